"""`orchard serve`: a real server process on a free local port, spoken to with OpenAI's own client
(and raw HTTP for what a client would never send). The model is the tiny chat checkpoint of
conftest, with two LoRA adapters of random weights, so that base and adapters answer differently."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from orchard.checkpoint import load_checkpoint, save_checkpoint
from orchard.lineage.record import parent_entry
from orchard.peft.lora import LoraConfig, add_lora

MAX_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`orchard serve ARGS` in its own process, up once /health answers."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchard.cli.main", "serve", *args, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 60 s")
            time.sleep(0.1)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)  # the server's own graceful-shutdown limit
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def served(chat_base, tmp_path_factory):
    """The chat base with adapters `a` and `b`, served with up to 32 sequences at once."""
    root = tmp_path_factory.mktemp("serve")
    adapters = []
    for index, name in enumerate(["a", "b"]):
        checkpoint = load_checkpoint(chat_base.dir)
        add_lora(checkpoint.model, LoraConfig(r=4), seed=index)
        generator = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():
            for key, parameter in checkpoint.model.named_parameters():
                if ".lora." in key and key.endswith(".B"):
                    parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
        save_checkpoint(root / name, checkpoint.model, checkpoint.tokenizer,
                        record={"stage": "test-lora", "parent": parent_entry(chat_base.dir)})
        adapters += ["--adapter", f"{name}={root / name}"]
    server = Server(str(chat_base.dir), *adapters, "--max-batch-size", str(MAX_BATCH), "--max-queue", "64",
                    "--model-name", "base")
    server.adapter_dirs = {"a": root / "a", "b": root / "b"}
    yield server
    assert server.stop() == 0


def chat(client, model="base", content="What does Tom have?", **settings):
    settings = {"temperature": 0, "max_tokens": 12, **settings}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **settings)


def test_models_chat_and_stream(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    reply = chat(client)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Streamed: the same text in chunks, a first chunk with the role, usage at the end when asked.
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # Adapters by name answer differently from the base and from each other.
    texts = {name: chat(client, name, max_tokens=20).choices[0].message.content for name in ("base", "a", "b")}
    assert len(set(texts.values())) == 3, texts


def test_an_adapter_checkpoint_served_alone_answers_with_its_adapter(served):
    alone = Server(str(served.adapter_dirs["a"]))
    try:
        with alone.client() as client:
            assert [m.id for m in client.models.list().data] == ["a"]
            reply = chat(client, "a", max_tokens=20).choices[0].message.content
    finally:
        assert alone.stop() == 0
    assert reply == chat(served.client(), "a", max_tokens=20).choices[0].message.content
    assert reply != chat(served.client(), "base", max_tokens=20).choices[0].message.content


def test_n_seed_stop_and_logprobs(served):
    client = served.client()
    sampled = chat(client, temperature=1.0, n=3, seed=11, max_tokens=16)
    again = chat(client, temperature=1.0, n=3, seed=11, max_tokens=16)
    texts = [c.message.content for c in sampled.choices]
    assert len(texts) == 3 and texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice samples on its own
    # stop: cut before the stop string, finish_reason "stop"
    greedy = chat(client, "a", max_tokens=30).choices[0].message.content
    at = next(i for i in range(3, len(greedy) - 2) if greedy.find(greedy[i:i + 2]) == i)
    cut = chat(client, "a", max_tokens=30, stop=[greedy[at:at + 2], "never seen"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[:at]
    # logprobs: the greedy token is the most likely one, and its log-prob is the top one's
    reply = chat(client, logprobs=True, top_logprobs=3, max_tokens=6).choices[0]
    entries = reply.logprobs.content
    assert len(entries) == 6 or reply.finish_reason == "stop"
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob >= entry.top_logprobs[1].logprob
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in entries).startswith(reply.message.content[:3])


def test_completions(served):
    client = served.client()
    done = client.completions.create(model="a", prompt="Tom has", max_tokens=8, temperature=0, logprobs=2)
    choice = done.choices[0]
    assert choice.finish_reason in ("stop", "length") and done.usage.completion_tokens <= 8
    assert len(choice.logprobs.tokens) == done.usage.completion_tokens
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    echoed = client.completions.create(model="a", prompt="Tom has", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "Tom has" + choice.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt="Tom has", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == choice.text


def test_concurrent_greedy_requests_give_each_the_text_it_gets_alone(served):
    """32 requests at once (base and both adapters, prompts and budgets of different lengths)."""
    client = served.client()
    requests = [dict(model=["base", "a", "b"][i % 3], content="Tom " + "and Ann " * (i % 5) + f"have {i} cats.",
                     max_tokens=4 + 3 * (i % 9)) for i in range(32)]

    def ask(request):
        return chat(client, request["model"], request["content"], max_tokens=request["max_tokens"]).choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, requests))
    alone = [ask(request) for request in requests]
    assert together == alone
    assert len(set(together)) > 10


MALFORMED = [
    ("not json", None),
    ("[1, 2]", None),
    ({}, "model"),
    ({"model": "base"}, "messages"),
    ({"model": "base", "messages": []}, "messages"),
    ({"model": "base", "messages": "hello"}, "messages"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "base", "messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"model": "base", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 1000}, "n"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": 3}, "stop"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi " * 2000}]}, "messages"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True},
     "top_logprobs"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1.0}, "presence_penalty"),
    ({"model": "base", "prompt": ""}, "messages"),  # a completions body at the chat route
]


def test_malformed_requests_get_openai_errors_and_the_server_goes_on(served):
    for body, param in MALFORMED:
        content = body if isinstance(body, str) else json.dumps(body)
        response = httpx.post(f"{served.url}/v1/chat/completions", content=content,
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        if param is not None:
            assert error["param"] == param, (body, error)
    for body, status in [({"model": "base", "prompt": "hi", "logprobs": 9}, 400), ({"model": "base"}, 400),
                         ({"model": "base", "prompt": []}, 400), ({"model": "zzz", "prompt": "hi"}, 404)]:
        response = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == status and "error" in response.json(), (body, response.text)
    assert httpx.get(f"{served.url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{served.url}/static/../../../../etc/passwd").status_code == 404
    huge = httpx.post(f"{served.url}/v1/chat/completions", content=b"x" * (5 * 2 ** 20),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert huge.status_code == 413 and "error" in huge.json()
    assert served.health()["status"] == "ok"
    assert chat(served.client()).choices[0].message.content is not None


def test_clients_that_leave_mid_stream_free_their_slots(served):
    client = served.client()
    chat(client, max_tokens=4)  # warm
    before = served.rss_mib()
    body = {"model": "base", "messages": [{"role": "user", "content": "Tell me about Tom."}], "max_tokens": 400,
            "temperature": 1.0, "stream": True}

    def leave_early(_):
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                    return True  # a token arrived: hang up
        return False

    with ThreadPoolExecutor(10) as pool:
        assert sum(pool.map(leave_early, range(50))) >= 45
    deadline = time.monotonic() + 20
    while (health := served.health())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["free_slots"] == MAX_BATCH
    assert served.rss_mib() - before < 60
    metrics = httpx.get(f"{served.url}/metrics").text
    for name in ("orchard_requests_total", "orchard_generated_tokens_total", "orchard_tokens_per_second",
                 "orchard_queue_length", "orchard_running_batch_size", "orchard_time_to_first_token_seconds_bucket"):
        assert name in metrics, name
    assert 'orchard_running_batch_size 0.0' in metrics


def test_a_full_queue_answers_429(chat_base):
    """In process, with the engine not running: the queue fills and stays full."""
    from fastapi.testclient import TestClient

    from orchard.serve.api import ServedModels, create_app
    from orchard.serve.engine import Engine, Sampling, Sequence

    checkpoint = load_checkpoint(chat_base.dir)
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch_size=2, max_queue=3)
    app = create_app(engine, ServedModels("base", [], []))
    client = TestClient(app)  # not entered: no lifespan, so the engine's thread never takes the queue
    engine.submit([Sequence([1, 2], Sampling(max_tokens=4), frozenset(), lambda delta: None)] * 2)
    response = client.post("/v1/chat/completions", json={"model": "base", "n": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
QUESTION = [{"role": "user", "content": "What is 37 + 45?"}]


@pytest.fixture
def scripted(chat_base):
    """`scripted(reply)`: the app in process on a real engine whose every sequence writes `reply`
    and ends (each token forced), as `.client` (OpenAI's), `.http` (raw) and `.sequences` (what the
    engine was given). The model is a fresh tiny one: chat_base's 512 positions are too few for a
    prompt that lists tools."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from orchard.model import CausalLM, ModelConfig
    from orchard.serve.api import ServedModels, create_app
    from orchard.serve.engine import Engine

    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)

    def make(reply: str) -> SimpleNamespace:
        model = CausalLM(config)
        model.reset_parameters(seed=0)
        engine = Engine(model, tokenizer, max_batch_size=2, max_queue=4)
        script = tokenizer.encode(reply) + [tokenizer.eos_id]
        take, submit, sequences = engine._take, engine.submit, []

        def forced(sequence, logits):  # the script's next token is the only possible one
            only = torch.full_like(logits, -1e9)
            only[script[len(sequence.tokens)]] = 0
            take(sequence, only)

        def recorded(batch):
            sequences.extend(batch)
            submit(batch)

        engine._take, engine.submit = forced, recorded
        http = stack.enter_context(TestClient(create_app(engine, ServedModels("base", [], []))))
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        return SimpleNamespace(client=client, http=http, sequences=sequences, tokenizer=tokenizer)

    with ExitStack() as stack:
        yield make


