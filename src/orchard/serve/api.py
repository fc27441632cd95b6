"""OpenAI's HTTP API over the engine (FastAPI), the chat page, health and Prometheus metrics.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as server-sent
events when `stream` is true), GET /health, GET /metrics, and GET / for the chat page (static files
in `static/`). Every error is OpenAI's body, {"error": {"message", "type", "param", "code"}}, with a
4xx status (5xx only for the server's own failures).

Tool calls, as OpenAI's API and vLLM's hermes parser: a chat request's `tools` (function schemas)
go to the chat template, which lists them in the system turn; assistant messages may carry
`tool_calls` (arguments as JSON strings, as clients send them, or objects) and `tool` messages the
results, all in the format of `orchard.data.tool_calls`. When tools are offered and the reply holds
`<tool_call>` blocks that all parse, the answer is `message.tool_calls` (ids `call_<hex>`), the text
before the first call as `content` (null when empty) and finish_reason "tool_calls"; a malformed
call leaves the whole reply as content. Streamed, content goes out until a `<tool_call>` may begin,
and the calls come whole in the last chunk. `tool_choice` "auto" (the default) or "none", which, as
in vLLM, still lists the tools in the prompt but reads no calls back; "required" and a named function
need constrained decoding, which this server does not do: 400.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.records import BadRecord
from ..data.tool_calls import ParsedReply, checked_tool_calls, checked_tools, content_end, parse_reply
from ..errors import OrchardError
from .engine import Delta, Engine, QueueFull, Sampling, Sequence

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 2 ** 20
"""Request bodies above this are refused (413) before they are read whole."""
MAX_STOP_STRINGS = 4
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|dict|list\[.*\]|function-.*|[A-Z]\w*)$")
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --- request bodies --------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None
    ignore_eos: bool = False
    """vLLM's extension: decode past the end tokens, to the token budget (benchmarks of fixed lengths)."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("is not supported by this server (only 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("is not supported by this server")
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, name: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value):
        if value not in (None, "auto", "none"):
            raise ValueError('this server takes "auto" or "none" (forcing calls needs constrained decoding)')
        return value


class CompletionBody(_Body):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


# --- the app ----------------------------------------------------------------------------------------

@dataclass
class ServedModels:
    """Model ids: the base's, and each adapter's (its name)."""
    base: str
    adapters: list[str]
    chat_end_ids: list[int]

    def adapter_of(self, model_id: str) -> str | None:
        if model_id == self.base:
            return None
        if model_id in self.adapters:
            return model_id
        raise ApiError(404, f"The model `{model_id}` does not exist (served: "
                            f"{', '.join([self.base, *self.adapters])})", "model", "model_not_found")


