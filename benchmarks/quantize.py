"""Weight-only quantization: what int8 and int4 cost in perplexity and gain in size and speed.

    python benchmarks/quantize.py [CHECKPOINT ...] [--out DIR] [--max-sequences N] [--max-new-tokens N]

For each checkpoint (by default the quickstart's pretrained model and the Tiny Shakespeare model that
benchmarks/shakespeare.py trains, where they exist) it runs `orchard quantize --bits 8` and
`--bits 4` (groups of 32) and prints, for the original and both quantized copies: perplexity on the
held-out split the model was pretrained with (the tail of its corpus that its lineage record names,
cut into the same windows), the size of model.safetensors, and greedy decoding speed (batch 1,
128 new tokens after a 16-token prompt, 2 threads, the median of 3 runs after a warm-up).

Take the timings on an otherwise idle machine: with more threads than free cores, PyTorch's parallel
regions wait for descheduled threads, and the fused kernels, which run one per linear layer even for
a single token, suffer most (on a 2-core machine busy with another run, 2 threads made every model
20 to 140 times slower than 1 thread did).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINTS = [ROOT / "runs" / "quickstart" / "pretrain" / "final",
                       ROOT / "runs" / "bench-shakespeare" / "orchard" / "final",
                       ROOT / "runs" / "shakespeare" / "final"]
PROMPT_TOKENS = 16


def held_out(checkpoint_dir: Path, tokenizer):
    """The validation windows of the pretraining run behind `checkpoint_dir` (found through the
    lineage), tokenized with this checkpoint's tokenizer."""
    from orchard.data.packing import PackedSequences, split_tokens
    from orchard.data.tokens import build_token_cache
    from orchard.lineage import ancestry
    from orchard.data.text import TextDataConfig, corpus_paths

    pretrain = next((r for r in ancestry(checkpoint_dir) if r.get("stage") == "pretrain"), None)
    if pretrain is None:
        sys.exit(f"{checkpoint_dir}: no pretraining stage in its lineage to take the held-out data from")
    settings = dict(pretrain["recipe"]["data"])
    paths = settings["path"] if isinstance(settings["path"], list) or settings["path"] is None else [settings["path"]]
    if paths is not None:  # a relative path is relative to where the run was started: try the repository
        paths = [p if Path(p).exists() or not (ROOT / p).exists() else str(ROOT / p) for p in paths]
    data = TextDataConfig(**{**settings, "path": paths})
    cache = build_token_cache(corpus_paths(data), tokenizer, data.text_field)
    _, val = split_tokens(cache.tokens, data.val_fraction, data.seq_len)
    return PackedSequences(val, data.seq_len), val


def perplexity(checkpoint, sequences, max_sequences: int | None) -> float:
    from orchard.evaluation.language_modeling import evaluate_language_modeling

    metrics = evaluate_language_modeling(checkpoint.model, sequences, checkpoint.tokenizer.token_byte_lengths(),
                                         batch_size=16, max_sequences=max_sequences)
    return metrics["val_perplexity"]


def tokens_per_second(model, prompt: list[int], new_tokens: int, repeats: int) -> float:
    from orchard.model.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    generate(model, [prompt], sampling, eos_id=[], pad_id=0)  # warm-up: allocations, kernel layouts
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        (tokens,) = generate(model, [prompt], sampling, eos_id=[], pad_id=0)  # no end token: all of them
        times.append(time.perf_counter() - started)
    return len(tokens) / statistics.median(times)


def main() -> None:
    from orchard.checkpoint import load_checkpoint, resolve_checkpoint
    from orchard.cli.main import main as orchard

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", type=Path, help="checkpoints (default: see above)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quantize",
                        help="where the quantized copies go (default runs/bench-quantize)")
    parser.add_argument("--max-sequences", type=int, default=None, help="held-out windows to score (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per model (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = args.checkpoints or [p for p in DEFAULT_CHECKPOINTS if p.is_dir()]
    if not checkpoints:
        sys.exit("no checkpoints given and none of the defaults exists (run `orchard quickstart` first)")

    rows = []
    for source in checkpoints:
        source = resolve_checkpoint(source)
        name = "/".join(source.parts[-3:-1] if source.name == "final" else source.parts[-2:])
        variants = [("original", source, [])]
        for label, flags in (("int8", ["--bits", "8"]), ("int4 g32", ["--bits", "4", "--group-size", "32"])):
            out = args.out / f"{name}-{label.replace(' ', '-')}"
            if orchard(["quantize", str(source), *flags, "--out", str(out)]) != 0:
                sys.exit(f"orchard quantize {source} {' '.join(flags)} failed")
            variants.append((label, out, flags))
        sequences = prompt = None
        baseline = None
        for label, path, _ in variants:
            checkpoint = load_checkpoint(path)
            if sequences is None:
                sequences, val = held_out(source, checkpoint.tokenizer)
                prompt = [int(t) for t in val[:PROMPT_TOKENS]]
            ppl = perplexity(checkpoint, sequences, args.max_sequences)
            baseline = ppl if baseline is None else baseline
            speed = tokens_per_second(checkpoint.model, prompt, args.max_new_tokens, args.repeats)
            rows.append((name, label, ppl, 100 * (ppl / baseline - 1), (path / "model.safetensors").stat().st_size,
                         speed))
            del checkpoint

    print()
    print(f"{'checkpoint':<24} {'weights':<9} {'held-out ppl':>12} {'change':>8} {'model.safetensors':>18} "
          f"{'greedy tok/s':>13}")
    for name, label, ppl, change, size, speed in rows:
        change_text = "" if label == "original" else f"{change:+.2f}%"
        print(f"{name:<24} {label:<9} {ppl:>12.4f} {change_text:>8} {size / 1e6:>15.2f} MB {speed:>13.1f}")
    print(f"\n(batch 1, {args.max_new_tokens} new tokens, {args.threads} threads, median of {args.repeats}; "
          f"perplexity over {'all' if args.max_sequences is None else f'at most {args.max_sequences}'} "
          f"held-out windows)")
    if not all(math.isfinite(row[2]) for row in rows):
        sys.exit("a perplexity is not finite")


if __name__ == "__main__":
    main()
