"""lm-evaluation-harness's model class for orchard checkpoints: `--model orchard`.

    orchard lm-eval --model orchard --model_args pretrained=runs/sft --tasks arc_easy --device cuda
    lm-eval run --model orchard ...      (lm-eval releases with plugin discovery, after 0.4.13)

`pretrained` is anything `load_checkpoint` reads: a checkpoint, run or LoRA adapter directory, a
Hugging Face model directory or hub id. Requests are tokenised as lm-eval's `hf` model tokenises
them (TemplateLM's split of context and continuation; BOS only where the tokenizer's post-processor
adds one; BOS, else EOS, before an empty context and a rolling window), so a checkpoint scores here
what its `orchard export --format hf` copy scores under `--model hf` (tested to 1e-4). Scoring runs
through `scoring.continuation_log_likelihoods`, generation through the serving engine's continuous
batching (`scoring.generate_replies`).

Where it departs from `hf`: a generation also ends at `<|im_end|>` (a chat model's turn end, which
an orchard checkpoint's generation_config.json does not list); sampled generations take their seeds
from torch's global generator, which lm-eval seeds (`--seed`), so they repeat from run to run; and
generation settings the engine has no equivalent of (top_k, num_beams, ...) are ignored with a
warning. (And `hf` on an orchard export generates up to generation_config.json's max_new_tokens,
256, whatever max_gen_toks says: transformers lets it override the max_length lm-eval passes. Only
replies that run past max_gen_toks without a stop string differ.)
"""

from __future__ import annotations

import hashlib
import logging
import sys

