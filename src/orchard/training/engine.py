"""The training engine: the one loop every orchard method runs on.

A method (pretraining, SFT, DPO, distillation, ...) supplies only what is its own: the micro-batches
of each step, the loss of a micro-batch, and an evaluation. The engine owns everything else:
AdamW (fused where the device has it), warm-up then cosine decay, gradient accumulation, gradient
clipping, bf16 autocast, validation, a progress bar, metrics as JSONL (and to TensorBoard or W&B),
limits by steps, tokens or wall-clock time, checkpoints with resume, and DistributedDataParallel
under `torchrun`.

Exact resume: a method's batches are a pure function of (step, micro-batch, rank, world size), and
a checkpoint holds the weights, the optimizer state and the step, so a run stopped after step s
and restarted computes the same steps s+1, s+2, ... as one that never stopped (on CPU, to the
byte). Equal curves across world sizes: each step's loss is the sum over the whole global batch
divided by its item count (tokens for language modelling), whatever the world size and
accumulation are.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..checkpoint.sharded import (consolidate_weights, consolidated_weight_names, is_sharded_checkpoint, load_shards,
                                  save_shards)
from ..checkpoint import (ADAPTER_WEIGHTS_FILE, FINAL_DIR, STEP_PREFIX, has_training_state, is_adapter_checkpoint,
                          is_checkpoint, read_record, read_training_state, read_weights, restore_trained_weights,
                          save_checkpoint, step_checkpoints)
from ..config import Duration, to_dict
from ..errors import OrchardError
from ..files import atomic_file, read_json_lines
from ..model import CausalLM
from ..peft.surgery import is_peft_tensor
from ..tokenizer import Tokenizer
from .progress import Progress
from .run_directory import METRICS_FILE, open_run, recipe_change
from .distributed import Shard
from .runtime import Runtime, resolve_device
from .trackers import Tracker, TrackerName, check_installed, open_tracker


@dataclass
class TrainConfig:
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_tokens: int | None = None
    """Stop after this many training tokens (all processes together)."""
    max_time: Duration | None = None
    """Stop after this much training time, e.g. 300, 90s, 5m, 1h30m (summed over resumes)."""
    batch_size: int = 16
    """Sequences per micro-batch, per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: global batch = batch_size x grad_accum x processes."""
    global_batch: int | None = None
    """Sequences (pairs, prompts) per optimizer step over all processes. When set, grad_accum is
    worked out from it (global_batch / (batch_size x processes), which must divide), so the run
    trains the same at any number of processes, and can be resumed at another."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr x min_lr_ratio at the end of training."""
    warmup_steps: int = 50
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast or plain fp32; auto picks what is fastest on the device (see README)."""
    eval_every: int = 100
    """Validate every this many steps (and at the end); 0 validates only at the end."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation."""
    save_every: int = 200
    """Write a resumable checkpoint every this many steps; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final one is always kept)."""
    log_every: int = 10
    """Append a line to metrics.jsonl every this many steps."""
    report_to: list[TrackerName] = field(default_factory=list)
    """Experiment trackers that also get metrics.jsonl's values and the recipe: tensorboard (into
    RUN_DIR/tensorboard/), wandb (RUN_DIR/wandb/; WANDB_MODE=offline needs no account), e.g.
    train.report_to=tensorboard,wandb. Each needs the orchard-lm extra of its name."""
    seed: int = 1337
    """Seed of initialisation and data order."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (CUDA when available)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the training step: the whole model with its loss for a method whose batches
    all have one shape (pretraining), else each decoder block, whatever the batch's shape (SFT,
    LoRA, DPO, RL). One compilation (~20 s on 2 CPU cores), then faster steps: a bf16 step ~1/4 to
    1/3 shorter. auto compiles once the first steps show at least COMPILE_PAYS_AFTER seconds of
    training left."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun: ddp keeps a whole copy of the model, its gradients and optimizer state in every
    process; fsdp shards them (FSDP2, per block), for models that do not fit one device that way.
    auto is ddp for now."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: much less
    activation memory (long sequences, big batches) for about a third more compute."""
    activation_checkpointing_every: int = 1
    """With activation_checkpointing: recompute every k-th block only (1: all of them), trading
    memory back for speed."""
    progress: bool = True
    """Show a progress bar on an interactive terminal."""

    DEFAULTS_YIELD_TO: ClassVar[dict[str, tuple[str, ...]]] = {"max_steps": ("max_tokens", "max_time")}
    """A method's default max_steps limits only a run given no other limit: a recipe that sets
    max_tokens or max_time, and not max_steps, trains to that limit alone (and the schedule decays
    over it)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "global_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.eval_batches <= 0:
            raise ValueError(f"train.eval_batches must be positive, got {self.eval_batches}")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.activation_checkpointing_every < 1:
            raise ValueError(f"train.activation_checkpointing_every must be at least 1, got "
                             f"{self.activation_checkpointing_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        for index, name in enumerate(self.report_to):
            if name in self.report_to[:index]:
                raise ValueError(f"train.report_to: {name} is named twice")
        try:
            for name in self.report_to:
                check_installed(name)
            resolve_device(self.device)
        except OrchardError as error:
            raise ValueError(str(error)) from None
        except RuntimeError:
            raise ValueError(f"train.device: expected cpu, cuda, cuda:N or auto, got {self.device!r}") from None


Batch = dict[str, torch.Tensor]

COMPILE_PAYS_AFTER = 150.0
"""Seconds of training left from which train.compile=auto compiles: compiling costs ~20 s for the
13.8M benchmark model on 2 CPU cores and saves ~1/3 of each bf16 step (benchmarks/peers.py), so it
pays back within a minute; the margin covers bigger models' longer compilations."""
AUTO_COMPILE_STEP = 5
"""The step after which train.compile=auto estimates the time left (the first steps run eagerly)."""


