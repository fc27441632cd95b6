"""Tiny Shakespeare: validation bits per byte within a 5-minute CPU budget, beside nanoGPT.

    python benchmarks/shakespeare.py [--data PATH] [--out DIR]

Runs `orchard pretrain recipes/shakespeare.yaml` (5 minutes of wall-clock training) and, for a
like-for-like row, nanoGPT's documented CPU configuration run through orchard (4 layers, 128 wide,
4 heads, 64-token context, batch 12, 2000 iterations, lr 1e-3, a 300-token byte-level vocabulary —
near character level), then prints both beside nanoGPT's own documented result for that
configuration: a validation loss of about 1.88 nats per character, which on this ASCII text is
1.88 / ln 2 = 2.71 bits per byte. Validation is the last 10% of the file in every row.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
NANOGPT_DOCUMENTED_NATS = 1.88

NANOGPT_CPU_CONFIG = [
    "model.num_hidden_layers=4", "model.hidden_size=128", "model.intermediate_size=344",
    "model.num_attention_heads=4", "model.num_key_value_heads=4", "tokenizer.vocab_size=300",
    "data.seq_len=64", "train.batch_size=12", "train.max_steps=2000", "train.max_time=null",
    "train.lr=1e-3", "train.warmup_steps=100", "train.eval_every=250",
]


def pretrain(out: Path, data: Path, overrides: list[str]) -> tuple[dict, float]:
    command = [sys.executable, "-m", "orchard.cli.main", "pretrain", str(ROOT / "recipes" / "shakespeare.yaml"),
               f"out={out}", f"data.path={data}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    record = json.loads((out / "final" / "orchard.json").read_text())
    return record, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-shakespeare")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: not found (Tiny Shakespeare is read from ../shared/data)")

    rows = []
    for name, overrides in [("orchard, recipes/shakespeare.yaml (5 min)", []),
                            ("nanoGPT's CPU config, run in orchard", NANOGPT_CPU_CONFIG)]:
        record, seconds = pretrain(args.out / name.split(",")[0].replace("'", "").replace(" ", "-"), args.data,
                                   overrides)
        rows.append((name, record["metrics"]["val_bpb"], record["metrics"]["val_loss"],
                     record["training"]["tokens"], record["training"]["wall_seconds"], record["training"]["precision"]))
    print()
    print(f"{'run':<44} {'val bits/byte':>13} {'val nats/token':>14} {'tokens':>11} {'train s':>8} precision")
    for name, bpb, loss, tokens, seconds, precision in rows:
        print(f"{name:<44} {bpb:>13.3f} {loss:>14.3f} {tokens:>11,} {seconds:>8.0f} {precision}")
    print(f"{'nanoGPT CPU config, documented':<44} {NANOGPT_DOCUMENTED_NATS / math.log(2):>13.3f} "
          f"{NANOGPT_DOCUMENTED_NATS:>14.3f} {2000 * 12 * 64:>11,} {'~180':>8} fp32 (MacBook, its README)")


if __name__ == "__main__":
    main()
