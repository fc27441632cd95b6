"""Byte-level BPE tokenizer: trained with Hugging Face ``tokenizers``, saved in the layout
``PreTrainedTokenizerFast`` / ``AutoTokenizer`` load.

Byte-level means every string maps to tokens and back exactly (no unknown token, no
normalisation), whatever the language or script. The pre-tokenizer follows Llama 3's regex split,
then splits digits one by one so the model sees numbers digit by digit, which helps arithmetic.
Chat formatting is ChatML (as in Qwen), rendered with the same Jinja setup transformers uses so a
template behaves identically here and after export.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from orchard.errors import OrchardError

SPECIAL_TOKENS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|pad|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3's split: contractions, words with one leading non-letter, numbers, punctuation runs,
# newline runs, other whitespace. Digits(individual_digits=True) then splits numbers further.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# What transformers writes as model_max_length when a tokenizer has no length limit.
_NO_MAX_LENGTH = int(1e30)


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


def _raise_exception(message: str):
    raise OrchardError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str):
    # Same environment as transformers' _compile_jinja_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise OrchardError(f"chat template: line {getattr(e, 'lineno', '?')}: {e.message}") from None


class Tokenizer:
    """A byte-level BPE tokenizer plus the special tokens and chat template that go with it."""

    def __init__(
        self,
        backend: _HFTokenizer,
        chat_template: str = CHAT_TEMPLATE,
        bos_token: str = SPECIAL_TOKENS["bos"],
        eos_token: str = SPECIAL_TOKENS["eos"],
        pad_token: str = SPECIAL_TOKENS["pad"],
        model_max_length: int = _NO_MAX_LENGTH,
    ):
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        # Written to tokenizer_config.json; set it to the model's context length before saving.
        self.model_max_length = model_max_length

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
        from a tokenizer.json file."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_file.is_file():
            raise OrchardError(f"{tokenizer_file}: no such file")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse problem
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OrchardError(f"{tokenizer_file}: not a valid tokenizer.json ({first_line})") from None

        config_file = tokenizer_file.parent / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise OrchardError(f"{config_file}: invalid JSON ({e})") from None
            if not isinstance(config, dict):
                raise OrchardError(f"{config_file}: expected a JSON object")

        def token(key: str, role: str) -> str:
            value = config.get(key) or SPECIAL_TOKENS[role]
            # transformers may write a token as {"content": ..., ...} instead of a plain string.
            return value["content"] if isinstance(value, dict) else value

        tokenizer = cls(
            backend,
            chat_template=config.get("chat_template") or CHAT_TEMPLATE,
            bos_token=token("bos_token", "bos"),
            eos_token=token("eos_token", "eos"),
            pad_token=token("pad_token", "pad"),
            model_max_length=int(config.get("model_max_length") or _NO_MAX_LENGTH),
        )
        for name in ("bos_token", "eos_token", "pad_token"):
            if backend.token_to_id(getattr(tokenizer, name)) is None:
                raise OrchardError(f"{path}: {name} {getattr(tokenizer, name)!r} is not in the vocabulary")
        return tokenizer

    def save(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        added = self._backend.get_added_tokens_decoder()
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
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (across the tokenizers library's thread pool)."""
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the chat template."""
        template = _compile_template(self.chat_template)
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        except TemplateError as e:
            raise OrchardError(f"chat template: {e.message}") from None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._backend.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token decodes to (special tokens: 0), so a span's byte count is
        ``lengths[ids].sum()`` -- exact bits-per-byte without decoding."""
        byte_of = _byte_decoder()
        special = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if i in special:
                continue
            token = self._backend.id_to_token(i)
            # Mirrors the ByteLevel decoder: a token made of byte characters is those bytes;
            # anything else (a non-special added token) is its UTF-8 text.
            if all(c in byte_of for c in token):
                lengths[i] = len(token)
            else:
                lengths[i] = len(token.encode("utf-8"))
        return lengths

    def fingerprint(self) -> str:
        """sha256 of tokenizer.json in canonical form: equal fingerprints tokenize identically."""
        canonical = json.dumps(
            json.loads(self._backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
