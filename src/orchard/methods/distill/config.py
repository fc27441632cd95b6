"""`orchard distill`'s config: teacher, student, mode, divergence and their settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...data.text import TextDataConfig
from ...training import TrainConfig
from ..prompts import PromptDataConfig


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
    teacher_device: str = "auto"
    """Where the teacher computes: auto (where the student trains), cpu, cuda or cuda:N (e.g. a
    second GPU, or the CPU to leave the GPU's memory to the student); its outputs are moved to the
    student."""
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
