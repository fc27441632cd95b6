"""Sequence-level distillation's data: the teacher's answers to the training prompts, kept and reused."""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

import torch

from ...data.synthetic import answer_matches, write_jsonl
from ...errors import OrchardError
from ...files import read_json, write_json
from ...model.generation import SamplingConfig, generate
from ...training.runtime import Runtime
from ..prompts import load_prompts
from ..rollouts import turn_end_ids
from .config import REPLIES_FILE, DistillConfig
from .models import Teacher


# --- sequence-level distillation -------------------------------------------------------------------

def teacher_replies(config: DistillConfig, teacher: Teacher, out: Path, runtime: Runtime) -> tuple[Path, dict]:
    """The teacher's answers to the training prompts as conversations in `out/teacher_replies.jsonl`,
    reused while the teacher, prompts and sampling settings are the same."""
    tokenizer = teacher.tokenizer
    prompts, _, prompt_record = load_prompts(config.prompts, tokenizer, config.train.seed)
    settings = {"teacher_weights_sha256": teacher.weights_sha256,
                "prompts": hashlib.sha256(str([p.ids for p in prompts]).encode()).hexdigest(),
                "temperature": config.sampling_temperature, "samples": config.samples_per_prompt,
                "max_new_tokens": config.max_new_tokens, "keep_only_correct": config.keep_only_correct,
                "reasoning": config.reasoning, "seed": config.train.seed}
    target, meta_file = out / REPLIES_FILE, out / (REPLIES_FILE + ".meta.json")
    if target.is_file() and meta_file.is_file():
        try:
            meta = read_json(meta_file)
        except OrchardError:
            meta = {}  # unreadable: made again
        if meta.get("settings") == settings:
            return target, meta
    from tqdm import tqdm

    model = teacher.model.to(runtime.device).eval()
    end_ids = turn_end_ids(tokenizer)
    records, rejected, started = [], 0, time.perf_counter()
    batch_size = 32
    expanded = [p for p in prompts for _ in range(config.samples_per_prompt)]
    for start in tqdm(range(0, len(expanded), batch_size), desc="teacher answers", unit="batch", file=sys.stderr,
                      disable=not sys.stderr.isatty()):
        chunk = expanded[start:start + batch_size]
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.sampling_temperature,
                                  top_p=1.0, seed=config.train.seed + start)
        with torch.no_grad(), runtime.autocast():
            completions = generate(model, [p.ids for p in chunk], sampling, end_ids, tokenizer.pad_id)
        for prompt, completion in zip(chunk, completions):
            reply = tokenizer.decode(completion).strip()
            if config.reasoning == "strip":
                reply = re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL).strip()
            if not reply or (config.keep_only_correct and prompt.answer is not None
                             and not answer_matches(reply, prompt.answer)):
                rejected += 1
                continue
            records.append({"messages": [*prompt.messages, {"role": "assistant", "content": reply}]})
    if not records:
        raise OrchardError("prompts: the teacher gave no usable answer (keep_only_correct rejected all of them?)")
    meta = {"settings": settings, "prompts": prompt_record, "answers": len(records), "rejected": rejected,
            "seconds": round(time.perf_counter() - started, 2)}
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, records)
    write_json(meta_file, meta)
    return target, meta