def create_app(engine: Engine, models: ServedModels, api_key: str | None = None,
               request_timeout: float | None = None, drain_seconds: float = 30.0,
               start_engine: bool = True) -> FastAPI:
    """The server's ASGI app. The engine stops, drained, when the app shuts down; it starts on a
    thread of its own with the app, unless `start_engine` is false (the caller runs it)."""
    registry = CollectorRegistry()
    requests_total = Counter("orchard_requests", "HTTP requests answered", ["route", "status"], registry=registry)
    first_token = Histogram("orchard_time_to_first_token_seconds", "From a sequence's arrival to its first token",
                            registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    registry.register(_EngineCollector(engine))
    engine.on_first_token = first_token.observe
    outbox = _Outbox()
    engine.after_step = outbox.flush

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain_seconds)

    app = FastAPI(title="orchard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit)

    app.add_middleware(_Gate, api_key=api_key, requests_total=requests_total)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.param, error.code, error.kind, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        location = []
        for part in first.get("loc", ())[1:]:  # after "body"
            if isinstance(part, str) and _UNION_BRANCH.match(part):  # pydantic names the type tried, not a key
                break
            location.append(str(part))
        if first.get("type") == "json_invalid":
            return error_response(400, f"The request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
        param = ".".join(location) or None
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        return error_response(400, f"{param or 'body'}: {message}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind=kind)

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "orchard",
                                             "parent": None if name == models.base else models.base}
                                            for name in [models.base, *models.adapters]]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        adapter = models.adapter_of(body.model)
        messages = [_template_message(m, i) for i, m in enumerate(body.messages)]
        try:
            tools = checked_tools(body.tools)
        except BadRecord as error:
            raise ApiError(400, error.message, "tools") from None
        reads_calls = bool(tools) and body.tool_choice != "none"
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except OrchardError as error:
            raise ApiError(400, str(error), "messages") from None
        prompt_ids = engine.tokenizer.encode(prompt, add_bos=False)  # the template writes any BOS itself
        end_ids = frozenset() if body.ignore_eos else frozenset([engine.tokenizer.eos_id, *models.chat_end_ids])
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        budget = body.max_completion_tokens or body.max_tokens
        run = _Run(engine, body, [prompt_ids], adapter, end_ids, budget, top, request_timeout, outbox)
        if body.stream:
            return _sse(run.stream_chat(_include_usage(body), reads_calls))
        return await run.chat(request, reads_calls)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        adapter = models.adapter_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        encoded = [engine.tokenizer.encode(p, add_bos=getattr(engine.tokenizer, "adds_bos_by_default", False))
                   or [engine.tokenizer.bos_id if engine.tokenizer.bos_id is not None else engine.tokenizer.eos_id]
                   for p in prompts]
        end_ids = frozenset() if body.ignore_eos else frozenset([engine.tokenizer.eos_id])
        run = _Run(engine, body, encoded, adapter, end_ids, body.max_tokens,
                   body.logprobs, request_timeout, outbox, prompts if body.echo else None)
        if body.stream:
            return _sse(run.stream_completion(_include_usage(body)))
        return await run.completion(request)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine is not running", kind="server_error")
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting),
                "free_slots": len(engine.free_slots), "max_batch_size": engine.max_batch_size,
                "failed_steps": engine.failures}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _template_message(message: Message, index: int) -> dict:
    """A message as chat templates take it: text parts joined, extra keys (tool_call_id, ...) kept,
    an assistant's tool calls checked and their JSON-string arguments decoded (the template writes
    them out as JSON itself)."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    extra = {k: v for k, v in (message.model_extra or {}).items() if v is not None}
    if message.role == "assistant" and "tool_calls" in extra:
        try:
            extra["tool_calls"] = checked_tool_calls(extra["tool_calls"], f"messages[{index}].")
        except BadRecord as error:
            raise ApiError(400, error.message, f"messages.{index}.tool_calls") from None
    return {"role": message.role, "content": content if content is not None else "", **extra}


def _called(text: str) -> ParsedReply | None:
    """The reply read as tool calls, when it makes some and every one parses; else None: as vLLM's
    hermes parser, a malformed call is left to the client as the model's text, not an error."""
    reply = parse_reply(text)
    return reply if reply.calls and not reply.errors else None


