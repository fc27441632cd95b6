"""Model cards: every checkpoint and Hugging Face export carries a README.md that huggingface_hub
reads without a warning, naming its base model and their relation as the Hub expects, its measured
metrics, its lineage and its cost."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from orchard.checkpoint.quantize import quantize_checkpoint
from orchard.config import load_config
from orchard.interop.export import export_hf
from orchard.lineage.card import FULL, render_model_card
from orchard.methods import pretrain, sft
from orchard.model import ModelConfig

TRAIN = ["train.batch_size=4", "train.eval_every=0", "train.eval_batches=2", "train.precision=fp32",
         "train.warmup_steps=1", "train.log_every=1", "train.progress=false"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny lineage on the built-in world: pretrain from scratch (3 steps), then full SFT and LoRA
    SFT of it (2 steps each), the SFT quantized to int8 and the LoRA checkpoint exported merged."""
    root = tmp_path_factory.mktemp("cards")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCHARD_CACHE", str(root / "cache"))  # the built-in corpus, never ~/.cache
        scratch = pretrain.run(load_config(pretrain.PretrainConfig, None, [
            f"out={root / 'pretrain'}", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
            "model.max_position_embeddings=256", "tokenizer.vocab_size=400", "data.synthetic_documents=300",
            "data.seq_len=32", "train.max_steps=3", *TRAIN])).final_dir

        def fine_tune(name: str, *overrides: str) -> Path:
            return sft.run(load_config(sft.SFTConfig, None, [
                f"init={scratch}", f"out={root / name}", "data.max_conversations=40", "data.max_length=128",
                "train.max_steps=2", *TRAIN, *overrides])).final_dir

        tuned = fine_tune("sft")
        adapter = fine_tune("lora", "peft.method=lora", "peft.r=2")
    quantized = quantize_checkpoint(tuned, root / "sft-int8", bits=8).path
    merged = export_hf(adapter, root / "lora-merged")
    return SimpleNamespace(scratch=scratch, sft=tuned, lora=adapter, int8=quantized, merged=merged)


def load_card(directory: Path, caplog) -> ModelCard:
    """The card, read as the Hub reads it; any warning (Python's or huggingface_hub's log) fails."""
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="huggingface_hub"):
        warnings.simplefilter("error")
        card = ModelCard.load(directory / "README.md")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    return card


def record(directory: Path) -> dict:
    return json.loads((directory / "orchard.json").read_text())


def test_the_warning_check_sees_huggingface_hub_warnings(tmp_path, caplog):
    (tmp_path / "README.md").write_text("# no front matter\n")
    with pytest.raises(AssertionError, match="metadata block was not found"):
        load_card(tmp_path, caplog)


@pytest.mark.parametrize("name, base, relation, library", [
    ("scratch", None, None, "transformers"),
    ("sft", "scratch", "finetune", "transformers"),
    ("lora", "scratch", "adapter", "peft"),
    ("int8", "sft", "quantized", None),  # orchard's own format: transformers would drop its layers
    ("merged", "scratch", "merge", "transformers"),  # the adapter merged into its base
])
def test_each_card_names_its_base_model_and_relation(family, caplog, name, base, relation, library):
    data = load_card(getattr(family, name), caplog).data
    assert data.base_model == (str(getattr(family, base).resolve()) if base else None)
    assert data.get("base_model_relation") == relation
    assert data.library_name == library and data.pipeline_tag == "text-generation"
    # Every stage trained on the built-in world alone: orchard's own license.
    assert data.license == "apache-2.0" and data.datasets is None
    assert "orchard" in data.tags


def test_tags_name_the_stage_and_its_methods(family, caplog):
    assert load_card(family.lora, caplog).data.tags == ["orchard", "sft-lora", "sft", "lora"]
    assert load_card(family.int8, caplog).data.tags == ["orchard", "quantize", "int8"]
    assert load_card(family.merged, caplog).data.tags == ["orchard", "sft-lora", "sft", "lora", "merged"]


