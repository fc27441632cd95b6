"""The distillation run: teacher, student and corpus prepared, then the shared engine."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from ...config import to_dict
from ...data.packing import PackedSequences, split_tokens
from ...data.text import corpus_paths
from ...data.tokens import build_token_cache
from ...errors import OrchardError
from ...lineage import new_record
from ...model import CausalLM
from ...training import Trainer, TrainResult, training_runtime
from ...training.objectives import ConversationLanguageModeling, tokenize_conversations
from ...training.run_directory import in_run_directory
from ...training.runtime import Runtime, resolve_device
from ..rollouts import turn_end_ids
from .cache import build_teacher_cache, cache_directory, open_teacher_cache
from .config import DistillConfig
from .method import Distillation
from .models import Teacher, build_student, parameter_summary
from .sequence import teacher_replies


def _train(config: DistillConfig, student: CausalLM, method, tokenizer, data_record: dict, summary: dict,
           student_init: str | None, runtime: Runtime, stage: str, extra_flops: float = 0.0) -> TrainResult:
    recipe = to_dict(config)
    record = new_record(stage, recipe, data_record, parent=config.teacher)
    record["parameters"] = summary
    if student_init:
        record["student_init"] = student_init
    flops = student.config.training_flops_per_token(config.data.seq_len) + extra_flops
    trainer = Trainer(config.train, student, method, tokenizer, Path(config.out), record, flops_per_token=flops,
                      runtime=runtime)
    return trainer.fit()


@in_run_directory("distill")
def run(config: DistillConfig) -> TrainResult:
    if not config.teacher:
        raise OrchardError("teacher: distill needs a teacher checkpoint, e.g. orchard distill runs/big/final "
                           "--student student.yaml")
    runtime = training_runtime(config.train)
    teacher = Teacher(config.teacher)
    teacher_runtime = runtime if config.teacher_device == "auto" else \
        replace(runtime, device=resolve_device(config.teacher_device, key="teacher_device"))
    if config.mode == "sequence":
        return run_sequence_level(config, teacher, runtime, teacher_runtime)
    if config.hidden_weight > 0 and config.mode == "offline":
        raise OrchardError("hidden_weight: hidden-state alignment needs the teacher's hidden states, which the "
                           "offline cache does not keep; use mode=online or mode=on_policy")
    tokenizer = teacher.tokenizer

    with runtime.distributed.rank_zero_first():
        paths = corpus_paths(config.data)
        token_cache = build_token_cache(paths, tokenizer, config.data.text_field,
                                        show_progress=sys.stderr.isatty() and runtime.distributed.rank == 0)
    where = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    train_tokens, val_tokens = split_tokens(token_cache.tokens, config.data.val_fraction, config.data.seq_len, where)
    train, val = PackedSequences(train_tokens, config.data.seq_len), PackedSequences(val_tokens, config.data.seq_len)
    num_train = min(len(train), config.max_train_windows or len(train))
    # eval_batches global batches, split over the processes: the same windows at every world size.
    num_val = min(len(val), config.train.eval_batches * config.train.batch_size * runtime.distributed.world_size)
    student, student_init = build_student(config, teacher, config.data.seq_len)
    if student.config.max_position_embeddings < config.data.seq_len:
        raise OrchardError(f"data.seq_len: {config.data.seq_len} exceeds the student's "
                           f"{student.config.max_position_embeddings} positions")

    cache, cache_record, teacher_model, teacher_flops = None, None, None, 0.0
    if config.mode == "offline":
        windows = {"train": num_train, "val": num_val}
        directory = cache_directory(token_cache.directory, teacher.weights_sha256, config.top_k, config.data.seq_len,
                                    windows, runtime.precision)
        with runtime.distributed.rank_zero_first():
            cache = open_teacher_cache(directory)
            built_now = cache is None
            if built_now:
                print(f"caching the teacher's top-{config.top_k} log-probabilities of {num_train + num_val} windows "
                      f"in {directory}", file=sys.stderr)
                cache = build_teacher_cache(directory, teacher, {"train": train, "val": val}, windows, config.top_k,
                                            2 * config.train.batch_size, teacher_runtime)
                teacher.release()
        cache_record = {"path": str(cache.directory), "built_now": built_now,
                        **{k: cache.meta[k] for k in ("k", "tokens", "bytes", "bytes_per_token", "build_seconds",
                                                      "build_flops")}}
    else:
        teacher_model = teacher.model.to(teacher_runtime.device).eval().requires_grad_(False)
        teacher_flops = teacher.forward_flops_per_token()  # one teacher forward pass per training token

    method = Distillation(config, train, val, num_train, num_val, tokenizer.token_byte_lengths(), student,
                          teacher_model, cache, turn_end_ids(tokenizer), tokenizer.pad_id, runtime)
    data_record = {"paths": [str(p) for p in paths], "fingerprint": token_cache.fingerprint,
                   "train_windows": num_train, "val_windows": num_val, "seq_len": config.data.seq_len,
                   "teacher_loaded": teacher.loaded}
    if cache_record:
        data_record["teacher_cache"] = cache_record
    summary = parameter_summary(teacher.config, student.config)
    return _train(config, student, method, tokenizer, data_record, summary, student_init, runtime,
                  stage=f"distill-{config.mode.replace('_', '-')}", extra_flops=teacher_flops)


def run_sequence_level(config: DistillConfig, teacher: Teacher, runtime: Runtime,
                       teacher_runtime: Runtime) -> TrainResult:
    """Sequence-level KD: the teacher writes answers once; the student is fine-tuned on them exactly as
    `orchard sft` fine-tunes on conversations."""
    tokenizer = teacher.tokenizer
    with runtime.distributed.rank_zero_first():
        replies, meta = teacher_replies(config, teacher, Path(config.out), teacher_runtime)
    student, student_init = build_student(config, teacher, config.data.seq_len)
    summary = parameter_summary(teacher.config, student.config)
    records = [json.loads(line) for line in replies.read_text(encoding="utf-8").splitlines()]
    # As `orchard sft` with its defaults: every assistant turn supervised, old turns dropped first.
    examples, too_long = tokenize_conversations([{"messages": r["messages"], "source": f"{replies}:{i + 1}"}
                                                 for i, r in enumerate(records)], tokenizer, config.data.seq_len,
                                                "all_assistant", "truncate_prompt")
    random.Random(config.train.seed).shuffle(examples)
    num_val = max(1, int(len(examples) * 0.05))
    method = ConversationLanguageModeling(examples[num_val:], examples[:num_val], tokenizer.pad_id, config.data.seq_len,
                                          True, config.train, name="distill-sequence")
    data_record = {"source": str(replies), "answers": meta["answers"], "rejected": meta["rejected"],
                   "skipped_too_long": too_long, "teacher_seconds": meta["seconds"], "teacher_loaded": teacher.loaded}
    return _train(config, student, method, tokenizer, data_record, summary, student_init, runtime,
                  stage="distill-sequence")
