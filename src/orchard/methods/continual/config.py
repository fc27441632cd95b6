"""`orchard continual`'s config: the task stream, the strategy and its settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...data.synthetic import CONTINUAL_TASKS
from ...peft.config import PeftConfig
from ...training import TrainConfig
from ...training.launch import MethodConfig


@dataclass
class ContinualDataConfig:
    max_length: int = 512
    """Tokens per training sequence; longer conversations lose their oldest turns (never the answer).
    Text tasks are cut into windows of this many tokens."""
    packing: bool = True
    """Pack several conversations per sequence (block-diagonal attention); False pads one per row."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns the loss covers."""
    train_items: int | None = None
    """Use at most this many training conversations (text tasks: windows) per task (None: all of
    them; a built-in task's default size)."""
    text_field: str = "text"
    """Field holding the text in a text task's .jsonl/.json/.parquet records."""


@dataclass
class ContinualConfig(MethodConfig):
    out: str = "runs/continual"
    """Run directory: one run directory per task, continual.json, R.png, report.md. Running again resumes it."""
    tasks: list[str] = field(default_factory=lambda: list(CONTINUAL_TASKS))
    """The tasks, in training order: built-in names (arithmetic, facts-en, facts-zh), conversation
    .jsonl files, or text corpora to continue pretraining on: "text:PATH" (a file, glob or
    directory, as pretrain's data.path reads) or a .txt file."""
    task_steps: list[int] | None = None
    """Training steps of each task, in order (None: train.max_steps for every task). 0 scores a task
    without training it: a task the init model already learnt (e.g. the corpus it was pretrained
    on), whose data replay and EWC still protect while later tasks train."""
    strategy: Literal["naive", "replay", "ewc", "adapters"] = "naive"
    """naive: plain sequential fine-tuning; replay: mix in a buffer of earlier tasks' examples; ewc:
    online elastic weight consolidation; adapters: one LoRA adapter per task on a frozen base."""
    replay_size: int = 200
    """replay: examples kept in the reservoir buffer of earlier tasks' training examples."""
    replay_ratio: float = 0.25
    """replay: fraction of each step's micro-batches drawn from the buffer."""
    ewc_lambda: float = 1e6
    """ewc: strength of the penalty (ewc_lambda / 2) * sum F (theta - theta*)^2 added to the mean token
    loss. The Fisher of a batch's mean loss is small (1e-7 of a nat at naive fine-tuning's drift on
    the built-in stream), hence the large default: it cut that stream's forgetting by 82%."""
    ewc_batches: int = 20
    """ewc: batches of a task's training data the diagonal Fisher is averaged over."""
    ewc_gamma: float = 1.0
    """ewc: decay of the earlier Fisher, F = ewc_gamma * F_old + F_new (online EWC; 1 keeps all)."""
    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="lora", r=8))
    """adapters: the adapter each task trains (lora or dora)."""
    eval_items: int = 100
    """Items per task scored after every task (text tasks: windows of data.max_length tokens)."""
    eval_on: Literal["held_out", "train"] = "held_out"
    """held_out: score items no training step saw (built-in tasks' held-out split, conversations held
    out of a file, a corpus's last windows): what a task generalises to. train: score the first
    eval_items training items: how much of what was taught is retained, the measure of tasks that
    are memorised (facts a model did not know) rather than generalised."""
    world_seed: int = 0
    """Seed of the built-in tasks' items."""
    data: ContinualDataConfig = field(default_factory=ContinualDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200, lr=1e-4, warmup_steps=20,
                                                                   weight_decay=0.0, batch_size=8))
    """Training of each task (its own warm-up and cosine decay)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        if self.replay_size < 0:
            raise ValueError(f"replay_size must not be negative, got {self.replay_size}")
        if not 0 <= self.replay_ratio <= 1:
            raise ValueError(f"replay_ratio must be between 0 and 1, got {self.replay_ratio}")
        if self.ewc_lambda < 0 or self.ewc_gamma < 0:
            raise ValueError("ewc_lambda and ewc_gamma must not be negative")
        if self.ewc_batches <= 0:
            raise ValueError(f"ewc_batches must be positive, got {self.ewc_batches}")
        if self.eval_items <= 0:
            raise ValueError(f"eval_items must be positive, got {self.eval_items}")
        if self.task_steps is not None:
            if len(self.task_steps) != len(self.tasks):
                raise ValueError(f"task_steps: give one number per task ({len(self.tasks)}), got {len(self.task_steps)}")
            if any(steps < 0 for steps in self.task_steps) or not any(self.task_steps):
                raise ValueError(f"task_steps: must not be negative, and at least one task must train; got "
                                 f"{self.task_steps}")
