"""Experiment trackers: a run's metrics also go to TensorBoard and/or Weights & Biases.

    orchard pretrain train.report_to=tensorboard          # then: tensorboard --logdir runs/
    WANDB_MODE=offline orchard pretrain train.report_to=wandb

The engine hands each tracker of `train.report_to` every numeric value of every metrics.jsonl line,
at that line's step, and the run's recipe once as hyper-parameters; only the process that writes
metrics.jsonl reports. Files stay in the run directory: TensorBoard's event files in
RUN_DIR/tensorboard/, W&B's offline runs and logs in RUN_DIR/wandb/. A resumed run continues the
same history: the same TensorBoard directory, the same W&B run (its id is kept in
RUN_DIR/wandb/run_id). Each tracker's package is imported only by a run that asks for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Literal, Protocol

from ..errors import OrchardError

TrackerName = Literal["tensorboard", "wandb"]
"""The trackers `train.report_to` may name; each needs the package of its name, installed by the
orchard-lm extra of its name."""

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_RUN_ID_FILE = "run_id"


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None:
        """Record `scalars` (name -> value) at optimizer step `step`."""

    def close(self) -> None:
        """Write out what is buffered and end the run's session with the tracker."""


def _missing_package(name: str, detail: str = "") -> OrchardError:
    return OrchardError(f"train.report_to: {name} needs the {name} package{detail}: "
                        f"pip install 'orchard-lm[{name}]'")


def check_installed(name: str) -> None:
    """Refuse a tracker whose package is not installed, without importing it (a config check,
    made before a run prepares its data)."""
    if importlib.util.find_spec(name) is None:
        raise _missing_package(name)


def open_tracker(name: TrackerName, run_dir: Path, recipe: dict, first_step: int) -> Tracker:
    """The tracker `name` of the run in `run_dir`, told its recipe. `first_step` is the first step
    this attempt logs: 0 for a run that starts (over whatever an earlier attempt left), the step
    after its checkpoint for a resumed one."""
    if name == "tensorboard":
        return TensorBoardTracker(run_dir / TENSORBOARD_DIR, recipe, first_step)
    return WandbTracker(run_dir, recipe, resumed=first_step > 0)


def flat_hyperparameters(recipe: dict, prefix: str = "") -> dict[str, float | str]:
    """The recipe as dotted keys (train.lr) holding numbers or strings, which is all TensorBoard's
    hyper-parameter plugin takes: other values (true, null, lists) are written as JSON."""
    flat: dict[str, float | str] = {}
    for key, value in recipe.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, dotted + "."))
        elif isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            flat[dotted] = value
        else:
            flat[dotted] = json.dumps(value)
    return flat


class TensorBoardTracker:
    """Scalars as TensorBoard summaries, the recipe in its HParams dashboard."""

    def __init__(self, log_dir: Path, recipe: dict, first_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as error:
            raise _missing_package("tensorboard", f" ({error})") from None
        # The steps from first_step on are logged (again) by this attempt: purge_step hides what an
        # interrupted attempt logged for them, so the directory holds one history with each step once.
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step)
        self.step, self.written = first_step, set[str]()
        """The last step logged and the names written at it: an evaluation's line repeats the
        step's token count, which TensorBoard would otherwise plot twice."""
        # The HParams dashboard compares runs by these values beside each run's loss.
        for summary in hparams(flat_hyperparameters(recipe), {"loss": None}):
            self.writer.file_writer.add_summary(summary)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if step != self.step:
            self.step, self.written = step, set()
        for key, value in scalars.items():
            if key not in self.written:
                self.writer.add_scalar(key, value, step)
                self.written.add(key)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run whose files are in RUN_DIR/wandb/; its mode (online, offline) is the
    user's (WANDB_MODE), its project WANDB_PROJECT or "orchard", its name the run directory's.

    Unlike TensorBoard's, a W&B history cannot be cut back: a run resumed from a checkpoint older
    than the last step an interrupted attempt logged keeps that attempt's values for the steps in
    between (W&B drops a step at or below the last it has) and adds the steps after them."""

    def __init__(self, run_dir: Path, recipe: dict, resumed: bool):
        try:
            import wandb
        except ImportError as error:
            raise _missing_package("wandb", f" ({error})") from None
        id_file = run_dir / WANDB_DIR / WANDB_RUN_ID_FILE
        if resumed and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            # A run starting at step 0 is a new W&B run: W&B drops steps below those a run already has.
            run_id = secrets.token_hex(6)
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        try:
            # dir=run_dir: W&B writes into its wandb/ subdirectory.
            self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "orchard"),
                                  name=run_dir.name, config=recipe, id=run_id, resume="allow")
        except wandb.errors.Error as error:
            raise OrchardError(f"train.report_to: wandb could not start a run ({' '.join(str(error).split())}); "
                               f"WANDB_MODE=offline logs without an account") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
