"""The `orchard` command in-process: user mistakes are one `orchard: error:` line with exit status 2
(naming the file, line or key), --help everywhere, and a tiny pretrain -> info/eval/generate run."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from orchard.checkpoint import save_checkpoint
from orchard.cli.main import main
from orchard.errors import OrchardError
from orchard.model import CausalLM, ModelConfig
from orchard.tokenizer import Tokenizer
from cli_errors import run_error

SENTENCES = ["The quick brown fox jumps over the lazy dog.\n",
             "A small model learns the shape of the text it reads.\n",
             "敏捷的棕色狐狸跳过了懒狗。\n",
             "Orchards grow apples, pears and plums in the autumn sun.\n",
             "小模型学习它所读文本的形状。\n"]

TINY = ["tokenizer.vocab_size=300", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
        "data.seq_len=32", "train.max_steps=4", "train.batch_size=4", "train.eval_every=2",
        "train.save_every=2", "train.precision=fp32"]


def write_corpus(path, repeats=40):
    path.write_text("".join(SENTENCES * repeats), encoding="utf-8")
    return path



# --- user errors: one line, exit status 2 ----------------------------------------------------


def test_pretrain_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'run'}", f"data.path={missing}"])
    assert str(missing) in line and "data.path" in line
    assert not (tmp_path / "run").exists()


def test_pretrain_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'run'}", f"data.path={empty}", *TINY])
    assert f"{empty}: file is empty" in line


def test_pretrain_invalid_utf8_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("line one\nline two\n".encode() + b"caf\xe9 au lait\n" + b"line four\n")
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'run'}", f"data.path={bad}", *TINY])
    assert f"{bad}:3: invalid UTF-8" in line


def test_pretrain_malformed_jsonl_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n', encoding="utf-8")
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'run'}", f"data.path={bad}", *TINY])
    assert f"{bad}:3:" in line and "invalid JSON" in line


def test_pretrain_unknown_key(tmp_path, capsys):
    capsys.readouterr()
    code = main(["pretrain", f"out={tmp_path / 'run'}", "train.max_step=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [err.strip()]  # nothing but the one line
    assert err.startswith("orchard: error: train.max_step: unknown key")


def test_pretrain_bad_value(tmp_path, capsys):
    capsys.readouterr()
    code = main(["pretrain", f"out={tmp_path / 'run'}", "train.max_steps=abc"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("orchard: error: train.max_steps: expected an integer")


def test_pretrain_bad_recipe_names_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 3\n   lr: 1\n", encoding="utf-8")
    line = run_error(capsys, ["pretrain", str(recipe), f"out={tmp_path / 'run'}"])
    assert f"{recipe}:3: invalid YAML" in line


def test_failed_pretrain_leaves_no_checkpoint(tmp_path, capsys):
    # The corpus is fine where the tokenizer is trained (its first bytes) and broken further on,
    # so the run gets as far as the token cache before failing.
    corpus = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": s}, ensure_ascii=False) for s in SENTENCES * 20]
    corpus.write_text("\n".join(good[:60] + ["{not json"] + good[60:]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    line = run_error(capsys, ["pretrain", f"out={out}", f"data.path={corpus}", "tokenizer.train_bytes=2000", *TINY])
    assert f"{corpus}:61:" in line
    assert not (out / "final").exists()
    assert not list(out.glob("step-*"))
    assert not list(out.glob(".*tmp*"))


def test_generate_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    line = run_error(capsys, ["generate", str(missing), "--prompt", "x"])
    assert str(missing) in line and "no such checkpoint" in line


def test_generate_bad_sampling_option_names_flag(tmp_path, capsys):
    line = run_error(capsys, ["generate", str(tmp_path), "--prompt", "x", "--top-p", "0"])
    assert "--top-p" in line


def tiny_checkpoint(path, tokenizer: Tokenizer, vocab_size: int):
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    model = CausalLM(config)
    model.reset_parameters(seed=0)
    return save_checkpoint(path, model, tokenizer, {"stage": "pretrain"})


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(SENTENCES * 10), vocab_size=300)


def test_checkpoint_with_mismatched_tokenizer(tmp_path, capsys, tokenizer):
    assert tokenizer.vocab_size > 280
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tokenizer, vocab_size=280)
    line = run_error(capsys, ["generate", str(checkpoint), "--prompt", "x", "--max-new-tokens", "2"])
    assert str(checkpoint) in line and "tokenizer" in line and "280" in line
    line = run_error(capsys, ["eval", str(checkpoint), "--data", str(write_corpus(tmp_path / "c.txt"))])
    assert str(checkpoint) in line and "tokenizer" in line


def test_eval_missing_data_file(tmp_path, capsys, tokenizer):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tokenizer, vocab_size=tokenizer.vocab_size)
    missing = tmp_path / "missing.txt"
    line = run_error(capsys, ["eval", str(checkpoint), "--data", str(missing), "--seq-len", "16"])
    assert str(missing) in line and "--data" in line


def test_info_of_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    line = run_error(capsys, ["info", str(tmp_path)])
    assert str(tmp_path) in line and "not a checkpoint" in line


def test_debug_reraises(tmp_path):
    with pytest.raises(OrchardError, match="train.max_step"):
        main(["--debug", "pretrain", f"out={tmp_path / 'run'}", "train.max_step=3"])


# --- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["quickstart"], ["tokenizer"], ["tokenizer", "train"], ["pretrain"],
                                  ["generate"], ["chat"], ["eval"], ["info"], ["distill"], ["quantize"], ["grow"]])
def test_help_exits_zero_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: orchard")
    if argv:
        assert re.search(rf"usage: orchard {' '.join(argv)}\b", out)


def test_pretrain_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.max_time = None" in out
    assert "train.max_steps = 1000" in out
    assert "Stop after this many optimizer steps." in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: orchard" in capsys.readouterr().out


# --- a tiny run end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-run")
    corpus = write_corpus(root / "corpus.txt")
    out = root / "run"
    argv = ["pretrain", f"out={out}", f"data.path={corpus}", *TINY]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCHARD_CACHE", str(root / "cache"))
        assert main(argv) == 0
    return {"out": out, "corpus": corpus, "argv": argv, "cache": root / "cache"}


def test_pretrain_writes_final_and_step_checkpoints(trained):
    out = trained["out"]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002", "step-000004"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "val_loss" in e] == [0, 2, 4]  # 0: before training


def test_info_json(trained, capsys):
    capsys.readouterr()
    assert main(["info", str(trained["out"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"] == str(trained["out"] / "final")
    lineage = info["lineage"]
    assert lineage[0]["stage"] == "pretrain"
    assert lineage[0]["training"]["steps"] == 4
    assert lineage[0]["training"]["tokens"] == 4 * 4 * 32
    assert lineage[0]["recipe"]["train"]["max_steps"] == 4
    config = info["config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (32, 2, 1)
    assert config["vocab_size"] == 300
    assert info["parameters"] == ModelConfig.from_hf_dict(config).num_parameters()
    assert info["total_training_flops"] == pytest.approx(lineage[0]["training"]["flops"]) and info["total_training_flops"] > 0
    # The plain-text form works too.
    assert main(["info", str(trained["out"])]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_eval_json(trained, capsys, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(trained["cache"]))
    capsys.readouterr()
    assert main(["eval", str(trained["out"]), "--data", str(trained["corpus"]), "--seq-len", "32",
                 "--limit", "8", "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["checkpoints"][0]["path"] == str(trained["out"] / "final")
    assert output["checkpoints"][0]["stage"] == "pretrain"
    bpb = output["results"]["bpb"]["run"]
    result = bpb["metrics"]
    assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] > 0
    assert result["loss"] == pytest.approx(math.log(result["perplexity"]), rel=1e-6)
    assert bpb["items"] == 8 * 32  # tokens
    # A barely trained model is near-uniform over its 300 tokens, nowhere near zero loss.
    assert result["loss"] > 1.0 and result["loss"] < 2 * math.log(300)


def test_eval_asks_the_runtime_for_device_and_precision(trained, capsys, monkeypatch):
    """--device and --precision reach the model: auto is fp32 on the CPU (the default's figures are
    exact and unchanged), bf16 autocast moves the loss a little but not the token count."""
    monkeypatch.setenv("ORCHARD_CACHE", str(trained["cache"]))
    argv = ["eval", str(trained["out"]), "--data", str(trained["corpus"]), "--seq-len", "32", "--limit", "8",
            "--json"]
    results = {}
    for flags in ([], ["--device", "cpu", "--precision", "fp32"], ["--device", "cpu", "--precision", "bf16"]):
        capsys.readouterr()
        assert main(argv + flags) == 0
        bpb = json.loads(capsys.readouterr().out)["results"]["bpb"]["run"]
        results[" ".join(flags)] = {**bpb["metrics"], "tokens": bpb["items"]}
    fp32, explicit, bf16 = results.values()
    assert fp32 == explicit
    assert bf16["tokens"] == fp32["tokens"] and bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("command", [["eval", "--data"], ["generate", "--prompt", "x"], ["chat"],
                                     ["quantize", "--bits", "8"]])
def test_inference_on_a_missing_gpu_is_one_line(trained, capsys, command):
    data = [str(trained["corpus"])] if command[0] == "eval" else []
    line = run_error(capsys, [command[0], str(trained["out"]), *command[1:], *data, "--device", "cuda"])
    assert "--device: cuda asked for, but no CUDA device is available" in line


def test_generate_runs(trained, capsys):
    capsys.readouterr()
    argv = ["generate", str(trained["out"]), "--prompt", "the", "--max-new-tokens", "5", "--seed", "0"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("the")
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # seeded: the same sample again


def test_rerunning_a_finished_pretrain_does_not_retrain(trained, capsys, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(trained["cache"]))
    weights = trained["out"] / "final" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    step_before = (trained["out"] / "step-000004" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(trained["argv"]) == 0
    captured = capsys.readouterr()
    assert "the run is complete" in captured.err
    assert "4 steps" in captured.out
    assert weights.stat().st_mtime_ns == before
    assert (trained["out"] / "step-000004" / "model.safetensors").stat().st_mtime_ns == step_before


def test_chat_repl_answers_resets_and_quits(trained, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/reset\nand again\n/quit\n"))
    capsys.readouterr()
    assert main(["chat", str(trained["out"]), "--max-new-tokens", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2  # one reply per user turn; /reset and /quit are commands


def test_chat_reply_ends_at_the_turn_end_token(trained):
    from orchard.checkpoint import load_checkpoint
    from orchard.model.generation import SamplingConfig, generate

    checkpoint = load_checkpoint(trained["out"])
    tokenizer, model = checkpoint.tokenizer, checkpoint.model
    im_end = tokenizer.token_to_id("<|im_end|>")
    # An output layer that always predicts <|im_end|>.
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[im_end] = 10.0
    model.lm_head = head
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                            add_generation_prompt=True))
    greedy = SamplingConfig(max_new_tokens=5, temperature=0)
    assert generate(model, [prompt], greedy, [tokenizer.eos_id, im_end], tokenizer.pad_id) == [[]]
    assert generate(model, [prompt], greedy, tokenizer.eos_id, tokenizer.pad_id) == [[im_end] * 5]


def test_quickstart_writes_a_report_with_metrics_plot_and_samples(tmp_path):
    from orchard.cli.quickstart import run_quickstart
    from orchard.evaluation.report import read_metrics

    report = run_quickstart(tmp_path / "qs", max_time=2.0, sft_steps=3, eval_items=16, distill_steps=3,
                            continual_steps=2, continual_items=4, grow_steps=2, align_steps=2, tool_steps=3)
    text = report.read_text(encoding="utf-8")
    assert "validation loss before training" in text and "validation bits per byte" in text
    assert "fact recall (English)" in text and "arithmetic (Chinese)" in text
    assert "## Fine-tuning" in text and "LoRA r=8" in text and "full SFT" in text
    assert (tmp_path / "qs" / "pretrain_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "](pretrain_loss.png)" in text
    assert text[:text.index("## Fine-tuning")].count("```text") == 5  # one sample per prompt
    assert (tmp_path / "qs" / "pretrain" / "final" / "orchard.json").is_file()
    assert (tmp_path / "qs" / "export" / "hf" / "config.json").is_file() and "GGUF q8_0" in text
    assert "## Distillation and quantization" in text and "int4 weights" in text
    assert (tmp_path / "qs" / "distill" / "final-int8" / "quantization.json").is_file()
    assert "## Continual learning" in text and "after facts-zh" in text
    assert (tmp_path / "qs" / "continual" / "replay" / "R.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Growing a model" in text and (tmp_path / "qs" / "grow" / "train" / "final" / "config.json").is_file()
    difference = float(re.search(r"largest logit difference[^|]*\| ([0-9.e+-]+)", text).group(1))
    assert difference < 1e-4  # the grown model computes the parent's function
    # GRPO before and after, sampled as well as greedy, on the questions it trains on and held-out ones
    assert "| trained | before |" in text and "| held-out | after |" in text and "mean@8" in text
    tools = text[text.index("## Tool use"):text.index("## Distillation")]
    assert "correct_calls" in tools and "accuracy (no tools)" in tools and "failed tool calls (greedy)" in tools
    assert json.loads((tmp_path / "qs" / "tool-eval" / "eval.json").read_text())["results"]["tools"].keys() == {
        "SFT", "tool SFT", "tool GRPO"}
    assert "## Serving" in text and f"orchard serve {tmp_path / 'qs' / 'pretrain'} --adapter chat-lora=" in text
    # It ends with every checkpoint on the same tasks, each column headed by its lineage.
    final = text[text.index("## Every checkpoint, side by side"):]
    header = final[final.index("| task |"):].splitlines()[0]
    assert header == ("| task | metric | pretrained | SFT | LoRA | DPO | GRPO | student (distilled) | "
                      "student (no teacher) | student int8 | student int4 | grown (6 layers) | tool SFT | tool GRPO |")
    assert "dpo from sft" in final and "quantize from distill" in final and "pretrain from grown" in final
    comparison = json.loads((tmp_path / "qs" / "eval" / "eval.json").read_text())
    assert len(comparison["checkpoints"]) == 12 and set(comparison["results"]) == {"held-out text", "world, held-out"}
    assert "](eval/eval.png)" in final
    # The family tree: every checkpoint the quickstart made descends from the pretrained model.
    from contextlib import closing

    from orchard.lineage.catalog import connect
    from orchard.lineage.family import Family
    qs = tmp_path / "qs"
    assert "## Family tree" in text and (qs / "family_tree.png").read_bytes()[:4] == b"\x89PNG"
    with closing(connect()) as connection:
        family = Family(connection)
        tree = family.to_json(family.find(qs / "pretrain"))
        below = {}

        def walk(entries, parent):
            for entry in entries:  # a checkpoint at several places (identical weights) is one node
                for location in entry["locations"]:
                    below[location] = (parent, entry["relations"])
                walk(entry["children"], entry["name"])
        walk(tree["descendants"], "pretrain")
        for run in ["sft", "lora", "dpo", "grpo", "reward", "distill", "student-no-teacher", "grow/train", "tool-sft",
                    "tool-grpo",
                    *[f"continual/{s}/task-{i}-{t}" for s in ("naive", "replay")
                      for i, t in enumerate(["arithmetic", "facts-en", "facts-zh"])]]:
            assert str((qs / run / "final").resolve()) in below, run
        by_path = {Path(p).relative_to(qs.resolve()).as_posix(): v for p, v in below.items()}
        assert by_path["distill/final"] == ("pretrain", ["distilled from"])
        assert by_path["student-no-teacher/final"] == ("pretrain", ["distilled from"])
        assert by_path["dpo/final"] == ("sft", ["reference of", "trained from"])
        # Quick GRPO steps whose every group drew equal rewards change nothing (no weight decay
        # in RL): the checkpoint is then the tool SFT model's weights, one node of the tree.
        signal = any(r.get("frac_reward_zero_std", 1) < 1 for r in read_metrics(qs / "tool-grpo" / "metrics.jsonl"))
        assert by_path["tool-grpo/final"] == (("tool-sft", ["trained from"]) if signal else by_path["tool-sft/final"])
        assert by_path["tool-sft/final"] == ("sft", ["trained from"])
        assert by_path["grow/grown"] == ("pretrain", ["grown from"])
        assert by_path["distill/final-int4"] == ("distill", ["quantized from"])
        assert by_path["lora/final"] == ("pretrain", ["adapter of"])
        assert by_path["export/hf"] == ("pretrain", ["exported as"])
        # The distilled student's ledger, against its records.
        records = {name: json.loads((qs / name / "final" / "orchard.json").read_text()) for name in ("distill",
                                                                                                     "pretrain")}
        ledger = family.cost(family.find(qs / "distill"))
        assert ledger["own"]["flops"] == records["distill"]["training"]["flops"]
        assert [(a["name"], a["flops"]) for a in ledger["ancestors"]] == [("pretrain",
                                                                            records["pretrain"]["training"]["flops"])]
        cache = next(s for s in ledger["shared"] if s["relation"] == "teacher cache reused by")
        assert cache["shared_by"] == 2
        assert cache["share_flops"] == records["distill"]["data"]["teacher_cache"]["build_flops"] / 2


def test_inference_loads_bf16_weights_only_on_a_gpu_in_bf16():
    from orchard.training.runtime import Runtime

    assert Runtime.for_inference("cpu").inference_dtype is None  # the CPU keeps the checkpoint's fp32
    assert Runtime.for_inference("cpu", "bf16").inference_dtype is None
    assert Runtime(torch.device("cuda"), "bf16").inference_dtype == torch.bfloat16
    assert Runtime(torch.device("cuda"), "fp32").inference_dtype is None
