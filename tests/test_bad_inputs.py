"""Bad input, table-driven: every case is something a user (or someone who shares a file with them)
can hand `orchard`. Each must fail as a user error (exit status 2, one `orchard: error:` line naming
the file, line, flag or key, no traceback) and change nothing on disk: no file is added, removed or
altered outside orchard's own cache, so nothing half-made can be mistaken for a result later.

A case is (id, setup, expected): `setup(case_dir, base)` prepares its files in its own directory and
returns the command line; `expected` must appear in the error line. `base` holds files made once
for the module (a corpus, a tiny checkpoint, an adapter checkpoint on it, a finished run).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchard.checkpoint import save_checkpoint
from orchard.cli.main import main
from orchard.lineage.record import parent_entry
from orchard.peft import LoraConfig, add_lora
from orchard.tokenizer import Tokenizer
from orchard.tokenizer import chat_template
from cli_errors import run_error
from untrusted import SENTENCES, TINY_MODEL, Payload, tiny_model, write_corpus

TINY = [*TINY_MODEL, "train.max_steps=2", "train.eval_every=0", "train.save_every=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    corpus = write_corpus(root / "corpus.txt")
    tokenizer = Tokenizer.train(iter(SENTENCES * 20), vocab_size=300)
    checkpoint = save_checkpoint(root / "ckpt", tiny_model(tokenizer), tokenizer, {"stage": "pretrain"})
    adapted = tiny_model(tokenizer)
    add_lora(adapted, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=0)
    adapter = save_checkpoint(root / "lora", adapted, tokenizer,
                              {"stage": "sft-lora", "parent": parent_entry(checkpoint)})
    conversations = root / "chats.jsonl"
    conversations.write_text("".join(json.dumps({"messages": [{"role": "user", "content": s.strip()},
                                                              {"role": "assistant", "content": "ok"}]}) + "\n"
                                     for s in SENTENCES * 5), encoding="utf-8")
    run = root / "run"
    assert main(["pretrain", f"out={run}", f"data.path={corpus}", *TINY]) == 0
    return SimpleNamespace(root=root, corpus=corpus, tokenizer=tokenizer, ckpt=checkpoint, lora=adapter,
                           chats=conversations, run=run)


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edited(source: Path, target: Path, name: str, content: bytes | str) -> Path:
    """A copy of the checkpoint `source` whose file `name` is replaced by `content`."""
    copy_of(source, target)
    path = target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return target


def truncated(source: Path, target: Path, name: str) -> Path:
    data = (source / name).read_bytes()
    return edited(source, target, name, data[: len(data) // 2])


def with_template(source: Path, target: Path, template: str) -> Path:
    copy_of(source, target)
    (target / "chat_template.jinja").write_text(template, encoding="utf-8")
    return target


def foreign_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("the user's own file\n", encoding="utf-8")
    return path


def pretrain(d: Path, b, *overrides: str) -> list[str]:
    return ["pretrain", f"out={d / 'out'}", f"data.path={b.corpus}", *TINY, *overrides]


def sft(d: Path, init, *overrides: str, data=None) -> list[str]:
    return ["sft", f"init={init}", f"out={d / 'out'}", f"data.path={data}", "train.max_steps=1", "train.batch_size=2",
            "train.precision=fp32", "train.progress=false", *overrides]


def state_files(step: Path) -> None:
    for name in ("training_state.json", "training_state.safetensors"):
        (step / name).unlink()


def resumable_run(d: Path, b, damage) -> list[str]:
    """A copy of the finished run with its final checkpoint gone, so running it again resumes from
    its step checkpoints, which `damage(steps)` spoils."""
    run = copy_of(b.run, d / "out")
    shutil.rmtree(run / "final")
    damage(sorted(run.glob("step-*")))
    return ["pretrain", f"out={run}", f"data.path={b.corpus}", *TINY]


def jsonl(d: Path, name: str, lines: list[str]) -> Path:
    path = d / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CASES = [
    # --- data ------------------------------------------------------------------------------------
    ("data-missing", lambda d, b: pretrain(d, b, f"data.path={d / 'nope.txt'}"), "nope.txt"),
    ("data-empty", lambda d, b: pretrain(d, b, f"data.path={jsonl(d, 'empty.txt', [])}"), "empty.txt"),
    ("data-invalid-utf8", lambda d, b: (d.joinpath("bad.txt").write_bytes(b"ok\ncaf\xe9\n"),
                                        pretrain(d, b, f"data.path={d / 'bad.txt'}"))[1], "bad.txt:2"),
    ("data-malformed-jsonl", lambda d, b: pretrain(d, b, "data.path=" + str(jsonl(d, "c.jsonl", ['{"text": "a"}',
                                                                                             "{oops"]))), "c.jsonl:2"),
    ("data-missing-text-field", lambda d, b: pretrain(d, b, "data.path=" + str(jsonl(d, "c.jsonl", ['{"body": "a"}']))),
     "c.jsonl:1"),
    ("data-corrupt-gzip", lambda d, b: (d.joinpath("c.txt.gz").write_bytes(b"not gzip at all"),
                                        pretrain(d, b, f"data.path={d / 'c.txt.gz'}"))[1], "c.txt.gz"),
    ("data-corrupt-parquet", lambda d, b: (d.joinpath("c.parquet").write_bytes(b"PAR1 nonsense"),
                                           pretrain(d, b, f"data.path={d / 'c.parquet'}"))[1], "c.parquet"),
    ("data-too-short", lambda d, b: pretrain(d, b, f"data.path={jsonl(d, 'short.txt', ['tiny'])}"), "short.txt"),
    ("data-glob-matches-nothing", lambda d, b: pretrain(d, b, f"data.path={d}/*.nothing"), "*.nothing"),
    ("sft-data-missing-messages", lambda d, b: sft(d, b.ckpt, data=jsonl(d, "c.jsonl", ['{"foo": 1}'] * 4)),
     "c.jsonl:1"),
    ("sft-data-bad-role", lambda d, b: sft(d, b.ckpt, data=jsonl(d, "c.jsonl", [json.dumps(
        {"messages": [{"role": "wizard", "content": "x"}]})] * 4)), "c.jsonl:1"),
    ("sft-data-not-json", lambda d, b: sft(d, b.ckpt, data=jsonl(d, "c.jsonl", ["{nope"] * 4)), "c.jsonl:1"),
    ("dpo-data-missing-rejected", lambda d, b: ["dpo", f"init={b.ckpt}", f"out={d / 'out'}", "train.max_steps=1",
                                                "data.path=" + str(jsonl(d, "p.jsonl", [json.dumps(
                                                    {"prompt": "a", "chosen": "b"})] * 4))], "p.jsonl:1"),
    ("eval-data-missing", lambda d, b: ["eval", str(b.ckpt), "--data", str(d / "nope.txt"), "--seq-len", "16"],
     "nope.txt"),
    # --- config ----------------------------------------------------------------------------------
    ("config-unknown-key", lambda d, b: pretrain(d, b, "train.lrr=1"), "train.lrr"),
    ("config-bad-type", lambda d, b: pretrain(d, b, "train.batch_size=many"), "train.batch_size"),
    ("config-seq-len-zero", lambda d, b: pretrain(d, b, "data.seq_len=0"), "data.seq_len"),
    ("config-seq-len-negative", lambda d, b: pretrain(d, b, "data.seq_len=-5"), "data.seq_len"),
    ("config-val-fraction-one", lambda d, b: pretrain(d, b, "data.val_fraction=1"), "data.val_fraction"),
    ("config-lr-zero", lambda d, b: pretrain(d, b, "train.lr=0"), "train.lr"),
    ("config-lr-infinite", lambda d, b: pretrain(d, b, "train.lr=.inf"), "train.lr"),
    ("config-absurd-model", lambda d, b: pretrain(d, b, "model.hidden_size=4000000", "model.intermediate_size=4000000",
                                                  "model.num_attention_heads=1", "model.num_key_value_heads=1"),
     "model: "),
    ("config-heads-do-not-divide", lambda d, b: pretrain(d, b, "model.num_attention_heads=3"), "num_attention_heads"),
    ("config-vocab-too-small", lambda d, b: pretrain(d, b, "tokenizer.vocab_size=100"), "tokenizer.vocab_size"),
    ("config-eval-batches-zero", lambda d, b: pretrain(d, b, "train.eval_batches=0"), "train.eval_batches"),
    ("config-bad-duration", lambda d, b: pretrain(d, b, "train.max_time=soon"), "train.max_time"),
    ("config-no-cuda", lambda d, b: pretrain(d, b, "train.device=cuda:3"), "train.device"),
    ("config-not-a-device", lambda d, b: pretrain(d, b, "train.device=toaster"), "train.device"),
    ("config-override-without-value", lambda d, b: pretrain(d, b, "=3"), "key=value"),
    ("recipe-missing", lambda d, b: ["pretrain", str(d / "nope.yaml")], "nope.yaml"),
    ("recipe-invalid-yaml", lambda d, b: (d.joinpath("r.yaml").write_text("train: [unclosed\n"),
                                          ["pretrain", str(d / "r.yaml")])[1], "r.yaml"),
    ("recipe-not-a-mapping", lambda d, b: (d.joinpath("r.yaml").write_text("- a\n- b\n"),
                                           ["pretrain", str(d / "r.yaml")])[1], "r.yaml"),
    ("recipe-python-tag", lambda d, b: (d.joinpath("r.yaml").write_text(
        "out: !!python/object/apply:os.system ['touch pwned']\n"), ["pretrain", str(d / "r.yaml")])[1], "r.yaml"),
    ("sft-without-init", lambda d, b: ["sft", f"out={d / 'out'}"], "init"),
    ("sft-unknown-peft-method", lambda d, b: sft(d, b.ckpt, "peft.method=magic", data=b.chats), "peft.method"),
    ("distill-without-student", lambda d, b: ["distill", str(b.ckpt), f"out={d / 'out'}"], "student"),
    # --- checkpoints -----------------------------------------------------------------------------
    ("ckpt-missing", lambda d, b: ["generate", str(d / "nope"), "--prompt", "x"], "nope: no such checkpoint"),
    ("ckpt-hub-shaped-typo", lambda d, b: ["generate", "runs/typo", "--prompt", "x"], "runs/typo: no such checkpoint"),
    ("ckpt-not-a-checkpoint", lambda d, b: ["info", str(foreign_dir(d / "x"))], "not a checkpoint"),
    ("ckpt-truncated-record", lambda d, b: ["info", str(truncated(b.ckpt, d / "c", "orchard.json"))], "orchard.json"),
    ("ckpt-truncated-config", lambda d, b: ["generate", str(truncated(b.ckpt, d / "c", "config.json")), "--prompt", "x"],
     "config.json"),
    ("ckpt-truncated-weights", lambda d, b: ["generate", str(truncated(b.ckpt, d / "c", "model.safetensors")),
                                             "--prompt", "x"], "model.safetensors"),
    ("ckpt-pickle-as-weights", lambda d, b: ["generate", str(edited(b.ckpt, d / "c", "model.safetensors",
                                                                    pickle.dumps(Payload(d / "pwned")))),
                                             "--prompt", "x"], "model.safetensors"),
    ("ckpt-config-bad-field", lambda d, b: ["generate", str(edited(b.ckpt, d / "c", "config.json", json.dumps(
        {**json.loads((b.ckpt / "config.json").read_text()), "hidden_size": -1}))), "--prompt", "x"], "config.json"),
    ("ckpt-weights-wrong-shape", lambda d, b: ["generate", str(edited(b.ckpt, d / "c", "config.json", json.dumps(
        {**json.loads((b.ckpt / "config.json").read_text()), "intermediate_size": 48}))), "--prompt", "x"],
     "shape"),
    ("ckpt-garbage-tokenizer", lambda d, b: ["generate", str(edited(b.ckpt, d / "c", "tokenizer.json", "{}")),
                                             "--prompt", "x"], "tokenizer.json"),
    ("ckpt-foreign-tokenizer", lambda d, b: ["generate", str(edited(b.ckpt, d / "c", "tokenizer.json",
                                                                    Tokenizer.train(iter(["zzz yyy"] * 30),
                                                                                    vocab_size=300)._backend.to_str())),
                                             "--prompt", "x"], "not the tokenizer this model was trained with"),
    ("adapter-truncated-settings", lambda d, b: ["generate", str(truncated(b.lora, d / "a", "adapters.json")),
                                                 "--prompt", "x"], "adapters.json"),
    ("adapter-truncated-weights", lambda d, b: ["generate", str(truncated(b.lora, d / "a", "adapters.safetensors")),
                                                "--prompt", "x"], "adapters.safetensors"),
    ("adapter-pickle-weights", lambda d, b: ["generate", str(edited(b.lora, d / "a", "adapters.safetensors",
                                                                   pickle.dumps(Payload(d / "pwned")))),
                                             "--prompt", "x"], "adapters.safetensors"),
    ("adapter-base-gone-generate", lambda d, b: ["generate", str(edited(b.lora, d / "a", "orchard.json", json.dumps(
        {"stage": "sft-lora", "parent": {"path": str(d / "gone")}}))), "--prompt", "x"], "not available"),
    ("adapter-base-gone-info", lambda d, b: ["info", str(edited(b.lora, d / "a", "orchard.json", json.dumps(
        {"stage": "sft-lora", "parent": {"path": str(d / "gone")}})))], "not available"),
    ("quantized-to-sft", lambda d, b: (main(["quantize", str(b.ckpt), "--bits", "8", "--out", str(d / "q")]),
                                       sft(d, d / "q", data=b.chats))[1], "quantized"),
    # --- resumes ---------------------------------------------------------------------------------
    ("resume-truncated-state", lambda d, b: resumable_run(d, b, lambda steps: [
        (s / "training_state.json").write_text((s / "training_state.json").read_text()[:20]) for s in steps]),
     "none of its step checkpoints can be resumed"),
    ("resume-pickled-state", lambda d, b: resumable_run(d, b, lambda steps: [
        (state_files(s), (s / "training_state.pt").write_bytes(pickle.dumps(Payload(d / "pwned")))) for s in steps]),
     "none of its step checkpoints can be resumed"),
    ("resume-other-recipe", lambda d, b: [*resumable_run(d, b, lambda steps: None), "train.lr=0.5"], "train.lr"),
    ("resume-other-command", lambda d, b: (copy_of(b.run, d / "out"), sft(d, b.ckpt, data=b.chats))[1],
     "holds a `pretrain` run"),
    # --- outputs ---------------------------------------------------------------------------------
    ("out-is-a-file", lambda d, b: (d.joinpath("out").write_text("keep me"), pretrain(d, b))[1], "is a file"),
    ("out-under-a-file", lambda d, b: (d.joinpath("f").write_text("keep me"), pretrain(d, b, f"out={d / 'f' / 'run'}"))[1],
     "a file is in the way"),
    ("out-read-only-place", lambda d, b: pretrain(d, b, "out=/proc/orchard-run"), "out: cannot write"),
    ("out-foreign-dir", lambda d, b: (foreign_dir(d / "out"), pretrain(d, b))[1], "did not write"),
    ("sft-out-foreign-dir", lambda d, b: (foreign_dir(d / "out"), sft(d, b.ckpt, data=b.chats))[1], "did not write"),
    ("export-hf-foreign-dir", lambda d, b: ["export", str(b.ckpt), "--format", "hf", "--out", str(foreign_dir(d / "x"))],
     "did not write"),
    ("export-hf-onto-file", lambda d, b: (d.joinpath("x").write_text("keep"),
                                          ["export", str(b.ckpt), "--format", "hf", "--out", str(d / "x")])[1],
     "did not write"),
    ("export-hf-onto-its-run", lambda d, b: ["export", str(copy_of(b.run, d / "run")), "--format", "hf", "--out",
                                             str(d / "run")], "which `orchard export` reads"),
    ("export-gguf-onto-file", lambda d, b: (d.joinpath("m.gguf").write_text("keep"),
                                            ["export", str(b.ckpt), "--format", "gguf", "--out", str(d / "m.gguf")])[1],
     "did not write"),
    ("export-gguf-onto-dir", lambda d, b: ["export", str(b.ckpt), "--format", "gguf", "--out", str(foreign_dir(d / "x"))],
     "is a directory"),
    ("quantize-onto-other-checkpoint", lambda d, b: ["quantize", str(b.ckpt), "--bits", "8", "--out",
                                                     str(copy_of(b.lora, d / "other"))], "did not write"),
    ("quantize-onto-itself", lambda d, b: ["quantize", str(copy_of(b.ckpt, d / "c")), "--bits", "8", "--out",
                                           str(d / "c")], "reads"),
    ("grow-onto-foreign-dir", lambda d, b: ["grow", str(b.ckpt), "--layers", "3", "--out", str(foreign_dir(d / "x"))],
     "did not write"),
    ("tokenizer-out-is-file", lambda d, b: (d.joinpath("t").write_text("keep"),
                                            ["tokenizer", "train", "--data", str(b.corpus), "--out", str(d / "t")])[1],
     "did not write"),
    ("tokenizer-out-foreign-dir", lambda d, b: ["tokenizer", "train", "--data", str(b.corpus), "--out",
                                                str(foreign_dir(d / "t"))], "did not write"),
    # --- templates -------------------------------------------------------------------------------
    ("template-include", lambda d, b: sft(d, with_template(b.ckpt, d / "c", "{% include 'secret.j2' %}"), data=b.chats),
     "self-contained"),
    ("template-import", lambda d, b: sft(d, with_template(b.ckpt, d / "c", "{% import 'm.j2' as m %}{{ m.x }}"),
                                         data=b.chats), "self-contained"),
    ("template-syntax", lambda d, b: sft(d, with_template(b.ckpt, d / "c", "{% for m in messages %}"), data=b.chats),
     "chat template"),
    ("template-loops", lambda d, b: sft(d, with_template(b.ckpt, d / "c", "{% for a in range(100000) %}{% for c in "
                                                         "range(100000) %}{% endfor %}{% endfor %}"), data=b.chats),
     "does not stop"),
    ("template-escapes-sandbox", lambda d, b: sft(d, with_template(b.ckpt, d / "c", "{{ ''.__class__.__mro__ }}"),
                                                  data=b.chats), "unsafe"),
    ("template-huge-output", lambda d, b: sft(d, with_template(b.ckpt, d / "c", "{{ 'x' * 100000000 }}"), data=b.chats),
     "chat template"),
    # --- command-line flags ----------------------------------------------------------------------
    ("eval-seq-len-zero", lambda d, b: ["eval", str(b.ckpt), "--data", str(b.corpus), "--seq-len", "0"], "--seq-len"),
    ("eval-zero-windows", lambda d, b: ["eval", str(b.ckpt), "--data", str(b.corpus), "--limit", "0"], "--limit"),
    ("eval-longer-than-positions", lambda d, b: ["eval", str(b.ckpt), "--data", str(b.corpus), "--seq-len", "999"],
     "--seq-len"),
    ("generate-bad-top-p", lambda d, b: ["generate", str(b.ckpt), "--prompt", "x", "--top-p", "2"], "--top-p"),
    ("quantize-bad-bits", lambda d, b: ["quantize", str(b.ckpt), "--bits", "3", "--out", str(d / "q")], "--bits"),
    ("grow-fewer-layers", lambda d, b: ["grow", str(b.ckpt), "--layers", "1", "--out", str(d / "g")], "--layers"),
    ("grow-bad-positions", lambda d, b: ["grow", str(b.ckpt), "--layers", "3", "--positions", "a,b"], "--positions"),
    ("tokenizer-vocab-too-small", lambda d, b: ["tokenizer", "train", "--data", str(b.corpus), "--out", str(d / "t"),
                                                "--vocab-size", "10"], "--vocab-size"),
]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (orchard's cache aside) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).parts[0] == "cache"}


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60, len(CASES)
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name, setup, expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(name, setup, expected, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(chat_template, "TEMPLATE_MAX_SECONDS", 0.5)  # the looping template: give up sooner
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = setup(case_dir, base)
    before = snapshot(tmp_path)
    line = run_error(capsys, argv)
    assert expected in line, line
    assert not (case_dir / "pwned").exists(), "a file planted by the user ran code"
    after = snapshot(tmp_path)
    assert after.keys() == before.keys(), f"files added or removed: {sorted(after.keys() ^ before.keys())}"
    assert [k for k in after if after[k] != before[k]] == []