def _call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _include_usage(body: _Body) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Run:
    """One request's sequences (n per prompt) in the engine, and their answer in OpenAI's shapes."""

    def __init__(self, engine: Engine, body: _Body, prompts: list[list[int]], adapter: str | None,
                 end_ids: frozenset[int], max_tokens: int | None, top_logprobs: int | None,
                 request_timeout: float | None, outbox: _Outbox, echo: list[str] | None = None):
        self.body, self.echo = body, echo
        self.wants_logprobs = top_logprobs is not None
        limit = engine.max_model_len
        if body.n * len(prompts) > engine.max_batch_size:
            raise ApiError(400, f"n x prompts = {body.n * len(prompts)}; this server runs at most "
                                f"{engine.max_batch_size} sequences at once", "n")
        for ids in prompts:
            room = limit - len(ids)
            if room < 1:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                    f"{len(ids)}", "messages" if echo is None else "prompt", "context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens: {len(ids)} in the "
                                    f"prompt leave {room} for max_tokens, not {max_tokens}", "max_tokens",
                               "context_length_exceeded")
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.id = f"{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.outbox = outbox
        outbox.loop = asyncio.get_running_loop()  # the server's one loop
        self.deltas: asyncio.Queue[tuple[int, Delta] | None] = asyncio.Queue()
        deadline = time.monotonic() + request_timeout if request_timeout else None
        self.sequences = []
        for ids in prompts:
            for sample in range(body.n):
                seed = None if body.seed is None else body.seed + sample
                sampling = Sampling(max_tokens=max_tokens or limit - len(ids), temperature=body.temperature,
                                    top_p=body.top_p, seed=seed, stop=body.stop or [], top_logprobs=top_logprobs)
                index = len(self.sequences)
                self.sequences.append(Sequence(ids, sampling, end_ids, self._receiver(index), adapter, deadline))
        try:
            engine.submit(self.sequences)
        except QueueFull as error:
            raise ApiError(429, f"The server is busy ({error}); retry shortly", None, "queue_full",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None

    def _receiver(self, index: int):
        def receive(delta: Delta) -> None:
            self.outbox.put(self.deltas, (index, delta))
        return receive

    def cancel(self) -> None:
        for sequence in self.sequences:
            sequence.cancelled = True

    async def updates(self) -> AsyncIterator[dict[int, Delta]]:
        """What arrived since the last update, merged into one delta per sequence, until every
        sequence has ended (or the client has left: `watch`); then cancels what still runs. Under load
        several tokens arrive together and go out as one chunk."""
        open_sequences = len(self.sequences)
        try:
            while open_sequences:
                items = [await self.deltas.get()]
                while not self.deltas.empty():
                    items.append(self.deltas.get_nowait())
                merged: dict[int, Delta] = {}
                for item in items:
                    if item is None:  # the client left
                        return
                    index, delta = item
                    if delta.finish_reason == "error":
                        raise ApiError(500, "the engine failed; see the server's log", kind="server_error")
                    open_sequences -= delta.finish_reason is not None
                    if index in merged:
                        earlier = merged[index]
                        delta = Delta(earlier.text + delta.text, earlier.logprobs + delta.logprobs,
                                      delta.finish_reason, delta.completion_tokens)
                    merged[index] = delta
                yield merged
        finally:
            self.cancel()  # no-op for ended sequences; frees the slots of the others

    async def watch(self, request: Request) -> None:
        """Ends `updates` when the client of a non-streamed request goes away (a stream's client
        leaving cancels the stream itself)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        self.deltas.put_nowait(None)

    async def collect(self, request: Request) -> tuple[list[str], list[list[dict]], list[str | None]]:
        """Each sequence's whole text, log-probs and finish reason."""
        texts, logprobs = ["" for _ in self.sequences], [[] for _ in self.sequences]
        reasons: list[str | None] = [None for _ in self.sequences]
        watcher = asyncio.create_task(self.watch(request))
        try:
            async for merged in self.updates():
                for index, delta in merged.items():
                    texts[index] += delta.text
                    logprobs[index] += delta.logprobs
                    reasons[index] = delta.finish_reason or reasons[index]
        finally:
            watcher.cancel()
        return texts, logprobs, reasons

    def usage(self) -> dict:
        completion = sum(len(s.tokens) for s in self.sequences)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    # --- chat ---

    async def chat(self, request: Request, reads_calls: bool) -> dict:
        texts, logprobs, reasons = await self.collect(request)
        choices = []
        for i, text in enumerate(texts):
            message, reason = {"role": "assistant", "content": text}, reasons[i]
            if reads_calls and (reply := _called(text)):
                message = {"role": "assistant", "content": reply.content or None,
                           "tool_calls": [call.as_openai(_call_id()) for call in reply.calls]}
                reason = "tool_calls"
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": logprobs[i]} if self.wants_logprobs else None})
        return {"id": f"chatcmpl-{self.id}", "object": "chat.completion", "created": self.created,
                "model": self.body.model, "system_fingerprint": None, "choices": choices, "usage": self.usage()}

    async def stream_chat(self, include_usage: bool, reads_calls: bool) -> AsyncIterator[dict]:
        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            event = {"id": f"chatcmpl-{self.id}", "object": "chat.completion.chunk", "created": self.created,
                     "model": self.body.model, "system_fingerprint": None, "choices": choices}
            if include_usage:
                event["usage"] = usage
            return event

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for i in range(len(self.sequences))])
        texts, sent = ["" for _ in self.sequences], [0 for _ in self.sequences]
        async for merged in self.updates():
            choices = []
            for index, delta in merged.items():
                text = texts[index] = texts[index] + delta.text
                reason, calls, end = delta.finish_reason, None, len(text)
                if reads_calls and reason is None:
                    end = content_end(text)  # hold back what may begin a call, until the reply ends
                elif reads_calls and (reply := _called(text)):
                    calls = [{"index": j, **call.as_openai(_call_id())} for j, call in enumerate(reply.calls)]
                    reason, end = "tool_calls", content_end(text)
                message = {"content": text[sent[index]:end]} if end > sent[index] else {}
                if calls:
                    message["tool_calls"] = calls
                sent[index] = end  # never less: what is surely content only grows
                choices.append({"index": index, "delta": message, "finish_reason": reason,
                                "logprobs": {"content": delta.logprobs} if self.wants_logprobs else None})
            yield chunk(choices)
        if include_usage:
            yield chunk([], self.usage())

    # --- completions ---

    def _completion_logprobs(self, entries: list[dict], offset: int) -> dict:
        tokens = [e["token"] for e in entries]
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def _prefix(self, index: int) -> str:
        return self.echo[index // self.body.n] if self.echo is not None else ""

    async def completion(self, request: Request) -> dict:
        texts, logprobs, reasons = await self.collect(request)
        texts = [self._prefix(i) + text for i, text in enumerate(texts)]
        return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created, "model": self.body.model,
                "choices": [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                             "logprobs": self._completion_logprobs(logprobs[i], len(self._prefix(i))) if self.wants_logprobs else None}
                            for i in range(len(self.sequences))],
                "usage": self.usage()}

    async def stream_completion(self, include_usage: bool) -> AsyncIterator[dict]:
        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            event = {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created,
                     "model": self.body.model, "choices": choices}
            if include_usage:
                event["usage"] = usage
            return event

        written = [len(self._prefix(i)) for i in range(len(self.sequences))]
        if self.echo is not None:
            yield chunk([{"index": i, "text": self._prefix(i), "logprobs": None, "finish_reason": None}
                         for i in range(len(self.sequences))])
        async for merged in self.updates():
            choices = []
            for index, delta in merged.items():
                logprobs = self._completion_logprobs(delta.logprobs, written[index]) if self.wants_logprobs else None
                written[index] += len(delta.text)
                choices.append({"index": index, "text": delta.text, "logprobs": logprobs,
                                "finish_reason": delta.finish_reason})
            yield chunk(choices)
        if include_usage:
            yield chunk([], self.usage())


