"""The teacher (loaded once, released when no longer needed) and the student (a checkpoint, a YAML of
model fields, or a copy of chosen teacher layers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...checkpoint import (load_checkpoint, load_merged, read_model_config, read_record, resolve_checkpoint,
                           weights_sha256)
from ...config import load_config
from ...errors import OrchardError
from ...model import CausalLM, ModelConfig
from ...tokenizer import Tokenizer
from .config import DistillConfig


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
