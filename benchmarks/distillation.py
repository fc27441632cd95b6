"""Distillation: a quarter-size student with and without a teacher, on the same tokens.

    python benchmarks/distillation.py [--teacher runs/quickstart/pretrain/final] [--steps 1500]
                                      [--shakespeare-teacher runs/bench-shakespeare/orchard/final]

On the built-in world, from the given teacher (the quickstart's pretrained model by default):

* a student of half the teacher's width (<= 1/4 of its non-embedding parameters) trained on the
  same windows, in the same order, for the same steps: without a teacher (alpha=0), and with the
  teacher's cached top-k distributions through forward KL, reverse KL and generalised JSD;
  held-out bits per byte, the three divergences from the teacher, and greedy exact match on the
  world's held-out facts (both languages) and on sums, side by side with the teacher's;
* the offline cache's cost: the first KD student builds it (the teacher's forward passes), the
  others train from it without loading the teacher; FLOPs and wall time of each, and the bytes per
  token a cache of k = 8, 32 and 128 stores;
* Tiny Shakespeare: the same comparison (teacher / student with KD / without) in bits per byte,
  from a teacher trained by `benchmarks/shakespeare.py` (trained here if it is missing).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from orchard.checkpoint import load_checkpoint, read_model_config, read_record
from orchard.config import load_config
from orchard.data.packing import PackedSequences, split_tokens
from orchard.data.synthetic import World
from orchard.data.tokens import build_token_cache
from orchard.evaluation.completion import completion_accuracy, world_completion_tasks
from orchard.methods import distill
from orchard.data.text import TextDataConfig, corpus_paths

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"


def student_yaml(teacher_dir: Path, path: Path) -> Path:
    return distill.write_student_config(distill.quarter_width_config(read_model_config(teacher_dir)), path)


def exact_match(checkpoint_dir: Path) -> dict[str, float]:
    """Greedy completion exact match on the held-out split's facts (English, Chinese) and on sums."""
    checkpoint = load_checkpoint(checkpoint_dir)
    world = World()
    tasks = world_completion_tasks(world, sums=200)
    scores = {name.removeprefix("held-out ").replace(" (", " ").rstrip(")"): completion_accuracy(
        checkpoint.model, checkpoint.tokenizer, items).accuracy for name, items in tasks.items()}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def teacher_metrics(teacher_dir: Path, seq_len: int, data: TextDataConfig, windows: int) -> dict:
    """The teacher's own held-out bits per byte on the windows the students are validated on."""
    from orchard.evaluation.language_modeling import evaluate_language_modeling

    checkpoint = load_checkpoint(teacher_dir)
    tokens = build_token_cache(corpus_paths(data), checkpoint.tokenizer, data.text_field).tokens
    _, val = split_tokens(tokens, data.val_fraction, seq_len)
    return evaluate_language_modeling(checkpoint.model, PackedSequences(val, seq_len),
                                      checkpoint.tokenizer.token_byte_lengths(), 32, max_sequences=windows)


