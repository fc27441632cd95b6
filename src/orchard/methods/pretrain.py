"""Pretraining: next-token prediction on packed text, from scratch or from a checkpoint.

Run it with `orchard pretrain [RECIPE.yaml] [key=value ...]`; with no recipe and no data it trains
a small model on the built-in synthetic world. Read top to bottom, a run is:

1. the tokenizer: `tokenizer.path`, the `init` checkpoint's, or one trained on the corpus;
2. the corpus tokenized once into a cached memory-mapped stream, split by position;
3. the model: `init`'s weights or a fresh `model` config;
4. the shared engine, with this module's batches (packed windows) and loss (summed token
   cross-entropy), validated by loss, perplexity and bits per byte.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..checkpoint import (inference_only_error, is_quantized_checkpoint, load_checkpoint, read_record,
                          resolve_checkpoint)
from ..config import to_dict
from ..data.corpus import iter_text_chunks
from ..data.packing import PackedSequences, split_tokens
from ..data.text import TextDataConfig, corpus_paths
from ..data.tokens import build_token_cache
from ..errors import OrchardError
from ..files import atomic_directory
from ..lineage import new_record
from ..model import CausalLM, ModelConfig
from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer
from ..training import TrainConfig, Trainer, TrainResult, training_runtime
from ..training.objectives import PackedLanguageModeling
from ..training.run_directory import open_run, read_run_file, record_in_run_file


@dataclass
class TokenizerConfig:
    path: str | None = None
    """An existing tokenizer (a tokenizer.json or a directory holding one); None trains one."""
    vocab_size: int = 4096
    """Vocabulary size of a tokenizer trained here (special tokens included)."""
    train_bytes: int = 50_000_000
    """At most this many bytes of the corpus (from its start) train the tokenizer."""

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"tokenizer.vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes and the special "
                             f"tokens), got {self.vocab_size}")
        if self.train_bytes <= 0:
            raise ValueError(f"tokenizer.train_bytes must be positive, got {self.train_bytes}")


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"
    """Run directory: checkpoints, metrics.jsonl, the tokenizer. Running again resumes it."""
    init: str | None = None
    """Start from this checkpoint's weights and tokenizer instead of a fresh model."""
    init_trainable: Literal["all", "new"] = "all"
    """Which of init's weights train: all, or only the blocks `orchard grow` inserted (the
    new_parameters its record lists; LLaMA Pro trains only those, so the old blocks keep what they
    know). "new" needs init to be a grown checkpoint with inserted blocks."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of a fresh model (ignored with init); vocab_size comes from the tokenizer."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000))


def prepare_tokenizer(config: PretrainConfig, paths: list[Path], run_dir: Path) -> Tokenizer:
    """The run's tokenizer, saved in the run directory so a resumed run uses the very same one.

    It is written whole (a temporary directory renamed into place) and its fingerprint goes into the
    run's run.json; a saved tokenizer is reused only when it is that one, so a run killed while the
    tokenizer was written, or a tokenizer/ put there by hand, is never taken for the run's."""
    saved = run_dir / "tokenizer"
    recorded = read_run_file(run_dir).get("tokenizer_fingerprint")
    if recorded and (saved / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.load(saved)
        except OrchardError as problem:
            print(f"{saved} is unreadable ({problem}); making it again", file=sys.stderr)
        else:
            if tokenizer.fingerprint() == recorded:
                return tokenizer
            print(f"{saved} is not the tokenizer this run recorded; making it again", file=sys.stderr)
    if config.init:
        tokenizer = load_checkpoint(config.init).tokenizer
    elif config.tokenizer.path:
        tokenizer = Tokenizer.load(config.tokenizer.path)
    else:
        print(f"training a {config.tokenizer.vocab_size}-token tokenizer on {len(paths)} file(s)", file=sys.stderr)
        chunks = (text for text, _ in iter_text_chunks(paths, config.data.text_field))
        tokenizer = Tokenizer.train(_leading_bytes(chunks, config.tokenizer.train_bytes),
                                    vocab_size=config.tokenizer.vocab_size)
    atomic_directory(saved, tokenizer.save)
    record_in_run_file(run_dir, tokenizer_fingerprint=tokenizer.fingerprint())
    return tokenizer


def _leading_bytes(texts, limit: int):
    total = 0
    for text in texts:
        yield text
        total += len(text.encode("utf-8"))
        if total >= limit:
            return


def init_checkpoint(config: PretrainConfig) -> Path | None:
    """The `init` checkpoint, refused if it is quantized: its layers hold int8/int4 codes as buffers,
    which would silently not train (one-line error naming its parent, as every training stage gives);
    with init_trainable=new, refused unless it is grown with new blocks (see `new_parameters`)."""
    if not config.init:
        if config.init_trainable == "new":
            raise OrchardError("init_trainable: 'new' trains the blocks `orchard grow` inserted; set init to the "
                               "grown checkpoint")
        return None
    path = resolve_checkpoint(config.init)
    if is_quantized_checkpoint(path):
        raise inference_only_error(path, "train from")
    if config.init_trainable == "new":
        new_parameters(path)
    return path


def new_parameters(path: Path) -> list[str]:
    """The parameters `orchard grow` inserted into the checkpoint `path`, as its record lists them;
    a one-line error if it is no grown checkpoint or lists none (width-only growth makes no whole
    new parameters: its new weights sit inside the old tensors)."""
    record = read_record(path)
    if record.get("stage") != "grow":
        raise OrchardError(f"init_trainable: 'new' needs init to be made by `orchard grow`; {path} was made by "
                           f"{record.get('stage') or 'something else'}")
    names = record.get("new_parameters")
    if not isinstance(names, list) or not names:
        raise OrchardError(f"init_trainable: {path} has no new blocks to train alone (it grew in width only); "
                           f"use init_trainable=all")
    return names


def freeze_all_but(model: CausalLM, names: list[str], where: Path) -> None:
    """Train only the parameters `names`; the engine leaves the frozen rest out of the optimizer."""
    parameters = dict(model.named_parameters())
    missing = [name for name in names if name not in parameters]
    if missing:
        raise OrchardError(f"{where}: its record lists {missing[0]}, which the model does not have")
    model.requires_grad_(False)
    for name in names:
        parameters[name].requires_grad_(True)


def build_model(config: PretrainConfig, tokenizer: Tokenizer, sharded: bool = False) -> tuple[CausalLM, str | None]:
    """The model to train and the checkpoint it starts from (None: a fresh one). A fresh model that
    will be sharded is built on the meta device: the engine gives each process only its shards."""
    init = init_checkpoint(config)
    if init is not None:
        checkpoint = load_checkpoint(init)
        # Train fp32 master weights even from a bf16 checkpoint; autocast handles the speed.
        model = checkpoint.model.float().train()
        if config.init_trainable == "new":
            freeze_all_but(model, new_parameters(checkpoint.path), checkpoint.path)
        return model, str(checkpoint.path)
    model_config = config.model
    model_config.vocab_size = tokenizer.vocab_size
    model_config.bos_token_id, model_config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    model_config.pad_token_id = tokenizer.pad_id
    if model_config.max_position_embeddings < config.data.seq_len:
        model_config.max_position_embeddings = config.data.seq_len
    if sharded:
        with torch.device("meta"):
            return CausalLM(model_config), None
    model = CausalLM(model_config)
    model.reset_parameters(seed=config.train.seed)
    return model, None


def check_model_fits(config: PretrainConfig) -> None:
    """Refuse, before any work, a fresh model whose float32 weights alone exceed this machine's memory."""
    if config.init:
        return
    parameters = replace(config.model, vocab_size=config.tokenizer.vocab_size).num_parameters()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * parameters > memory:
        raise OrchardError(f"model: {parameters:,} parameters need {4 * parameters / 2**30:,.0f} GiB as float32 "
                           f"weights, more than this machine's {memory / 2**30:.0f} GiB of memory")


def run(config: PretrainConfig) -> TrainResult:
    run_dir = Path(config.out)
    # Before the tokenizer and the corpus are prepared for nothing:
    init_checkpoint(config)
    check_model_fits(config)
    with open_run(run_dir, "pretrain", to_dict(config)):
        return _run(config, run_dir)


def _run(config: PretrainConfig, run_dir: Path) -> TrainResult:
    runtime = training_runtime(config.train)
    with runtime.distributed.rank_zero_first():  # one process writes the tokenizer and caches, the rest read them
        paths = corpus_paths(config.data)
        tokenizer = prepare_tokenizer(config, paths, run_dir)
        cache = build_token_cache(paths, tokenizer, config.data.text_field,
                                  show_progress=sys.stderr.isatty() and runtime.distributed.rank == 0)
    where = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    train_tokens, val_tokens = split_tokens(cache.tokens, config.data.val_fraction, config.data.seq_len, where)
    model, parent = build_model(config, tokenizer, runtime.distributed.shards(config.train.parallel))
    if model.config.vocab_size < tokenizer.vocab_size:
        raise OrchardError(f"init: the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                           f"{model.config.vocab_size}")

    method = PackedLanguageModeling(PackedSequences(train_tokens, config.data.seq_len),
                                    PackedSequences(val_tokens, config.data.seq_len),
                                    tokenizer.token_byte_lengths(), config.train)
    data_record = {"paths": [str(p) for p in paths], "fingerprint": cache.fingerprint,
                   "tokens": len(cache), "train_tokens": len(train_tokens), "val_tokens": len(val_tokens),
                   "documents": cache.num_documents}
    counts = None
    if config.init_trainable == "new":
        counts = (sum(p.numel() for p in model.parameters() if p.requires_grad), model.num_parameters())
    record = new_record("pretrain", to_dict(config), data_record, parent=parent, parameters=counts)
    trainer = Trainer(config.train, model, method, tokenizer, run_dir, record,
                      flops_per_token=model.config.training_flops_per_token(config.data.seq_len),
                      runtime=runtime)
    return trainer.fit()
