"""`orchard serve` under load: output tokens/s, and p50/p95 time to first token (TTFT) and
inter-token latency (ITL), at concurrency 1, 8 and 32, beside a baseline that serves the same
requests one at a time with transformers' `generate` on the same weights.

    python benchmarks/serve.py                              # the quickstart's architecture, random weights
    python benchmarks/serve.py --checkpoint runs/quickstart/sft --requests 64

Without --checkpoint the model is the quickstart's (4 blocks of 256, vocabulary 2,048, 4 query and
2 key/value heads) with random weights and a tokenizer trained on the built-in conversations, so
that it runs without a quickstart first; with a trained checkpoint replies end at their end token.
Every request is a chat turn from the built-in held-out conversations, greedy, at most
--max-tokens tokens, run twice: replies ending where the model ends them (a trained quickstart
model answers in a few tokens, so prompts dominate), and every reply exactly --max-tokens long
(`ignore_eos`, vLLM's extension, as serving benchmarks fix output lengths). The server streams
(TTFT and ITL are read off the stream's chunks). The baseline runs each request's chat prompt
through `LlamaForCausalLM.generate` (greedy, the same end tokens and budget) one after another; its
TTFT is the time to its first token (`max_new_tokens=1`) measured apart. Both are fp32 and give the
same tokens, so tokens/s compare like for like (the script checks the replies are identical).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_checkpoint(directory: Path) -> Path:
    from orchard.checkpoint import save_checkpoint
    from orchard.cli.quickstart import quickstart_config
    from orchard.data.synthetic import World, instruction_conversations
    from orchard.model import CausalLM, ModelConfig
    from orchard.tokenizer import Tokenizer

    texts = [m["content"] for c in instruction_conversations(World(), "train") for m in c["messages"]]
    tokenizer = Tokenizer.train(iter(texts), vocab_size=2048)
    config = quickstart_config(directory, 1.0).model
    model = CausalLM(ModelConfig(**{**config.__dict__, "vocab_size": tokenizer.vocab_size}))
    model.reset_parameters(seed=0)
    return save_checkpoint(directory / "quickstart-architecture", model, tokenizer, record={"stage": "benchmark"})


def workload(count: int) -> list[list[dict]]:
    from orchard.data.synthetic import World, instruction_conversations

    conversations = instruction_conversations(World(), "held_out")
    return [[m for m in c["messages"] if m["role"] != "assistant"][:1] for c in conversations[:count]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def serve_round(url: str, model: str, requests: list[list[dict]], concurrency: int, max_tokens: int,
                fixed: bool) -> dict:
    """Every request streamed, `concurrency` at a time, from one asyncio client (light on the CPU the
    server shares)."""
    async def one(client, limit, messages):
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": fixed}
        async with limit:
            started = time.perf_counter()
            arrivals, text, tokens = [], "", 0
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            arrivals.append(time.perf_counter())
                            text += choice["delta"]["content"]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return {"ttft": arrivals[0] - started if arrivals else float("nan"), "gaps": gaps, "tokens": tokens, "text": text}

    async def all_requests():
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
            return await asyncio.gather(*(one(client, limit, messages) for messages in requests))

    started = time.perf_counter()
    try:  # the client shares the server's CPU: the faster event loop where there is one
        import uvloop
        results = uvloop.run(all_requests())
    except ImportError:
        results = asyncio.run(all_requests())
    seconds = time.perf_counter() - started
    return {"tokens_per_s": sum(r["tokens"] for r in results) / seconds,
            "ttft": [r["ttft"] for r in results], "itl": [g for r in results for g in r["gaps"]],
            "texts": [r["text"] for r in results], "tokens": sum(r["tokens"] for r in results)}


def baseline(checkpoint: Path, requests: list[list[dict]], max_tokens: int, fixed: bool) -> dict:
    """transformers' generate, one request after another, on the same weights."""
    from transformers import LlamaForCausalLM

    from orchard.cli.commands import chat_end_ids
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(checkpoint)
    model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    end = sorted({tokenizer.eos_id, *chat_end_ids(checkpoint, tokenizer)})
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in requests]
    texts, tokens, ttfts = [], 0, []
    # Fixed lengths: past the end tokens, as the server's ignore_eos (which decodes them, not suppresses them).
    stopping = {"eos_token_id": end}
    if fixed:
        model.generation_config.eos_token_id = stopping["eos_token_id"] = None
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=end[0])  # warm-up
        started = time.perf_counter()
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=end[0], **stopping)
            new = out[0, len(ids):].tolist()
            if not fixed:
                new = new[:next((i for i, t in enumerate(new) if t in end), len(new))]
            tokens += len(new)
            texts.append(tokenizer.decode(new))
        seconds = time.perf_counter() - started
        for ids in prompts:
            first = time.perf_counter()
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=1, do_sample=False, pad_token_id=end[0])
            ttfts.append(time.perf_counter() - first)
    return {"tokens_per_s": tokens / seconds, "ttft": ttfts, "itl": [seconds / max(tokens, 1)], "texts": texts,
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="an orchard checkpoint (default: the quickstart architecture)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    from test_serve import Server

    from orchard.checkpoint import resolve_checkpoint

    workloads = {"replies as the model ends them": False, f"every reply {args.max_tokens} tokens (ignore_eos)": True}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = resolve_checkpoint(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp))
        requests = workload(args.requests)
        server = Server(str(checkpoint), "--model-name", "bench", "--max-batch-size", str(max(args.concurrency)))
        try:
            serve_round(server.url, "bench", requests[:4], 4, 8, False)  # warm-up
            for name, fixed in workloads.items():
                results[name] = {c: serve_round(server.url, "bench", requests, c, args.max_tokens, fixed)
                                 for c in args.concurrency}
        finally:
            server.stop()
        for name, fixed in workloads.items():
            results[name]["base"] = baseline(checkpoint, requests, args.max_tokens, fixed)
    print(f"{checkpoint}: {len(requests)} chat requests, greedy, at most {args.max_tokens} new tokens each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, rounds in results.items():
        base = rounds.pop("base")
        print(f"\n{name}: {base['tokens']} tokens")
        print(f"{'':<34} {'tokens/s':>9} {'x base':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}")

        def row(label, r):
            ms = lambda v: f"{1000 * v:.0f} ms"  # noqa: E731
            print(f"{label:<34} {r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] / base['tokens_per_s']:>6.2f}x "
                  f"{ms(statistics.median(r['ttft'])):>9} {ms(percentile(r['ttft'], .95)):>9} "
                  f"{ms(statistics.median(r['itl'])):>8} {ms(percentile(r['itl'], .95)):>8}")

        row("transformers generate, one by one", base)
        for c, r in rounds.items():
            row(f"orchard serve, concurrency {c}", r)
        same = all(r["texts"] == base["texts"] for r in rounds.values())
        print(f"replies identical to the baseline's: {same}")


if __name__ == "__main__":
    main()