class _Outbox:
    """Hands the engine thread's deltas to the requests' queues on the event loop, all of a step's at
    once (`flush`, the engine's `after_step`): one wake-up of the loop per step, not one per token.
    Each wake-up costs the engine more than its system call: it waits for the GIL while the loop
    runs."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def put(self, target: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((target, item))

    def flush(self) -> None:
        with self.lock:
            if not self.items:
                return
            items, self.items = self.items, []
        try:
            self.loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the event loop closed (shutdown): nobody is listening
            pass

    @staticmethod
    def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
        for target, item in items:
            target.put_nowait(item)


class _EngineCollector:
    """The engine's live figures at each scrape: tokens generated, tokens/s over the last 10 s,
    sequences waiting and running."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine, now = self.engine, time.monotonic()
        recent = [t for t in list(engine.token_times) if now - t <= 10.0]
        window = max(now - recent[0], 1.0) if recent else 1.0
        yield CounterMetricFamily("orchard_generated_tokens", "Tokens generated",
                                  value=engine.tokens_generated)
        yield GaugeMetricFamily("orchard_tokens_per_second", "Tokens generated per second over the last 10 s",
                                value=len(recent) / window)
        yield GaugeMetricFamily("orchard_queue_length", "Sequences waiting for a slot", value=len(engine.waiting))
        yield GaugeMetricFamily("orchard_running_batch_size", "Sequences decoding", value=len(engine.running))


ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics", "/"})


class _Gate:
    """The API key on /v1 routes, and the count of answered requests by route and status. Plain ASGI
    rather than FastAPI's "http" middleware, which would pass every chunk of a stream through a
    queue of its own."""

    def __init__(self, app, api_key: str | None, requests_total: Counter):
        self.app, self.api_key, self.requests_total = app, api_key, requests_total

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        if self.api_key is not None and path.startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                self.requests_total.labels(route, "401").inc()
                return await error_response(401, "Incorrect API key provided", code="invalid_api_key")(
                    scope, receive, send)
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.requests_total.labels(route, str(status)).inc()


class _BodyLimit:
    """Refuses (413) a request body over MAX_BODY_BYTES, by its Content-Length or as it arrives."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await error_response(413, f"request body over {MAX_BODY_BYTES} bytes")(scope, receive, send)
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise StarletteHTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
            return message

        return await self.app(scope, limited, send)