class Method(Protocol):
    """What a training method adds to the engine."""

    name: str

    def batch(self, step: int, micro: int, rank: int, world: int) -> Batch:
        """Micro-batch `micro` of optimizer step `step` on process `rank` (a pure function)."""

    def count(self, batch: Batch) -> int:
        """How many items the loss of `batch` sums over (e.g. target tokens, preference pairs)."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed (not averaged) loss of `batch`, and per-batch metrics to log."""

    def evaluate(self, model: CausalLM, shard: Shard) -> dict[str, float]:
        """Validation metrics of the unwrapped model, under no_grad, on every process: split over
        them by `shard` (each scores its batches, `shard.sum` adds the totals), or, for a method
        that does not split its validation, the same on each."""

    trainable_modules: torch.nn.Module | None
    """Weights that train with the model but are not part of it (distillation's projections of
    hidden states), saved with the training state only; None for most methods.

    A method whose batches all have the same shapes sets `fixed_shapes = True`, so that
    train.compile compiles the whole model with its loss (others get their blocks compiled: the
    loss takes only the rows with a target, whose number changes from batch to batch).

    A method may also have `regularize(model, distributed) -> (penalty, metrics)`: called once per
    step after the backward passes, it adds the gradient of a penalty on the weights to their
    gradients itself (each process to the weights or shards it holds) and returns the penalty,
    which the logged loss includes (continual learning's EWC)."""


