"""Does a change leave every result of the pipeline unchanged? The quickstart, run by steps instead of
time (so two runs take exactly the same steps), on this working tree and on a git revision, compared
number for number: every metrics.jsonl row (timings left out), every final checkpoint's weights
hash, and the report with its timings and paths masked.

    python benchmarks/same_results.py --base 80b70b1                  # ~6 min per tree on 2 cores
    python benchmarks/same_results.py --base HEAD~3 --pretrain-steps 20 --stage-steps 5   # a smoke run

It prints one line per compared file and exits 1 when anything differs. Both trees run with this
tree's Python environment, the base from a temporary `git worktree`, each with its own cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time", "tok_per_s", "tokens_per_s", "elapsed", "eta", "seconds", "mfu", "flops_per_s", "wall")

RUN = """
import dataclasses, sys
from pathlib import Path
from orchard.cli import quickstart
pretrain_steps, stage_steps, items = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
original = quickstart.quickstart_config
def by_steps(out, max_time):
    config = original(out, max_time)
    config.train = dataclasses.replace(config.train, max_time=None, max_steps=pretrain_steps)
    return config
quickstart.quickstart_config = by_steps
quickstart.run_quickstart(Path(sys.argv[1]), sft_steps=stage_steps, eval_items=items, distill_steps=stage_steps,
                          continual_steps=stage_steps // 3, continual_items=items // 2, grow_steps=stage_steps // 3)
"""


def run_pipeline(source: Path, out: Path, args) -> None:
    env = {**os.environ, "PYTHONPATH": str(source / "src"), "ORCHARD_CACHE": str(out.parent / f"{out.name}-cache")}
    command = [sys.executable, "-c", RUN, str(out), str(args.pretrain_steps), str(args.stage_steps), str(args.items)]
    print(f"running the quickstart from {source} ...", file=sys.stderr)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


def metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(word in k for word in TIMING)} for row in rows]


def masked_report(out: Path) -> str:
    text = (out / "report.md").read_text().replace(str(out), "OUT")
    text = re.sub(r"wall time \(s\) \| [0-9.]+", "wall time (s) | T", text)
    text = re.sub(r"\| \d+ \| (OUT/\S+) \|$", r"| T | \1 |", text, flags=re.M)  # the alignment table's seconds
    return re.sub(r"read back from `[^`]*`", "read back from CACHE", text)


def compare(base: Path, head: Path) -> list[str]:
    differences = []
    for found in sorted(base.rglob("metrics.jsonl")):
        name = found.relative_to(base)
        same = (head / name).is_file() and metrics(found) == metrics(head / name)
        print(f"{'same' if same else 'DIFFERS'}  {name}")
        differences += [] if same else [str(name)]
    for found in sorted(base.rglob("final/orchard.json")):
        name = found.relative_to(base)
        same = (head / name).is_file() and json.loads(found.read_text())["weights_sha256"] == \
            json.loads((head / name).read_text())["weights_sha256"]
        print(f"{'same' if same else 'DIFFERS'}  {name.parent} weights")
        differences += [] if same else [f"{name.parent} weights"]
    same = masked_report(base) == masked_report(head)
    print(f"{'same' if same else 'DIFFERS'}  report.md (timings and paths masked)")
    return differences + ([] if same else ["report.md"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare this working tree with")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--stage-steps", type=int, default=60, help="SFT and distillation steps (a third for "
                                                                    "continual learning and growth)")
    parser.add_argument("--items", type=int, default=50, help="evaluation items per task")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tree = scratch / "base-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), args.base], check=True)
        try:
            run_pipeline(tree, scratch / "base", args)
            run_pipeline(ROOT, scratch / "head", args)
            differences = compare(scratch / "base", scratch / "head")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    print(f"{len(differences)} difference(s) from {args.base}" if differences else f"identical to {args.base}")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