def run_student(teacher: Path, student: Path, out: Path, settings: list[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    config = load_config(distill.DistillConfig, None, [f"teacher={teacher}", f"student={student}", f"out={out}",
                                                       "train.progress=false", *settings])
    result = distill.run(config)
    return read_record(result.final_dir) | {"path": str(result.final_dir)}, time.perf_counter() - started


def cache_sizes(teacher_dir: Path, data: TextDataConfig, seq_len: int, out: Path) -> list[tuple[int, float]]:
    """Bytes per token of the offline cache for k = 8, 32, 128 (100 windows each)."""
    teacher = distill.Teacher(str(teacher_dir))
    tokens = build_token_cache(corpus_paths(data), teacher.tokenizer, data.text_field).tokens
    windows = PackedSequences(tokens, seq_len)
    sizes = []
    for k in (8, 32, 128):
        directory = out / f"cache-k{k}"
        cache = distill.open_teacher_cache(directory) or distill.build_teacher_cache(
            directory, teacher, {"train": windows}, {"train": 100}, k, 32, "bf16", torch.device("cpu"))
        sizes.append((k, cache.meta["bytes_per_token"]))
    return sizes


def built_in(args) -> None:
    out = args.out / "world"
    teacher = args.teacher
    student = student_yaml(teacher, out / "student.yaml")
    teacher_config = read_model_config(teacher)
    data = TextDataConfig(seq_len=128, synthetic_documents=20000, val_fraction=0.05)
    common = ["data.seq_len=128", "data.synthetic_documents=20000", "data.val_fraction=0.05",
              f"train.max_steps={args.steps}", "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=30",
              "train.eval_every=0", "train.eval_batches=10", "train.save_every=500", f"top_k={args.top_k}",
              f"max_train_windows={args.windows}", f"temperature={args.temperature}"]
    runs = {}
    for name, slug, settings in [
            ("KD, forward KL", "kd-forward-kl", ["divergence=forward_kl", f"alpha={args.alpha}"]),
            ("no teacher (alpha=0)", "no-teacher", ["alpha=0"]),
            ("KD, reverse KL", "kd-reverse-kl", ["divergence=reverse_kl", f"alpha={args.alpha}"]),
            ("KD, generalised JSD (beta 0.5)", "kd-jsd", ["divergence=jsd", f"alpha={args.alpha}"])]:
        print(f"--- {name}", file=sys.stderr)
        runs[name] = run_student(teacher, student, out / slug, common + settings)

    val_windows = 10 * 32
    teacher_lm = teacher_metrics(teacher, 128, data, val_windows)
    teacher_em = exact_match(teacher)
    rows = [("teacher", teacher_config.num_parameters(False), teacher_lm["val_bpb"], None, None, None, teacher_em)]
    for name, (record, _) in runs.items():
        m = record["metrics"]
        rows.append((name, record["parameters"]["student_non_embedding"], m["val_bpb"], m["val_forward_kl"],
                     m["val_reverse_kl"], m["val_jsd"], exact_match(Path(record["path"]))))
    print(f"\nbuilt-in world: {args.steps} steps x 32 windows x 128 tokens for every student, "
          f"{args.windows} distinct windows, top-{args.top_k} cache, T={args.temperature}, alpha={args.alpha}")
    print(f"{'model':34} {'non-emb params':>14} {'val bpb':>8} {'fwd KL':>7} {'rev KL':>7} {'JSD':>7} "
          f"{'facts en':>8} {'facts zh':>8} {'sums':>6} {'mean EM':>7} {'of teacher':>10}")
    for name, params, bpb, fkl, rkl, jsd, em in rows:
        cells = " ".join(f"{v:7.4f}" if v is not None else f"{'-':>7}" for v in (fkl, rkl, jsd))
        print(f"{name:34} {params:>14,} {bpb:8.4f} {cells} {em['facts en']:8.1%} {em['facts zh']:8.1%} "
              f"{em['sums']:6.1%} {em['mean']:7.1%} {em['mean'] / max(teacher_em['mean'], 1e-9):10.1%}")

    print("\noffline cache: built once by the first KD student, reused by the others")
    print(f"{'student':34} {'teacher loaded':>14} {'cache FLOPs':>12} {'train FLOPs':>12} {'cache s':>8} "
          f"{'train s':>8} {'total s':>8}")
    for name, (record, seconds) in runs.items():
        cache = record["data"]["teacher_cache"]
        cache_flops = cache["build_flops"] if cache["built_now"] else 0.0
        cache_seconds = cache["build_seconds"] if cache["built_now"] else 0.0
        training = record["training"]
        print(f"{name:34} {str(record['data']['teacher_loaded']):>14} {cache_flops:12.3g} {training['flops']:12.3g} "
              f"{cache_seconds:8.1f} {training['wall_seconds']:8.1f} {seconds:8.1f}")
    print("\nbytes per token stored (uint16 ids + float16 log-probabilities):")
    for k, size in cache_sizes(teacher, data, 128, out):
        print(f"  k={k:<4} {size:8.1f}")


def shakespeare(args) -> None:
    if not SHAKESPEARE.is_file():
        print(f"Tiny Shakespeare skipped: {SHAKESPEARE} not found", file=sys.stderr)
        return
    teacher = args.shakespeare_teacher
    if not (teacher / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "orchard.cli.main", "pretrain", str(ROOT / "recipes" / "shakespeare.yaml"),
                        f"out={teacher.parent}", f"data.path={SHAKESPEARE}"], check=True)
    out = args.out / "shakespeare"
    student = student_yaml(teacher, out / "student.yaml")
    common = [f"data.path={SHAKESPEARE}", "data.seq_len=256", "data.val_fraction=0.1",
              f"train.max_steps={args.shakespeare_steps}", "train.batch_size=16", "train.lr=2e-3",
              "train.warmup_steps=50", "train.eval_every=0", "train.eval_batches=1000", "train.save_every=500",
              f"top_k={args.top_k}", f"temperature={args.temperature}"]
    kd, _ = run_student(teacher, student, out / "kd", common + [f"alpha={args.alpha}"])
    plain, _ = run_student(teacher, student, out / "no-teacher", common + ["alpha=0"])
    data = TextDataConfig(path=str(SHAKESPEARE), val_fraction=0.1)
    teacher_bpb = teacher_metrics(teacher, 256, data, 1000)["val_bpb"]
    print(f"\nTiny Shakespeare (validation: the last 10% of the file), {args.shakespeare_steps} steps x 16 x 256 "
          f"tokens per student")
    print(f"{'model':28} {'non-emb params':>14} {'val bits/byte':>13}")
    print(f"{'teacher':28} {read_model_config(teacher).num_parameters(False):>14,} {teacher_bpb:13.3f}")
    for name, record in (("student with KD", kd), ("student without teacher", plain)):
        print(f"{name:28} {record['parameters']['student_non_embedding']:>14,} {record['metrics']['val_bpb']:13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "quickstart" / "pretrain" / "final")
    parser.add_argument("--shakespeare-teacher", type=Path, default=ROOT / "runs" / "bench-shakespeare" / "orchard" / "final")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each built-in student")
    parser.add_argument("--shakespeare-steps", type=int, default=600)
    parser.add_argument("--windows", type=int, default=8000, help="distinct training windows (the cache's size)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", default=["world", "shakespeare"])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if "world" in args.only:
        if not (args.teacher / "config.json").is_file():
            sys.exit(f"{args.teacher}: no teacher checkpoint; run `orchard quickstart` first or pass --teacher")
        built_in(args)
    if "shakespeare" in args.only:
        shakespeare(args)


if __name__ == "__main__":
    main()
