"""Continual learning on the built-in three-task stream: naive, replay, EWC and per-task adapters.

    python benchmarks/continual.py [--init runs/quickstart/sft/final] [--steps 100] [--eval-on train]

Each strategy trains the same checkpoint through word problems, then English facts, then Chinese
facts (`orchard continual`, the same steps and settings per task), scoring every task after each
one on its first --eval-items taught items (retention; --eval-on held_out: its held-out items). Prints each strategy's accuracy matrix R (row: after training task
i; column: task j), average accuracy, forgetting and backward transfer, and how much each strategy
cuts forgetting against naive fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchard.config import load_config
from orchard.methods import continual

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = {"naive": [], "replay": ["replay_ratio=0.25", "replay_size=400"], "ewc": [],
              # LoRA trains fewer weights and takes the usual larger learning rate.
              "adapters": ["peft.method=lora", "peft.r=16", "train.lr=2e-3"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, default=ROOT / "runs" / "quickstart" / "sft" / "final")
    parser.add_argument("--steps", type=int, default=100, help="training steps per task")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ewc-lambda", type=float, default=1e6)
    parser.add_argument("--eval-items", type=int, default=100)
    parser.add_argument("--eval-on", choices=["held_out", "train"], default="train",
                        help="score held-out items (generalisation) or the first taught items (retention)")
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more `orchard continual` overrides for every strategy")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-continual")
    args = parser.parse_args()
    if not (args.init / "config.json").is_file():
        sys.exit(f"{args.init}: no checkpoint; run `orchard quickstart` first or pass --init")
    results = {}
    for strategy in args.only:
        extra = STRATEGIES[strategy] + ([f"ewc_lambda={args.ewc_lambda}"] if strategy == "ewc" else [])
        config = load_config(continual.ContinualConfig, None, [
            f"init={args.init}", f"out={args.out / strategy}", f"strategy={strategy}", f"eval_items={args.eval_items}",
            f"eval_on={args.eval_on}",
            f"train.max_steps={args.steps}", f"train.lr={args.lr}", "train.batch_size=16", "train.eval_every=0",
            "train.save_every=0", "train.progress=false", "data.max_length=256", *extra, *args.set])
        continual.run(config)
        results[strategy] = json.loads((args.out / strategy / "continual.json").read_text())

    names = next(iter(results.values()))["tasks"]
    for strategy, result in results.items():
        items = "first taught" if args.eval_on == "train" else "held-out"
        print(f"\n{strategy}: R[i][j] = exact match on task j's {args.eval_items} {items} items after training task i")
        print(f"{'':22}" + "".join(f"{name:>12}" for name in names))
        print(f"{'before training':22}" + "".join(f"{v:12.1%}" for v in result["baseline"]))
        for name, row in zip(names, result["R"]):
            print(f"{'after ' + name:22}" + "".join(f"{v:12.1%}" for v in row))
    naive = results.get("naive", {}).get("summary", {}).get("forgetting")
    print(f"\n{'strategy':12} {'average accuracy':>16} {'forgetting':>10} {'backward transfer':>17} "
          f"{'last task':>9} {'forgetting cut':>14}")
    for strategy, result in results.items():
        summary, last = result["summary"], result["R"][-1][-1]
        cut = f"{1 - summary['forgetting'] / naive:14.0%}" if naive else f"{'-':>14}"
        print(f"{strategy:12} {summary['average_accuracy']:16.1%} {summary['forgetting']:10.3f} "
              f"{summary['backward_transfer']:17.3f} {last:9.1%} {cut}")


if __name__ == "__main__":
    main()