# lm-eval registers its own models (`hf`, `vllm`, ...) only when it finds its registry empty:
# importing them first keeps them there once `orchard` is registered below.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..errors import OrchardError
from ..serve.engine import Sampling
from ..training.runtime import Runtime
from .scoring import continuation_log_likelihoods, generate_replies

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
# The generation settings the engine's `Sampling` has an equivalent for (after lm-eval's
# `normalize_gen_kwargs`, which folds max_new_tokens and its other aliases into max_gen_toks).
SUPPORTED_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_p"})
# transformers' continue_final_message marks the final message's end with this, then cuts there.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@register_model("orchard")
class OrchardLM(TemplateLM):
    """An orchard checkpoint as lm-eval's `loglikelihood`, `loglikelihood_rolling` and
    `generate_until`. `batch_size` "auto" (which orchard does not search for) is `max_batch_size`,
    else 16; `max_length` defaults to the model's positions; `prefix_token_id` overrides what
    precedes an empty context and a rolling window (as `hf`'s argument of that name: orchard's own
    pretraining separates documents with EOS, never BOS)."""

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_batch_size: int | None = None, precision: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, prefix_token_id: int | None = None) -> None:
        super().__init__()
        if precision not in (None, "auto", "bf16", "fp32"):
            raise OrchardError(f"precision: expected auto, bf16 or fp32, got {precision!r}")
        self.runtime = Runtime.for_inference(device, precision or "auto")
        self._device = self.runtime.device
        checkpoint = load_checkpoint(pretrained, device=self.runtime.device, dtype=self.runtime.inference_dtype)
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        positions = self.model.config.max_position_embeddings
        self.max_length = int(max_length) if max_length is not None else positions
        if not 0 < self.max_length <= positions:
            raise OrchardError(f"max_length: expected 1 to the model's {positions} positions, got {self.max_length}")
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        im_end = self.tokenizer.token_to_id("<|im_end|>")
        self.end_ids = [self.tokenizer.eos_id] + ([im_end] if im_end is not None else [])
        self.prefix_text = self.tok_decode([self.prefix_token_id], skip_special_tokens=False)
        self.adds_bos = self.tokenizer.adds_bos_by_default  # read once: tok_encode runs for every request

    # --- tokens, as lm-eval's `hf` model makes them --------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As transformers' `encode` adds special tokens by default: BOS where the tokenizer's
        # post-processor adds one (Llama), unless the text already starts with it (a chat template
        # that writes its own), as `hf` checks against its prefix token's text.
        add_bos = self.adds_bos and add_special_tokens is not False
        if add_special_tokens is None and string.startswith(self.prefix_text):
            add_bos = False
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- the three request types -------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        with self.runtime.autocast():
            results = continuation_log_likelihoods(self.model, [(context, continuation)
                                                                for _, context, continuation in requests],
                                                   self.batch_size, self.max_length, progress.update)
        progress.close()
        for cache_key, result in zip((key for key, _, _ in requests), results):
            if cache_key is not None:  # None: a rolling window, cached per text by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # Each text as `hf` cuts it: windows of max_length tokens, each token predicted once with as
        # much context as fits, the first after the prefix token.
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, samplings, ignored = [], [], set()
        for context, gen_kwargs in (request.args for request in requests):
            settings = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            ignored |= settings.keys() - SUPPORTED_GEN_KWARGS
            max_tokens = settings["max_gen_toks"]
            room = self.max_length - max_tokens  # for the prompt, cut from the left as `hf` cuts it
            if room <= 0:
                raise OrchardError(f"max_gen_toks: {max_tokens} leaves no room for a prompt in max_length "
                                   f"{self.max_length}")
            # An empty prompt starts from the prefix token, as an empty context does in loglikelihood.
            prompts.append(self.tok_encode(context)[-room:] or [self.prefix_token_id])
            temperature = float(settings.get("temperature", 0.0))
            sampled = settings["do_sample"] and temperature > 0  # lm-eval: greedy unless both ask to sample
            samplings.append(Sampling(
                max_tokens=max_tokens, temperature=temperature if sampled else 0.0,
                top_p=float(settings.get("top_p", 1.0)),
                seed=int(torch.randint(2**31, ())) if sampled else None,
                stop=[stop for stop in settings["until"] if stop]))  # "" would stop at once
        if ignored:
            logger.warning("orchard ignores these generation settings (the engine has no equivalent): %s",
                           ", ".join(sorted(ignored)))
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        # The engine ends a reply at the first stop string, and leaves the stop string out.
        replies = generate_replies(self.model, self.tokenizer, prompts, samplings, self.end_ids, self.batch_size,
                                   self.runtime.autocast, progress.update)
        progress.close()
        for request, reply in zip(requests, replies):
            self.cache_hook.add_partial("generate_until", request.args, reply)
        return replies

    # --- chat templates (--apply_chat_template) ----------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        # Keys lm-eval's cache of rendered requests, so it changes with the tokens and the template.
        source = self.tokenizer.fingerprint() + (self.tokenizer.chat_template or "")
        return "orchard-" + hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records for the run: the tokenizer's, or its template of that name."""
        if not chat_template:
            return None
        if isinstance(chat_template, str):
            if chat_template not in self.tokenizer.chat_templates:
                raise OrchardError(f"chat template {chat_template!r}: the tokenizer's named templates are "
                                   f"{sorted(self.tokenizer.chat_templates) or 'none'}")
            return self.tokenizer.chat_templates[chat_template]
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered as `hf` renders it: with the assistant's generation prompt, or (lm-eval
        asks for none when a task's gen_prefix begins the reply) with the final message left open,
        as transformers' continue_final_message leaves it; a template that refuses a system message
        is tried again without it."""
        try:
            return self._render(chat_history, add_generation_prompt)
        except OrchardError:
            if not any(message["role"] == "system" for message in chat_history):
                raise
            logger.warning("the chat template failed; rendering the chat again without its system messages")
            return self._render([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if add_generation_prompt:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        final = messages[-1]
        rendered = self.tokenizer.apply_chat_template(
            [*messages[:-1], {**final, "content": final["content"] + CONTINUE_TAG}])
        marker = CONTINUE_TAG.strip()
        if marker not in rendered:
            raise OrchardError("chat template: the final message is not in the rendered chat, so it cannot be "
                               "continued (a task's gen_prefix)")
        at = rendered.rindex(marker)
        # A template that strips the message's trailing space strips the reply prefix's too.
        return rendered[:at] if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    if str(batch_size).startswith("auto"):  # "auto" or "auto:N" (N searches, which orchard does not do)
        return int(max_batch_size) if max_batch_size else DEFAULT_BATCH_SIZE
    try:
        size = int(batch_size)
    except ValueError:
        size = 0
    if size <= 0:
        raise OrchardError(f"batch_size: expected a positive integer or auto, got {batch_size!r}")
    return size


def run_lm_eval_cli(argv: list[str]) -> int:
    """Run lm-eval's own command line (`run ...`, `ls tasks`, or `run`'s options alone) on `argv`,
    with `orchard` registered as a model (importing this module did that); returns its exit status.
    What `orchard lm-eval` runs, since lm-eval 0.4.13 does not load models' entry points."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    # HarnessCLI parses sys.argv (and inserts `run` when no subcommand is named): lend it ours.
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
