"""Byte-level BPE tokenizer: exact round trips, compression on English and Chinese, special tokens,
save/load, the Hugging Face config, the ChatML template and per-token byte lengths."""

import json

import numpy as np
import pytest

from orchard.errors import OrchardError
from orchard.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Training data matters more than most people think.",
    "She sold 12 apples and 345 oranges at the market on Tuesday.",
    "Orchards grow apples, pears and cherries in neat rows.",
]
CHINESE = [
    "今天天气很好，我们去公园散步吧。",
    "语言模型根据前面的词预测下一个词。",
    "训练数据比大多数人想象的更重要。",
    "果园里整齐地种着苹果树、梨树和樱桃树。",
    "她在星期二的市场上卖了十二个苹果。",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    corpus = (ENGLISH + CHINESE) * 40
    return Tokenizer.train(iter(corpus), vocab_size=1000, min_frequency=2)


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "今天天气很好，我们去公园散步吧。",
        "emoji 😀🍎👩‍👩‍👧 and flags 🇯🇵",
        "  leading spaces, trailing tabs\t\t\n\nnew lines\r\nand CRLF",
        "mixed 中英文 text with numbers 3.14159 and 1,000,000",
        "unseen scripts: Ελληνικά, русский, العربية, हिन्दी, 한국어, 日本語",
        "\x00 control \x7f bytes \u200b zero width",
        "",
    ],
)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_compresses_english_and_chinese(tokenizer):
    for text in (" ".join(ENGLISH), "".join(CHINESE)):
        assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_digits_are_split_individually(tokenizer):
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == list("12345")


def test_special_tokens(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS.values()] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 3 and ids[-1] == 4
    assert ids.count(3) == 1 and ids.count(4) == 1
    assert tokenizer.encode("hi", add_bos=True, add_eos=True) == [0, *tokenizer.encode("hi"), 1]
    assert tokenizer.decode([0, *tokenizer.encode("hi"), 1]) == "hi"
    assert tokenizer.decode([0, *tokenizer.encode("hi")], skip_special_tokens=False) == "<|begin_of_text|>hi"


def test_vocab_includes_all_bytes(tokenizer):
    # 256 byte tokens + 5 specials at least, and the requested size is an upper bound.
    assert 261 <= tokenizer.vocab_size <= 1000
    assert tokenizer.encode_batch(["hello", "你好"]) == [tokenizer.encode("hello"), tokenizer.encode("你好")]


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    text = "Orchards grow apples 🍎 果园里种着苹果树。"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.chat_template == CHAT_TEMPLATE
    assert Tokenizer.load(tmp_path / "tok" / "tokenizer.json").encode(text) == tokenizer.encode(text)


def test_fingerprint_differs_between_tokenizers(tokenizer):
    other = Tokenizer.train(iter(ENGLISH * 40), vocab_size=400)
    assert other.fingerprint() != tokenizer.fingerprint()


def test_tokenizer_config_for_transformers(tokenizer, tmp_path):
    tokenizer.model_max_length = 2048
    try:
        tokenizer.save(tmp_path)
    finally:
        tokenizer.model_max_length = int(1e30)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == "<|begin_of_text|>"
    assert config["eos_token"] == "<|end_of_text|>"
    assert config["pad_token"] == "<|pad|>"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["model_max_length"] == 2048
    assert config["clean_up_tokenization_spaces"] is False
    assert config["added_tokens_decoder"]["3"] == {
        "content": "<|im_start|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert sorted(config["added_tokens_decoder"]) == ["0", "1", "2", "3", "4"]
    assert Tokenizer.load(tmp_path).model_max_length == 2048


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(OrchardError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(OrchardError, match="tokenizer.json") as excinfo:
        Tokenizer.load(bad)
    assert "\n" not in str(excinfo.value)


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    expected = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"


def test_chat_template_raise_exception_is_an_orchard_error(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('only user turns') }}"
    try:
        with pytest.raises(OrchardError, match="only user turns"):
            tokenizer.apply_chat_template([{"role": "system", "content": "x"}])
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE


def test_token_byte_lengths(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (tokenizer.vocab_size,)
    assert (lengths[:5] == 0).all()
    for text in ["The quick brown fox 😀", "今天天气很好，我们去公园散步吧。", " \n\t 12345"]:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert lengths[ids].sum() == len(text.encode("utf-8"))


# --- tokenizers of Hugging Face checkpoints ----------------------------------------------------


def write_config(directory, **changes):
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))


