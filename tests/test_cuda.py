"""The CUDA paths, run where there is a GPU (benchmarks/gpu_check.sh runs them); skipped elsewhere.

A short training run on the GPU gives the CPU's losses (fp32) within a tolerance of summation order,
bf16 autocast trains too, FSDP2 on one GPU saves and resumes exactly, and the inference commands
load their weights in bf16 on the GPU and answer like the CPU's fp32 model (greedy, same text)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchard.checkpoint import read_weights
from orchard.cli.main import main
from orchard.data.synthetic import write_corpus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "tokenizer.vocab_size=400", "data.seq_len=64",
        "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2", "train.eval_batches=2", "train.log_every=1",
        "train.eval_every=0", "train.progress=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "world.jsonl", 400, seed=3)


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_training_on_the_gpu_matches_the_cpu(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    common = ["pretrain", f"data.path={corpus}", *TINY, "train.max_steps=6", "train.precision=fp32"]
    assert main([*common, "train.device=cpu", f"out={tmp_path / 'cpu'}"]) == 0
    assert main([*common, "train.device=cuda", f"out={tmp_path / 'gpu'}"]) == 0
    cpu, gpu = losses(tmp_path / "cpu"), losses(tmp_path / "gpu")
    assert max(abs(a - b) for a, b in zip(cpu, gpu)) < 1e-3, (cpu, gpu)
    record = json.loads((tmp_path / "gpu" / "final" / "orchard.json").read_text())
    assert record["training"]["device"] == "cuda"
    assert main(["pretrain", f"data.path={corpus}", *TINY, "train.max_steps=6", "train.precision=bf16",
                 "train.device=cuda", "train.activation_checkpointing=true", f"out={tmp_path / 'bf16'}"]) == 0
    bf16 = losses(tmp_path / "bf16")
    assert bf16[-1] < bf16[0] and max(abs(a - b) for a, b in zip(cpu, bf16)) < 0.05


def test_fsdp_on_one_gpu_saves_and_resumes(tmp_path, corpus):
    env = {**os.environ, "ORCHARD_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "orchard.cli.main", "pretrain", f"data.path={corpus}", *TINY, "train.parallel=fsdp", "train.device=cuda",
               "train.precision=fp32", "train.save_every=3", "train.max_steps=6"]
    completed = subprocess.run([*command, f"out={tmp_path / 'straight'}"], env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")  # as if lost after the step-3 checkpoint
    for later in ("final", "step-000006"):
        shutil.rmtree(tmp_path / "resumed" / later)
    completed = subprocess.run([*command, f"out={tmp_path / 'resumed'}"], env=env, capture_output=True, text=True)
    assert completed.returncode == 0 and "from step 3" in completed.stderr, completed.stderr[-3000:]
    # CUDA's embedding backward adds with atomics, so sums may differ in their last bits.
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(resumed) == 6 and max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-5


def test_inference_commands_use_the_gpu_in_bf16(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    assert main(["pretrain", f"data.path={corpus}", *TINY, "train.max_steps=20", "train.precision=fp32",
                 f"out={tmp_path / 'run'}"]) == 0
    evaluations = {}
    for device in ("cpu", "cuda"):
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "run"), "--data", str(corpus), "--seq-len", "64", "--limit", "16",
                     "--json", "--device", device]) == 0
        evaluations[device] = json.loads(capsys.readouterr().out)["results"]["bpb"]["run"]["metrics"]
    assert evaluations["cuda"]["loss"] == pytest.approx(evaluations["cpu"]["loss"], rel=0.02)
    replies = {}
    for device in ("cpu", "cuda"):
        capsys.readouterr()
        assert main(["generate", str(tmp_path / "run"), "--prompt", "Tom", "--temperature", "0",
                     "--max-new-tokens", "8", "--device", device]) == 0
        replies[device] = capsys.readouterr().out
    assert replies["cuda"].startswith("Tom") and len(replies["cuda"]) > len("Tom")
    # Quantizing on the GPU writes what quantizing on the CPU writes (int4 with its error search).
    quantized = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"int4-{device}"
        assert main(["quantize", str(tmp_path / "run"), "--bits", "4", "--minimize-error", "--device", device,
                     "--out", str(out)]) == 0
        quantized[device] = read_weights(out)
    assert quantized["cpu"].keys() == quantized["cuda"].keys()
    for name, tensor in quantized["cpu"].items():
        other = quantized["cuda"][name]
        if tensor.dtype == torch.uint8:  # packed codes: ties may round either way, nothing more
            assert (tensor != other).float().mean() < 1e-3, name
        else:
            assert torch.allclose(tensor.float(), other.float(), rtol=1e-2, atol=1e-6), name


def test_packed_attention_through_flex_attention_equals_the_dense_mask_on_the_gpu():
    """On CUDA packed documents take compiled FlexAttention (auto); its logits and gradients equal
    the dense-mask path's within 1e-5 in fp32."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from gpu_check import packed_batch

    from orchard.model import CausalLM, ModelConfig
    from orchard.model.attention import uses_flex

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    assert uses_flex("auto", torch.device("cuda")) and not uses_flex("auto", torch.device("cpu"))
    torch.manual_seed(0)
    model = CausalLM(config).cuda()
    batch = packed_batch(config, 4, 384, torch.device("cuda"))
    results = {}
    for choice in ("mask", "auto"):
        model.packed_attention = choice
        model.zero_grad(set_to_none=True)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()
        results[choice] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (mask_logits, mask_grads), (flex_logits, flex_grads) = results["mask"], results["auto"]
    assert (mask_logits - flex_logits).abs().max() <= 1e-5
    assert max((mask_grads[n] - flex_grads[n]).abs().max().item() for n in mask_grads) <= 1e-5