def streamed(client, **request) -> tuple[str, list[dict], list[str]]:
    """A streamed reply's content, tool-call deltas and finish reasons."""
    chunks = [c.choices[0] for c in client.chat.completions.create(model="base", stream=True, **request) if c.choices]
    calls = [call.model_dump(exclude_none=True) for c in chunks for call in c.delta.tool_calls or []]
    return "".join(c.delta.content or "" for c in chunks), calls, [c.finish_reason for c in chunks if c.finish_reason]


def test_tool_calls_come_back_as_openai_tool_calls_streamed_or_not(scripted):
    from orchard.data.tool_calls import call_block

    script = ("Let me work it out.\n" + call_block("calculator", {"expression": "37 + 45"}) + "\n"
              + call_block("calculator", {"expression": "82 * 2"}))
    served = scripted(script)
    reply = served.client.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content == "Let me work it out."
    assert [(c.type, c.function.name, c.function.arguments) for c in reply.message.tool_calls] == [
        ("function", "calculator", '{"expression": "37 + 45"}'), ("function", "calculator", '{"expression": "82 * 2"}')]
    ids = [c.id for c in reply.message.tool_calls]
    assert all(re.fullmatch("call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == 2
    # The engine was given the template's prompt with the tools listed.
    prompt = served.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tools=TOOLS)
    assert '"name": "calculator"' in prompt and served.sequences[0].prompt_ids == served.tokenizer.encode(prompt)

    content, calls, reasons = streamed(served.client, messages=QUESTION, tools=TOOLS, tool_choice="auto")
    assert content == "Let me work it out." and reasons == ["tool_calls"]
    assert [(c["index"], c["type"], c["function"]) for c in calls] == [
        (0, "function", {"name": "calculator", "arguments": '{"expression": "37 + 45"}'}),
        (1, "function", {"name": "calculator", "arguments": '{"expression": "82 * 2"}'})]
    assert all(re.fullmatch("call_[0-9a-f]{24}", c["id"]) for c in calls)

    # The client's own message sent back, with a result: rendered as the model wrote it.
    served.client.chat.completions.create(model="base", tools=TOOLS, messages=[
        *QUESTION, reply.message, *({"role": "tool", "tool_call_id": i, "content": "82"} for i in ids)])
    assert served.tokenizer.decode(served.sequences[-1].prompt_ids, skip_special_tokens=False).endswith(
        f"<|im_start|>assistant\n{script}<|im_end|>\n<|im_start|>user\n<tool_response>\n82\n</tool_response>\n"
        "<tool_response>\n82\n</tool_response><|im_end|>\n<|im_start|>assistant\n")

    # tool_choice "none": the tools are still in the prompt (as vLLM does), the reply is plain text.
    text = served.client.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS,
                                                 tool_choice="none").choices[0]
    assert text.finish_reason == "stop" and text.message.tool_calls is None
    assert text.message.content == script
    assert served.sequences[-1].prompt_ids == served.sequences[0].prompt_ids


