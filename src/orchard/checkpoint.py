"""Checkpoint directories: what a trained model is on disk.

A checkpoint is a directory that Hugging Face tools can read as it is:

    config.json              the architecture (Hugging Face Llama/Qwen2/Qwen3 field names)
    model.safetensors        the weights (Hugging Face tensor names; a tied lm_head is omitted)
    tokenizer.json           the tokenizer, and tokenizer_config.json with its chat template
    generation_config.json   default sampling settings
    orchard.json             the lineage record: stage, parent, recipe, data, compute, metrics
    training_state.json      counters, optimizer settings and RNG of a resumable step checkpoint,
    training_state.safetensors   with the optimizer's tensors (no pickle: nothing read can run code)
    quantization.json        only in a quantized checkpoint (`orchard quantize`): which layers hold
                             int8/int4 codes in model.safetensors instead of a weight (see
                             `orchard.model.quantization`). Such a checkpoint is orchard's own, for
                             inference: transformers would load it with those layers missing.

Every write goes to a hidden temporary directory beside the target and is renamed into place
when complete, so a run killed at any moment leaves either the old checkpoint or the new one,
never half of one.

Loading reads Hugging Face model directories too (Llama, Qwen2, Qwen3, Mistral; weights in one
`model.safetensors` or in shards listed by `model.safetensors.index.json`), and Hub model ids, which
are downloaded into the Hugging Face cache. The weights are memory-mapped and become the model's
parameters without a copy, so loading a model costs little more memory than its weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import OrchardError
from .files import atomic_directory, file_sha256, read_json, write_json
from .model import CausalLM, ModelConfig
from .model.quantization import (apply_quantization_layout, prepare_quantized, quantization_settings,
                                 quantization_tensor_names)
from .tokenizer import Tokenizer

RECORD_FILE = "orchard.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TRAINING_STATE_FILE = "training_state.json"
TRAINING_TENSORS_FILE = "training_state.safetensors"
LEGACY_TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_SETTINGS_FILE = "adapters.json"
QUANTIZATION_FILE = "quantization.json"
PEFT_DIR = "peft"
FINAL_DIR = "final"
STEP_PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    model: CausalLM
    tokenizer: Tokenizer
    record: dict


def model_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Base weights under Hugging Face names, without the tied lm_head (as `transformers` saves
    them) and without adapters."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if not _is_adapter_tensor(name)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _is_adapter_tensor(name: str) -> bool:
    from .peft.settings import is_peft_tensor

    return is_peft_tensor(name)


def adapter_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """Every adapter tensor under its module path (`...q_proj.lora.default.A`), DoRA magnitudes
    included, and a trainable score head trained with them."""
    from .peft.settings import has_trained_head

    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
               if _is_adapter_tensor(name)}
    if tensors and has_trained_head(model):
        tensors.update({f"score.{name}": t.detach().contiguous() for name, t in model.score.state_dict().items()})
    return tensors


def is_adapter_checkpoint(path: Path) -> bool:
    return (path / ADAPTER_WEIGHTS_FILE).is_file() and (path / ADAPTER_SETTINGS_FILE).is_file()


def _write_adapters(tmp: Path, model: CausalLM, base: dict | None) -> str:
    """An adapter checkpoint: orchard's own file (exact, DoRA included) and, for plain LoRA, the
    same adapter in PEFT's format for transformers users. Returns the adapter file's hash."""
    from .peft.lora import save_adapter
    from .peft.settings import describe

    settings = describe(model)
    tensors = {k: v.to("cpu") for k, v in adapter_tensors(model).items()}
    save_file(tensors, tmp / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(tmp / ADAPTER_SETTINGS_FILE, settings)
    lora = settings.get("lora", {})
    if list(settings) == ["lora"] and len(lora) == 1 and not next(iter(lora.values()))["use_dora"]:
        save_adapter(model, next(iter(lora)), tmp / PEFT_DIR, base_model_name_or_path=(base or {}).get("path"))
    return file_sha256(tmp / ADAPTER_WEIGHTS_FILE)


def save_checkpoint(path: str | Path, model: CausalLM, tokenizer: Tokenizer, record: dict,
                    training_state: dict | None = None) -> Path:
    """Write a complete checkpoint directory atomically; returns its path."""
    path = Path(path)
    config = model.config
    quantization = quantization_settings(model)
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    generation_config = {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
        "max_new_tokens": 256,
    }

    def write(tmp: Path) -> None:
        if adapter_tensors(model):
            # The base is frozen and stays where it is: only the adapters are written, and the
            # record's parent says which base they belong to.
            sha = _write_adapters(tmp, model, record.get("parent"))
        else:
            write_json(tmp / "config.json", config.to_hf_dict(dtype))
            state = {k: v.to("cpu") for k, v in model_state_dict(model).items()}
            save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            sha = file_sha256(tmp / WEIGHTS_FILE)
            if quantization is not None:
                # Its own file, not a `quantization_config` in config.json, which transformers
                # would take for one of its own formats.
                write_json(tmp / QUANTIZATION_FILE, quantization)
        tokenizer.save(tmp)
        write_json(tmp / "generation_config.json", generation_config)
        write_json(tmp / RECORD_FILE, {**record, "weights_sha256": sha, "tokenizer_sha256": tokenizer.fingerprint()})
        if training_state is not None:
            write_training_state(tmp, training_state)

    atomic_directory(path, write)
    return path


def write_training_state(directory: Path, state: dict) -> None:
    """A resumable run's state (nested dicts, lists and tuples of numbers, strings and tensors, as an
    optimizer's state_dict is) as JSON plus one safetensors file for the tensors: formats that hold
    data only, so a training state planted in a shared run directory cannot run code when resumed."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            return {"tensor": key}
        if isinstance(value, dict):
            return {"dict": [[k, encode(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {type(value).__name__: [encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"training state {key}: cannot store a {type(value).__name__}")

    document = encode(state, "state")
    save_file(tensors, directory / TRAINING_TENSORS_FILE, metadata={"format": "pt"})
    write_json(directory / TRAINING_STATE_FILE, document)


def read_training_state(directory: Path, device: str | torch.device = "cpu") -> dict:
    """What `write_training_state` wrote; anything else (a missing or truncated file, a pickle left
    by an older orchard) is a one-line error naming the file."""
    if (directory / LEGACY_TRAINING_STATE_FILE).is_file() and not (directory / TRAINING_STATE_FILE).is_file():
        raise OrchardError(f"{directory / LEGACY_TRAINING_STATE_FILE}: a pickle written by an earlier orchard, which "
                           f"orchard does not load since a pickle can run code")
    document = read_json(directory / TRAINING_STATE_FILE)
    tensors = read_weights(directory / TRAINING_TENSORS_FILE)
    where = directory / TRAINING_STATE_FILE

    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            raise OrchardError(f"{where}: not a training state written by orchard")
        (kind, content), = value.items()
        try:
            if kind == "tensor":
                return tensors[content].to(device)
            if kind == "dict":
                return {k: decode(v) for k, v in content}
            if kind == "list":
                return [decode(v) for v in content]
            if kind == "tuple":
                return tuple(decode(v) for v in content)
        except (KeyError, TypeError, ValueError) as error:
            raise OrchardError(f"{where}: does not match {TRAINING_TENSORS_FILE} ({error!r})") from None
        raise OrchardError(f"{where}: not a training state written by orchard (unknown entry {kind!r})")

    state = decode(document)
    if not isinstance(state, dict):
        raise OrchardError(f"{where}: not a training state written by orchard")
    return state


def has_training_state(directory: Path) -> bool:
    return (directory / TRAINING_STATE_FILE).is_file() or (directory / LEGACY_TRAINING_STATE_FILE).is_file()


def is_checkpoint(path: Path) -> bool:
    weights = (path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file()
    return ((path / "config.json").is_file() and weights) or is_adapter_checkpoint(path)


def output_beside(source: str | Path, resolved: Path, suffix: str) -> Path:
    """Where a command that derives a checkpoint from `source` (quantize, grow) writes it without
    --out: beside the checkpoint, named NAME{suffix}; for a Hub model, in the working directory, never
    into the Hugging Face cache."""
    if Path(source).exists():
        return resolved.parent / f"{resolved.name}{suffix}"
    return Path(str(source).rstrip("/").rpartition("/")[2] + suffix)


def loaded_paths(path: Path) -> tuple[Path, ...]:
    """The directories that loading the checkpoint `path` reads, which a command's output must never
    replace: the checkpoint, and an adapter checkpoint's base."""
    parent = (read_record(path).get("parent") or {}).get("path") if is_adapter_checkpoint(path) else None
    return (path, Path(parent)) if parent else (path,)


def is_quantized_checkpoint(path: Path) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def read_quantization(path: Path) -> dict | None:
    """A checkpoint's quantization.json, or None when it is not quantized."""
    return read_json(path / QUANTIZATION_FILE) if is_quantized_checkpoint(path) else None


def inference_only_error(path: Path, purpose: str) -> OrchardError:
    """The one-line refusal to train, export or re-quantize a quantized checkpoint: `purpose` its parent."""
    parent = (read_record(path).get("parent") or {}).get("path")
    source = f"its parent {parent}" if parent else "the checkpoint it was quantized from"
    return OrchardError(f"{path}: a quantized checkpoint is for inference (eval, generate, chat); {purpose} "
                        f"{source}")


def step_checkpoints(run_dir: Path) -> list[Path]:
    """A run's periodic checkpoints (`step-000100`, ...), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its `final/`, else its latest step), or a Hugging Face
    Hub model id (its snapshot in the local cache, downloaded if need be)."""
    from .hub import resolve_model_path

    path = resolve_model_path(path)
    if is_checkpoint(path):
        return path
    if is_checkpoint(path / FINAL_DIR):
        return path / FINAL_DIR
    steps = step_checkpoints(path)
    if steps:
        return steps[-1]
    raise OrchardError(f"{path}: not a checkpoint (no config.json and {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})")


def read_record(path: Path) -> dict:
    record_file = path / RECORD_FILE
    return read_json(record_file) if record_file.is_file() else {}


def read_model_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    data = read_json(config_file)
    try:
        return ModelConfig.from_hf_dict(data)
    except (TypeError, ValueError) as error:
        raise OrchardError(f"{config_file}: {error}") from None


def weights_sha256(path: Path) -> str:
    """The hash of a checkpoint's weights: of `model.safetensors`, or of its shards' hashes."""
    files = weights_files(path)
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def weights_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: `model.safetensors`, or the shards its
    index lists (as `save_pretrained` writes large models)."""
    index_file = path / WEIGHTS_INDEX_FILE
    if (path / WEIGHTS_FILE).is_file() or not index_file.is_file():
        return [path / WEIGHTS_FILE]
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise OrchardError(f"{index_file}: not a safetensors index ({error!r})") from None
    return [path / name for name in sorted(set(weight_map.values()))]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (or of one safetensors file), memory-mapped: a
    tensor's bytes are read from disk when first used, and never copied."""
    state = {}
    for weights_file in weights_files(path) if path.is_dir() else [path]:
        try:
            with safe_open(weights_file, framework="pt") as handle:
                state.update((name, handle.get_tensor(name)) for name in handle.keys())
        except FileNotFoundError:
            raise OrchardError(f"{weights_file}: no such file") from None
        except (SafetensorError, OSError) as error:
            raise OrchardError(f"{weights_file}: unreadable weights ({error})") from None
    return state


def checked_weights(model: CausalLM, path: Path) -> dict[str, torch.Tensor]:
    """`read_weights(path)`, after checking it holds exactly the tensors `model` needs, in the shapes
    it needs (the model may be on the meta device: only names and shapes are compared)."""
    state = read_weights(path)
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some Hugging Face files store the tied copy as well
    for name in [name for name in state if name.endswith("rotary_emb.inv_freq")]:
        del state[name]  # a table older transformers versions saved; orchard computes its own
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise OrchardError(f"{path}: weights do not match config.json ({what})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise OrchardError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                               f"config.json implies {tuple(expected[name].shape)}")
    return state


def load_weights(model: CausalLM, path: Path, assign: bool = False, dtype: torch.dtype | None = None) -> None:
    """Load a checkpoint directory's (or a safetensors file's) weights into `model`.

    By default the values are copied into the model's existing parameters (which an optimizer may
    already hold). `assign=True` makes the memory-mapped tensors themselves the parameters, which is
    how a model built on the meta device is loaded without a second copy of its weights; they keep
    the file's dtype unless `dtype` is given (a file mixing dtypes is brought to its embedding's).
    """
    state = checked_weights(model, path)
    if assign:
        dtype = dtype or state["model.embed_tokens.weight"].dtype
        keep = quantization_tensor_names(model)  # codes, scales and zeros keep the format's dtypes
        for name, tensor in state.items():
            if tensor.dtype != dtype and name not in keep:
                state[name] = tensor.to(dtype)  # one tensor at a time, so at most one extra copy exists
    model.load_state_dict(state, strict=False, assign=assign)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def check_tokenizer_matches(tokenizer: Tokenizer, config: ModelConfig, where: Path, record: dict) -> None:
    """Reject a tokenizer that does not belong to the model: one that produces ids the model has no
    embedding for, or, in an orchard checkpoint, any tokenizer.json other than the one its record
    names (a smaller vocabulary from another model would otherwise be read as garbage). A Hugging Face
    model with more embeddings than tokens is fine (vocab_size is padded to a round number), and so
    is an eos_token_id in config.json that differs from the tokenizer's (Llama 3 instruct lists
    several)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise OrchardError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}: they do not belong together")
    expected = record.get("tokenizer_sha256")
    if expected and tokenizer.fingerprint() != expected:
        raise OrchardError(f"{where / 'tokenizer.json'}: not the tokenizer this model was trained with "
                           f"({RECORD_FILE} records another); put the checkpoint's own tokenizer back")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """Load model, tokenizer and lineage record from a checkpoint or run directory, a Hugging Face
    model directory or a Hub model id (see `resolve_checkpoint`).

    The model is built on the meta device and takes the memory-mapped tensors as its parameters, so
    loading costs about the weights' size in memory (and only as their pages are used). The weights
    keep their dtype (orchard's own checkpoints are float32, most Hugging Face models bfloat16)
    unless `dtype` is given.
    """
    path = resolve_checkpoint(path)
    if is_adapter_checkpoint(path):
        return _load_adapter_checkpoint(path, device, dtype)
    config = read_model_config(path)
    tokenizer = Tokenizer.load(path)
    record = read_record(path)
    check_tokenizer_matches(tokenizer, config, path, record)
    with torch.device("meta"):
        model = CausalLM(config)
    quantization = read_quantization(path)
    if quantization is not None:
        apply_quantization_layout(model, quantization, str(path / QUANTIZATION_FILE))
    load_weights(model, path, assign=True, dtype=dtype)
    model.model.rotary.reset()
    model = model.to(device).eval()
    if quantization is not None:
        prepare_quantized(model)  # the CPU kernels' weight layout, once, rather than at the first token
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, record=record)


def load_merged(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint as one plain model, every weight trainable: an adapter checkpoint's LoRA (or
    DoRA) merged into its base. What a stage that trains further, or an export, starts from; a
    quantized checkpoint is refused (one-line error naming its parent)."""
    from .peft.lora import adapter_configs, merge_adapter, remove_adapter

    path = resolve_checkpoint(path)
    if is_quantized_checkpoint(path):
        raise inference_only_error(path, "train from")
    checkpoint = load_checkpoint(path, device)
    if not is_adapter_checkpoint(checkpoint.path):
        return checkpoint
    if any(key in read_json(checkpoint.path / ADAPTER_SETTINGS_FILE) for key in ("bottleneck", "prefix")):
        raise OrchardError(f"{checkpoint.path}: bottleneck adapters and prefixes cannot be merged into the base's "
                           f"weights; this works for LoRA and DoRA checkpoints")
    names = list(adapter_configs(checkpoint.model))
    if len(names) != 1:
        raise OrchardError(f"{checkpoint.path}: holds {len(names)} adapters; merging needs exactly one")
    merge_adapter(checkpoint.model, names[0])
    remove_adapter(checkpoint.model, names[0])  # a merged adapter's removal keeps the merged weights
    checkpoint.model.requires_grad_(True)
    checkpoint.record = {**checkpoint.record, "merged_adapter": str(checkpoint.path)}
    return checkpoint


def _load_adapter_checkpoint(path: Path, device, dtype) -> Checkpoint:
    """The base named by the record's parent, with this checkpoint's adapters attached and active."""
    record = read_record(path)
    parent = (record.get("parent") or {}).get("path")
    if not parent or not Path(parent).exists():
        raise OrchardError(f"{path}: adapter checkpoint whose base model {parent!r} is not available")
    base = load_checkpoint(parent, device, dtype)
    restore_adapters(base.model, path, create=True)
    return Checkpoint(path=path, model=base.model.eval(), tokenizer=base.tokenizer, record=record)


def restore_adapters(model: CausalLM, path: Path, create: bool = False, rename: str | None = None) -> list[str]:
    """Load an adapter checkpoint's tensors into `model`, adding the adapters first with `create`
    (under the name `rename` when given, so several checkpoints' adapters can share one base).
    Returns the adapter names."""
    from .peft.settings import rebuild

    settings = read_json(path / ADAPTER_SETTINGS_FILE)
    lora = settings.get("lora", {})
    if not isinstance(lora, dict):
        raise OrchardError(f"{path / ADAPTER_SETTINGS_FILE}: \"lora\" must map adapter names to settings")
    tensors = dict(read_weights(path / ADAPTER_WEIGHTS_FILE))
    if rename is not None:
        if list(settings) != ["lora"] or len(lora) != 1:
            raise OrchardError(f"{path}: only a checkpoint with a single LoRA adapter can join other adapters "
                               f"on one base")
        (old_name,) = lora
        tensors = {k.replace(f".lora.{old_name}.", f".lora.{rename}."): v for k, v in tensors.items()}
    before = set(adapter_tensors(model))
    if create:
        rebuild(model, settings, rename)
    expected = set(adapter_tensors(model)) - before if create else set(adapter_tensors(model))
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise OrchardError(f"{path / ADAPTER_WEIGHTS_FILE}: adapters do not match the model ({missing[0]})")
    model.load_state_dict(tensors, strict=False)
    return [rename] if rename is not None else list(lora)


def attach_adapter_checkpoint(model: CausalLM, base_path: Path, adapter_path: str | Path, name: str) -> None:
    """Add the adapters of another adapter checkpoint to an already loaded base, as `name`,
    refusing adapters that were trained on a different base."""
    adapter_dir = resolve_checkpoint(adapter_path)
    if not is_adapter_checkpoint(adapter_dir):
        raise OrchardError(f"{adapter_dir}: not an adapter checkpoint (no {ADAPTER_WEIGHTS_FILE})")
    parent = read_record(adapter_dir).get("parent") or {}
    base_sha = read_record(base_path).get("weights_sha256")
    if parent.get("weights_sha256") and base_sha and parent["weights_sha256"] != base_sha:
        raise OrchardError(f"{adapter_dir}: trained on the base {parent.get('path')}, not on {base_path}")
    restore_adapters(model, adapter_dir, create=True, rename=name)


def restore_trained_weights(model: CausalLM, path: Path) -> None:
    """Put a step checkpoint's trained weights back into a model being trained (for resuming)."""
    if is_adapter_checkpoint(path):
        restore_adapters(model, path)
    else:
        load_weights(model, path)