def test_qwen_style_special_tokens(tokenizer, tmp_path):
    """No BOS (null), eos <|im_end|> as an AddedToken dict, no pad token (falls back to eos)."""
    tokenizer.save(tmp_path)
    write_config(tmp_path, bos_token=None, pad_token=...,
                 eos_token={"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False})
    loaded = Tokenizer.load(tmp_path)
    assert loaded.bos_token is None and loaded.bos_id is None
    assert loaded.eos_token == "<|im_end|>" and loaded.eos_id == 4
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_id == 4
    assert loaded.encode("hi", add_bos=True, add_eos=True) == [*tokenizer.encode("hi"), 4]
    assert not loaded.adds_bos_by_default
    assert loaded.special_tokens_map == {"eos_token": "<|im_end|>"}
    loaded.save(tmp_path / "again")  # the configured values are written back, not the fallback
    config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert config["bos_token"] is None and config["pad_token"] is None and config["eos_token"] == "<|im_end|>"
    assert Tokenizer.load(tmp_path / "again").pad_id == 4


def test_chat_template_sources(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    named = [{"name": "default", "template": "D{{ messages | length }}"}, {"name": "tool_use", "template": "T"}]
    write_config(tmp_path, chat_template=named)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == "D{{ messages | length }}"
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "f"}]) == "T"
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], chat_template="tool_use") == "T"
    # chat_template.jinja wins over the config's entry, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("J{{ eos_token }}", encoding="utf-8")
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J<|end_of_text|>"
    # chat_template.json (the processor file) when nothing else has one.
    (tmp_path / "chat_template.jinja").unlink()
    write_config(tmp_path, chat_template=...)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "L"}))
    assert Tokenizer.load(tmp_path).chat_template == "L"
    # Several named templates and no default: an error that names them.
    write_config(tmp_path, chat_template=named[1:])
    with pytest.raises(OrchardError, match="tool_use"):
        Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    write_config(tmp_path, chat_template=[{"name": "default"}])
    with pytest.raises(OrchardError, match="tokenizer_config.json: chat_template"):
        Tokenizer.load(tmp_path)


def test_vocabulary_without_chatml_has_no_default_template(tmp_path):
    other = Tokenizer.train(iter(ENGLISH * 40), vocab_size=300)
    other._backend = other._backend.from_str(other._backend.to_str().replace("<|im_start|>", "<|xm_start|>"))
    other.chat_template = None
    other.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template is None
    with pytest.raises(OrchardError, match="has none"):
        loaded.apply_chat_template([{"role": "user", "content": "x"}])


def test_load_errors_name_the_key(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    write_config(tmp_path, eos_token=None)
    with pytest.raises(OrchardError, match=r"tokenizer_config.json: eos_token is not set"):
        Tokenizer.load(tmp_path)
    write_config(tmp_path, eos_token=["<|im_end|>"])
    with pytest.raises(OrchardError, match=r"tokenizer_config.json: eos_token: expected a token"):
        Tokenizer.load(tmp_path)
    write_config(tmp_path, eos_token="<|nope|>")
    with pytest.raises(OrchardError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)


def test_vocab_size_is_largest_id_plus_one(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, processors

    backend = Backend(models.BPE(vocab={"a": 0, "b": 1, "c": 7}, merges=[]))
    backend.add_special_tokens(["<s>", "</s>"])  # ids 3 and 4: the gap stays
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == 8
    assert loaded.adds_bos_by_default
    assert loaded.encode("abc") == [0, 1, 7]  # the post-processor's BOS is not added by encode
    assert loaded.encode("abc", add_bos=True) == [3, 0, 1, 7]
    assert loaded.token_byte_lengths().shape == (8,)