def test_a_request_with_tool_calls_and_results_renders_as_the_template_does(scripted):
    """OpenAI's clients send an assistant's call with content null and arguments as a JSON string:
    the prompt is the template's rendering of the same conversation with the arguments an object."""
    served = scripted("37 + 45 = 82.")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "37 + 45"}'}}
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "82"}]
    reply = served.client.chat.completions.create(model="base", messages=messages, tools=TOOLS).choices[0]
    assert (reply.message.content, reply.message.tool_calls, reply.finish_reason) == ("37 + 45 = 82.", None, "stop")
    as_object = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 + 45"}}}
    as_objects = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [as_object]},
                  {"role": "tool", "content": "82"}]
    prompt = served.tokenizer.apply_chat_template(as_objects, add_generation_prompt=True, tools=TOOLS)
    assert prompt.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": '
                           '"37 + 45"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n82\n'
                           '</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert served.sequences[0].prompt_ids == served.tokenizer.encode(prompt)


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "calculator", "arguments": [1]}\n</tool_call>',
    "Sure.\n<tool_call>\nnot json\n</tool_call>",
    '<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>\n<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1"',  # cut before its end
])
def test_malformed_tool_calls_come_back_as_content(scripted, reply):
    served = scripted(reply)
    choice = served.client.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (reply, None, "stop")
    assert streamed(served.client, messages=QUESTION, tools=TOOLS) == (reply, [], ["stop"])


