"""Conversations for SFT: reading four record formats, bad records, supervising exactly the assistant
tokens (decoded back), truncation, packing without leaks across conversations, padding, ordering."""

import gzip
import itertools
import json

import pytest
import torch

from orchard.data.conversations import (
    Conversation,
    TokenizedConversation,
    collate_packed,
    collate_padded,
    length_grouped_order,
    pack_conversations,
    read_conversations,
    tokenize_conversation,
    tokenize_conversations,
)
from orchard.data.records import ReadStats
from orchard.data.synthetic import World, generate_documents, instruction_conversations
from orchard.errors import OrchardError
from orchard.losses.tokens import IGNORE_INDEX, token_cross_entropy
from orchard.model import CausalLM, ModelConfig
from orchard.model.attention import document_mask
from orchard.tokenizer.bpe import Tokenizer

IM_END = "<|im_end|>"

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
EN = [SYSTEM,
      {"role": "user", "content": "Where does Tom Snow live?"},
      {"role": "assistant", "content": "Tom Snow lives in Greenfield."},
      {"role": "user", "content": "And how old is he?"},
      {"role": "assistant", "content": "Tom Snow is 34 years old.\nHe was born in Redwater."}]
ZH = [{"role": "system", "content": "你是一个乐于助人的助手。"},
      {"role": "user", "content": "汤姆·斯诺住在哪里？"},
      {"role": "assistant", "content": "汤姆·斯诺住在绿野镇。"},
      {"role": "user", "content": "他的工作是什么？"},
      {"role": "assistant", "content": "他是一名面包师。"}]


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(generate_documents(150, seed=0)) + [m["content"] for m in EN + ZH] * 3
    return Tokenizer.train(iter(texts), vocab_size=400)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def supervised_runs(example: TokenizedConversation) -> list[list[int]]:
    """Maximal runs of consecutive supervised token ids."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def decoded_runs(example, tokenizer) -> list[str]:
    return [tokenizer.decode(run, skip_special_tokens=False) for run in supervised_runs(example)]


# --- reading -------------------------------------------------------------------------------------


def test_reads_all_four_formats_with_sources(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                           {"from": "assistant", "value": "a2"}]},
        {"instruction": "Translate.", "input": "cat", "output": "猫", "system": "Be brief."},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"prompt": "1 + 1 =", "completion": " 2"},
    ])
    got = list(read_conversations(path))
    assert [c.source for c in got] == [f"{path}:{i}" for i in range(1, 6)]
    assert got[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [m["role"] for m in got[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert got[2].messages == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Translate.\n\ncat"},
                               {"role": "assistant", "content": "猫"}]
    assert got[3].messages[0] == {"role": "user", "content": "Say hi."}
    assert got[4].messages == [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": " 2"}]


def test_json_list_gzip_and_forced_format(tmp_path):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    listed = tmp_path / "alpaca.json"
    listed.write_text(json.dumps(records, indent=1), encoding="utf-8")
    zipped = tmp_path / "more.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    got = list(read_conversations([listed, zipped]))
    assert [c.source for c in got] == [f"{listed}: item {i}" for i in (1, 2, 3)] + [f"{zipped}:1"]
    with pytest.raises(OrchardError, match=rf"{listed}: item 1: missing field 'messages'"):
        list(read_conversations(listed, format="messages"))
    with pytest.raises(OrchardError, match="data.format"):
        list(read_conversations(listed, format="openai"))


def test_reads_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chats.parquet"
    messages = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 2
    pq.write_table(pa.table({"messages": messages}), path)
    got = list(read_conversations(path))
    assert [c.messages for c in got] == messages and got[1].source == f"{path}: row 2"


BAD = [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role", "'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "a"}]}, "unknown role", "'tool'"),
    ({"instruction": "q"}, "missing field", "missing field 'output'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing field", "'content'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     "non-string content", "a list, expected a string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     "no assistant turn", "no assistant turn"),
    ({"prompt": "q", "completion": "  "}, "empty assistant turn", "empty"),
    ({"text": "plain"}, "unrecognised record", "unrecognised record"),
    ([1, 2], "not an object", "expected a JSON object"),
]


def test_each_bad_record_is_an_error_naming_file_line_and_problem(tmp_path):
    good = {"prompt": "q", "completion": "a"}
    for record, _, problem in BAD:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(OrchardError) as error:
            list(read_conversations(path))
        message = str(error.value)
        assert message.startswith(f"{path}:2: ") and problem in message and "\n" not in message


def test_skip_mode_counts_bad_records_by_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "q", "completion": "a"})] + [json.dumps(r) for r, _, _ in BAD] + ["{not json"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = ReadStats()
    got = list(read_conversations(path, on_error="skip", stats=stats))
    assert len(got) == 1 and stats.kept == 1 and stats.read == len(BAD) + 2
    assert stats.skipped == len(BAD) + 1
    assert stats.reasons["unknown role"] == 2 and stats.reasons["missing field"] == 2
    assert stats.reasons["invalid JSON"] == 1
    assert stats.describe().startswith("2 missing field, 2 unknown role, 1 empty assistant turn")
    path.write_text(lines[0] + "\n\n" + lines[-1] + "\n", encoding="utf-8")
    with pytest.raises(OrchardError, match=rf"{path}:3: invalid JSON"):
        list(read_conversations(path, on_error="error"))


def test_file_problems_always_raise(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(OrchardError, match="empty"):
        list(read_conversations(empty, on_error="skip"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "q",\n "completion": }]', encoding="utf-8")
    with pytest.raises(OrchardError, match=rf"{broken}:2: invalid JSON"):
        list(read_conversations(broken, on_error="skip"))
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(OrchardError, match=".txt"):
        list(read_conversations(text))
    with pytest.raises(OrchardError, match="no such file"):
        list(read_conversations(tmp_path / "missing.jsonl"))


# --- which tokens are supervised ------------------------------------------------------------------


@pytest.mark.parametrize("messages", [EN, ZH], ids=["en", "zh"])
def test_supervised_tokens_are_exactly_the_assistant_replies_and_turn_ends(tokenizer, messages):
    example = tokenize_conversation(Conversation(messages, "test"), tokenizer, max_length=1000)
    full = tokenizer.apply_chat_template(messages)
    assert example.input_ids == tokenizer.encode(full)  # one tokenization of the whole rendering
    assert example.input_ids.count(tokenizer.token_to_id("<|im_start|>")) == len(messages)
    replies = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    assert decoded_runs(example, tokenizer) == replies
    # Everything else (system, user, the assistant headers) is not supervised.
    rest = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert tokenizer.decode(rest, skip_special_tokens=False) == full.replace(replies[0], "").replace(replies[1], "")

    last = tokenize_conversation(Conversation(messages, "test"), tokenizer, 1000, train_on="last_assistant")
    assert last.input_ids == example.input_ids
    assert decoded_runs(last, tokenizer) == replies[-1:]


def test_alpaca_and_instruction_records_supervise_their_outputs(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Where does Tom Snow live?", "input": "Answer briefly.", "output": "In Greenfield."},
        {"instruction": "汤姆·斯诺住在哪里？", "output": "绿野镇", "system": "请简短地回答。"},
    ])
    records = list(read_conversations(path))
    records += [Conversation(r["messages"], f"world:{i}")
                for i, r in enumerate(instruction_conversations(World(), num_conversations=12))]
    stats = ReadStats()
    examples = tokenize_conversations(records, tokenizer, max_length=1000, stats=stats)
    assert stats.kept == len(records) and not stats.skipped
    for conversation, example in zip(records, examples):
        replies = [m["content"] + IM_END for m in conversation.messages if m["role"] == "assistant"]
        assert decoded_runs(example, tokenizer) == replies


def test_other_templates_supervise_reply_and_their_turn_end(tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|end_of_text|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    other = Tokenizer(tokenizer._backend, chat_template=template)
    example = tokenize_conversation(Conversation(EN, "t"), other, 1000)
    # " Tom" straddles the header's ": " and the reply: it is supervised, so the reply is not cut.
    assert decoded_runs(example, other) == [" " + m["content"] + "<|end_of_text|>" for m in EN
                                            if m["role"] == "assistant"]

    # A reply that also occurs in the template's own text is still found where it is.
    tricky = [{"role": "user", "content": "im"}, {"role": "assistant", "content": "im"}]
    assert decoded_runs(tokenize_conversation(Conversation(tricky, "t"), tokenizer, 100), tokenizer) == ["im" + IM_END]

    unstable = Tokenizer(tokenizer._backend, chat_template="{{ messages | length }}" + template)
    with pytest.raises(OrchardError, match="t: the chat template is not prefix-stable"):
        tokenize_conversation(Conversation(EN, "t"), unstable, 1000)


def test_too_long_conversations(tokenizer):
    conversation = Conversation(EN, "data.jsonl:7")
    full = tokenize_conversation(conversation, tokenizer, 1000)
    n = len(full.input_ids)
    with pytest.raises(OrchardError, match=rf"data.jsonl:7: conversation is {n} tokens, longer than "
                                           rf"data.max_length={n - 1}"):
        tokenize_conversation(conversation, tokenizer, n - 1)
    assert tokenize_conversation(conversation, tokenizer, n - 1, truncation="skip") is None
    assert tokenize_conversation(conversation, tokenizer, n, truncation="error").input_ids == full.input_ids

    # truncate_prompt drops the oldest exchange, keeping the system prompt and the final exchange.
    kept = [EN[0]] + EN[3:]
    short = tokenize_conversation(Conversation(kept, "x"), tokenizer, 1000)
    truncated = tokenize_conversation(conversation, tokenizer, n - 1, truncation="truncate_prompt")
    assert truncated.input_ids == short.input_ids and truncated.labels == short.labels
    assert decoded_runs(truncated, tokenizer) == [EN[-1]["content"] + IM_END]
    # If even system + last exchange does not fit, it is skipped, never cut.
    stats = ReadStats()
    assert tokenize_conversations([conversation, conversation], tokenizer, len(short.input_ids) - 1,
                                  truncation="truncate_prompt", stats=stats) == []
    assert stats.reasons == {"too long": 2}
    tokenize_conversations([conversation], tokenizer, n - 1, truncation="truncate_prompt", stats=stats)
    assert stats.truncated == 1 and stats.kept == 1


# --- packing and batching -------------------------------------------------------------------------


def example(length: int, start: int = 10, supervised_from: int = 0) -> TokenizedConversation:
    ids = list(range(start, start + length))
    return TokenizedConversation(ids, [IGNORE_INDEX if i < supervised_from else t for i, t in enumerate(ids)])


def test_pack_is_first_fit_in_order_with_shifted_labels():
    examples = [example(6, 10, 2), example(5, 20), example(3, 30), example(4, 40), example(1, 50)]
    packed = pack_conversations(examples, seq_len=10)
    # 6 -> bin 0; 5 -> bin 1; 3 -> bin 0 (9); 4 -> bin 1 (9); 1 -> bin 0 (10)
    assert [p.input_ids for p in packed] == [list(range(10, 16)) + [30, 31, 32, 50],
                                             list(range(20, 25)) + [40, 41, 42, 43]]
    first = packed[0]
    assert first.position_ids == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    assert first.document_ids == [0] * 6 + [1] * 3 + [2]
    # labels[t] is the target for input t: the next token of the same conversation, if supervised.
    assert first.labels == [IGNORE_INDEX, 12, 13, 14, 15, IGNORE_INDEX, 31, 32, IGNORE_INDEX, IGNORE_INDEX]
    assert pack_conversations(examples, 10) == packed
    assert len(pack_conversations([example(3)] * 100, 7)) == 50
    with pytest.raises(ValueError, match="seq_len=5"):
        pack_conversations([example(6)], 5)


def test_collate_packed_mask_is_block_diagonal_causal():
    packed = pack_conversations([example(3, 10), example(2, 20), example(4, 30)], seq_len=5)
    batch = collate_packed(packed, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch["labels"][1].tolist() == [31, 32, 33, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    mask = document_mask(batch["document_ids"])
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert mask[0, 0].long().tolist() == expected.tolist()
    assert mask[1, 0, 4].long().tolist() == [0, 0, 0, 0, 1]  # padding sees only itself
    assert mask[1, 0, :4, 4].sum() == 0
    assert collate_packed(packed, 0, pad_to=8)["input_ids"].shape == (2, 8)


def tiny_model(vocab_size: int) -> CausalLM:
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1)
    model = CausalLM(config)
    model.reset_parameters(seed=0)
    return model.eval()


def test_packed_batch_gives_each_conversation_its_own_logits_and_loss(tokenizer):
    records = instruction_conversations(World(), num_conversations=6) + [{"messages": EN}, {"messages": ZH}]
    examples = [tokenize_conversation(Conversation(r["messages"], str(i)), tokenizer, 256)
                for i, r in enumerate(records)]
    model = tiny_model(tokenizer.vocab_size)
    packed = pack_conversations(examples, seq_len=256)
    assert len(packed) < len(examples)
    batch = collate_packed(packed, tokenizer.pad_id)
    padded = collate_padded(examples, tokenizer.pad_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]).logits
        padded_logits = model(padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        alone = [model(torch.tensor([e.input_ids])).logits[0] for e in examples]

    placed = 0
    expected_loss = 0.0
    for row, p in enumerate(packed):
        starts = [t for t, position in enumerate(p.position_ids) if position == 0] + [len(p.input_ids)]
        for start, end in itertools.pairwise(starts):
            index = next(i for i, e in enumerate(examples) if e.input_ids == p.input_ids[start:end])
            assert (logits[row, start:end] - alone[index]).abs().max() <= 1e-5
            placed += 1
    assert placed == len(examples)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert (padded_logits[row, :n] - alone[row]).abs().max() <= 1e-5
        # The shifted labels make token_cross_entropy the usual next-token loss on supervised tokens.
        targets = torch.tensor(e.labels[1:])
        expected_loss += token_cross_entropy(alone[row][None, :-1], targets[None]).item()
    assert token_cross_entropy(logits, batch["labels"]).item() == pytest.approx(expected_loss, rel=1e-5)
    assert token_cross_entropy(padded_logits, padded["labels"]).item() == pytest.approx(expected_loss, rel=1e-5)
    supervised = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == supervised


def test_collate_padded_rows():
    batch = collate_padded([example(3, 10, 1), example(5, 20)], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], list(range(20, 25))]
    assert batch["labels"].tolist() == [[11, 12, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
                                        [21, 22, 23, 24, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]


def test_length_grouped_order_is_a_deterministic_grouped_permutation():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    order = length_grouped_order(lengths, batch_size=4, seed=1, epoch=0)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, 4, 1, 0)
    assert order != length_grouped_order(lengths, 4, 1, 1) and order != length_grouped_order(lengths, 4, 2, 0)
    spreads = [max(lengths[i] for i in order[s:s + 4]) - min(lengths[i] for i in order[s:s + 4])
               for s in range(0, 1000, 4)]
    assert sum(spreads) / len(spreads) < 5  # random batches would spread ~60


def test_packed_attention_through_flex_attention_equals_the_dense_mask(tokenizer):
    """FlexAttention's block mask (the GPU path) and the dense (T x T) mask (the CPU path) give the
    same logits within 1e-5 in fp32, padding and grouped-query attention included. (FlexAttention
    has no backward pass on the CPU: the gradients are compared in tests/test_cuda.py.)"""
    records = instruction_conversations(World(), num_conversations=8)
    examples = [tokenize_conversation(Conversation(r["messages"], str(i)), tokenizer, 256)
                for i, r in enumerate(records)]
    batch = collate_packed(pack_conversations(examples, seq_len=256), tokenizer.pad_id, pad_to=288)
    assert (batch["document_ids"] == -1).any() and batch["document_ids"].max() > 0
    model = tiny_model(tokenizer.vocab_size)
    logits = {}
    for choice in ("mask", "flex"):
        model.packed_attention = choice
        with torch.no_grad():
            logits[choice] = model(batch["input_ids"], position_ids=batch["position_ids"],
                                   document_ids=batch["document_ids"]).logits
    assert (logits["mask"] - logits["flex"]).abs().max() <= 1e-5
    assert (logits["mask"] - logits["flex"]).abs().max() > 0  # two computations, not one path taken twice
    with pytest.raises(ValueError, match="packed attention"):
        model.packed_attention = "dense"
        model(batch["input_ids"], document_ids=batch["document_ids"])
