"""The opening and the close that every method training a checkpoint further shares.

    start = start_from(config.init, "sft", config.train)       # runtime, merged checkpoint, fp32 model
    ...                                                          # the method's data, adapters, objective
    return finish(start, config, method, "sft", data_record, parameters, context_length)

`MethodConfig` holds the recipe fields they share (init, out, peft, train). `start_from` checks `init`, makes the runtime and loads the checkpoint merged (an adapter checkpoint
folded into its base) with float32 weights in training mode; `finish` writes the lineage record and
runs the shared engine with the FLOPs estimate of the method's sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Checkpoint, load_merged
from ..config import to_dict
from ..errors import OrchardError
from ..lineage import new_record
from ..model import CausalLM
from ..peft.config import PeftConfig
from ..tokenizer import Tokenizer
from .engine import TrainConfig, Trainer, TrainResult, training_runtime
from .runtime import Runtime


@dataclass
class MethodConfig:
    """The recipe fields of every method that trains a checkpoint further. A method's config
    subclasses it, adds its own fields and sections, and redeclares `out` and `train` with its
    defaults (a redeclared field keeps this docstring)."""

    init: str | None = None
    """The checkpoint to start from (orchard's, or a Hugging Face model directory or Hub id)."""
    out: str = "runs/run"
    """Run directory. Running again resumes it."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Start:
    """What a method that trains a checkpoint further starts from."""

    runtime: Runtime
    checkpoint: Checkpoint
    model: CausalLM
    """The checkpoint's model in float32 (autocast brings the speed), in training mode; in the
    checkpoint's dtype, memory-mapped, when the run shards it (made float32 as it is sharded)."""
    tokenizer: Tokenizer


def start_from(init: str | None, command: str, train: TrainConfig) -> Start:
    """The checkpoint `init` (refused when unset), merged, as `command` trains it on `train`'s runtime."""
    if not init:
        raise OrchardError(f"init: {command} needs a checkpoint to start from, e.g. init=runs/quickstart/sft")
    runtime = training_runtime(train)
    checkpoint = load_merged(init)
    model = checkpoint.model
    if not runtime.distributed.shards(train.parallel):
        # A model to shard stays memory-mapped in the checkpoint's dtype: each process makes float32
        # only its shards, block by block (Distributed.wrap), never the whole model.
        model = model.float()
    return Start(runtime, checkpoint, model.train(), checkpoint.tokenizer)


def finish(start: Start, config: MethodConfig, method, stage: str, data_record: dict, parameters: tuple[int, int],
           context_length: int) -> TrainResult:
    """Train `start.model` with `method` to `config.train`'s limits in `config.out`: the lineage
    record (stage, parent, the whole recipe, data, (trainable, total) parameters) and the engine."""
    record = new_record(stage, to_dict(config), data_record, parent=start.checkpoint.path,
                        peft_method=config.peft.method, parameters=parameters)
    trainer = Trainer(config.train, start.model, method, start.tokenizer, Path(config.out), record,
                      flops_per_token=start.model.config.training_flops_per_token(context_length),
                      runtime=start.runtime)
    return trainer.fit()
