"""Corpus reading (formats, path specs, one-line errors naming file and line) and the token cache
(reuse, invalidation, layout)."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard.data import corpus
from orchard.data.corpus import iter_documents, iter_text_chunks
from orchard.data.records import resolve_paths
from orchard.data.tokens import build_token_cache, corpus_fingerprint
from orchard.errors import OrchardError
from orchard.tokenizer import Tokenizer

DOCS = ["first document\nwith two lines", "second: 你好，世界", "third 😀"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    texts = DOCS * 20 + ["The quick brown fox jumps over the lazy dog."] * 20
    return Tokenizer.train(iter(texts), vocab_size=400)


# --- reading formats -------------------------------------------------------------------------


def test_txt_is_one_document_with_bom_and_crlf_normalised(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert list(iter_text_chunks(path)) == [("line one\nline two\n", True)]


def test_large_txt_streams_in_line_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "TXT_CHUNK_BYTES", 64)
    lines = [f"line {i} 行\n" for i in range(100)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines), encoding="utf-8")
    chunks = list(iter_text_chunks(path))
    assert len(chunks) > 5
    assert [end for _, end in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(text.endswith("\n") for text, _ in chunks)
    assert "".join(text for text, _ in chunks) == "".join(lines)
    assert list(iter_documents(path)) == ["".join(lines)]


def test_jsonl_and_gzip(tmp_path):
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    plain.write_text(plain.read_text(encoding="utf-8") + "\n  \n", encoding="utf-8")  # blank lines skipped
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(plain.read_text(encoding="utf-8"))
    assert list(iter_documents(plain)) == DOCS
    assert list(iter_documents(gz)) == DOCS
    assert list(iter_text_chunks(gz)) == [(d, True) for d in DOCS]


def test_json_list_and_json_lines(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": d} for d in DOCS], indent=2), encoding="utf-8")
    assert list(iter_documents(alpaca, text_field="instruction")) == DOCS
    lines = write_jsonl(tmp_path / "lines.json", [{"text": d} for d in DOCS])
    assert list(iter_documents(lines)) == DOCS


def test_txt_gz(tmp_path):
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("hello\n世界\n".encode())
    assert list(iter_documents(path)) == ["hello\n世界\n"]


def test_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": [1, 2, 3]}), path, row_group_size=2)
    assert list(iter_documents(path, text_field="content")) == DOCS
    with pytest.raises(OrchardError, match=r"a\.parquet: no column 'text'"):
        list(iter_documents(path))


def test_mixed_files_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "beta"}, {"text": "gamma"}])
    assert list(iter_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])) == ["alpha\n", "beta", "gamma"]


# --- path specs ------------------------------------------------------------------------------


def test_resolve_paths(tmp_path):
    for name in ["b.txt", "a.txt", "c.jsonl", "notes.md"]:
        (tmp_path / name).write_text("x\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.parquet").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("x")

    assert resolve_paths(str(tmp_path / "*.txt")) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert resolve_paths(tmp_path) == [tmp_path / n for n in ["a.txt", "b.txt", "c.jsonl", "sub/d.parquet"]]
    assert resolve_paths([str(tmp_path / "c.jsonl"), str(tmp_path / "?.txt"), tmp_path / "a.txt"]) == [
        tmp_path / "c.jsonl",
        tmp_path / "a.txt",
        tmp_path / "b.txt",
    ]
    with pytest.raises(OrchardError, match=r"data.path: no file matches '.*\*\.json'"):
        resolve_paths(str(tmp_path / "*.json"))
    with pytest.raises(OrchardError, match="missing.txt"):
        resolve_paths(str(tmp_path / "missing.txt"))
    with pytest.raises(OrchardError, match="notes.md: unsupported file type"):
        resolve_paths(str(tmp_path / "*"))


# --- errors ----------------------------------------------------------------------------------


def error_of(paths, **kwargs) -> str:
    with pytest.raises(OrchardError) as excinfo:
        list(iter_text_chunks(paths, **kwargs))
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" "d"}\n')
    assert error_of(path).startswith(f"{path}:3: invalid JSON (")


def test_malformed_json_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    assert error_of(path).startswith(f"{path}:3: invalid JSON (")


def test_missing_and_non_string_field(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"body": "b"}])
    assert error_of(path) == f"{path}:2: no field 'text'"
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": 5}])
    assert error_of(path) == f"{path}:1: field 'text' is a number, expected a string"
    path = write_jsonl(tmp_path / "h.jsonl", [["a list"]])
    assert error_of(path) == f"{path}:1: expected a JSON object, got a list"


def test_invalid_utf8(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"ok\nstill ok\nbad \xff byte\n")
    assert error_of(txt) == f"{txt}:3: invalid UTF-8 (byte 0xff at column 5)"
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "\xc3("}\n')
    assert error_of(jsonl).startswith(f"{jsonl}:2: invalid UTF-8")


def test_empty_and_missing_files(tmp_path):
    for name, content in [("e.txt", " \n\n"), ("e.jsonl", "\n\n"), ("e.json", ""), ("w.jsonl", '{"text": "  "}\n')]:
        path = tmp_path / name
        path.write_text(content)
        assert error_of(path) == f"{path}: file is empty"
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    assert error_of(path).startswith(f"{path}: cannot read (")


# --- token cache -----------------------------------------------------------------------------


@pytest.fixture
def jsonl_corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in DOCS])


def test_token_cache_layout(jsonl_corpus, tokenizer):
    cache = build_token_cache([jsonl_corpus], tokenizer)
    expected = []
    for doc in DOCS:
        expected += tokenizer.encode(doc) + [tokenizer.eos_id]
    assert cache.tokens.dtype == np.uint16
    assert cache.tokens.tolist() == expected
    assert len(cache) == len(expected)
    assert cache.num_documents == 3
    assert cache.directory.parent == cache.directory.parents[1] / "tokens"
    assert str(cache.directory).startswith(os.environ["ORCHARD_CACHE"])
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["num_tokens"] == len(expected) and meta["dtype"] == "uint16"
    # No temporary build directories left behind.
    assert [p.name for p in cache.directory.parent.iterdir()] == [cache.directory.name]


def test_token_cache_txt_chunks_get_one_eos(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(corpus, "TXT_CHUNK_BYTES", 16)
    path = tmp_path / "doc.txt"
    path.write_text("".join(f"line {i}\n" for i in range(20)))
    cache = build_token_cache(path, tokenizer)
    assert cache.num_documents == 1
    assert cache.tokens.tolist().count(tokenizer.eos_id) == 1 and cache.tokens[-1] == tokenizer.eos_id
    assert tokenizer.decode(cache.tokens) == path.read_text()


def test_token_cache_is_reused(jsonl_corpus, tokenizer, monkeypatch):
    first = build_token_cache([jsonl_corpus], tokenizer)

    def no_encoding(texts):
        raise AssertionError("re-tokenized a cached corpus")

    monkeypatch.setattr(tokenizer, "encode_batch", no_encoding)
    second = build_token_cache([jsonl_corpus], tokenizer)
    assert second.directory == first.directory
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.tokens, first.tokens)


def test_fingerprint_changes_with_corpus_and_tokenizer(jsonl_corpus, tokenizer):
    before = corpus_fingerprint([jsonl_corpus], "text")
    assert corpus_fingerprint([jsonl_corpus], "body") != before
    first = build_token_cache([jsonl_corpus], tokenizer)

    write_jsonl(jsonl_corpus, [{"text": d} for d in reversed(DOCS)])
    assert corpus_fingerprint([jsonl_corpus], "text") != before
    changed = build_token_cache([jsonl_corpus], tokenizer)
    assert changed.fingerprint != first.fingerprint

    other = Tokenizer.train(iter(DOCS * 10), vocab_size=300)
    assert build_token_cache([jsonl_corpus], other).fingerprint not in {first.fingerprint, changed.fingerprint}


def test_failed_build_leaves_no_cache(tmp_path, tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"nope": 1}])
    with pytest.raises(OrchardError, match=":2: no field 'text'"):
        build_token_cache(bad, tokenizer, cache_root=tmp_path / "c")
    assert list((tmp_path / "c" / "tokens").iterdir()) == []
