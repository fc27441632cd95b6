"""Compute to target: grow a trained half-size model instead of training the large one from scratch.

    python benchmarks/growth.py [--data world|shakespeare] [--steps 600] [--small-steps 300]

For the large model (--layers x 256; by default the quickstart's 4 x 256), and for three half-size
models (half the depth, half the width: hidden size, heads and MLP halved, and both), it runs:

1. the large model from scratch for --steps steps: its final validation loss is the target;
2. each small model for --small-steps steps, `orchard grow` to the large architecture (function
   preserving, or --depth-method stack), and `orchard pretrain init=GROWN` with the same schedule as
   from scratch (--steps steps, or --grown-steps), stopped as soon as its validation loss reaches
   the target;

and prints, for each path, the training FLOPs and wall time until the validation loss first reaches
the target (the small model's own training counted), and the saving against from scratch. The loss is
validated every --eval-every steps, so "first reaches" is resolved to that many steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
WIDE = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2}
NARROW = {"hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 2, "num_key_value_heads": 1}


def shapes(layers: int) -> tuple[dict, dict[str, dict]]:
    """The large model (`layers` x 256) and its three half-size models."""
    half = layers // 2
    return {**WIDE, "num_hidden_layers": layers}, {
        "half depth": {**WIDE, "num_hidden_layers": half},
        "half width": {**NARROW, "num_hidden_layers": layers},
        "half depth and width": {**NARROW, "num_hidden_layers": half},
    }


def data_settings(name: str, tokenizer: Path | None) -> list[str]:
    if name == "shakespeare":
        settings = [f"data.path={SHAKESPEARE}", "data.seq_len=256", "data.val_fraction=0.1", "train.batch_size=16"]
    else:
        settings = ["data.seq_len=128", "data.synthetic_documents=20000", "data.val_fraction=0.05",
                    "train.batch_size=32"]
    return settings + ([f"tokenizer.path={tokenizer}"] if tokenizer else ["tokenizer.vocab_size=2048"])


def orchard(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "orchard.cli.main", *argv], check=True)


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def pretrain(out: Path, settings: list[str], stop_at: float | None = None) -> list[dict]:
    """`orchard pretrain`; with `stop_at`, stopped as soon as a validation loss reaches it (the rest of
    its schedule would only spend time: the comparison needs the first step at the target)."""
    if stop_at is not None and reached(read_metrics(out), stop_at, 1.0):
        return read_metrics(out)  # an earlier run of this benchmark got there
    argv = [sys.executable, "-m", "orchard.cli.main", "pretrain", f"out={out}", "train.progress=false",
            "train.save_every=0", *settings]
    process = subprocess.Popen(argv)
    while process.poll() is None:
        time.sleep(1.0)
        if stop_at is not None and reached(read_metrics(out), stop_at, 1.0):
            process.terminate()
            process.wait()
            return read_metrics(out)
    if process.returncode != 0:
        sys.exit(f"orchard pretrain out={out} failed with exit code {process.returncode}")
    return read_metrics(out)


def reached(metrics: list[dict], target: float, flops_per_token: float) -> tuple[float, float] | None:
    """(FLOPs, seconds) of training when the validation loss first reaches `target`."""
    elapsed = {row["step"]: row["elapsed"] for row in metrics if "elapsed" in row}
    for row in metrics:
        if "val_loss" in row and row["val_loss"] <= target and row["step"] > 0:
            seconds = max((s for s in elapsed if s <= row["step"]), default=None)
            return row["tokens"] * flops_per_token, elapsed.get(seconds, 0.0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["world", "shakespeare"], default="world")
    parser.add_argument("--steps", type=int, default=600, help="the large model's steps from scratch")
    parser.add_argument("--small-steps", type=int, default=300, help="each small model's steps before growing")
    parser.add_argument("--grown-steps", type=int, default=None,
                        help="the schedule of the grown model's training (default: --steps, as from scratch)")
    parser.add_argument("--grown-lr", type=float, default=2e-3, help="peak learning rate of the grown model")
    parser.add_argument("--depth-method", choices=["identity", "stack"], default="identity",
                        help="new blocks as identities (function preserving) or copies of the whole stack")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--layers", type=int, default=4, help="the large model's depth (an even number)")
    parser.add_argument("--only", nargs="*", default=list(shapes(4)[1]), help="which small models")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-growth")
    args = parser.parse_args()
    if args.data == "shakespeare" and not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE}: not found (Tiny Shakespeare is read from ../shared/data)")
    from orchard.checkpoint import read_model_config

    out = args.out / args.data
    large, small_shapes = shapes(args.layers)
    common = [f"train.eval_every={args.eval_every}", "train.eval_batches=10", "train.lr=2e-3",
              "train.warmup_steps=30", "train.log_every=5"]
    architecture = lambda sizes: [f"model.{k}={v}" for k, v in sizes.items()]  # noqa: E731

    scratch = pretrain(out / "scratch", data_settings(args.data, None) + common + architecture(large)
                       + [f"train.max_steps={args.steps}"])
    tokenizer = out / "scratch" / "tokenizer"
    large_config = read_model_config(out / "scratch" / "final")
    seq_len = 256 if args.data == "shakespeare" else 128
    large_fpt = large_config.training_flops_per_token(seq_len)
    target = [row["val_loss"] for row in scratch if "val_loss" in row][-1]
    scratch_cost = reached(scratch, target, large_fpt)
    rows = [("large from scratch", scratch_cost, None)]

    for name in args.only:
        slug = name.replace(" ", "-")
        small = pretrain(out / slug / "small", data_settings(args.data, tokenizer) + common + architecture(small_shapes[name])
                         + [f"train.max_steps={args.small_steps}"])
        small_config = read_model_config(out / slug / "small" / "final")
        small_flops = small[-1]["tokens"] * small_config.training_flops_per_token(seq_len) \
            if "tokens" in small[-1] else 0.0
        small_seconds = max(row.get("elapsed", 0.0) for row in small)
        grown = out / slug / "grown"
        if not (grown / "config.json").is_file():
            deeper = ["--depth-method", args.depth_method] if small_shapes[name]["num_hidden_layers"] < args.layers else []
            orchard("grow", str(out / slug / "small" / "final"), "--out", str(grown), "--layers", str(args.layers),
                    *deeper,
                    "--hidden-size", "256", "--intermediate-size", "688", "--heads", "4", "--kv-heads", "2")
        continued = pretrain(out / slug / "continued", data_settings(args.data, tokenizer) + common
                             + [f"init={grown}", f"train.max_steps={args.grown_steps or args.steps}",
                                f"train.lr={args.grown_lr}"], stop_at=target)
        cost = reached(continued, target, large_fpt)
        rows.append((f"{name}: small + grown", cost and (cost[0] + small_flops, cost[1] + small_seconds),
                     (small_flops, small_seconds)))

    print(f"\n{args.data}: target = the large model's validation loss after {args.steps} steps from scratch, "
          f"{target:.4f} nats/token")
    print(f"{'path':34} {'FLOPs to target':>16} {'of scratch':>10} {'seconds':>8} {'of scratch':>10} "
          f"{'small model FLOPs':>18}")
    for name, cost, small_cost in rows:
        if cost is None:
            print(f"{name:34} {'not reached':>16}")
            continue
        small_text = f"{small_cost[0]:18.3g}" if small_cost else f"{'-':>18}"
        print(f"{name:34} {cost[0]:16.3g} {cost[0] / scratch_cost[0]:10.1%} {cost[1]:8.0f} "
              f"{cost[1] / scratch_cost[1]:10.1%} {small_text}")


if __name__ == "__main__":
    main()