def test_bad_tools_tool_calls_and_tool_choice_are_400s(scripted):
    served = scripted("unused")
    call = {"type": "function", "function": {"name": "calculator", "arguments": "{not json"}}
    for request, param, message in [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools",
         "tools[0] is not a function schema with a name"),
        ({"tools": "calculator"}, "tools", "tools: Input should be a valid list"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice",
         'tool_choice: this server takes "auto" or "none" (forcing calls needs constrained decoding)'),
        ({"messages": [*QUESTION, {"role": "assistant", "tool_calls": [call]}]}, "messages.1.tool_calls",
         "messages[1].tool_calls[0]: arguments are not JSON: Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)"),
        ({"messages": [*QUESTION, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
         "messages.1.tool_calls", "messages[1].tool_calls[0] has no function name"),
    ]:
        response = served.http.post("/v1/chat/completions", json={"model": "base", "messages": QUESTION, **request})
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["param"], response.json()["error"]["message"]) == (param, message)
    assert served.sequences == []


def test_engine_gives_each_sequence_its_text_alone_with_prompts_run_together(chat_base):
    """Without adapters every matmul has packed weights, so prompts arriving together run in one
    pass and decoding steps run only the rows there are: still each sequence's tokens, greedy or
    seeded, are those it gets alone (the served test above covers adapters)."""
    from orchard.serve.engine import Engine, Sampling, Sequence

    checkpoint = load_checkpoint(chat_base.dir)
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch_size=16, max_queue=64)
    assert engine.batched_prefill == torch.backends.mkl.is_available()
    prompts = [checkpoint.tokenizer.encode("Tom " + "and Ann " * (i % 6) + f"have {i} cats.")[: 1 + 7 * i]
               for i in range(24)]
    finished: dict[int, list[int]] = {}
    done = threading.Event()

    def sequences(indices):
        made = []
        for i in indices:
            sampling = Sampling(max_tokens=3 + 5 * (i % 7), temperature=0.0 if i % 3 else 0.9, seed=i)

            def on_delta(delta, i=i):
                if delta.finish_reason:
                    finished[i] = list(made_by_index[i].tokens)
                    if len(finished) == len(made_by_index):
                        done.set()
            made.append(Sequence(prompts[i], sampling, frozenset(), on_delta))
        return made

    engine.start()
    try:
        made_by_index = dict(enumerate(sequences(range(24))))
        engine.submit(list(made_by_index.values()))
        assert done.wait(60)
        together = dict(finished)
        alone = {}
        for i in range(24):
            finished.clear()
            done.clear()
            made_by_index = {i: sequences([i])[0]}
            engine.submit(list(made_by_index.values()))
            assert done.wait(60)
            alone[i] = finished[i]
    finally:
        engine.stop()
    assert together == alone
    assert len({tuple(t) for t in together.values()}) > 12


def test_engine_ends_sequences_at_their_deadline_and_drops_cancelled_ones(chat_base):
    from orchard.serve.engine import Engine, Sampling, Sequence

    checkpoint = load_checkpoint(chat_base.dir)
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch_size=4, max_queue=8)
    deltas: dict[str, list] = {"late": [], "long": [], "timed": []}
    prompt = checkpoint.tokenizer.encode("Tom has")

    def sequence(name, max_tokens, deadline=None):
        return Sequence(prompt, Sampling(max_tokens=max_tokens, temperature=1.0, seed=0), frozenset(),
                        deltas[name].append, deadline=deadline)

    engine.start()
    try:
        late, long = sequence("late", 50, deadline=time.monotonic() - 1), sequence("long", 400)
        engine.submit([late, long])
        deadline = time.monotonic() + 20
        while not deltas["long"]:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        long.cancelled = True  # its client left
        timed = sequence("timed", 400, deadline=time.monotonic() + 0.05)
        engine.submit([timed])
        while engine.busy():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.stop()
    assert [(d.text, d.finish_reason) for d in deltas["late"]] == [("", "length")]  # ended before its prompt ran
    assert not any(d.finish_reason for d in deltas["long"]) and long.slot is None
    assert deltas["timed"][-1].finish_reason == "length" and len(timed.tokens) < 400
    assert sorted(engine.free_slots) == [0, 1, 2, 3] and engine.cache.lengths == [0, 0, 0, 0]


