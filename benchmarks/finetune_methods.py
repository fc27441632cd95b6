"""Fine-tuning methods side by side (full, LoRA, DoRA, bottleneck adapters, prefix tuning): trainable parameters, tokens/s and peak memory, and orchard's
LoRA beside Hugging Face PEFT's on the same model, data and settings.

    python benchmarks/finetune_methods.py [--steps 8] [--precision bf16] [--compile]

Every method runs in its own process (so peak resident memory is its own) on the same Llama-style
model (~22M parameters) and the same packed batches of the built-in instruction conversations:
a training step is forward, loss on assistant tokens, backward and AdamW, as in the engine.
PEFT runs the identical model as a `transformers.LlamaForCausalLM` with `peft.LoraConfig` of the
same rank, alpha and target modules. The first two steps are not timed. With --compile, orchard
compiles its decoder blocks as `train.compile` does for SFT (whose batches change shape), and PEFT
runs `torch.compile` of its whole model (its faster choice here).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from orchard.data.conversations import Conversation, collate_packed, pack_conversations, tokenize_conversation
from orchard.data.synthetic import World, instruction_conversations
from orchard.losses.tokens import token_cross_entropy
from orchard.model import CausalLM, ModelConfig
from orchard.model.attention import document_mask
from orchard.tokenizer import Tokenizer

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True)
BATCH, SEQ_LEN, RANK, ALPHA = 8, 256, 8, 16.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["full", "lora", "dora", "adapter", "prefix", "peft-lora"]


def batches(tokenizer, count: int) -> list[dict]:
    records = instruction_conversations(World(), split="train")
    examples = [tokenize_conversation(Conversation(r["messages"], "bench"), tokenizer, SEQ_LEN) for r in records]
    packed = pack_conversations([e for e in examples if e is not None], SEQ_LEN)
    return [collate_packed(packed[i * BATCH:(i + 1) * BATCH], tokenizer.pad_id, pad_to=SEQ_LEN) for i in range(count)]


def orchard_model(method: str, vocab_size: int):
    model = CausalLM(ModelConfig(vocab_size=vocab_size, **CONFIG))
    model.reset_parameters(seed=0)
    if method in ("lora", "dora"):
        from orchard.peft.lora import LoraConfig, add_lora

        add_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS, use_dora=method == "dora"), seed=0)
    elif method == "adapter":
        from orchard.peft.adapters import AdapterConfig, add_adapters

        add_adapters(model, AdapterConfig(bottleneck=64), seed=0)
    elif method == "prefix":
        from orchard.peft.prefix import PrefixConfig, add_prefix

        add_prefix(model, PrefixConfig(num_virtual_tokens=16), seed=0)
    # The summed loss as orchard's training computes it (the head fused with the loss).
    return model, lambda batch: model(batch["input_ids"], position_ids=batch["position_ids"],
                                      document_ids=batch["document_ids"], labels=batch["labels"]).loss


def peft_model(vocab_size: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, attn_implementation="sdpa", **CONFIG)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    # transformers takes an additive float mask of shape (B, 1, T, T) for packed sequences.
    def summed_loss(batch):
        mask = torch.where(document_mask(batch["document_ids"]), 0.0, float("-inf"))
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        return token_cross_entropy(logits, batch["labels"])
    return model, summed_loss


def worker(method: str, steps: int, precision: str, compiled: bool) -> dict:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train((m["content"] for r in instruction_conversations(World(), split="train")
                                 for m in r["messages"]), vocab_size=2048)
    data = batches(tokenizer, steps)
    model, forward = peft_model(tokenizer.vocab_size) if method == "peft-lora" else orchard_model(method, tokenizer.vocab_size)
    if compiled and method == "peft-lora":
        forward = torch.compile(forward)
    elif compiled:
        model.compiled_blocks = True
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    model.train()
    timed_tokens, timed_seconds = 0, 0.0
    for step, batch in enumerate(data):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(batch) / (batch["labels"] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            timed_tokens += batch["input_ids"].numel()
            timed_seconds += time.perf_counter() - started
    return {"method": method, "trainable": sum(p.numel() for p in params), "total": total,
            "tokens_per_s": timed_tokens / timed_seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--compile", action="store_true", help="orchard's blocks compiled, PEFT's model compiled")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.precision, args.compile)))
        return
    print(f"model: {CONFIG['num_hidden_layers']} layers x {CONFIG['hidden_size']}, batch {BATCH} x {SEQ_LEN} packed "
          f"tokens, {args.precision}, LoRA r={RANK} alpha={ALPHA:g} on {len(TARGETS)} projections"
          f"{', compiled' if args.compile else ''}")
    print(f"{'method':<10} {'trainable':>12} {'of total':>9} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--steps", str(args.steps),
                              "--precision", args.precision] + ["--compile"] * args.compile, capture_output=True,
                             text=True)
        if out.returncode != 0:
            print(f"{method:<10} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method:<10} {r['trainable']:>12,} {r['trainable'] / r['total']:>9.2%} {r['tokens_per_s']:>9,.0f} "
              f"{r['peak_rss_mib']:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
