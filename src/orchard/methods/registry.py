"""The training commands: each method's name, config, run function and help, in one table that
the CLI reads (and that "go to definition" can follow from the command to its code).

A new method adds its module under `orchard/methods/` and one `TrainingCommand` here; see
the methods' modules for what a method is (a config, batches, a loss, an evaluation, and `run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import continual, distill, dpo, grpo, kto, ppo, pretrain, reward, sft


@dataclass(frozen=True)
class TrainingCommand:
    name: str
    """The `orchard` subcommand."""
    config: type
    """The method's config dataclass (its fields and their docstrings are the command's --help)."""
    run: Callable
    """Train with a config; returns the engine's TrainResult."""
    help: str
    """One line for `orchard --help`."""
    description: str
    """What `orchard NAME --help` says first."""
    example: str
    """Example overrides for the usage line."""


COMMANDS: dict[str, TrainingCommand] = {command.name: command for command in [
    TrainingCommand("pretrain", pretrain.PretrainConfig, pretrain.run,
        "pretrain a model on text",
        "Pretrain a model. With no recipe and no data.path it trains a small model on the built-in "
        "synthetic world.", "train.max_steps=200"),
    TrainingCommand("sft", sft.SFTConfig, sft.run,
        "fine-tune on conversations (full, LoRA, DoRA, QLoRA, adapters, prefix)",
        "Supervised fine-tuning of init=CHECKPOINT on conversations, with the loss on assistant tokens only. "
        "peft.method=lora|dora|... trains adapters on the frozen base and saves only them. With no data.path "
        "it uses the built-in world's instruction conversations.",
        "init=runs/quickstart/pretrain peft.method=lora"),
    TrainingCommand("reward", reward.RewardConfig, reward.run,
        "train a reward model on preference pairs (Bradley-Terry)",
        "Train a scalar reward head on init=CHECKPOINT so that chosen replies score above rejected ones; "
        "reports held-out pairwise accuracy. With no data.path it uses the built-in world's pairs.",
        "init=runs/quickstart/sft"),
    TrainingCommand("kto", kto.KTOConfig, kto.run,
        "align on unpaired feedback (a reply marked desirable or not) with KTO",
        "KTO on init=CHECKPOINT from unpaired examples, TRL's {prompt, completion, label} records: each "
        "desirable reply's implicit reward is pushed above a reference point, each undesirable one below it. "
        "With no data.path it uses the built-in world's pairs taken apart, and reports held-out pairwise "
        "accuracy.", "init=runs/quickstart/sft beta=0.1"),
    TrainingCommand("dpo", dpo.DPOConfig, dpo.run,
        "align on preference pairs with DPO, IPO, SimPO or ORPO",
        "Offline preference optimisation of init=CHECKPOINT (loss=dpo|ipo|simpo|orpo). The reference model's "
        "log-probabilities are computed once and cached. With no data.path it uses the built-in world's pairs.",
        "init=runs/quickstart/sft loss=dpo beta=0.1"),
    TrainingCommand("grpo", grpo.GRPOConfig, grpo.run,
        "online RL with group-relative advantages (GRPO, DAPO, Dr. GRPO)",
        "Sample num_generations replies per prompt, score them with the rewards, and push the policy "
        "towards the better ones of each group. With no data.path it uses the built-in world's questions "
        "with the exact-match reward.", "init=runs/quickstart/sft rewards=[exact_match]"),
    TrainingCommand("ppo", ppo.PPOConfig, ppo.run,
        "online RL with a value head and GAE (PPO, as in RLHF)",
        "Proximal policy optimisation of init=CHECKPOINT with a learned value head, GAE, clipped losses and "
        "a KL penalty to the reference. With no data.path it uses the built-in world's questions.",
        "init=runs/quickstart/sft rewards=[model:runs/quickstart/reward/final]"),
    TrainingCommand("distill", distill.DistillConfig, distill.run,
        "distil a teacher into a smaller student (KD, GKD, sequence-level)",
        "Train a student (--student: a checkpoint, or a YAML of model fields) on TEACHER's distributions: "
        "offline from the teacher's cached top-k log-probabilities, online, on-policy on the student's "
        "own text (GKD), or on the teacher's answers (mode=sequence). With no data.path it uses the "
        "built-in world's documents. Usage: orchard distill TEACHER --student STUDENT [RECIPE] [key=value ...]",
        "mode=offline divergence=forward_kl alpha=0.5 temperature=2"),
    TrainingCommand("continual", continual.ContinualConfig, continual.run,
        "train one checkpoint through a sequence of tasks (naive, replay, "
        "EWC, adapters)",
        "Continual learning: train init=CHECKPOINT on tasks one after another (conversation .jsonl "
        "files, or text corpora as text:PATH for continued pretraining) "
        "(strategy=naive|replay|ewc|adapters), scoring every task after each one; writes the accuracy "
        "matrix, its metrics (forgetting, transfer) and a heat map to OUT/continual.json, OUT/R.png and "
        "OUT/report.md. With no tasks it uses the built-in stream (arithmetic, facts-en, facts-zh).",
        "init=runs/quickstart/sft strategy=replay train.max_steps=100"),
]}
