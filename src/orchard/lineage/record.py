"""The lineage record (`orchard.json`) each checkpoint carries.

It says what stage produced the checkpoint, from which parent (path and content hash, so a moved
or altered parent is detected), with which fully resolved recipe, on which data (fingerprint and
token count), and at what cost (steps, tokens, wall seconds, estimated FLOPs), plus its final
metrics. The training engine fills in the cost and metrics; following `parent` links gives the
model's family tree and the compute its ancestors already spent.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from .. import __version__
from ..checkpoint.layout import RECORD_FILE, weights_sha256
from ..files import read_json

FORMAT = "orchard-lineage/1"


def checkpoint_name(checkpoint_dir: Path) -> str:
    """A checkpoint's short name (a served model's id, an evaluation's column): its folder's, or its
    run's for a run's `final` (`runs/quickstart/sft/final` -> `sft`), steps and derived finals
    (`runs/q/distill/final-int8` -> `distill-int8`)."""
    name, run = checkpoint_dir.name, checkpoint_dir.parent.name
    if name == "final":
        return run
    if name.startswith("final-"):
        return f"{run}-{name.removeprefix('final-')}"
    if name.startswith("step-"):
        return f"{run}-{name}"
    return name


def parent_entry(checkpoint_dir: str | Path) -> dict:
    """How a child names its parent: the path and the hash of the parent's weights."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    record_file = checkpoint_dir / RECORD_FILE
    sha = None
    if record_file.is_file():
        sha = read_json(record_file).get("weights_sha256")
    if sha is None:
        sha = weights_sha256(checkpoint_dir)
    return {"path": str(checkpoint_dir), "weights_sha256": sha}


def made_from(target: str | Path, stage: str, source: str | Path) -> bool:
    """Whether the checkpoint `target` is what the command `stage` made from the checkpoint at
    `source` (its record names that path as its parent; the weights there may have been trained on
    since), and so may be made again in place."""
    record_file = Path(target) / RECORD_FILE
    if not record_file.is_file():
        return False
    record = read_json(record_file)
    return record.get("stage") == stage and (record.get("parent") or {}).get("path") == str(Path(source).resolve())


def new_record(stage: str, recipe: dict, data: dict, parent: str | Path | None = None,
               peft_method: str = "none", parameters: tuple[int, int] | None = None) -> dict:
    """A stage's lineage record before training. A stage that trains adapters is named after them
    ("sft-lora"); `parameters` is (trainable, total)."""
    record = {
        "format": FORMAT,
        "orchard_version": __version__,
        "stage": stage if peft_method == "none" else f"{stage}-{peft_method}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parent": parent_entry(parent) if parent else None,
        "recipe": recipe,
        "data": data,
    }
    if parameters is not None:
        record["parameters"] = {"trainable": parameters[0], "total": parameters[1]}
    return record


def ancestry(checkpoint_dir: str | Path) -> list[dict]:
    """The records of a checkpoint and its ancestors, child first. A parent that is gone or whose
    weights changed since is reported as such rather than followed."""
    chain = []
    current: Path | None = Path(checkpoint_dir)
    seen = set()
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        record_file = current / RECORD_FILE
        if not record_file.is_file():
            chain.append({"path": str(current), "stage": "external", "missing_record": True})
            break
        record = read_json(record_file)
        record = {"path": str(current), **record}
        chain.append(record)
        parent = record.get("parent")
        if not parent:
            break
        parent_dir = Path(parent["path"])
        parent_record = parent_dir / RECORD_FILE
        if not parent_record.is_file():
            chain.append({"path": parent["path"], "stage": "unavailable", "missing_record": True})
            break
        actual = read_json(parent_record).get("weights_sha256")
        if parent.get("weights_sha256") and actual != parent["weights_sha256"]:
            chain.append({"path": parent["path"], "stage": "changed since", "missing_record": True})
            break
        current = parent_dir
    return chain


def total_flops(chain: list[dict]) -> float:
    """Training FLOPs of a checkpoint including everything its ancestors spent."""
    return sum(r.get("training", {}).get("flops", 0.0) for r in chain)
