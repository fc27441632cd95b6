"""Byte-level BPE tokenizer: trained with Hugging Face ``tokenizers``, saved in the layout
``PreTrainedTokenizerFast`` / ``AutoTokenizer`` load.

Byte-level means every string maps to tokens and back exactly (no unknown token, no
normalisation), whatever the language or script. The pre-tokenizer follows Llama 3's regex split,
then splits digits one by one so the model sees numbers digit by digit, which helps arithmetic.
Chat formatting is ChatML (as in Qwen), rendered by `orchard.tokenizer.chat_template` with the same
Jinja setup transformers uses, so a template behaves identically here and after export.

`Tokenizer.load` also reads the tokenizer of a Hugging Face checkpoint (Llama, Qwen2/3, Mistral):
``tokenizer.json`` with the files `orchard.tokenizer.hf_files` reads (``tokenizer_config.json``, the
legacy ``special_tokens_map.json``, the chat template wherever transformers keeps it).
What it reads follows transformers 5's ``AutoTokenizer.from_pretrained``, so ids, special tokens and
rendered chats agree with it; the differences are listed on `Tokenizer.load`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from ..errors import OrchardError
from ..files import contained_file
from .chat_template import render_chat
from .hf_files import (CHAT_TEMPLATE_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, read_chat_templates, read_json,
                       token_text)

SPECIAL_TOKENS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|pad|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}

# The 256 byte tokens, the special tokens and room for a few merges: smaller makes no useful tokenizer.
MIN_VOCAB_SIZE = 300

# ChatML, with Qwen2.5's tool calling (`orchard.data.tool_calls`): with ``tools``, the system turn
# (the conversation's own, if any) lists them and says how to call them; an assistant's
# ``tool_calls`` follow its content as <tool_call> JSON blocks; ``tool`` messages (consecutive
# ones together) come back as a user turn of <tool_response> blocks. Unlike Qwen's template, no
# default system prompt is added, so a conversation without tools renders as plain ChatML.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant' }}{% if message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' + tool_call['arguments'] | tojson"
    " + '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the named special tokens.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Llama 3's split: contractions, words with one leading non-letter, numbers, punctuation runs,
# newline runs, other whitespace. Digits(individual_digits=True) then splits numbers further.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# What transformers writes as model_max_length when a tokenizer has no length limit.
_NO_MAX_LENGTH = int(1e30)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = byte_values[:]
    # Bytes without a printable character of their own get one from 256 upwards.
    next_free = 256
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(next_free)
            next_free += 1
    return {chr(c): b for b, c in zip(byte_values, code_points)}


class Tokenizer:
    """A byte-level BPE tokenizer plus the special tokens and chat template that go with it.

    ``bos_token`` may be None (Qwen has no BOS): then ``bos_id`` is None and ``encode(add_bos=True)``
    adds nothing, as transformers does. ``pad_token`` falls back to ``eos_token`` when the tokenizer
    defines no padding token, so ``pad_id`` is always an id (saving writes the configured value, None).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        chat_template: str | None = CHAT_TEMPLATE,
        bos_token: str | None = SPECIAL_TOKENS["bos"],
        eos_token: str = SPECIAL_TOKENS["eos"],
        pad_token: str | None = SPECIAL_TOKENS["pad"],
        model_max_length: int = _NO_MAX_LENGTH,
        chat_templates: dict[str, str] | None = None,
        named_tokens: dict[str, str] | None = None,
    ):
        self._backend = backend
        # The template used by default; `chat_templates` holds a checkpoint's named templates (the
        # "tool_use" one is picked when tools are passed, as transformers does).
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        # Other named special tokens of the config (unk_token, mask_token, image_token, ...):
        # transformers passes them to the chat template as variables.
        self.named_tokens = dict(named_tokens or {})
        # Written to tokenizer_config.json; set it to the model's context length before saving.
        self.model_max_length = model_max_length

    @property
    def pad_token(self) -> str:
        """The padding token; the end-of-text token where the tokenizer defines none."""
        return self._pad_token if self._pad_token is not None else self.eos_token

    @pad_token.setter
    def pad_token(self, value: str | None) -> None:
        self._pad_token = value

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train on ``texts``, which is consumed as a stream (it may be larger than memory)."""
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.Digits(individual_digits=True),
                # The regex already split the text; ByteLevel only maps bytes to characters.
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=list(SPECIAL_TOKENS.values()),  # become ids 0..4 in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path) -> Tokenizer:
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json), or
        from a tokenizer.json file.

        Reads orchard's own directories and Hugging Face checkpoints alike, as transformers 5 does:
        special tokens as strings or AddedToken dicts; ``special_tokens_map.json`` only where the
        config has no ``added_tokens_decoder`` (then it overrides the config); the chat template from
        ``chat_template.jinja`` / ``additional_chat_templates/`` before the config's entry (a string or
        a list of named templates, "default" being the one used), then ``chat_template.json``.
        Orchard's additions: a tokenizer.json without any config gets orchard's own special tokens
        (those its vocabulary has), the padding token falls back to the end-of-text token, and a
        vocabulary with ChatML's tokens but no template gets orchard's ChatML template. An
        end-of-text token is required.
        """
        path = Path(path)
        tokenizer_file = contained_file(path, "tokenizer.json") if path.is_dir() else path
        if not tokenizer_file.is_file():
            raise OrchardError(f"{tokenizer_file}: no such file")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse problem
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OrchardError(f"{tokenizer_file}: not a valid tokenizer.json ({first_line})") from None

        directory = tokenizer_file.parent
        config_file = contained_file(directory, CONFIG_FILE)
        config: dict = {}
        if config_file.is_file():
            config = read_json(config_file)
            if not isinstance(config, dict):
                raise OrchardError(f"{config_file}: expected a JSON object")
        tokens_from = {key: config_file for key in config}
        map_file = contained_file(directory, SPECIAL_TOKENS_MAP_FILE)
        if map_file.is_file() and "added_tokens_decoder" not in config:
            # transformers reads this legacy file only then, and its entries win over the config's.
            special_map = read_json(map_file)
            if not isinstance(special_map, dict):
                raise OrchardError(f"{map_file}: expected a JSON object")
            config = {**config, **special_map}
            tokens_from.update({key: map_file for key in special_map})

        bare = not tokens_from  # a tokenizer.json alone: orchard's own special tokens, where it has them

        def token(key: str, fallback: str | None) -> str | None:
            if key in config:
                return token_text(config[key], f"{tokens_from[key]}: {key}")
            if bare and fallback is not None and backend.token_to_id(fallback) is not None:
                return fallback
            return None

        padding = backend.padding  # transformers takes the pad token from tokenizer.json's padding too
        bos_token = token("bos_token", SPECIAL_TOKENS["bos"])
        eos_token = token("eos_token", SPECIAL_TOKENS["eos"])
        pad_token = token("pad_token", SPECIAL_TOKENS["pad"])
        if pad_token is None and padding and "pad_token" not in config:
            pad_token = padding["pad_token"]
        if eos_token is None:
            where = tokens_from.get("eos_token", config_file if config_file.is_file() else tokenizer_file)
            raise OrchardError(f"{where}: eos_token is not set (orchard needs an end-of-text token)")

        # Every other "*_token" string is a named special token transformers hands to the template.
        named = {}
        for key, value in config.items():
            if key in ("bos_token", "eos_token", "pad_token") or not key.endswith("_token"):
                continue
            if isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str)):
                named[key] = token_text(value, f"{tokens_from[key]}: {key}")
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            for key, value in extra.items():
                if isinstance(value, (str, dict)):
                    named[key] = token_text(value, f"{tokens_from['extra_special_tokens']}: extra_special_tokens.{key}")

        templates = read_chat_templates(directory, config)
        chat_templates = templates if isinstance(templates, dict) else {}
        chat_template = templates.get("default") if isinstance(templates, dict) else templates
        if templates is None and all(backend.token_to_id(SPECIAL_TOKENS[t]) is not None for t in ("im_start", "im_end")):
            chat_template = CHAT_TEMPLATE

        max_length = config.get("model_max_length")
        tokenizer = cls(
            backend,
            chat_template=chat_template,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            model_max_length=int(max_length) if max_length else _NO_MAX_LENGTH,
            chat_templates=chat_templates,
            named_tokens=named,
        )
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if value is not None and backend.token_to_id(value) is None:
                raise OrchardError(f"{path}: {name} {value!r} is not in the vocabulary")
        return tokenizer

    def save(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        added = self._backend.get_added_tokens_decoder()
        if self.chat_templates:
            templates = {**self.chat_templates}
            if self.chat_template is not None:
                templates["default"] = self.chat_template
            chat_template = [{"name": name, "template": text} for name, text in templates.items()]
        else:
            chat_template = self.chat_template
        config = {
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(added.items())
            },
            "bos_token": self.bos_token,
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "model_max_length": self.model_max_length,
            "pad_token": self._pad_token,
            **{key: value for key, value in sorted(self.named_tokens.items())},
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        # transformers prefers chat_template.jinja to the config's entry: keep an old one in step.
        stale = directory / CHAT_TEMPLATE_FILE
        if stale.is_file():
            if self.chat_template is None:
                os.remove(stale)
            else:
                stale.write_text(self.chat_template, encoding="utf-8")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Exactly the text's tokens (no post-processor), plus BOS / EOS when asked; a tokenizer
        without a BOS token adds none. See `adds_bos_by_default` for what a model expects."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (across the tokenizers library's thread pool)."""
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def adds_bos_by_default(self) -> bool:
        """Whether transformers' ``tokenizer(text)`` / ``encode(text)`` starts with BOS (Llama,
        Mistral: tokenizer.json's post-processor adds it), so a model trained that way expects it.

        transformers 5 takes this from tokenizer.json's post-processor alone (``add_bos_token`` in
        tokenizer_config.json is dropped when tokenizer.json exists), and so does this."""
        bos_id = self.bos_id
        if bos_id is None or self._backend.post_processor is None:
            return False
        return self._backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens, as transformers passes them to chat templates."""
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self._pad_token,
                  **self.named_tokens}
        return {key: value for key, value in tokens.items() if value is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the chat template, exactly
        as transformers' ``apply_chat_template(messages, tokenize=False, ...)`` does: the template
        sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named special
        tokens (``bos_token``, ``eos_token``, ...) and every extra keyword argument
        (``enable_thinking=False``, ``date_string=...``). Message keys whose value is None are
        dropped first. ``chat_template`` is a template name (of `chat_templates`) or a template.
        Tools must be JSON schemas (dicts); transformers' conversion of Python functions is not done."""
        source = self._select_template(chat_template, tools)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise OrchardError("chat template: tools must be JSON schemas (dicts)")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise OrchardError("chat template: documents must be dicts with 'title' and 'text'")
        return render_chat(source, messages, dict(tools=tools, documents=documents,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **self.special_tokens_map, **kwargs))

    def _select_template(self, chat_template: str | None, tools) -> str:
        # transformers' get_chat_template: a name picks a named template, other strings are templates.
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            names = ", ".join(sorted(self.chat_templates))
            raise OrchardError(f"chat template: several named templates ({names}) and no \"default\"; "
                               f"pass chat_template=<name>")
        raise OrchardError("chat template: this tokenizer has none (no chat_template in tokenizer_config.json "
                           "or chat_template.jinja)")

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 over the vocabulary and the added tokens (ids may have gaps)."""
        return max(self._backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._backend.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)


    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level token may be part of a UTF-8 character; a
        special or other added token is its UTF-8 text), as OpenAI's log-probs report them."""
        token = self._backend.id_to_token(token_id)
        if token is None:  # a gap in a checkpoint's ids
            return b""
        byte_of = _byte_decoder()
        # Mirrors the ByteLevel decoder: a token made of byte characters is those bytes.
        if all(c in byte_of for c in token):
            return bytes(byte_of[c] for c in token)
        return token.encode("utf-8")

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token decodes to (special tokens: 0), so a span's byte count is
        ``lengths[ids].sum()`` -- exact bits-per-byte without decoding."""
        special = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if i not in special:
                lengths[i] = len(self.token_bytes(i))
        return lengths

    def fingerprint(self) -> str:
        """sha256 of tokenizer.json in canonical form: equal fingerprints tokenize identically."""
        canonical = json.dumps(
            json.loads(self._backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
