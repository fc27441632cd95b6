"""Knowledge distillation: a small student learns from a large teacher's distributions.

Run it with `orchard distill TEACHER --student CONFIG_OR_CKPT [RECIPE.yaml] [key=value ...]`; with
no data it distils on the built-in world's documents. Read top to bottom, a run is:

1. the teacher (a checkpoint) and its tokenizer, which the student must share;
2. the student: a checkpoint to continue, a fresh model from a config file (a YAML of model
   fields), or `student_layers=[...]`, a fresh model made of some of the teacher's layers with its
   embeddings and final norm (as DistilBERT starts from every other layer of BERT);
3. the data: a text corpus cut into packed windows, exactly as pretraining reads it (`data.*`);
4. by `mode`, the teacher's side of the loss:
   - offline: the teacher runs once over the data and its top-k log-probabilities are stored
     beside the tokenized corpus (`teacher_cache`); every later student with the same teacher,
     data and k trains from that file without loading the teacher;
   - online: the teacher sits beside the student and scores each batch, with all its logits
     (and hidden states, for `hidden_weight`);
   - on_policy: as online, but a `lmbda` fraction of the batches are the student's own
     continuations of the windows' first `prompt_tokens` tokens, scored by the teacher (GKD);
   - sequence: the teacher answers the prompts (`prompts.*`), and the student is fine-tuned on
     those answers as on conversations (sequence-level KD, Kim & Rush 2016);
5. the shared engine, with the loss of `orchard.losses.distillation`: `alpha` x the divergence (forward KL,
   reverse KL or generalised JSD at `temperature`) + (1 - alpha) x the data's cross-entropy, plus
   `hidden_weight` x the projected hidden-state error; validated by the student's loss and bits per
   byte and by all three divergences from the teacher on held-out windows, side by side.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..checkpoint import (load_checkpoint, load_merged, read_model_config, read_record, resolve_checkpoint,
                          weights_sha256)
from ..config import load_config, to_dict
from ..data.packing import EpochOrder, PackedSequences, micro_batch_samples, split_tokens
from ..data.synthetic import answer_matches, write_jsonl
from ..data.text import TextDataConfig, corpus_paths
from ..data.tokens import build_token_cache
from ..errors import OrchardError
from ..evaluation.language_modeling import evaluate_language_modeling
from ..files import read_json, remove_stale_temporaries, temporary_path, write_json
from ..lineage import new_record
from ..losses.distillation import SparseTeacher, distillation_loss, forward_kl, generalized_jsd, hidden_state_loss, \
    reverse_kl, top_k_teacher
from ..losses.tokens import IGNORE_INDEX
from ..model import CausalLM, ModelConfig
from ..model.generation import SamplingConfig, generate
from ..tokenizer import Tokenizer
from ..training import TrainConfig, Trainer, TrainResult
from ..training.run_directory import open_run
from ..training.objectives import ConversationLanguageModeling, tokenize_conversations
from ..training.runtime import Runtime
from .rollouts import PromptDataConfig, load_prompts, turn_end_ids

CACHE_PREFIX = "teacher-"
REPLIES_FILE = "teacher_replies.jsonl"


@dataclass
class DistillConfig:
    teacher: str | None = None
    """The teacher checkpoint (orchard's, or a Hugging Face model directory)."""
    student: str | None = None
    """The student: a checkpoint to continue from, or a .yaml/.json file of model fields (hidden_size,
    num_hidden_layers, ...) for a fresh one; its vocabulary is the teacher's tokenizer's."""
    student_layers: list[int] | None = None
    """Instead of `student`: a fresh student with the teacher's architecture made of these teacher
    layers (0-based), its embeddings and its final norm, e.g. [0, 2] of a 4-layer teacher."""
    out: str = "runs/distill"
    """Run directory. Running again resumes it."""
    mode: Literal["offline", "online", "on_policy", "sequence"] = "offline"
    """offline: train from the teacher's cached top-k log-probabilities; online: teacher and student in
    one process; on_policy: online plus the student's own continuations (GKD); sequence: fine-tune
    on the teacher's answers to `prompts`."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl: KL(teacher || student), Hinton's soft labels; reverse_kl: KL(student || teacher),
    mode-seeking (MiniLLM); jsd: generalised Jensen-Shannon with `beta` (GKD)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the divergence (scaled back by T^2)."""
    alpha: float = 0.5
    """Weight of the divergence; 1 - alpha weighs the cross-entropy with the data's next tokens."""
    beta: float = 0.5
    """The generalised JSD's interpolation (0: forward KL, 1: reverse KL, as TRL's GKD)."""
    top_k: int = 32
    """Teacher log-probabilities kept per token in the offline cache (renormalised over those k)."""
    hidden_weight: float = 0.0
    """Weight of hidden-state alignment (online and on_policy modes): each student layer's output,
    projected to the teacher's width when they differ, against the teacher layer it is matched to."""
    hidden_layers: list[int] | None = None
    """The teacher layer (1-based) each student layer is matched to; None spreads them evenly
    (student layer j of S to teacher layer round(j * T / S))."""
    lmbda: float = 0.5
    """on_policy: fraction of batches that are the student's own continuations (GKD's lambda)."""
    prompt_tokens: int = 32
    """on_policy: tokens of a window the student continues from."""
    max_new_tokens: int = 64
    """on_policy: tokens the student writes; sequence: longest teacher answer."""
    sampling_temperature: float = 1.0
    """Temperature of sampled sequences (the student's in on_policy, the teacher's in sequence); 0 is
    greedy."""
    samples_per_prompt: int = 1
    """sequence: teacher answers per prompt."""
    keep_only_correct: bool = False
    """sequence: keep only answers that match the prompt's reference answer (where it has one)."""
    reasoning: Literal["keep", "strip"] = "keep"
    """sequence: keep the teacher's <think>...</think> reasoning in the targets, or train on the
    answers alone."""
    max_train_windows: int | None = None
    """Use only the first this many training windows (so an offline cache holds only what is used)."""
    data: TextDataConfig = field(default_factory=lambda: TextDataConfig(val_fraction=0.05))
    prompts: PromptDataConfig = field(default_factory=PromptDataConfig)
    """sequence mode's prompts (the built-in world's questions by default)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, lr=2e-3, warmup_steps=30))

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        for name in ("alpha", "beta", "lmbda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("top_k", "prompt_tokens", "max_new_tokens", "samples_per_prompt"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must not be negative, got {self.hidden_weight}")
        if self.sampling_temperature < 0:
            raise ValueError(f"sampling_temperature must not be negative, got {self.sampling_temperature}")
        if self.max_train_windows is not None and self.max_train_windows <= 0:
            raise ValueError(f"max_train_windows must be positive, got {self.max_train_windows}")


# --- teacher and student ---------------------------------------------------------------------------

class Teacher:
    """The teacher checkpoint, whose weights are loaded only when something needs them: a student
    training from an existing offline cache never loads them."""

    def __init__(self, path: str):
        self.path = resolve_checkpoint(path)
        self._checkpoint = None
        self.loaded = False
        """Whether this run has loaded the weights."""
        self.record = read_record(self.path)
        plain = (self.path / "config.json").is_file() and (self.path / "tokenizer.json").is_file()
        self.config = read_model_config(self.path) if plain else self.checkpoint.model.config
        self.tokenizer = Tokenizer.load(self.path) if plain else self.checkpoint.tokenizer

    @property
    def checkpoint(self):
        if self._checkpoint is None:
            self._checkpoint = load_checkpoint(self.path)
            self.loaded = True
        return self._checkpoint

    def release(self) -> None:
        """Give the weights' memory back (after the offline cache is built)."""
        self._checkpoint = None

    @property
    def model(self) -> CausalLM:
        return self.checkpoint.model

    @property
    def weights_sha256(self) -> str:
        return self.record.get("weights_sha256") or weights_sha256(self.path)

    def forward_flops_per_token(self) -> float:
        return 2.0 * (self.config.num_parameters(False) + self.config.vocab_size * self.config.hidden_size)


def build_student(config: DistillConfig, teacher: Teacher, seq_len: int) -> tuple[CausalLM, str | None]:
    """(student model, the checkpoint it continues or None), checked against the teacher's tokenizer."""
    given = [name for name in ("student", "student_layers") if getattr(config, name)]
    if len(given) != 1:
        raise OrchardError("student: give exactly one of student=CHECKPOINT_OR_CONFIG and student_layers=[...]")
    tokenizer = teacher.tokenizer
    if config.student_layers:
        return student_from_layers(teacher.model, config.student_layers), None
    source = Path(config.student)
    if source.suffix in (".yaml", ".yml", ".json") and source.is_file():
        model_config = load_config(ModelConfig, source, [])
        model_config.vocab_size = teacher.config.vocab_size
        model_config.bos_token_id, model_config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        model_config.pad_token_id = tokenizer.pad_id
        model_config.max_position_embeddings = max(model_config.max_position_embeddings, seq_len)
        student = CausalLM(model_config)
        student.reset_parameters(seed=config.train.seed)
        return student, None
    checkpoint = load_merged(config.student)
    if checkpoint.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise OrchardError(f"student: {checkpoint.path} has another tokenizer than the teacher; distillation "
                           f"compares their distributions token by token, so they must share one")
    return checkpoint.model.float().train(), str(checkpoint.path)


def student_from_layers(teacher: CausalLM, layers: list[int]) -> CausalLM:
    """A fresh model of the teacher's architecture holding copies of `layers`, the embeddings and
    the final norm (DistilBERT's initialisation)."""
    count = teacher.config.num_hidden_layers
    if any(not 0 <= layer < count for layer in layers):
        raise OrchardError(f"student_layers: the teacher has layers 0..{count - 1}, got {layers}")
    student = CausalLM(replace(teacher.config, num_hidden_layers=len(layers)))
    state = {name: tensor for name, tensor in teacher.state_dict().items() if not name.startswith("model.layers.")}
    for position, layer in enumerate(layers):
        for name, tensor in teacher.model.layers[layer].state_dict().items():
            state[f"model.layers.{position}.{name}"] = tensor
    student.load_state_dict({k: v.detach().clone().float() for k, v in state.items()})
    return student


def quarter_width_config(teacher: ModelConfig) -> ModelConfig:
    """The teacher's architecture at half the width (hidden size, MLP and heads, same head size) and
    the same depth, its MLP trimmed to a multiple of 8 so that the student has at most a quarter of
    the teacher's non-embedding parameters (the usual student)."""
    heads = max(1, teacher.num_attention_heads // 2)
    student = replace(teacher, hidden_size=teacher.hidden_size // 2, num_attention_heads=heads,
                      num_key_value_heads=max(1, min(heads, teacher.num_key_value_heads // 2)),
                      head_dim=teacher.resolved_head_dim, intermediate_size=teacher.intermediate_size // 16 * 8)
    while student.num_parameters(False) > teacher.num_parameters(False) / 4 and student.intermediate_size > 8:
        student.intermediate_size -= 8
    return student


def write_student_config(config: ModelConfig, path: str | Path) -> Path:
    """`config`'s architecture as the YAML `student=` reads (the vocabulary and special ids come
    from the teacher's tokenizer, so they are left out)."""
    import dataclasses

    import yaml

    tokenizer_fields = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "num_labels"}
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in tokenizer_fields}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False), encoding="utf-8")
    return path


def matched_layers(config: DistillConfig, student_layers: int, teacher_layers: int) -> list[int]:
    if config.hidden_layers is None:
        return [round((j + 1) * teacher_layers / student_layers) for j in range(student_layers)]
    if len(config.hidden_layers) != student_layers or not all(1 <= t <= teacher_layers for t in config.hidden_layers):
        raise OrchardError(f"hidden_layers: need {student_layers} teacher layers in 1..{teacher_layers} (one per "
                           f"student layer), got {config.hidden_layers}")
    return list(config.hidden_layers)


def parameter_summary(teacher: ModelConfig, student: ModelConfig) -> dict:
    t, s = teacher.num_parameters(False), student.num_parameters(False)
    return {"teacher_non_embedding": t, "student_non_embedding": s, "non_embedding_ratio": round(s / t, 4),
            "teacher_total": teacher.num_parameters(), "student_total": student.num_parameters()}


# --- the offline cache -----------------------------------------------------------------------------

@dataclass
class TeacherCache:
    """The teacher's top-k (ids, log-probabilities) for every position of every window of a split,
    memory-mapped: `ids[split]` and `log_probs[split]` are (windows, seq_len, k)."""

    directory: Path
    ids: dict[str, np.ndarray]
    log_probs: dict[str, np.ndarray]
    meta: dict

    def teacher(self, split: str, windows) -> SparseTeacher:
        index = np.asarray(list(windows))
        return SparseTeacher(ids=torch.from_numpy(self.ids[split][index].astype(np.int64)),
                             log_probs=torch.from_numpy(self.log_probs[split][index].astype(np.float32)))


def cache_directory(token_cache_dir: Path, teacher_sha: str, k: int, seq_len: int, windows: dict[str, int],
                    precision: str) -> Path:
    """Beside the tokenized corpus, named by what its content depends on."""
    key = hashlib.sha256(json.dumps([teacher_sha, k, seq_len, windows, precision]).encode()).hexdigest()[:16]
    return token_cache_dir / f"{CACHE_PREFIX}{key}"


def open_teacher_cache(directory: Path) -> TeacherCache | None:
    """The cache in `directory`, or None when there is none. One that cannot be read as what
    `build_teacher_cache` writes (plain .npy arrays, never pickled objects) is removed, to be built
    again: it is orchard's own, in orchard's cache."""
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = read_json(meta_file)
        ids = {split: np.load(directory / f"{split}.ids.npy", mmap_mode="r", allow_pickle=False)
               for split in meta["windows"]}
        log_probs = {split: np.load(directory / f"{split}.log_probs.npy", mmap_mode="r", allow_pickle=False)
                     for split in meta["windows"]}
    except (OrchardError, OSError, ValueError, KeyError, TypeError) as problem:
        print(f"{directory}: unreadable teacher cache ({problem}); building it again", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return TeacherCache(directory, ids, log_probs, meta)


@torch.no_grad()
def build_teacher_cache(directory: Path, teacher: Teacher, splits: dict[str, PackedSequences],
                        windows: dict[str, int], k: int, batch_size: int, runtime: Runtime) -> TeacherCache:
    """Run the teacher once over `windows[split]` windows of each split and store its top-k; written
    in a temporary directory and renamed into place, so a killed build is never mistaken for one."""
    from tqdm import tqdm

    remove_stale_temporaries(directory.parent, directory.name)
    tmp = temporary_path(directory)
    tmp.mkdir(parents=True)
    model = teacher.model.to(runtime.device).eval()
    id_dtype = np.uint16 if teacher.config.vocab_size <= 65535 else np.int32
    started, tokens = time.perf_counter(), 0
    seq_len = next(iter(splits.values())).seq_len
    total = sum(windows.values())
    bar = tqdm(total=total * seq_len, unit="tok", unit_scale=True, desc="teacher top-k cache", file=sys.stderr,
               disable=not sys.stderr.isatty())
    try:
        for split, sequences in splits.items():
            count = windows[split]
            ids = np.lib.format.open_memmap(tmp / f"{split}.ids.npy", "w+", id_dtype, (count, seq_len, k))
            log_probs = np.lib.format.open_memmap(tmp / f"{split}.log_probs.npy", "w+", np.float16, (count, seq_len, k))
            for start in range(0, count, batch_size):
                batch = sequences.batch(range(start, min(start + batch_size, count)))
                with runtime.autocast():
                    logits = model(batch["input_ids"].to(runtime.device)).logits
                top = top_k_teacher(logits.float(), k)
                ids[start:start + len(top.ids)] = top.ids.cpu().numpy().astype(id_dtype)
                log_probs[start:start + len(top.ids)] = top.log_probs.cpu().numpy().astype(np.float16)
                tokens += batch["input_ids"].numel()
                bar.update(batch["input_ids"].numel())
            ids.flush()
            log_probs.flush()
        bar.close()
        seconds = time.perf_counter() - started
        stored = sum(f.stat().st_size for f in tmp.glob("*.npy"))
        write_json(tmp / "meta.json", {
            "teacher": str(teacher.path), "teacher_weights_sha256": teacher.weights_sha256,
            "k": k, "seq_len": seq_len, "windows": windows, "tokens": tokens, "precision": runtime.precision,
            "bytes": stored, "bytes_per_token": stored / max(tokens, 1),
            "build_seconds": round(seconds, 2), "build_flops": teacher.forward_flops_per_token() * tokens})
        if directory.exists():  # another process finished the same cache first
            shutil.rmtree(tmp)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_teacher_cache(directory)


# --- the engine's view -----------------------------------------------------------------------------

class Distillation:
    """Batches of packed windows with the teacher's side of the loss: from the cache (offline) or
    from the teacher itself (online, on_policy)."""

    name = "distill"

    def __init__(self, config: DistillConfig, train: PackedSequences, val: PackedSequences, num_train: int,
                 num_val: int, token_bytes, student: CausalLM, teacher: CausalLM | None,
                 cache: TeacherCache | None, end_ids: list[int], pad_id: int, runtime: Runtime):
        self.config, self.train, self.val = config, train, val
        self.num_val, self.token_bytes = num_val, token_bytes
        self.student, self.teacher, self.cache = student, teacher, cache
        self.end_ids, self.pad_id, self.runtime = end_ids, pad_id, runtime
        self.order = EpochOrder(num_train, config.train.seed)
        self.trainable_modules = None
        if config.hidden_weight > 0:
            self.layer_map = matched_layers(config, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
            widths = (student.config.hidden_size, teacher.config.hidden_size)
            generator = torch.Generator().manual_seed(config.train.seed)
            self.trainable_modules = nn.ModuleList(
                [nn.Linear(*widths, bias=False) if widths[0] != widths[1] else nn.Identity() for _ in self.layer_map])
            for projection in self.trainable_modules:
                if isinstance(projection, nn.Linear):
                    with torch.no_grad():
                        projection.weight.copy_(torch.empty(projection.weight.shape).normal_(
                            0.0, projection.in_features ** -0.5, generator=generator))

    def _on_policy(self, step: int, micro: int) -> bool:
        if self.config.mode != "on_policy":
            return False
        return random.Random(f"{self.config.train.seed}:{step}:{micro}").random() < self.config.lmbda

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        c = self.config.train
        windows = [self.order[s] for s in micro_batch_samples(step, micro, rank, world, c.batch_size, c.grad_accum)]
        batch = self.train.batch(windows)
        if self.cache is not None:
            sparse = self.cache.teacher("train", windows)
            batch["teacher_ids"], batch["teacher_log_probs"] = sparse.ids, sparse.log_probs
        if self._on_policy(step, micro):
            seed = c.seed * 1_000_003 + (step * c.grad_accum + micro) * 1009 + rank
            batch = self.student_continuations(batch["input_ids"][:, :self.config.prompt_tokens], seed)
        return batch

    @torch.no_grad()
    def student_continuations(self, prompts: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """The student's continuations of `prompts`, laid out as a batch whose labels are only the
        generated tokens (the divergence is taken where the student wrote)."""
        was_training = self.student.training
        self.student.eval()
        sampling = SamplingConfig(max_new_tokens=self.config.max_new_tokens,
                                  temperature=self.config.sampling_temperature, top_p=1.0, seed=seed)
        with self.runtime.autocast():
            completions = generate(self.student, prompts.tolist(), sampling, self.end_ids, self.pad_id)
        self.student.train(was_training)
        P, C = prompts.shape[1], max(1, max(len(c) for c in completions))
        input_ids = torch.full((len(prompts), P + C), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        input_ids[:, :P], attention_mask[:, :P] = prompts, 1
        for row, completion in enumerate(completions):
            if completion:
                input_ids[row, P:P + len(completion)] = torch.tensor(completion)
                attention_mask[row, P:P + len(completion)] = 1
                labels[row, P - 1:P - 1 + len(completion)] = torch.tensor(completion)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "on_policy": torch.ones(len(prompts), dtype=torch.bool)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def teacher_outputs(self, batch: dict[str, torch.Tensor], hidden: bool):
        with torch.no_grad():
            output = self.teacher(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  output_hidden_states=hidden)
        return output.logits, output.hidden_states

    def _teacher(self, batch):
        if "teacher_ids" in batch:
            return SparseTeacher(batch["teacher_ids"], batch["teacher_log_probs"]), None
        return self.teacher_outputs(batch, self.config.hidden_weight > 0)

    def loss(self, model, batch):
        c = self.config
        hidden = c.hidden_weight > 0
        teacher, teacher_hidden = self._teacher(batch)
        output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), output_hidden_states=hidden)
        logits = output.logits
        if isinstance(teacher, torch.Tensor) and teacher.size(-1) != logits.size(-1):
            width = min(teacher.size(-1), logits.size(-1))  # a Hugging Face vocabulary padded to a round size
            teacher, logits = teacher[..., :width], logits[..., :width]
        # On-policy tokens were written by the student: there is no data token to imitate there.
        alpha = 1.0 if "on_policy" in batch else c.alpha
        total, parts = distillation_loss(logits, teacher, batch["labels"], divergence=c.divergence,
                                         temperature=c.temperature, alpha=alpha, beta=c.beta)
        metrics = {"kd_loss": float(parts["kd"]) / max(self.count(batch), 1),
                   "hard_loss": float(parts["ce"]) / max(self.count(batch), 1)}
        if hidden:
            mask = batch["labels"] != IGNORE_INDEX
            hidden_total = sum(hidden_state_loss(output.hidden_states[j + 1], teacher_hidden[t], mask,
                                                 projection if isinstance(projection, nn.Linear) else None)
                               for j, (t, projection) in enumerate(zip(self.layer_map, self.trainable_modules)))
            total = total + c.hidden_weight * hidden_total
            metrics["hidden_loss"] = float(hidden_total.detach()) / max(self.count(batch), 1)
        return total, metrics

    def evaluate(self, model: CausalLM) -> dict[str, float]:
        c = self.config
        metrics = evaluate_language_modeling(model, self.val, self.token_bytes, c.train.batch_size,
                                             max_sequences=self.num_val)
        sums, tokens = {"forward_kl": 0.0, "reverse_kl": 0.0, "jsd": 0.0}, 0
        device = next(model.parameters()).device
        for start in range(0, self.num_val, c.train.batch_size):
            windows = range(start, min(start + c.train.batch_size, self.num_val))
            batch = {k: v.to(device) for k, v in self.val.batch(windows).items()}
            if self.cache is not None:
                sparse = self.cache.teacher("val", windows)
                teacher = SparseTeacher(sparse.ids.to(device), sparse.log_probs.to(device))
            else:
                teacher, _ = self.teacher_outputs(batch, hidden=False)
            logits = model(batch["input_ids"]).logits
            sums["forward_kl"] += forward_kl(logits, teacher, batch["labels"]).item()
            sums["reverse_kl"] += reverse_kl(logits, teacher, batch["labels"]).item()
            sums["jsd"] += generalized_jsd(logits, teacher, batch["labels"], beta=c.beta).item()
            tokens += batch["labels"].numel()
        metrics.update({f"val_{name}": value / max(tokens, 1) for name, value in sums.items()})
        return metrics


# --- sequence-level distillation -------------------------------------------------------------------

def teacher_replies(config: DistillConfig, teacher: Teacher, out: Path, runtime: Runtime) -> tuple[Path, dict]:
    """The teacher's answers to the training prompts as conversations in `out/teacher_replies.jsonl`,
    reused while the teacher, prompts and sampling settings are the same."""
    tokenizer = teacher.tokenizer
    prompts, _, prompt_record = load_prompts(config.prompts, tokenizer, config.train.seed)
    settings = {"teacher_weights_sha256": teacher.weights_sha256,
                "prompts": hashlib.sha256(str([p.ids for p in prompts]).encode()).hexdigest(),
                "temperature": config.sampling_temperature, "samples": config.samples_per_prompt,
                "max_new_tokens": config.max_new_tokens, "keep_only_correct": config.keep_only_correct,
                "reasoning": config.reasoning, "seed": config.train.seed}
    target, meta_file = out / REPLIES_FILE, out / (REPLIES_FILE + ".meta.json")
    if target.is_file() and meta_file.is_file():
        try:
            meta = read_json(meta_file)
        except OrchardError:
            meta = {}  # unreadable: made again
        if meta.get("settings") == settings:
            return target, meta
    from tqdm import tqdm

    model = teacher.model.to(runtime.device).eval()
    end_ids = turn_end_ids(tokenizer)
    records, rejected, started = [], 0, time.perf_counter()
    batch_size = 32
    expanded = [p for p in prompts for _ in range(config.samples_per_prompt)]
    for start in tqdm(range(0, len(expanded), batch_size), desc="teacher answers", unit="batch", file=sys.stderr,
                      disable=not sys.stderr.isatty()):
        chunk = expanded[start:start + batch_size]
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.sampling_temperature,
                                  top_p=1.0, seed=config.train.seed + start)
        with torch.no_grad(), runtime.autocast():
            completions = generate(model, [p.ids for p in chunk], sampling, end_ids, tokenizer.pad_id)
        for prompt, completion in zip(chunk, completions):
            reply = tokenizer.decode(completion).strip()
            if config.reasoning == "strip":
                reply = re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL).strip()
            if not reply or (config.keep_only_correct and prompt.answer is not None
                             and not answer_matches(reply, prompt.answer)):
                rejected += 1
                continue
            records.append({"messages": [*prompt.messages, {"role": "assistant", "content": reply}]})
    if not records:
        raise OrchardError("prompts: the teacher gave no usable answer (keep_only_correct rejected all of them?)")
    meta = {"settings": settings, "prompts": prompt_record, "answers": len(records), "rejected": rejected,
            "seconds": round(time.perf_counter() - started, 2)}
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, records)
    write_json(meta_file, meta)
    return target, meta