def test_a_failing_step_ends_its_sequences_and_the_engine_goes_on(chat_base, capsys):
    from orchard.serve.engine import Engine, Sampling, Sequence

    checkpoint = load_checkpoint(chat_base.dir)
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch_size=4, max_queue=8)
    decode, calls = engine._decode_step, []

    def fails_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        decode()

    engine._decode_step = fails_once
    reasons = []
    engine.start()
    try:
        for _ in range(2):
            done = threading.Event()
            engine.submit([Sequence([5, 6, 7], Sampling(max_tokens=5, temperature=0), frozenset(),
                                    lambda d: (reasons.append(d.finish_reason), d.finish_reason and done.set()))])
            assert done.wait(30)
    finally:
        engine.stop()
    assert [r for r in reasons if r] == ["error", "length"] and engine.failures == 1
    assert "RuntimeError: injected" in capsys.readouterr().err
    assert sorted(engine.free_slots) == [0, 1, 2, 3]


def test_api_key_and_quantized_checkpoint(chat_base, tmp_path):
    from orchard.checkpoint.quantize import quantize_checkpoint

    quantized = quantize_checkpoint(chat_base.dir, tmp_path / "int8", bits=8).path
    server = Server(str(quantized), env={"ORCHARD_API_KEY": "sesame"})
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        client = server.client("sesame")
        (model,) = [m.id for m in client.models.list().data]
        assert model == "int8"
        assert chat(client, model).choices[0].message.content is not None
        assert httpx.get(f"{server.url}/health").status_code == 200  # not behind the key
    finally:
        assert server.stop() == 0


def test_sigterm_lets_running_requests_finish(chat_base):
    server = Server(str(chat_base.dir), "--model-name", "base")
    results = []
    request = threading.Thread(target=lambda: results.append(
        chat(server.client(), max_tokens=300, temperature=1.0).choices[0].finish_reason))
    request.start()
    while not server.health()["running"]:
        time.sleep(0.01)
    assert server.stop() == 0
    request.join()
    assert results and results[0] in ("stop", "length")


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "chat-page.png"


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian's chromium and chromium-driver (make test installs them where apt can)")
def test_chat_page_in_a_real_browser(served, tmp_path):
    """Headless Chromium opens the page, sends a message, sees the reply stream in, switches to an
    adapter, asks again, and saves a screenshot. With ORCHARD_SCREENSHOT_FROM=<a quickstart's
    folder> it does the same on that quickstart's pretrained base and LoRA chat adapter and writes
    the README's screenshot (docs/images/chat-page.png)."""
    drive_chat_page(served.url, tmp_path, ["What does Tom have?", "And Ann?"])
    quickstart = os.environ.get("ORCHARD_SCREENSHOT_FROM")
    if quickstart:
        server = Server(f"{quickstart}/pretrain", "--adapter", f"chat-lora={quickstart}/lora")
        try:
            shot = drive_chat_page(server.url, tmp_path, ["Where does Hugo Wood live?", "Where does Hugo Wood live?"],
                                   system="You answer briefly.")
        finally:
            server.stop()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(shot.read_bytes())


def drive_chat_page(url: str, tmp_path: Path, questions: list[str], system: str | None = None) -> Path:
    """Ask the first question of the first model in the picker and the second of the second, each
    reply checked to stream in; returns the page's screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,760", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) >= 2)
        models = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
        assert browser.title == "orchard chat"

        def ask(text: str) -> str:
            # Every change of the newest reply's text, as the page makes it: a streamed reply grows in steps.
            browser.execute_script("""
                window.replyLengths = [];
                new MutationObserver(() => {
                  const replies = document.querySelectorAll('.assistant .text');
                  if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
                }).observe(document.getElementById('conversation'),
                           {childList: true, subtree: true, characterData: true});""")
            browser.find_element(By.ID, "message").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant .text")
                       and b.find_element(By.ID, "send").is_enabled())  # the reply has ended
            growth = sorted(set(browser.execute_script("return window.replyLengths")))
            assert len(growth) >= 3, (growth, browser.find_element(By.ID, "status").text)  # streamed, piece by piece
            return browser.execute_script(
                "const r = document.querySelectorAll('.assistant .text'); return r[r.length - 1].textContent")

        if system:
            browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
            browser.find_element(By.ID, "system").send_keys(system)
        for field, value in (("max-tokens", "60"), ("temperature", "0")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        replies = [ask(questions[0])]
        Select(browser.find_element(By.ID, "model")).select_by_value(models[1])
        replies.append(ask(questions[1]))
        assert all(replies)
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message .who")] == \
            ["you", models[0], "you", models[1]]
        assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
        shot = tmp_path / "chat-page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        return shot
    finally:
        browser.quit()
