"""The tokenizer and data pipeline on real public text from ../shared/data (skipped without it)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from orchard.data.corpus import iter_documents
from orchard.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
SONG_CI = DATA / "chinese_poetry" / "song_ci.jsonl.gz"

pytestmark = pytest.mark.skipif(not (SHAKESPEARE.is_file() and SONG_CI.is_file()),
                                reason=f"real corpora not found under {DATA} (shared data is read, never copied)")


@pytest.fixture(scope="module")
def bilingual():
    english = SHAKESPEARE.read_text(encoding="utf-8")
    chinese = list(itertools.islice(iter_documents([SONG_CI]), 3000))
    # Train on the first 90% of each, measure on the rest: held-out text, not memorised text.
    english_train, english_test = english[:1_000_000], english[1_000_000:1_050_000]
    chinese_train, chinese_test = chinese[:2700], "\n".join(chinese[2700:])
    tokenizer = Tokenizer.train([english_train, *chinese_train], vocab_size=4096)
    return tokenizer, english_test, chinese_test


def test_round_trip_on_held_out_english_and_chinese(bilingual):
    tokenizer, english, chinese = bilingual
    assert tokenizer.decode(tokenizer.encode(english)) == english
    assert tokenizer.decode(tokenizer.encode(chinese)) == chinese


def test_both_languages_compress_on_held_out_text(bilingual):
    tokenizer, english, chinese = bilingual
    english_bytes_per_token = len(english.encode()) / len(tokenizer.encode(english))
    chinese_chars_per_token = len(chinese) / len(tokenizer.encode(chinese))
    # Whole English words and multi-character Chinese tokens, not bytes: a byte-level tokenizer
    # that had learned nothing would give 1 byte per token and 1/3 character per token.
    assert english_bytes_per_token > 2.5, english_bytes_per_token
    assert chinese_chars_per_token > 0.9, chinese_chars_per_token
    # Common words are single tokens; a Chinese character never costs more than its 3 bytes.
    assert len(tokenizer.encode(" the")) == 1 and len(tokenizer.encode(" king")) == 1
    assert len(tokenizer.encode("春风")) <= 2