def training_runtime(config: TrainConfig) -> Runtime:
    """The runtime of a training process (its device and, under torchrun, process group), with
    `config.grad_accum` worked out from `config.global_batch` for this number of processes."""
    runtime = Runtime.create(config.device, config.precision)
    if config.global_batch is not None:
        per_step = config.batch_size * runtime.distributed.world_size
        if config.global_batch % per_step:
            raise OrchardError(f"train.global_batch={config.global_batch} is not a multiple of train.batch_size="
                               f"{config.batch_size} x {runtime.distributed.world_size} process(es)")
        config.grad_accum = config.global_batch // per_step
    return runtime


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` as progress -> 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@dataclass
class TrainState:
    """Counters a resumed run continues from; saved in every step checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    flops: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    final_dir: Path
    state: TrainState
    resumed_from: int | None


class Trainer:
    """Runs a method to its limit, saving and resuming checkpoints in `out_dir`.

    `record` is the lineage information the caller knows (stage, parent, recipe, data); the
    engine adds what training measured (steps, tokens, time, FLOPs, metrics).
    """

    def __init__(self, config: TrainConfig, model: CausalLM, method: Method, tokenizer: Tokenizer,
                 out_dir: str | Path, record: dict, flops_per_token: float, runtime: Runtime | None = None):
        if config.max_steps is None and config.max_tokens is None and config.max_time is None:
            raise OrchardError("train: set a limit: train.max_steps, train.max_tokens or train.max_time")
        self.config = config
        self.compiled_at: int | None = None
        """The step from which the model ran compiled (train.compile), recorded with the checkpoint."""
        self.method = method
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.record = record
        self.flops_per_token = flops_per_token
        self.runtime = runtime or training_runtime(config)
        self.dist, self.device, self.precision = self.runtime.distributed, self.runtime.device, self.runtime.precision
        # A model to shard is moved (and made float32) block by block as it is sharded (Distributed.wrap).
        self.model = model if self.dist.shards(config.parallel) else model.to(self.device)
        self.extra_modules = method.trainable_modules
        # What the optimizer trains: the model, and weights trained beside it (named extra_modules.*).
        self.trained: torch.nn.Module = self.model
        if self.extra_modules is not None:
            self.extra_modules.to(self.device)
            self.trained = torch.nn.ModuleDict({"model": self.model, "extra_modules": self.extra_modules})
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.state = TrainState()
        self.metrics_file = self.out_dir / METRICS_FILE
        self.trackers: list[Tracker] = []
        """train.report_to's trackers, open while the run trains, on the process that logs."""

    # --- setup -----------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        """The model as the loop runs it (activation checkpointing, DDP or FSDP2), and the optimizer
        over its trainable weights, made after the wrapping because FSDP2 replaces them by shards."""
        c = self.config
        model = self.runtime.wrap(self.model, c.activation_checkpointing_every if c.activation_checkpointing else 0,
                                  c.parallel)
        if any(self.dist.local(p).is_meta for p in self.model.parameters()):
            # A fresh model built on the meta device to be sharded: each process allocates only its
            # shards, and initialises them as the whole model would be (as torchtitan does).
            self.model.to_empty(device=self.device)
            self.model.reset_parameters(seed=c.seed)
            self.model.model.rotary.reset()
        # Frozen parameters (a base under adapters, say) are left out of the optimizer.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.extra_modules is not None:
            self.params += [p for p in self.extra_modules.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(self.params)
        return model

    @property
    def sharded(self) -> bool:
        return self.dist.is_sharded(self.model)

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # Fused AdamW runs the whole update as one kernel per group on CPU and CUDA alike.
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(self.config.beta1, self.config.beta2),
                                 fused=fused)

    # --- limits and progress --------------------------------------------------------------

    def _progress(self) -> float:
        """Fraction of the run done: the furthest along of the step, token and time limits."""
        c, s = self.config, self.state
        fractions = []
        if c.max_steps:
            fractions.append(s.step / c.max_steps)
        if c.max_tokens:
            fractions.append(s.tokens / c.max_tokens)
        if c.max_time:
            fractions.append(s.elapsed / c.max_time)
        return max(fractions)

    def _compile_pays(self, progress: float, seconds: float, steps: int) -> bool:
        """train.compile=auto: whether to compile now, after the AUTO_COMPILE_STEP-th step of this
        attempt, given the fraction of the run done and the seconds its steps took so far. Every
        process decides the same (on the mean of their estimates)."""
        # Only conditions every process shares: the all-reduce below must be reached by all or none.
        if self.config.compile != "auto" or self.compiled_at is not None or steps != AUTO_COMPILE_STEP:
            return False
        done_now = progress - self._progress_at_start
        seconds_left = seconds * (1.0 - progress) / max(done_now, 1e-9)
        return self.dist.all_reduce_sum(seconds_left) / self.dist.world_size >= COMPILE_PAYS_AFTER

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (as the loop runs it) with its training step compiled (train.compile): wholly,
        loss included, for batches of one shape; else block by block (regional compilation, as
        torchtitan's), which a new length does not recompile, except under FSDP2, which stays eager.
        `fit` turns the blocks' off again."""
        if getattr(self.method, "fixed_shapes", False):
            self.compiled_at = self.state.step
            return torch.compile(model)
        if self.sharded:
            # FSDP2's hooks run around each block, which this does not trace (torchtitan compiles
            # before sharding): the run stays eager, and says so when compiling was asked for.
            if self.config.compile is True and self.dist.rank == 0:
                print("train.compile=true: this method's blocks stay eager under train.parallel=fsdp",
                      file=sys.stderr)
            return model
        self.compiled_at = self.state.step
        self.model.compiled_blocks = True
        return model

    def _done(self) -> bool:
        if self.dist.active:
            # Time limits differ by a few ms between processes: let rank 0 decide for everyone.
            flag = torch.tensor([float(self._progress() >= 1.0)], device=self.device)
            dist.broadcast(flag, src=0)
            return bool(flag.item())
        return self._progress() >= 1.0

    # --- checkpoints ----------------------------------------------------------------------

    def _training_state(self, optimizer: dict) -> dict:
        state = {"state": to_dict(self.state), "optimizer": optimizer,
                 "rng": torch.get_rng_state(), "world_size": self.dist.world_size}
        if self.extra_modules is not None:
            state["extra_modules"] = self.extra_modules.state_dict()
        return state

    def _full_record(self) -> dict:
        s = self.state
        return {**self.record, "training": {
            "steps": s.step, "tokens": s.tokens, "wall_seconds": round(s.elapsed, 2), "flops": s.flops,
            "precision": self.precision, "device": self.device.type, "world_size": self.dist.world_size,
            "global_batch": self._global_batch(), "compiled_at_step": self.compiled_at,
        }, "metrics": dict(s.metrics)}

    def _save(self, directory: Path, with_state: bool) -> None:
        """A checkpoint into `directory` (every rank calls this): a step checkpoint (`with_state`)
        of a sharded model as each rank's shards; final/ of a sharded model consolidated from the
        last step's shards, or, when it holds adapters or frozen weights, gathered onto rank 0."""
        self._check_finite(self.state.metrics)
        training_state = None
        if with_state:
            training_state = self._training_state(None if self.sharded else self.optimizer.state_dict())
        if self.sharded and with_state:
            self._save_shards(directory, training_state)
            return
        weights, write_weights = None, None
        if self.sharded:
            names = consolidated_weight_names(self.model)
            if names is None:
                # Every rank takes part; of a model with adapters only they are gathered (the frozen
                # base is not saved).
                with_adapters = any(is_peft_tensor(name) for name, _ in self.model.named_parameters())
                weights = self.dist.full_state_dict(self.model, trained_only=with_adapters)
            else:
                last_step = step_checkpoints(self.out_dir)[-1]
                write_weights = lambda tmp: consolidate_weights(last_step, tmp, names)  # noqa: E731
        if self.dist.rank == 0:
            save_checkpoint(directory, self.model, self.tokenizer, self._full_record(), training_state,
                            weights=weights, write_weights=write_weights)
        self.dist.barrier()

    def _save_shards(self, directory: Path, training_state: dict) -> None:
        """Rank 0 makes the checkpoint's temporary directory and tells the others where it is; each
        rank writes its shards there; rank 0 adds the rest and renames it into place."""
        def write_shards(tmp: Path | None) -> None:
            where = [str(tmp)]
            dist.broadcast_object_list(where, src=0)
            save_shards(Path(where[0]), self.model, self.trained, self.optimizer)

        if self.dist.rank == 0:
            save_checkpoint(directory, self.model, self.tokenizer, self._full_record(), training_state,
                            write_weights=write_shards)
        else:
            write_shards(None)
        self.dist.barrier()

    def _save_step(self) -> None:
        self._save(self.out_dir / f"{STEP_PREFIX}{self.state.step:06d}", with_state=True)
        if self.dist.rank == 0:
            for old in step_checkpoints(self.out_dir)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def _check_same_recipe(self, record: dict) -> None:
        """Refuse to continue a run directory that holds a different run (another model or data):
        only limits and bookkeeping (steps, time, logging, saving) may change between invocations.
        `record` is the lineage record of one of its checkpoints. `open_run` checks run.json the
        same way; this check is the one a run directory from before run.json gets."""
        problem = recipe_change(record.get("recipe"), self.record.get("recipe"))
        if problem:
            raise OrchardError(f"{self.out_dir} {problem}; use another out= for a new run")

    def _resume(self) -> int | None:
        """Continue from the newest step checkpoint that can be read and holds finite numbers; a
        newer one that cannot (a disk that failed under it, a pickle from an older orchard, NaN
        weights from a run that diverged) is passed over with a message naming it."""
        steps = [p for p in step_checkpoints(self.out_dir) if has_training_state(p)]
        if not steps:
            return None
        for candidate in reversed(steps):
            try:
                record = read_record(candidate)
            except OrchardError as problem:
                self._pass_over(candidate, problem)
                continue
            self._check_same_recipe(record)  # another run's checkpoint is refused, not passed over
            self._check_global_batch(candidate, record)
            try:
                saved = self._load_step(candidate, record)
                break
            except OrchardError as problem:
                self._pass_over(candidate, problem)
        else:
            raise OrchardError(f"{self.out_dir}: none of its step checkpoints can be resumed (see above); "
                               f"use another out= for a new run")
        if self.extra_modules is not None and "extra_modules" in saved:
            self.extra_modules.load_state_dict(saved["extra_modules"])
        try:
            self._load_optimizer(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            self.state = TrainState(**saved["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise OrchardError(f"{candidate}: its training state does not fit this run ({error})") from None
        if self.dist.rank == 0 and self.metrics_file.exists():
            # Lines logged after the checkpoint belong to the lost part of the run; a line cut short
            # by a kill is dropped too.
            kept = [entry for entry in read_json_lines(self.metrics_file) if entry.get("step", 0) <= self.state.step]
            atomic_file(self.metrics_file, lambda tmp: tmp.write_text(
                "".join(json.dumps(entry) + "\n" for entry in kept), encoding="utf-8"))
        return self.state.step

    def _load_optimizer(self, saved: dict | None) -> None:
        """An optimizer state keyed by position (saved by one process or DDP) into this run's
        optimizer, sharded or not; None when the checkpoint's shards held it (already loaded)."""
        if saved is None:
            return
        if not self.sharded:
            self.optimizer.load_state_dict(saved)
            return
        names = {id(p): name for name, p in self.trained.named_parameters()}
        order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        by_name = {"state": {order[index]: value for index, value in saved["state"].items()},
                   "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                    for group in saved["param_groups"]]}
        self.dist.load_full_optimizer_state(self.trained, self.optimizer, by_name)

    def _pass_over(self, step_dir: Path, problem: OrchardError) -> None:
        if self.dist.rank == 0:
            print(f"{step_dir.name} cannot be resumed ({problem}); trying the step before it", file=sys.stderr)

    def _load_step(self, directory: Path, record: dict) -> dict:
        """A step checkpoint's weights put into the model and its training state, checked finite."""
        saved = read_training_state(directory, self.device)
        metrics = record.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise OrchardError(f"{directory / 'orchard.json'}: \"metrics\" is not a mapping")
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise OrchardError(f"its {bad[0]} is {metrics[bad[0]]}")
        if is_sharded_checkpoint(directory):
            # Saved by a sharded run: each rank reads its slices, at any number of processes.
            load_shards(directory, self.model, self.trained, self.optimizer)
        elif self.sharded:
            # Every rank reads the whole tensors (an adapter checkpoint's are the adapters) and keeps its shards.
            weights = directory / ADAPTER_WEIGHTS_FILE if is_adapter_checkpoint(directory) else directory
            self.dist.load_full_state_dict(self.model, read_weights(weights))
        else:
            restore_trained_weights(self.model, directory)
            self.model.to(self.device)
        name = self._non_finite_parameter()
        if name is not None:
            raise OrchardError(f"its weight {name} is not finite")
        return saved

    def _global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.dist.world_size

    def _check_global_batch(self, directory: Path, record: dict) -> None:
        """Refuse to continue a run with another global batch (what another number of processes
        gives, unless train.global_batch holds it): it would be a different run from there on."""
        saved = (record.get("training") or {}).get("global_batch")
        if isinstance(saved, int) and saved != self._global_batch():
            raise OrchardError(f"{directory.name} was trained with a global batch of {saved}, this run's is "
                               f"{self._global_batch()} (train.batch_size x grad_accum x {self.dist.world_size} "
                               f"process(es)); set train.global_batch={saved} to continue it")

    def _non_finite_parameter(self) -> str | None:
        """The name of a trained weight holding NaN or infinity, or None when all are finite (of a
        sharded model every rank checks its shards and all of them learn the answer)."""
        named = list(self.model.named_parameters())
        if self.extra_modules is not None:
            named += list(self.extra_modules.named_parameters())
        found = next((name for name, p in named
                      if p.requires_grad and not bool(torch.isfinite(self.dist.local(p)).all())), None)
        if self.sharded and self.dist.all_reduce_sum(float(found is not None)) and found is None:
            found = "(on another process)"
        return found

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Stop a run that diverged before anything non-finite reaches a checkpoint."""
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            self._diverged(self.state.step, f"{bad[0]} is {metrics[bad[0]]}")
        name = self._non_finite_parameter()
        if name is not None:
            self._diverged(self.state.step, f"the weight {name} is not finite")

    def _diverged(self, step: int, problem: str) -> None:
        """The one-line error of a run whose step `step` (counted from 1, as checkpoints are) diverged."""
        saved = [p for p in step_checkpoints(self.out_dir) if int(p.name[len(STEP_PREFIX):]) < step]
        kept = f"the last checkpoint, {saved[-1].name}, is finite" if saved else "no checkpoint was saved"
        raise OrchardError(f"step {step}: {problem}: the run diverged (lower train.lr or check the data); {kept}")

    def _clip_gradients(self, max_norm: float) -> float:
        """Clip the global gradient norm (over every shard of a sharded model) and return it."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _log(self, entry: dict) -> None:
        if self.dist.rank == 0:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            scalars = {key: value for key, value in entry.items()
                       if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
            for tracker in self.trackers:
                tracker.log(scalars, entry["step"])

    def _open_trackers(self, resumed_from: int | None) -> None:
        """Rank 0 opens train.report_to's trackers (the run's to close), the recipe their
        hyper-parameters; a resumed run goes on with its history from the step after its checkpoint."""
        if self.dist.rank != 0:
            return
        first_step = 0 if resumed_from is None else resumed_from + 1
        for name in self.config.report_to:
            self.trackers.append(open_tracker(name, self.out_dir, self.record.get("recipe") or {}, first_step))

    def _close_trackers(self) -> None:
        while self.trackers:
            self.trackers.pop().close()

    def _evaluate(self) -> dict[str, float]:
        # Every process evaluates: the validation set is split over them (the same windows at every
        # world size); a sharded model computes only with all of them gathering its weights, so
        # there each evaluates every batch.
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast():
            metrics = self.method.evaluate(self.model, self.dist.shard(split=not self.sharded))
        self.model.train()
        if self.dist.rank == 0:
            self._log({"step": self.state.step, "tokens": self.state.tokens, **metrics})
        else:
            metrics = {}
        self.dist.barrier()
        return metrics

    # --- the loop -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to the limit in `out_dir`, which is held (`open_run`) for the whole run."""
        with open_run(self.out_dir, self.record.get("stage", self.method.name), self.record.get("recipe")):
            try:
                return self._fit()
            finally:
                self.model.compiled_blocks = False  # the trained model goes on eagerly (generation, export)
                self._close_trackers()

    def _fit(self) -> TrainResult:
        final_dir = self.out_dir / FINAL_DIR
        if is_checkpoint(final_dir):
            record = read_record(final_dir)
            self._check_same_recipe(record)
            training = record.get("training", {})
            self.state = TrainState(step=training.get("steps", 0), tokens=training.get("tokens", 0),
                                    elapsed=training.get("wall_seconds", 0.0), flops=training.get("flops", 0.0),
                                    metrics=record.get("metrics", {}))
            if self._progress() >= 1.0:
                # Running a finished command again is a no-op, so pipelines can be re-run safely.
                if self.dist.rank == 0:
                    print(f"{final_dir} exists: the run is complete (raise a train.max_* limit to extend it, "
                          f"or choose another out=)", file=sys.stderr)
                return TrainResult(final_dir=final_dir, state=self.state, resumed_from=self.state.step)
            # A raised limit extends the run from its last step checkpoint.
            self.state = TrainState()
        if self.dist.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        model = self._wrap()
        resumed_from = self._resume()
        if resumed_from is None and self.dist.rank == 0:
            # Lines of an earlier attempt that was killed before its first checkpoint: it starts over.
            self.metrics_file.unlink(missing_ok=True)
        self._open_trackers(resumed_from)
        if self.config.compile is True:
            model = self._compiled(model)
        model.train()
        c = self.config
        world = self.dist.world_size
        progress_display = Progress(c.progress and self.dist.rank == 0, self.state.step, c.max_steps)
        if resumed_from is not None and self.dist.rank == 0:
            print(f"resuming {self.out_dir} from step {resumed_from}", file=sys.stderr)
        if resumed_from is None and c.eval_every:
            self._evaluate()  # the starting point, so curves and reports show how far training moved
        window_tokens, window_seconds = 0, 0.0
        self._progress_at_start, attempt_step_seconds = self._progress(), 0.0
        # Time limits count wall-clock time, evaluation and saving included, summed over resumes.
        clock_start, elapsed_before = time.perf_counter(), self.state.elapsed

        while not self._done():
            started = time.perf_counter()
            step = self.state.step
            lr = learning_rate(c, step, self._progress())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batches = [self.method.batch(step, micro, self.dist.rank, world) for micro in range(c.grad_accum)]
            batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]
            items = self.dist.all_reduce_sum(float(sum(self.method.count(b) for b in batches)))
            if items == 0:
                raise OrchardError(f"step {step}: the batch has nothing to train on (every target is masked)")
            step_tokens = int(self.dist.all_reduce_sum(float(sum(b["input_ids"].numel() for b in batches))))
            loss_total, logged = 0.0, {}
            for micro, batch in enumerate(batches):
                # Gradients are all-reduced once, on the last micro-batch.
                sync = self.dist.no_sync(model) if micro < len(batches) - 1 else nullcontext()
                with sync, self.runtime.autocast():
                    total, metrics = self.method.loss(model, batch)
                # DDP averages gradients over processes, so scale by world / global item count.
                (total * (world / items)).backward()
                loss_total += total.item()
                for key, value in metrics.items():
                    logged[key] = logged.get(key, 0.0) + value / len(batches)
            regularize = getattr(self.method, "regularize", None)
            penalty = 0.0
            if regularize is not None:
                penalty, metrics = regularize(self.model, self.dist)
                logged.update(metrics)
            if self.dist.active and self.extra_modules is not None:
                # DDP averages the model's gradients; weights outside it are averaged here.
                for p in self.extra_modules.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            grad_norm = (self._clip_gradients(c.grad_clip) if c.grad_clip > 0 else float("nan"))
            if c.grad_clip > 0 and not math.isfinite(grad_norm):
                self._diverged(step + 1, f"the gradient norm is {grad_norm}")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.dist.all_reduce_sum(loss_total) / items + penalty
            if not math.isfinite(loss):
                self._diverged(step + 1, f"the loss is {loss}")

            self.state.step += 1
            self.state.tokens += step_tokens
            self.state.flops += self.flops_per_token * step_tokens
            now = time.perf_counter()
            self.state.elapsed = elapsed_before + now - clock_start
            self.state.metrics["train_loss"] = loss
            window_tokens += step_tokens
            window_seconds += now - started

            if c.log_every and self.state.step % c.log_every == 0:
                logged = self.dist.mean_over_processes(logged)
                tokens_per_second = window_tokens / max(window_seconds, 1e-9)
                window_tokens, window_seconds = 0, 0.0
                self._log({"step": self.state.step, "tokens": self.state.tokens, "loss": loss, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": tokens_per_second,
                           "elapsed": self.state.elapsed, **logged})
            else:
                tokens_per_second = None
            progress = self._progress()
            attempt_step_seconds += now - started
            if self._compile_pays(progress, attempt_step_seconds, step + 1 - (resumed_from or 0)):
                model = self._compiled(model)
                if self.compiled_at is not None:
                    progress_display.message(f"step {self.state.step}: compiling the model (train.compile=auto: "
                                             f"training has minutes left)")
            progress_display.update(self.state.step, min(progress, 1.0), self.state.elapsed, loss, tokens_per_second)

            finished = progress >= 1.0
            if c.eval_every and self.state.step % c.eval_every == 0 and not finished:
                metrics = self._evaluate()
                self.state.metrics.update(metrics)
                self._check_finite(metrics)
                if metrics:
                    progress_display.message(f"step {self.state.step}: " +
                                             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if c.save_every and self.state.step % c.save_every == 0 and not finished:
                self._save_step()
        progress_display.close()

        self.state.metrics.update(self._evaluate())
        # The last step checkpoint keeps the training state, so the run can be extended later.
        self._save_step()
        self._save(final_dir, with_state=False)
        return TrainResult(final_dir=final_dir, state=self.state, resumed_from=resumed_from)
