"""Continued pretraining on real data: a Tiny Shakespeare model goes on to classical Chinese poetry.

    python benchmarks/continual_pretraining.py [--pretrain-steps 600] [--steps 300]

1. `orchard pretrain` a 4 x 256 model (and its 512-token tokenizer) on Tiny Shakespeare;
2. `orchard continual` from it with tasks [Tiny Shakespeare, the Chinese poetry corpus] and
   task_steps [0, --steps]: Shakespeare is what the model already knows (scored, not trained), the
   poetry is the new task; once naively and once with replay of Shakespeare windows.

Prints bits per byte on held-out Shakespeare (the last 100 windows of 256 tokens, inside the
pretraining run's validation split) and on held-out poetry (the corpus's last 100 windows), before
and after the continuation, for both strategies. The data are read from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchard.config import load_config
from orchard.methods import continual, pretrain

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pretrain"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
POETRY = DATA / "chinese_poetry" / "song_ci.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="training steps on the poetry")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--replay-ratio", type=float, default=0.25)
    parser.add_argument("--replay-size", type=int, default=1000, help="Shakespeare windows kept for replay")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-continual-pretraining")
    args = parser.parse_args()
    for path in (SHAKESPEARE, POETRY):
        if not path.is_file():
            sys.exit(f"{path}: not found (the real corpora are read from ../shared/data)")

    base = pretrain.run(load_config(pretrain.PretrainConfig, None, [
        f"out={args.out / 'shakespeare'}", f"data.path={SHAKESPEARE}", "data.seq_len=256", "data.val_fraction=0.1",
        "tokenizer.vocab_size=512", "model.hidden_size=256", "model.intermediate_size=688",
        "model.num_hidden_layers=4", "model.num_attention_heads=4", "model.num_key_value_heads=4",
        f"train.max_steps={args.pretrain_steps}", "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=50",
        "train.eval_every=100", "train.save_every=200", "train.progress=false"])).final_dir

    results = {}
    for strategy, extra in (("naive", []), ("replay", [f"replay_ratio={args.replay_ratio}",
                                                       f"replay_size={args.replay_size}"])):
        config = load_config(continual.ContinualConfig, None, [
            f"init={base}", f"out={args.out / strategy}", f"tasks=[text:{SHAKESPEARE},text:{POETRY}]",
            f"task_steps=[0,{args.steps}]", f"strategy={strategy}", "eval_items=100", "data.max_length=256",
            f"train.lr={args.lr}", "train.batch_size=16", "train.warmup_steps=30", "train.weight_decay=0.1",
            "train.eval_every=0", "train.save_every=100", "train.progress=false", *extra])
        continual.run(config)
        results[strategy] = json.loads((args.out / strategy / "continual.json").read_text())

    print(f"\nbits per byte on held-out text (lower is better); {args.steps} steps on the poetry")
    print(f"{'':34}{'Shakespeare':>12}{'poetry':>10}")
    first = next(iter(results.values()))
    print(f"{'pretrained on Shakespeare':34}" + "".join(f"{v:12.3f}" if j == 0 else f"{v:10.3f}"
                                                         for j, v in enumerate(first["values"][0])))
    for strategy, result in results.items():
        shakespeare, poetry = result["values"][-1]
        print(f"{'after the poetry, ' + strategy:34}{shakespeare:12.3f}{poetry:10.3f}")
    naive, replay = (results[s]["values"] for s in ("naive", "replay"))
    rise = naive[-1][0] - naive[0][0]
    kept = replay[-1][0] - replay[0][0]
    print(f"\nShakespeare bits per byte rise: naive {rise:+.3f}, replay {kept:+.3f}"
          + (f" ({1 - kept / rise:.0%} less)" if rise > 0 else ""))


if __name__ == "__main__":
    main()
