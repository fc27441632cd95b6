"""Memory per process of one training step: one process, DDP and FSDP2 on 2 processes (CPU, gloo).

    python benchmarks/fsdp_memory.py                      # a ~0.5B Llama-shaped model (Qwen2.5-0.5B's shape)
    python benchmarks/fsdp_memory.py --layers 4 --width 512 --vocab 8192   # a quick small run
    python benchmarks/fsdp_memory.py --from-checkpoint    # start from a bf16 checkpoint, as init= does

For each setting it prints the bytes this process holds of parameters + gradients + AdamW state,
counted from its local tensors (shards under FSDP2), and its peak resident memory (ru_maxrss) after
one optimizer step on batch 1 x --seq-len tokens. The same engine pieces as training: the runtime's
wrapping (`Runtime.wrap`), fused AdamW, fp32 weights; a fresh model to shard is built on the meta
device and each process initialises its shards only, as pretraining does. With --from-checkpoint the model is first
written as a bf16 checkpoint and each process starts from it as `init=` does (`start_from`):
memory-mapped, made float32 whole by one process or DDP, block by block as it is sharded by FSDP2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def model_config(args):
    from orchard.model import ModelConfig
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                       num_key_value_heads=max(1, args.width // 448), max_position_embeddings=args.seq_len)


def write_checkpoint(args, directory: str) -> None:
    """The model as a bf16 checkpoint (as Hugging Face models come), in `directory`."""
    from orchard.checkpoint import save_checkpoint
    from orchard.model import CausalLM
    from orchard.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = CausalLM(model_config(args)).to(torch.bfloat16)
    tokenizer = Tokenizer.train(["a tiny corpus for a tokenizer"] * 4, vocab_size=300)
    save_checkpoint(directory, model, tokenizer, {"stage": "benchmark"})


def one_process(args) -> dict:
    from orchard.model import CausalLM
    from orchard.training.distributed import Distributed, leave_process_group
    from orchard.training.runtime import Runtime

    runtime = Runtime.create("cpu", "fp32")
    if args.checkpoint:
        from orchard.checkpoint import load_checkpoint
        model = load_checkpoint(args.checkpoint).model.train()
        if not runtime.distributed.shards(args.parallel):
            model = model.float()  # as start_from does
    elif runtime.distributed.shards(args.parallel):
        with torch.device("meta"):  # as pretraining builds a fresh model to shard
            model = CausalLM(model_config(args))
    else:
        model = CausalLM(model_config(args))
        model.reset_parameters(seed=0)
    config = model.config
    wrapped = runtime.wrap(model, 0, args.parallel)
    if any(Distributed.local(p).is_meta for p in model.parameters()):
        model.to_empty(device=runtime.device)  # each process allocates and initialises its shards only
        model.reset_parameters(seed=0)
        model.model.rotary.reset()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(runtime.distributed.rank))
    loss = torch.nn.functional.cross_entropy(wrapped(ids).logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    optimizer.step()
    local = Distributed.local
    held = sum(local(p).numel() * local(p).element_size() for p in params)
    held += sum(local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None)
    held += sum(local(t).numel() * local(t).element_size() for state in optimizer.state.values()
                for t in state.values() if torch.is_tensor(t))
    result = {"parallel": args.parallel, "world": runtime.distributed.world_size, "rank": runtime.distributed.rank,
              "parameters": model.config.num_parameters(), "held_bytes": held,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    leave_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--from-checkpoint", action="store_true",
                        help="start from a bf16 checkpoint (memory-mapped), as init= does")
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # a child's setting
    parser.add_argument("--parallel", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parallel is not None:
        result = one_process(args)
        with open(f"{args.out}.{result['rank']}", "w") as handle:
            json.dump(result, handle)
        return
    rows = []
    extra = []
    if args.from_checkpoint:
        checkpoint = f"/tmp/orchard-fsdp-memory-checkpoint-{os.getpid()}"
        write_checkpoint(args, checkpoint)
        extra = ["--checkpoint", checkpoint]
    settings = (("one process", "ddp", 1), ("DDP, 2 processes", "ddp", 2), ("FSDP2, 2 processes", "fsdp", 2))
    for label, parallel, processes in settings:
        out = f"/tmp/orchard-fsdp-memory-{os.getpid()}"
        launch = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        child = [*launch, __file__, *sys.argv[1:], *extra, "--parallel", parallel, "--out", out]
        completed = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if completed.returncode != 0:  # on a small machine, most likely out of memory
            print(f"{label}: failed (exit {completed.returncode}): {completed.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        results = []
        for rank in range(processes):
            with open(f"{out}.{rank}") as handle:
                results.append(json.load(handle))
            os.remove(f"{out}.{rank}")
        rows.append((label, max(r["held_bytes"] for r in results), max(r["peak_rss_bytes"] for r in results),
                     results[0]["parameters"]))
    if not rows or rows[0][0] != "one process":
        sys.exit("the one-process run failed: nothing to compare with")
    start = "from a bf16 checkpoint, " if args.from_checkpoint else ""
    print(f"{rows[0][3]:,} parameters, {start}fp32 weights, AdamW, batch 1 x {args.seq_len} tokens; per process:")
    print(f"{'':<22}{'params+grads+AdamW':>20}{'vs one process':>16}{'peak resident':>15}")
    for label, held, peak, _ in rows:
        print(f"{label:<22}{held / 2**30:>17.2f} GiB{held / rows[0][1]:>16.0%}{peak / 2**30:>11.2f} GiB")


if __name__ == "__main__":
    main()
