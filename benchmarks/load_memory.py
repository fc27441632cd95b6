"""Time and peak memory of `load_checkpoint` on a ~500M-parameter Llama checkpoint.

    python benchmarks/load_memory.py                      # float32 (orchard's own checkpoints)
    python benchmarks/load_memory.py --dtype bfloat16     # as most Hugging Face models ship
    python benchmarks/load_memory.py --checkpoint DIR     # an existing checkpoint or model instead

A child process writes a checkpoint with random weights into a temporary directory and exits, so
none of its memory is left around; a fresh child then imports orchard, notes its resident memory
(the baseline: Python, torch), loads the checkpoint, runs one short forward pass, then reads every
weight. Loading memory-maps the safetensors file and makes the mapped tensors the model's
parameters, so pages come in only as they are read, and the peak should be about the weights' size
above the baseline (target: peak / weights <= 1.3, baseline included).

Peak resident memory is the kernel's high-water mark (VmHWM in /proc/self/status), so this runs on
Linux. The file was just written, so it is read from the page cache: these are warm-cache times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# hidden 1280, 24 layers, 20 heads of 64 (4 key/value heads), untied 32000-token embeddings: ~507M parameters.
CONFIG = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3584, num_hidden_layers=24,
              num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=2048,
              tie_word_embeddings=False)


def memory_kib(field: str) -> int:
    """A line of /proc/self/status (VmRSS: resident now, VmHWM: the peak so far), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def generate(directory: Path, dtype: str) -> None:
    import torch

    from orchard.checkpoint import save_checkpoint
    from orchard.model import CausalLM, ModelConfig
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["The quick brown fox jumps over the lazy dog."] * 10, vocab_size=300)
    model = CausalLM(ModelConfig(**CONFIG, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                 pad_token_id=tokenizer.pad_id))
    save_checkpoint(directory, model.to(getattr(torch, dtype)), tokenizer, {"stage": "benchmark"})


def measure(directory: Path) -> dict:
    import torch

    from orchard.checkpoint import load_checkpoint, weights_files

    torch.set_num_threads(1)
    baseline = memory_kib("VmRSS")
    start = time.perf_counter()
    checkpoint = load_checkpoint(directory)
    load_seconds = time.perf_counter() - start
    after_load = memory_kib("VmHWM")
    start = time.perf_counter()
    with torch.no_grad():
        checkpoint.model(torch.tensor([[1, 2, 3, 4]]))
        forward_seconds = time.perf_counter() - start
        after_forward = memory_kib("VmHWM")
        for parameter in checkpoint.model.parameters():  # the embedding rows the forward pass did not use
            parameter.sum()
    return {"weights_bytes": sum(f.stat().st_size for f in weights_files(checkpoint.path)),
            "parameters": checkpoint.model.num_parameters(),
            "dtype": str(checkpoint.model.lm_head.weight.dtype).removeprefix("torch."),
            "baseline_kib": baseline, "peak_after_load_kib": after_load, "peak_after_forward_kib": after_forward,
            "peak_kib": memory_kib("VmHWM"), "load_seconds": load_seconds, "forward_seconds": forward_seconds}


def run_child(*args: str) -> str:
    result = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, check=True, text=True)
    return result.stdout


def report(figures: dict) -> None:
    weights_mib = figures["weights_bytes"] / 2**20
    baseline, load_peak, forward_peak, peak = (
        figures[k] / 1024 for k in ("baseline_kib", "peak_after_load_kib", "peak_after_forward_kib", "peak_kib"))
    print(f"checkpoint:      {figures['parameters'] / 1e6:.0f}M parameters, {figures['dtype']}, "
          f"{weights_mib:,.0f} MiB of weights on disk")
    print(f"baseline RSS:    {baseline:,.0f} MiB (python, torch, orchard imported)")
    print(f"load:            {figures['load_seconds']:.2f} s, peak RSS {load_peak:,.0f} MiB (no page read yet)")
    print(f"first forward:   {figures['forward_seconds']:.2f} s, peak RSS {forward_peak:,.0f} MiB "
          f"(every weight read but unused embedding rows)")
    print(f"peak RSS:        {peak:,.0f} MiB = {peak / weights_mib:.2f}x the weights (every weight read)")
    print(f"peak - baseline: {peak - baseline:,.0f} MiB = {(peak - baseline) / weights_mib:.2f}x the weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the generated checkpoint")
    parser.add_argument("--checkpoint", help="measure this checkpoint (or Hugging Face model) instead")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # child process: write a checkpoint there
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child process: load it, print JSON
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate), args.dtype)
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoint
        if directory is None:
            directory = str(Path(tmp) / "checkpoint")
            print(f"writing a {args.dtype} checkpoint with random weights ...", file=sys.stderr)
            run_child("--generate", directory, "--dtype", args.dtype)
        figures = json.loads(run_child("--measure", directory).splitlines()[-1])
    if args.json:
        print(json.dumps(figures))
    else:
        report(figures)


if __name__ == "__main__":
    main()
