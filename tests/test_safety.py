"""What users must never see: code run from a file they were given, their data replaced, a diverged
run saved, a half-written or foreign file taken for a valid one."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from orchard.checkpoint import load_checkpoint, read_training_state, read_weights, save_checkpoint
from orchard.cli.main import main
from orchard.errors import OrchardError
from orchard.files import atomic_directory, cached_directory, check_output, fingerprint, remove_stale_temporaries
from orchard.interop.export import export_hf
from orchard.peft.format import load_lora_adapter
from orchard.lineage.record import parent_entry
from orchard.methods import pairs
from orchard.methods.distill import open_teacher_cache
from orchard.methods.registry import COMMANDS
from orchard.peft import LoraConfig, add_lora
from orchard.tokenizer import Tokenizer
from orchard.training.runtime import Runtime
from cli_errors import run_error
from untrusted import SENTENCES, TINY_MODEL, Payload, tiny_model, write_corpus

TINY = [*TINY_MODEL, "train.eval_every=2", "train.save_every=1", "train.keep_checkpoints=10"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(SENTENCES * 20), vocab_size=300)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def lora_checkpoint(tmp_path: Path, tokenizer: Tokenizer) -> tuple[Path, Path]:
    """A base checkpoint and an adapter checkpoint on it whose B matrices are not zero (so merging
    changes the weights)."""
    base = save_checkpoint(tmp_path / "base", tiny_model(tokenizer), tokenizer, {"stage": "pretrain"})
    model = tiny_model(tokenizer)
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    adapter = save_checkpoint(tmp_path / "lora", model, tokenizer, {"stage": "sft-lora", "parent": parent_entry(base)})
    return base, adapter


def pretrain(out: Path, corpus: Path, *overrides: str) -> list[str]:
    return ["pretrain", f"out={out}", f"data.path={corpus}", *TINY, *overrides]


# --- 1. a planted pickle never runs --------------------------------------------------------------


def test_training_state_is_json_and_safetensors(tmp_path, corpus):
    assert main(pretrain(tmp_path / "run", corpus, "train.max_steps=2")) == 0
    step = tmp_path / "run" / "step-000002"
    assert sorted(p.name for p in step.glob("training_state*")) == ["training_state.json", "training_state.safetensors"]
    state = read_training_state(step)
    assert state["state"]["step"] == 2 and state["rng"].dtype == torch.uint8
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)


def test_a_pickle_planted_in_a_run_directory_never_runs(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(pretrain(run, corpus, "train.max_steps=2")) == 0
    marker = tmp_path / "pwned"
    shutil.rmtree(run / "final")
    for step in run.glob("step-*"):
        (step / "training_state.pt").write_bytes(pickle.dumps(Payload(marker)))  # beside the real state
    assert main(pretrain(run, corpus, "train.max_steps=3")) == 0
    # Alone, as an older orchard wrote it, and with the recipe taken out of every record.
    for step in run.glob("step-*"):
        (step / "training_state.json").unlink()
        record = json.loads((step / "orchard.json").read_text())
        (step / "orchard.json").write_text(json.dumps({k: v for k, v in record.items() if k != "recipe"}))
    shutil.rmtree(run / "final")
    line = run_error(capsys, pretrain(run, corpus, "train.max_steps=4"))
    assert "none of its step checkpoints can be resumed" in line
    for command in (["sft", f"init={run}", f"out={run}"], ["dpo", f"init={run}", f"out={run}"]):
        run_error(capsys, command)
    assert not marker.exists()


def test_a_pickled_dpo_reference_cache_is_computed_again(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    (tmp_path / pairs.REFERENCE_FILE).write_bytes(pickle.dumps(Payload(marker)))
    (tmp_path / "reference_logps.pt").write_bytes(pickle.dumps(Payload(marker)))  # the old name: never read
    computed = []
    monkeypatch.setattr(pairs, "reference_log_probs", lambda model, pairs, *a: computed.append(1) or
                        torch.zeros(len(pairs), 2))
    pair = SimpleNamespace(chosen=SimpleNamespace(input_ids=[1, 2]), rejected=SimpleNamespace(input_ids=[1, 3]))
    reference = pairs.cached_reference(tmp_path, torch.nn.Linear(1, 1), [pair] * 3, [pair] * 2, 0, 2, "sha", Runtime())
    assert computed == [1, 1] and reference["train"].shape == (3, 2) and not marker.exists()
    assert load_file(tmp_path / pairs.REFERENCE_FILE)["val"].shape == (2, 2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickled_legacy_peft_adapter_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(OrchardError, match="adapter_model.bin: unreadable weights"):
        load_lora_adapter(adapter)
    torch.save({"weights": Payload(marker)}, adapter / "adapter_model.bin")  # as torch.save writes one
    with pytest.raises(OrchardError, match="adapter_model.bin: unreadable weights"):
        load_lora_adapter(adapter)
    assert not marker.exists()


def test_a_pickled_teacher_cache_is_removed_not_loaded(tmp_path):
    marker = tmp_path / "pwned"
    cache = tmp_path / "teacher-cache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"windows": {"train": 1}}))
    np.save(cache / "train.ids.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.save(cache / "train.log_probs.npy", np.zeros((1, 2, 2), dtype=np.float16))
    assert open_teacher_cache(cache) is None
    assert not cache.exists() and not marker.exists()


def test_pickled_safetensors_are_one_line_errors(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "fisher.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(OrchardError, match="fisher.safetensors: unreadable weights"):
        read_weights(tmp_path / "fisher.safetensors")
    assert not marker.exists()


# --- 2. nothing is written over what orchard did not write ----------------------------------------


def test_export_replaces_its_own_export_and_nothing_else(tmp_path, tokenizer, capsys):
    one = save_checkpoint(tmp_path / "one", tiny_model(tokenizer, 0), tokenizer, {"stage": "pretrain"})
    two = save_checkpoint(tmp_path / "two", tiny_model(tokenizer, 1), tokenizer, {"stage": "pretrain"})
    out = tmp_path / "export"
    assert main(["export", str(one), "--format", "hf", "--out", str(out)]) == 0
    assert main(["export", str(one), "--format", "hf", "--out", str(out)]) == 0  # the same again: replaced
    line = run_error(capsys, ["export", str(two), "--format", "hf", "--out", str(out)])
    assert "did not write from this input" in line and "--force" in line
    assert (out / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()
    assert main(["export", str(two), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    # --force never writes over the input itself, nor over a directory holding it.
    for target in (two, tmp_path):
        assert "which `orchard export` reads" in run_error(
            capsys, ["export", str(two), "--format", "hf", "--out", str(target), "--force"])
    assert (two / "model.safetensors").is_file() and not list(tmp_path.glob(".*.tmp-*"))


def test_quantize_and_grow_replace_only_their_own_earlier_output(tmp_path, tokenizer, capsys):
    source = save_checkpoint(tmp_path / "source", tiny_model(tokenizer), tokenizer, {"stage": "pretrain"})
    other = save_checkpoint(tmp_path / "other", tiny_model(tokenizer, 1), tokenizer, {"stage": "pretrain"})
    out = tmp_path / "out"
    assert main(["quantize", str(source), "--bits", "8", "--out", str(out)]) == 0
    assert main(["quantize", str(source), "--bits", "4", "--out", str(out)]) == 0  # its own: remade as int4
    assert json.loads((out / "quantization.json").read_text())["bits"] == 4
    before = (other / "model.safetensors").read_bytes()
    assert "did not write" in run_error(capsys, ["quantize", str(source), "--bits", "8", "--out", str(other)])
    assert "did not write" in run_error(capsys, ["grow", str(source), "--layers", "3", "--out", str(other)])
    assert (other / "model.safetensors").read_bytes() == before
    grown = tmp_path / "grown"
    assert main(["grow", str(source), "--layers", "3", "--out", str(grown)]) == 0
    assert main(["grow", str(source), "--layers", "4", "--out", str(grown)]) == 0
    assert json.loads((grown / "config.json").read_text())["num_hidden_layers"] == 4


def test_tokenizer_train_replaces_only_its_own_tokenizer(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(corpus), "--out", str(out)]
    assert main([*args, "--vocab-size", "300"]) == 0
    assert main([*args, "--vocab-size", "300"]) == 0
    line = run_error(capsys, [*args, "--vocab-size", "320"])  # another input: a tokenizer someone may need
    assert "did not write from this input" in line
    assert main([*args, "--vocab-size", "320", "--force"]) == 0
    assert Tokenizer.load(out).vocab_size == 320


def test_training_out_never_takes_over_a_users_folder(tmp_path, corpus, capsys):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    line = run_error(capsys, pretrain(folder, corpus, "train.max_steps=1"))
    assert "already holds files that orchard did not write (e.g. thesis.tex)" in line
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_training_command_writes_into_a_users_folder(command, tmp_path, capsys):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    line = run_error(capsys, [command, f"out={folder}"])
    assert f"out: {folder} already holds files that orchard did not write" in line
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_a_full_disk_is_one_line_and_leaves_no_half_written_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    import errno

    from orchard.checkpoint import save as checkpoint

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save_file", full)
    run = tmp_path / "run"
    line = run_error(capsys, pretrain(run, corpus, "train.max_steps=2"))
    assert line.endswith("model.safetensors: No space left on device")
    assert not list(run.glob("step-*")) and not (run / "final").exists() and not list(run.glob(".*.tmp-*"))


def test_a_run_directory_from_before_run_json_is_still_resumed(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(pretrain(run, corpus, "train.max_steps=2")) == 0
    (run / "run.json").unlink()
    (run / ".lock").unlink()
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert main(pretrain(run, corpus, "train.max_steps=3")) == 0
    assert f"resuming {run} from step 2" in capsys.readouterr().err
    # Its checkpoints' records still guard the recipe.
    shutil.rmtree(run / "final")
    (run / "run.json").unlink(missing_ok=True)
    assert "holds a run with train.lr=" in run_error(capsys, pretrain(run, corpus, "train.max_steps=4", "train.lr=0.5"))


def test_check_output_rules(tmp_path):
    def never(target):
        return False

    check_output(tmp_path / "new", "--out", "x", never)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "--out", "x", never)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a").write_text("a")
    check_output(tmp_path / "mine", "--out", "x", lambda target: True)
    with pytest.raises(OrchardError, match="--out: .*mine is an existing directory"):
        check_output(tmp_path / "mine", "--out", "x", never)
    check_output(tmp_path / "mine", "--out", "x", never, force=True)
    with pytest.raises(OrchardError, match="holds"):
        check_output(tmp_path, "--out", "x", never, inputs=(tmp_path / "mine",), force=True)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(OrchardError, match="symbolic link"):
        check_output(tmp_path / "link", "--out", "x", lambda target: True)


def test_atomic_directory_replaces_a_file_and_removes_dead_writers_leftovers(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file in the way")
    dead = tmp_path / ".out.tmp-999999999"
    dead.mkdir()
    live = tmp_path / ".out.tmp-1"  # pid 1 runs: a live writer's temporary is left alone
    live.mkdir()
    atomic_directory(target, lambda tmp: (tmp / "x").write_text("new"))
    assert (target / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]
    assert remove_stale_temporaries(tmp_path) == []


# --- 3. exports: adapters merged, links not followed -----------------------------------------------


def test_gguf_export_of_an_adapter_checkpoint_merges_it(tmp_path, tokenizer):
    gguf = pytest.importorskip("gguf")
    from orchard.interop.gguf import export_gguf

    base, adapter = lora_checkpoint(tmp_path, tokenizer)
    merged = export_hf(adapter, tmp_path / "merged")

    def tensors(path):
        return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}

    from_adapter = tensors(export_gguf(adapter, tmp_path / "adapter.gguf", "f32"))
    from_merged = tensors(export_gguf(merged, tmp_path / "merged.gguf", "f32"))
    from_base = tensors(export_gguf(base, tmp_path / "base.gguf", "f32"))
    assert from_adapter.keys() == from_merged.keys()
    assert all(np.array_equal(from_adapter[name], from_merged[name]) for name in from_adapter)
    assert not np.array_equal(from_adapter["blk.0.attn_q.weight"], from_base["blk.0.attn_q.weight"])


def test_export_does_not_copy_a_file_through_a_link(tmp_path, tokenizer, capsys):
    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_model(tokenizer), tokenizer, {"stage": "pretrain"})
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    (checkpoint / "chat_template.jinja").symlink_to(secret)
    line = run_error(capsys, ["export", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "out")])
    assert "chat_template.jinja: a symbolic link to a file outside" in line
    assert not (tmp_path / "out").exists()


def test_a_hub_cache_snapshot_with_links_into_its_blobs_exports(tmp_path, tokenizer):
    """The Hugging Face cache keeps files as links from snapshots/REV/ into ../../blobs/: inside the
    repository's folder, so they are followed."""
    source = save_checkpoint(tmp_path / "src", tiny_model(tokenizer), tokenizer, {"stage": "pretrain"})
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        blob = repo / "blobs" / file.name
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    out = export_hf(snapshot, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert not (out / "model.safetensors").is_symlink()


# --- 4. a diverging run stops; resume never starts from a non-finite checkpoint ---------------------


def test_a_diverging_run_stops_without_saving_non_finite_weights(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    command = pretrain(run, corpus, "train.max_steps=8", "train.lr=1e12", "train.warmup_steps=0")
    line = run_error(capsys, command)
    assert line.startswith("orchard: error: step 2: ") and "the run diverged" in line
    assert "the last checkpoint, step-000001, is finite" in line
    assert not (run / "final").exists()
    for step in run.glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(step / "model.safetensors").values())
    # The same command again resumes from that last finite checkpoint (and diverges there again).
    line = run_error(capsys, command)
    assert line.startswith("orchard: error: step 2: ")
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000001"]


def test_resume_passes_over_non_finite_and_unreadable_checkpoints(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(pretrain(run, corpus, "train.max_steps=3")) == 0
    shutil.rmtree(run / "final")
    poisoned = load_file(run / "step-000003" / "model.safetensors")
    poisoned["model.norm.weight"][0] = float("nan")  # as an older orchard could save a diverged run
    save_file(poisoned, run / "step-000003" / "model.safetensors")
    truncated = run / "step-000002" / "training_state.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "lo')  # a line cut short by a kill
    capsys.readouterr()
    assert main(pretrain(run, corpus, "train.max_steps=4")) == 0
    err = capsys.readouterr().err
    assert "step-000003 cannot be resumed (its weight model.norm.weight is not finite)" in err
    assert "step-000002 cannot be resumed (" in err and "training_state.safetensors" in err
    assert f"resuming {run} from step 1" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


# --- 5. the run's tokenizer -------------------------------------------------------------------------


def test_a_leftover_tokenizer_is_not_reused_for_another_recipe(tmp_path, corpus):
    run = tmp_path / "run"
    run.mkdir()  # made by the user beforehand, so a failed run leaves what it wrote
    with pytest.raises(OrchardError, match="tokens leave the training split"):
        main(["--debug", *pretrain(run, corpus, "train.max_steps=1", "data.seq_len=100000")])
    assert Tokenizer.load(run / "tokenizer").vocab_size == 300
    assert main(pretrain(run, corpus, "train.max_steps=1", "tokenizer.vocab_size=320")) == 0
    assert Tokenizer.load(run / "tokenizer").vocab_size == 320
    assert load_checkpoint(run).tokenizer.vocab_size == 320
    # A tokenizer/ damaged by hand is made again, not trusted.
    (run / "tokenizer" / "tokenizer.json").write_text("{")
    shutil.rmtree(run / "final")
    assert main(pretrain(run, corpus, "train.max_steps=2", "tokenizer.vocab_size=320")) == 0


def test_a_tokenizer_swapped_into_a_checkpoint_is_refused(tmp_path, tokenizer):
    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_model(tokenizer), tokenizer, {"stage": "pretrain"})
    smaller = Tokenizer.train(iter(["entirely different text"] * 30), vocab_size=300)
    assert smaller.vocab_size <= tokenizer.vocab_size
    smaller.save(checkpoint)
    with pytest.raises(OrchardError, match="not the tokenizer this model was trained with"):
        load_checkpoint(checkpoint)


def test_evaluation_over_no_window_is_refused(tmp_path, tokenizer):
    from orchard.data.packing import PackedSequences
    from orchard.evaluation.language_modeling import evaluate_language_modeling

    sequences = PackedSequences(np.arange(10), 16)
    with pytest.raises(OrchardError, match="no window of 16 tokens"):
        evaluate_language_modeling(tiny_model(tokenizer), sequences, tokenizer.token_byte_lengths(), 4)


def test_a_cache_directory_is_whole_or_absent_and_the_first_builder_wins(tmp_path):
    target = tmp_path / "cache" / fingerprint("tokenizer", 3, {"b": 1, "a": 2})
    assert target.name == fingerprint("tokenizer", 3, {"a": 2, "b": 1}) != fingerprint("tokenizer", 4, {"a": 2, "b": 1})
    assert len(target.name) == 16

    def failing(tmp: Path) -> None:
        (tmp / "part").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_directory(target, failing)
    assert not target.exists() and list(target.parent.iterdir()) == []
    cached_directory(target, lambda tmp: (tmp / "data").write_text("first"))
    cached_directory(target, lambda tmp: (tmp / "data").write_text("second"))  # another process, same name
    assert (target / "data").read_text() == "first" and list(target.parent.iterdir()) == [target]