@pytest.mark.parametrize("name, metrics, model_name", [
    ("scratch", {"loss", "perplexity", "bpb"}, "pretrain"),  # runs/NAME/final is the model NAME
    ("sft", {"loss"}, "sft"),
    ("merged", {"loss"}, "lora-merged"),  # the adapter's metrics, which its export carries
    ("int8", set(), None),  # quantizing measures no validation metric
])
def test_model_index_holds_the_records_held_out_metrics(family, caplog, name, metrics, model_name):
    directory = getattr(family, name)
    data = load_card(directory, caplog).data
    results = data.eval_results or []
    assert {r.metric_type for r in results} == metrics
    for result in results:
        assert result.metric_value == record(directory)["metrics"][f"val_{result.metric_type}"]
        assert (result.task_type, result.dataset_type, result.dataset_split) == \
            ("text-generation", "orchard-built-in-world", "validation")
    assert data.model_name == model_name


def test_body_names_the_parent_and_the_flops(family, caplog):
    text = load_card(family.sft, caplog).text
    own, parent = record(family.sft)["training"]["flops"], record(family.scratch)["training"]["flops"]
    assert own > 0 and parent > 0
    assert f"Trained further from `{family.scratch.resolve()}`" in text
    assert f"2. `{family.scratch.resolve()}`: `pretrain`, {parent:.3g} FLOPs" in text
    assert f"- This stage: {own:.3g} FLOPs" in text and f"- In all: {own + parent:.3g} training FLOPs" in text
    assert f'AutoModelForCausalLM.from_pretrained("{family.sft.resolve()}")' in text
    lora = load_card(family.lora, caplog).text
    assert f'PeftModel.from_pretrained(base, "{family.lora.resolve()}/peft")' in lora


def test_a_hub_parent_is_named_by_its_id_and_sets_no_license(family, tmp_path, caplog):
    """A model from the Hub is a snapshot in the Hugging Face cache, without an orchard record."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(family.scratch, snapshot)
    (snapshot / "orchard.json").unlink()
    (snapshot / "README.md").unlink()
    out = quantize_checkpoint(snapshot, tmp_path / "int8", bits=8).path
    card = load_card(out, caplog)
    assert card.data.base_model == "tiny-org/tiny-llama" and card.data.get("base_model_relation") == "quantized"
    assert card.data.license is None  # the Hub model's license is not known here
    assert "`hf:tiny-org/tiny-llama` (a Hugging Face Hub model)" in card.text


def test_a_distilled_student_has_no_base_model_but_names_its_teacher():
    teacher = {"path": "/runs/big/final", "stage": "pretrain", "parent": None, "training": {"flops": 5e12},
               "data": {"paths": ["/cache/world.jsonl"]}, "recipe": {"data": {"path": None}}}
    student = {"path": "/runs/small/final", "stage": "distill-offline", "parent": {"path": "/runs/big/final"},
               "recipe": {"data": {"path": None}, "student_layers": None}, "data": {"paths": ["/cache/world.jsonl"]},
               "training": {"flops": 1e12}, "metrics": {"val_loss": 1.25, "val_tokens": 4096.0}}
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    card = ModelCard(render_model_card([student, teacher], config, FULL))
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert card.data.tags == ["orchard", "distill-offline", "distillation", "teacher:big"]
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("loss", 1.25)]
    assert "Distilled from the teacher `/runs/big/final`, the student trained from scratch." in card.text
    assert "- In all: 6e+12 training FLOPs" in card.text
    # A student built from the teacher's own layers starts from its weights: a fine-tune of it.
    student["recipe"]["student_layers"] = [0]
    card = ModelCard(render_model_card([student, teacher], config, FULL))
    assert card.data.base_model == "/runs/big/final" and card.data.get("base_model_relation") == "finetune"


def test_importing_lineage_first_works():
    """`checkpoint.save` imports the card module while `lineage.record` may still be importing the
    checkpoint package."""
    done = subprocess.run([sys.executable, "-c", "import orchard.lineage"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
