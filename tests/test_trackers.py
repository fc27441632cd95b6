"""train.report_to: a run's metrics.jsonl values and recipe also reach TensorBoard and Weights &
Biases, read back here with each tracker's own file format; a resumed run keeps one history."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from orchard.cli.main import main
from orchard.files import read_json_lines
from cli_errors import run_error
from untrusted import TINY_MODEL, write_corpus

RUN = [*TINY_MODEL, "train.log_every=1", "train.eval_every=3", "train.save_every=2", "train.keep_checkpoints=3",
       "train.lr=2e-3", "train.compile=false"]


def pretrain(tmp_path: Path, *overrides: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    out = tmp_path / "run"
    assert main(["pretrain", f"out={out}", f"data.path={corpus}", *RUN, *overrides]) == 0
    return out


def logged(out: Path, key: str) -> dict[int, float]:
    """metrics.jsonl's values of `key`, by step."""
    return {entry["step"]: entry[key] for entry in read_json_lines(out / "metrics.jsonl") if key in entry}


def tensorboard_scalars(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def steps_and_values(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def as_float32(values: dict[int, float]) -> list[tuple[int, float]]:
    """What a TensorBoard scalar holds of each value: its float32 rounding."""
    return [(step, float(np.float32(value))) for step, value in sorted(values.items())]


def test_tensorboard_gets_every_metric_and_the_recipe(tmp_path):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out = pretrain(tmp_path, "train.max_steps=6", "train.report_to=tensorboard")
    accumulator = tensorboard_scalars(out)
    assert [step for step, _ in steps_and_values(accumulator, "loss")] == [1, 2, 3, 4, 5, 6]
    for tag in ("loss", "val_loss", "lr", "grad_norm", "tokens"):
        assert steps_and_values(accumulator, tag) == as_float32(logged(out, tag)), tag
    assert [step for step, _ in steps_and_values(accumulator, "val_loss")] == [0, 3, 6]

    start = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hyperparameters = HParamsPluginData.FromString(start).session_start_info.hparams
    assert hyperparameters["train.lr"].number_value == 2e-3
    assert hyperparameters["model.hidden_size"].number_value == 32
    assert hyperparameters["train.report_to"].string_value == '["tensorboard"]'


def wandb_records(wandb_file: Path) -> list:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks of chunks, each with a crc32, a length and a type: full, first, middle,
    last), each record a `Record` protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, chunk_header = wandb_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, parts, position = [], [], 7
    while position + chunk_header <= len(data):
        left_in_block = block - position % block
        if left_in_block < chunk_header:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + chunk_header])
        position += chunk_header
        parts.append(data[position:position + length])
        position += length
        if kind in (1, 4):  # full, last
            records.append(Record.FromString(b"".join(parts)))
            parts = []
    return records


def test_wandb_offline_run_holds_the_history_and_the_recipe(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for variable, folder in [("WANDB_DIR", "wandb-dir"), ("WANDB_CACHE_DIR", "wandb-cache"),
                             ("WANDB_CONFIG_DIR", "wandb-config")]:
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    out = pretrain(tmp_path, "train.max_steps=4", "train.report_to=wandb")
    run_id = (out / "wandb" / "run_id").read_text().strip()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert run_dir.name.endswith(run_id)
    records = wandb_records(run_dir / f"run-{run_id}.wandb")

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "orchard", "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["lr"] == 2e-3 and config["model"]["hidden_size"] == 32

    history = [{item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert {row["_step"]: row["loss"] for row in history if "loss" in row} == logged(out, "loss")
    assert {row["_step"]: row["val_loss"] for row in history if "val_loss" in row} == logged(out, "val_loss")


def test_an_unknown_tracker_is_one_line(tmp_path, capsys):
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'run'}", "train.report_to=tensorboard,mlflow"])
    assert line == "orchard: error: train.report_to[1]: expected one of tensorboard, wandb, got 'mlflow'"
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_names_the_extra(tmp_path, capsys, monkeypatch):
    import orchard.training.trackers as trackers

    real_find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'run'}", "train.report_to=[wandb]"])
    assert line == "orchard: error: train.report_to: wandb needs the wandb package: pip install 'orchard-lm[wandb]'"
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_one_tensorboard_history(tmp_path):
    pretrain(tmp_path, "train.max_steps=3", "train.report_to=tensorboard")
    out = pretrain(tmp_path, "train.max_steps=6", "train.report_to=tensorboard")  # resumes from step 3
    assert [step for step, _ in steps_and_values(tensorboard_scalars(out), "loss")] == [1, 2, 3, 4, 5, 6]

    # A kill after step 6, before its checkpoint: the run resumes from step 4 and logs 5 and 6 again,
    # which must replace (not add to) what the killed attempt logged for them.
    for lost in ("final", "step-000006"):
        shutil.rmtree(out / lost)
    before = {tag: steps_and_values(tensorboard_scalars(out), tag) for tag in ("loss", "val_loss")}
    pretrain(tmp_path, "train.max_steps=6", "train.report_to=tensorboard")
    accumulator = tensorboard_scalars(out)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one directory, three attempts
    for tag in ("loss", "val_loss"):
        assert steps_and_values(accumulator, tag) == as_float32(logged(out, tag)), tag
    assert [step for step, _ in steps_and_values(accumulator, "val_loss")] == [0, 3, 6]
    # On CPU a resumed run computes the same steps as one that never stopped.
    assert steps_and_values(accumulator, "loss") == before["loss"]


def test_trackers_are_closed_when_a_run_fails(tmp_path, monkeypatch):
    import orchard.training.engine as engine

    events = []

    class FailingTracker:
        def log(self, scalars, step):
            events.append(("log", step))
            if step == 2:
                raise RuntimeError("the tracker's disk is full")

        def close(self):
            events.append(("close", None))

    monkeypatch.setattr(engine, "open_tracker", lambda *args: FailingTracker())
    corpus = write_corpus(tmp_path / "corpus.txt")
    with pytest.raises(RuntimeError, match="disk is full"):
        main(["pretrain", f"out={tmp_path / 'run'}", f"data.path={corpus}", *RUN, "train.max_steps=6",
              "train.report_to=tensorboard"])
    assert events == [("log", 0), ("log", 1), ("log", 2), ("close", None)]