def test_distillation_with_the_teacher_on_another_device(tmp_path, corpus, monkeypatch):
    """teacher_device=cpu while the student trains on the GPU: the same losses as both on the GPU."""
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    assert main(["pretrain", f"data.path={corpus}", *TINY, "train.max_steps=10", "train.precision=fp32",
                 f"out={tmp_path / 'teacher'}"]) == 0
    common = ["distill", str(tmp_path / "teacher"), "student_layers=[0]", "mode=online", f"data.path={corpus}",
              "data.seq_len=64", "train.max_steps=4", "train.batch_size=4", "train.precision=fp32",
              "train.log_every=1", "train.eval_every=0", "train.progress=false", "train.device=cuda"]
    for where in ("auto", "cpu"):
        assert main([*common, f"teacher_device={where}", f"out={tmp_path / where}"]) == 0
    a, b = losses(tmp_path / "auto"), losses(tmp_path / "cpu")
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-3


def test_compiled_decoding_on_the_gpu_gives_eager_tokens():
    """Compiled decoding on CUDA (a static cache and the step as one CUDA graph) gives the tokens of
    eager decoding on CUDA, fp32 greedy, padded prompts, on a first and a second (replaying) call."""
    from orchard.model import CausalLM, ModelConfig
    from orchard.model.generation import SamplingConfig, generate

    model = CausalLM(ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    model.reset_parameters(seed=0)
    model = model.cuda().eval()
    prompts = [[5, 17, 33, 8, 91, 40, 12], [60], [3, 77, 21]]
    eager = generate(model, prompts, SamplingConfig(max_new_tokens=24, temperature=0.0), eos_id=-1, pad_id=2)
    compiled = SamplingConfig(max_new_tokens=24, temperature=0.0, compile=True)
    assert generate(model, prompts, compiled, eos_id=-1, pad_id=2) == eager
    assert generate(model, prompts, compiled, eos_id=-1, pad_id=2) == eager


def test_eval_tasks_on_the_gpu_match_the_cpu(tmp_path, corpus, capsys, monkeypatch):
    """orchard eval in fp32 on the GPU: multiple choice and the world's held-out items give the
    CPU's accuracy (one item may flip on a near-tie of a barely trained model), bits per byte agrees
    within summation order."""
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    assert main(["pretrain", *TINY, "train.max_steps=20", f"data.path={corpus}", f"out={tmp_path / 'run'}"]) == 0
    items = tmp_path / "mc.jsonl"
    items.write_text("".join(json.dumps({"question": f"Who is {i}?", "choices": ["Tom", "Hugo", "a teacher"],
                                         "answer": i % 3}) + "\n" for i in range(24)))
    results = {}
    for device in ("cpu", "cuda"):
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "run"), "--tasks", f"mc:{items},world,bpb:{corpus}", "--limit", "20",
                     "--seq-len", "64", "--device", device, "--precision", "fp32", "--json"]) == 0
        results[device] = {task: next(iter(r.values()))["metrics"]
                           for task, r in json.loads(capsys.readouterr().out)["results"].items()}
    cpu, gpu = results["cpu"], results["cuda"]
    for task in (f"mc:{items}", "world"):
        for metric, value in cpu[task].items():
            assert gpu[task][metric] == pytest.approx(value, abs=0.051), (task, metric)
    assert gpu[f"bpb:{corpus}"]["bits_per_byte"] == pytest.approx(cpu[f"bpb:{corpus}"]["bits_per_byte"], rel=1e-4)