def run_sequence_level(config: DistillConfig, teacher: Teacher, runtime: Runtime) -> TrainResult:
    """Sequence-level KD: the teacher writes answers once; the student is fine-tuned on them exactly as
    `orchard sft` fine-tunes on conversations."""
    tokenizer = teacher.tokenizer
    with runtime.distributed.rank_zero_first():
        replies, meta = teacher_replies(config, teacher, Path(config.out), runtime)
    student, student_init = build_student(config, teacher, config.data.seq_len)
    summary = parameter_summary(teacher.config, student.config)
    records = [json.loads(line) for line in replies.read_text(encoding="utf-8").splitlines()]
    # As `orchard sft` with its defaults: every assistant turn supervised, old turns dropped first.
    examples, too_long = tokenize_conversations([{"messages": r["messages"], "source": f"{replies}:{i + 1}"}
                                                 for i, r in enumerate(records)], tokenizer, config.data.seq_len,
                                                "all_assistant", "truncate_prompt")
    random.Random(config.train.seed).shuffle(examples)
    num_val = max(1, int(len(examples) * 0.05))
    method = ConversationLanguageModeling(examples[num_val:], examples[:num_val], tokenizer.pad_id, config.data.seq_len,
                                          True, config.train, name="distill-sequence")
    data_record = {"source": str(replies), "answers": meta["answers"], "rejected": meta["rejected"],
                   "skipped_too_long": too_long, "teacher_seconds": meta["seconds"], "teacher_loaded": teacher.loaded}
    return _train(config, student, method, tokenizer, data_record, summary, student_init, runtime,
                  stage="distill-sequence")


