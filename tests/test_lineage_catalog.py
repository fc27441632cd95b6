"""The catalog of checkpoints and the family tree read from it: every relation a record names
becomes an edge, identity survives a move, a deleted checkpoint is shown missing, eight processes
saving at once lose nothing, the cost ledger adds up the records' figures, and the CLI prints,
draws and compares. (The quickstart's whole tree is checked in test_cli's quickstart test.)"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from contextlib import closing
from pathlib import Path

import pytest

from cli_errors import run_error
from orchard.checkpoint import save_checkpoint
from orchard.cli.main import main
from orchard.lineage import parent_entry
from orchard.lineage.catalog import catalog_file, connect, relations, scan
from orchard.lineage.family import Family
from orchard.model import CausalLM, ModelConfig
from orchard.tokenizer import Tokenizer

SENTENCES = ["Tom Snow lives in Greenfield.", "Hugo Wood is a teacher.", "37 + 45 = 82"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(SENTENCES * 20), vocab_size=300)


def checkpoint(path: Path, tokenizer, seed: int, record: dict, layers: int = 2) -> Path:
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    model = CausalLM(config)
    model.reset_parameters(seed=seed)
    return save_checkpoint(path, model, tokenizer, record)


def child(path: Path, tokenizer, seed: int, parent: Path, stage: str, layers: int = 2, **fields) -> Path:
    return checkpoint(path, tokenizer, seed, {"stage": stage, "parent": parent_entry(parent), **fields}, layers)


def family() -> Family:
    return Family(connect())


@pytest.fixture
def pipeline(tmp_path, tokenizer):
    """A small family written the way orchard's commands write it: a base; SFT; DPO and GRPO (with
    the SFT model as their reference, GRPO rewarded by a reward model); two students distilled from
    the base through one teacher cache; a quantized student; a grown base; a LoRA adapter."""
    root = tmp_path / "runs"
    cache = {"path": str(tmp_path / "cache" / "teacher-1"), "k": 16, "tokens": 1000, "build_seconds": 2.0,
             "build_flops": 3.0e9}
    paths = {"base": checkpoint(root / "base" / "final", tokenizer, 0,
                                {"stage": "pretrain", "parent": None, "training": {"flops": 1.0e12, "wall_seconds": 60,
                                                                                   "tokens": 50_000},
                                 "metrics": {"val_loss": 2.5}})}
    paths["sft"] = child(root / "sft" / "final", tokenizer, 1, paths["base"], "sft",
                         training={"flops": 2.0e11, "wall_seconds": 10})
    paths["reward"] = child(root / "reward" / "final", tokenizer, 2, paths["sft"], "reward")
    paths["dpo"] = child(root / "dpo" / "final", tokenizer, 3, paths["sft"], "dpo", recipe={"loss": "dpo"})
    paths["simpo"] = child(root / "simpo" / "final", tokenizer, 4, paths["sft"], "dpo", recipe={"loss": "simpo"})
    paths["grpo"] = child(root / "grpo" / "final", tokenizer, 5, paths["sft"], "grpo",
                          recipe={"beta": 0.04, "rewards": [f"model:{root / 'reward'}", "0.5*single_line"]})
    for index, name in enumerate(["student", "student-2"]):
        paths[name] = child(root / name / "final", tokenizer, 6 + index, paths["base"], "distill-offline",
                            data={"teacher_cache": {**cache, "built_now": index == 0}},
                            training={"flops": 4.0e11, "wall_seconds": 20})
    paths["int8"] = child(root / "student" / "final-int8", tokenizer, 8, paths["student"], "quantize")
    paths["grown"] = child(root / "grown", tokenizer, 9, paths["base"], "grow")
    paths["lora"] = child(root / "lora" / "final", tokenizer, 10, paths["base"], "sft-lora")
    return paths


def relations_of(fam: Family, path: Path) -> dict[str, list[str]]:
    return {parent.name: rels for parent, rels in fam.parents(fam.find(path))}


def test_every_relation_a_record_names_becomes_an_edge(pipeline):
    fam = family()
    assert relations_of(fam, pipeline["sft"]) == {"base": ["trained from"]}
    assert relations_of(fam, pipeline["dpo"]) == {"sft": ["reference of", "trained from"]}
    assert relations_of(fam, pipeline["simpo"]) == {"sft": ["trained from"]}  # SimPO has no reference
    assert relations_of(fam, pipeline["grpo"]) == {"sft": ["reference of", "trained from"],
                                                   "reward": ["reward model of"]}
    assert relations_of(fam, pipeline["student"]) == {"base": ["distilled from"],
                                                      "teacher cache teacher-1": ["teacher cache reused by"]}
    assert relations_of(fam, pipeline["int8"]) == {"student": ["quantized from"]}
    assert relations_of(fam, pipeline["grown"]) == {"base": ["grown from"]}
    assert relations_of(fam, pipeline["lora"]) == {"base": ["adapter of"]}
    # Every checkpoint of the family below the base, with the tree's relations.
    tree = fam.to_json(fam.find(pipeline["base"]))
    names = []

    def walk(entries):
        for entry in entries:
            names.append(entry["name"])
            walk(entry["children"])
    walk(tree["descendants"])
    assert sorted(names) == sorted(["sft", "reward", "dpo", "simpo", "grpo", "student", "student-2", "student-int8",
                                    "grown", "lora"])
    text = fam.render(fam.find(pipeline["grpo"]))
    assert "reference of, trained from: sft [sft]" in text and "reward model of: reward [reward]" in text


def test_continual_and_export_relations_from_records():
    parent = {"path": "/runs/a/final", "weights_sha256": "ab"}
    replay = {"stage": "continual", "parent": parent, "recipe": {"strategy": "replay"}, "data": {"replay_buffer": 100}}
    ewc = {"stage": "continual-lora", "parent": parent, "recipe": {"strategy": "ewc"}}
    export = {"stage": "sft-lora", "parent": parent, "merged_adapter": "/runs/l/final",
              "export": {"format": "hf", "source": {"path": "/runs/l/final", "weights_sha256": "cd"}}}
    assert [r[2] for r in relations(replay)] == ["trained from", "replayed data of"]
    assert [r[2] for r in relations(ewc)] == ["adapter of", "EWC Fisher of"]
    assert [(r[1], r[2]) for r in relations(export)] == [("sha256:cd", "exported as"), ("sha256:cd", "merged from")]


def test_a_moved_run_keeps_its_identity_and_relations_and_a_deleted_one_is_missing(pipeline, tmp_path, capsys):
    fam = family()
    identity = fam.find(pipeline["dpo"])
    moved = tmp_path / "elsewhere" / "dpo"
    shutil.move(str(pipeline["dpo"].parent), moved)
    scan([tmp_path / "elsewhere"])
    fam = family()
    assert fam.find(moved / "final") == identity
    node = fam.node(identity)
    assert node.path == str((moved / "final").resolve()) and not node.missing
    assert relations_of(fam, moved / "final") == {"sft": ["reference of", "trained from"]}
    # Deleted: still in the family, shown as missing.
    shutil.rmtree(pipeline["simpo"].parent)
    capsys.readouterr()
    assert main(["lineage", str(pipeline["sft"]), "--json"]) == 0
    below = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)["descendants"]}
    assert below["simpo"]["missing"] and not below["dpo"]["missing"]
    assert main(["lineage", str(pipeline["sft"])]) == 0
    assert "simpo [dpo]" in capsys.readouterr().out.split("(missing)")[0].splitlines()[-1]


def _save_one(args) -> str:
    home, directory, seed = args
    import os

    os.environ["ORCHARD_HOME"] = home
    tokenizer = Tokenizer.train(iter(SENTENCES * 20), vocab_size=300)
    checkpoint(Path(directory), tokenizer, seed, {"stage": "pretrain", "parent": None})
    return directory


def test_eight_processes_saving_at_once_lose_no_entry(tmp_path):
    home = str(tmp_path / "home")
    jobs = [(home, str(tmp_path / f"run-{i}" / "final"), 100 + i) for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        assert len(pool.map(_save_one, jobs)) == 8
    with closing(connect(Path(home) / "catalog.sqlite")) as connection:
        paths = {path for (path,) in connection.execute("SELECT path FROM locations")}
        count = connection.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
    assert paths == {str(Path(directory).resolve()) for _, directory, _ in jobs} and count == 8


def test_the_cost_ledger_adds_up_the_records(pipeline):
    fam = family()
    ledger = fam.cost(fam.find(pipeline["student"]))
    assert ledger["own"]["flops"] == 4.0e11 and ledger["own"]["seconds"] == 20
    assert [(a["name"], a["flops"]) for a in ledger["ancestors"]] == [("base", 1.0e12)]
    shared = {item["relation"]: item for item in ledger["shared"]}
    cache = shared["teacher cache reused by"]
    assert (cache["flops"], cache["shared_by"], cache["share_flops"]) == (3.0e9, 2, 1.5e9)
    # The base is shared by the four checkpoints distilled, grown... from it the same way: two students.
    assert shared["distilled from"]["shared_by"] == 2 and shared["distilled from"]["share_flops"] == 0.5e12
    assert ledger["total_flops"] == 4.0e11 + 1.0e12 + 1.5e9
    assert ledger["saved"] is None  # no from-scratch run to compare with: nothing is claimed


def test_saved_is_shown_only_against_a_measured_run_from_scratch(tmp_path, tokenizer):
    data = {"fingerprint": "same-data"}
    small = checkpoint(tmp_path / "small" / "final", tokenizer, 0, {"stage": "pretrain", "parent": None, "data": data,
                                                                    "training": {"flops": 1.0e12},
                                                                    "metrics": {"val_loss": 3.0}})
    grown = child(tmp_path / "grown", tokenizer, 1, small, "grow", layers=4)
    continued = child(tmp_path / "continued" / "final", tokenizer, 2, grown, "pretrain", layers=4, data=data,
                      training={"flops": 2.0e12}, metrics={"val_loss": 2.0})
    scratch = {"stage": "pretrain", "parent": None, "data": data, "training": {"flops": 8.0e12}}
    checkpoint(tmp_path / "scratch" / "final", tokenizer, 3, {**scratch, "metrics": {"val_loss": 2.05}}, layers=2)
    fam = family()
    # The only run from scratch has another architecture (and its own ancestor is no comparison).
    assert fam.cost(fam.find(continued))["saved"] is None
    checkpoint(tmp_path / "scratch-4" / "final", tokenizer, 4, {**scratch, "metrics": {"val_loss": 2.05}}, layers=4)
    checkpoint(tmp_path / "better" / "final", tokenizer, 5, {**scratch, "metrics": {"val_loss": 1.5}}, layers=4)
    fam = family()
    saved = fam.cost(fam.find(continued))["saved"]
    assert saved["from_scratch"]["name"] == "scratch-4"  # not the one that got further than the grown model
    assert saved["flops"] == 8.0e12 - (2.0e12 + 1.0e12) and saved["fraction"] == pytest.approx(5 / 8)


def test_lineage_commands(pipeline, tmp_path, capsys):
    capsys.readouterr()
    assert main(["lineage", str(pipeline["base"].parent), "--plot", str(tmp_path / "tree.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("base [pretrain]") and "distilled from: student-2" in out
    png = (tmp_path / "tree.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert main(["lineage", str(pipeline["student"]), "--cost"]) == 0
    out = capsys.readouterr().out
    assert "its own training 4e+11 FLOPs" in out and "shared by 2: 1.5e+09 FLOPs each" in out
    assert "saved: not measured" in out
    assert main(["lineage", "diff", str(pipeline["dpo"]), str(pipeline["simpo"]), "--json"]) == 0
    differences = json.loads(capsys.readouterr().out)
    assert differences["recipe"] == {"loss": ["dpo", "simpo"]}
    assert main(["lineage", "scan", str(tmp_path / "runs")]) == 0
    assert f"catalogued in {catalog_file()}" in capsys.readouterr().out
    line = run_error(capsys, ["lineage", str(tmp_path)])
    assert "not a checkpoint" in line
    line = run_error(capsys, ["lineage", "diff", str(pipeline["dpo"])])
    assert "two checkpoints" in line