# --- the run ---------------------------------------------------------------------------------------

def _train(config: DistillConfig, student: CausalLM, method, tokenizer, data_record: dict, summary: dict,
           student_init: str | None, runtime: Runtime, stage: str, extra_flops: float = 0.0) -> TrainResult:
    recipe = to_dict(config)
    record = new_record(stage, recipe, data_record, parent=config.teacher)
    record["parameters"] = summary
    if student_init:
        record["student_init"] = student_init
    flops = student.config.training_flops_per_token(config.data.seq_len) + extra_flops
    trainer = Trainer(config.train, student, method, tokenizer, Path(config.out), record, flops_per_token=flops,
                      runtime=runtime)
    return trainer.fit()


def run(config: DistillConfig) -> TrainResult:
    with open_run(config.out, "distill", to_dict(config)):
        return _run(config)


def _run(config: DistillConfig) -> TrainResult:
    if not config.teacher:
        raise OrchardError("teacher: distill needs a teacher checkpoint, e.g. orchard distill runs/big/final "
                           "--student student.yaml")
    runtime = Runtime.create(config.train.device, config.train.precision)
    teacher = Teacher(config.teacher)
    if config.mode == "sequence":
        return run_sequence_level(config, teacher, runtime)
    if config.hidden_weight > 0 and config.mode == "offline":
        raise OrchardError("hidden_weight: hidden-state alignment needs the teacher's hidden states, which the "
                           "offline cache does not keep; use mode=online or mode=on_policy")
    tokenizer = teacher.tokenizer

    with runtime.distributed.rank_zero_first():
        paths = corpus_paths(config.data)
        token_cache = build_token_cache(paths, tokenizer, config.data.text_field,
                                        show_progress=sys.stderr.isatty() and runtime.distributed.rank == 0)
    where = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    train_tokens, val_tokens = split_tokens(token_cache.tokens, config.data.val_fraction, config.data.seq_len, where)
    train, val = PackedSequences(train_tokens, config.data.seq_len), PackedSequences(val_tokens, config.data.seq_len)
    num_train = min(len(train), config.max_train_windows or len(train))
    num_val = min(len(val), config.train.eval_batches * config.train.batch_size)
    student, student_init = build_student(config, teacher, config.data.seq_len)
    if student.config.max_position_embeddings < config.data.seq_len:
        raise OrchardError(f"data.seq_len: {config.data.seq_len} exceeds the student's "
                           f"{student.config.max_position_embeddings} positions")

    cache, cache_record, teacher_model, teacher_flops = None, None, None, 0.0
    if config.mode == "offline":
        windows = {"train": num_train, "val": num_val}
        directory = cache_directory(token_cache.directory, teacher.weights_sha256, config.top_k, config.data.seq_len,
                                    windows, runtime.precision)
        with runtime.distributed.rank_zero_first():
            cache = open_teacher_cache(directory)
            built_now = cache is None
            if built_now:
                print(f"caching the teacher's top-{config.top_k} log-probabilities of {num_train + num_val} windows "
                      f"in {directory}", file=sys.stderr)
                cache = build_teacher_cache(directory, teacher, {"train": train, "val": val}, windows, config.top_k,
                                            2 * config.train.batch_size, runtime)
                teacher.release()
        cache_record = {"path": str(cache.directory), "built_now": built_now,
                        **{k: cache.meta[k] for k in ("k", "tokens", "bytes", "bytes_per_token", "build_seconds",
                                                      "build_flops")}}
    else:
        teacher_model = teacher.model.to(runtime.device).eval().requires_grad_(False)
        teacher_flops = teacher.forward_flops_per_token()  # one teacher forward pass per training token

    method = Distillation(config, train, val, num_train, num_val, tokenizer.token_byte_lengths(), student,
                          teacher_model, cache, turn_end_ids(tokenizer), tokenizer.pad_id, runtime)
    data_record = {"paths": [str(p) for p in paths], "fingerprint": token_cache.fingerprint,
                   "train_windows": num_train, "val_windows": num_val, "seq_len": config.data.seq_len,
                   "teacher_loaded": teacher.loaded}
    if cache_record:
        data_record["teacher_cache"] = cache_record
    summary = parameter_summary(teacher.config, student.config)
    return _train(config, student, method, tokenizer, data_record, summary, student_init, runtime,
                  stage=f"distill-{config.mode.replace('_', '-')}", extra_flops=teacher_flops)
