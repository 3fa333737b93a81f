"""The OpenAI-compatible HTTP API over the engine's continuous batching (FastAPI) that `leanseek serve` runs.

    GET  /                      the web chat (one page, no outside assets)
    GET  /v1/models, /health, /metrics (Prometheus text)
    POST /v1/chat/completions   messages -> the assistant's reply, the reasoning as `reasoning_content` beside
                                `content`, as DeepSeek's API returns it; streamed as server-sent events or not
    POST /v1/completions        a plain text prompt continued

Errors come back as OpenAI error bodies ({"error": {"message", "type", "param", "code"}}) with the right status:
400 for bad input (malformed JSON, wrong types, out-of-range values, an empty conversation, a context overflow),
401 for a missing or wrong API key when one is set, 404 for an unknown model, 411 for a body without a length, 413
for an oversized body, 429 when the queue is full. A client that disconnects mid-stream cancels its generation.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.chat import LEANSEEK_CHAT, ChatFormat
from ..data.tokenizer import THINK
from ..infer.engine import Engine
from .text import TextStream
from .worker import EngineWorker, Event, Handle, QueueFull

MAX_BODY_BYTES = 1 << 20


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends: on a client's disconnect
    Starlette cancels the sending task, and a generator left waiting at a `yield` would otherwise keep its request
    (and its slot) until garbage collection."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str
    reasoning_content: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = MAX_BODY_BYTES, worker_thread: bool = True,
               chat_format: ChatFormat = LEANSEEK_CHAT) -> FastAPI:
    """The app. chat_format: how the model writes conversations (leanseek's, or a Hugging Face folder's template
    and end-of-reply token: leanseek.data.chat.chat_format). worker_thread: run the engine loop in a thread
    started with the app; otherwise the caller runs app.state.worker.run() (leanseek serve does, in the main
    thread)."""
    worker = EngineWorker(engine, max_queue)
    end = tokenizer.token_id(chat_format.end)
    if end is None:
        raise ValueError(f"the tokenizer has no token {chat_format.end!r} to end a reply")
    stats = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_sum": 0.0,
             "latency_count": 0, "ttft_sum": 0.0, "ttft_count": 0}
    app = FastAPI(title="leanseek", on_startup=[worker.start] if worker_thread else [], on_shutdown=[worker.close])

    def error_body(e: ApiError) -> JSONResponse:
        stats["errors"] += 1
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return error_body(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
        return error_body(ApiError(400, message, param=where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return error_body(ApiError(e.status_code, str(e.detail), kind="not_found_error" if e.status_code == 404
                                   else "invalid_request_error"))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") and api_key is not None:
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_body(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                           kind="authentication_error", code="invalid_api_key"))
        size = request.headers.get("content-length")
        if request.method == "POST" and not (size or "").isdigit():  # a streamed body of unknown size
            return error_body(ApiError(411, "send the body with a Content-Length header"))
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return error_body(ApiError(413, f"the body has {size} bytes; the limit is {max_body_bytes}"))
        return await call_next(request)

    page = (Path(__file__).parent / "web" / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def web_chat():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "leanseek"}]}

    @app.get("/metrics")
    async def metrics():
        lines = []
        for name, kind, value, help_ in [
            ("requests_total", "counter", stats["requests"], "requests received"),
            ("request_errors_total", "counter", stats["errors"], "requests answered with an error"),
            ("prompt_tokens_total", "counter", stats["prompt_tokens"], "prompt tokens processed"),
            ("generation_tokens_total", "counter", stats["completion_tokens"], "tokens generated"),
            ("request_latency_seconds_sum", "counter", stats["latency_sum"], "total request latency"),
            ("request_latency_seconds_count", "counter", stats["latency_count"], "requests completed"),
            ("time_to_first_token_seconds_sum", "counter", stats["ttft_sum"], "total time to first token"),
            ("time_to_first_token_seconds_count", "counter", stats["ttft_count"], "first tokens"),
            ("queue_depth", "gauge", worker.waiting, "requests waiting for a slot"),
            ("running_requests", "gauge", worker.running, "requests decoding"),
            ("cache_usage", "gauge", worker.running / engine.max_batch, "fraction of cache slots in use"),
        ]:
            lines += [f"# HELP leanseek_{name} {help_}", f"# TYPE leanseek_{name} {kind}", f"leanseek_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def params_of(req: Sampling, max_tokens: int | None) -> tuple[dict, list[str]]:
        if req.model != model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found", kind="not_found_error")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        params = {"max_new_tokens": max_tokens or 256, "temperature": req.temperature, "top_p": req.top_p,
                  "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                  "stop": [end, *stop]}
        return params, stop

    async def run(prompt: list[int], params: dict, seed: int | None, n: int) -> list[Handle]:
        stats["requests"] += 1
        stats["prompt_tokens"] += len(prompt) * n
        try:
            return [worker.submit(prompt, {**params, "seed": None if seed is None else seed + i})
                    for i in range(n)]
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from None

    async def first(handle: Handle) -> Event:
        """The first event; a rejection (bad input found by the engine) becomes a 400."""
        event = await handle.events.get()
        if event.rejected:
            raise ApiError(400, event.error)
        stats["ttft_sum"] += time.perf_counter() - handle.submitted
        stats["ttft_count"] += 1
        return event

    async def collect(handle: Handle, stream: TextStream, max_tokens: int) -> dict:
        try:
            event = await first(handle)
            while True:
                stream.feed(event.tokens)
                if event.error:
                    raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
                if event.finished:
                    break
                event = await handle.events.get()
        finally:
            worker.done(handle)
        stats["latency_sum"] += time.perf_counter() - handle.submitted
        stats["latency_count"] += 1
        stats["completion_tokens"] += len(stream.ids)
        return {"finish_reason": finish_reason(stream, max_tokens)}

    def finish_reason(stream: TextStream, max_tokens: int) -> str:
        stopped = stream.ids[-1:] == [end] or any(x in tokenizer.decode(stream.ids) for x in stream.stop)
        return "length" if len(stream.ids) >= max_tokens and not stopped else "stop"

    def usage(prompt: list[int], streams: list[TextStream]) -> dict:
        completion = sum(len(s.ids) for s in streams)
        return {"prompt_tokens": len(prompt) * len(streams), "completion_tokens": completion,
                "total_tokens": len(prompt) * len(streams) + completion}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        if not req.messages:
            raise ApiError(400, "messages: the conversation is empty", param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        params, stop = params_of(req, max_tokens)
        text = chat_format.render([m.model_dump(exclude_none=True) for m in req.messages], add_generation_prompt=True)
        prompt = tokenizer.encode(text)
        opened = THINK if text.rstrip().endswith(THINK) else ""  # the template opened the reasoning itself
        return await respond(req, request, prompt, params, stop, chat=True, prefix=opened)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params, stop = params_of(req, req.max_tokens or 16)
        prompt = tokenizer.encode(req.prompt)
        if not prompt:
            raise ApiError(400, "prompt: empty", param="prompt")
        return await respond(req, request, prompt, params, stop, chat=False)

    async def respond(req: Sampling, request: Request, prompt: list[int], params: dict, stop: list[str], chat: bool,
                      prefix: str = ""):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        handles = await run(prompt, params, req.seed, req.n)
        streams = [TextStream(tokenizer, stop, chat, chat_format.end, prefix) for _ in handles]
        max_tokens = params["max_new_tokens"]
        if not req.stream:
            ends = []
            try:
                for h, s in zip(handles, streams):
                    ends.append(await collect(h, s, max_tokens))
            except BaseException:  # collect released the failing one; release the rest
                for h in handles[len(ends) + 1:]:
                    worker.done(h)
                raise
            choices = []
            for i, (s, e) in enumerate(zip(streams, ends)):
                reasoning, content = s.parts(final=True)
                body = ({"message": {"role": "assistant", "content": content, "reasoning_content": reasoning}}
                        if chat else {"text": content})
                choices.append({"index": i, **body, "finish_reason": e["finish_reason"], "logprobs": None})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": req.model, "choices": choices, "usage": usage(prompt, streams)}
        # streaming: the first event of each choice decides between a 400 and a stream
        firsts = []
        try:
            for h in handles:
                firsts.append(await first(h))
        except ApiError:
            for h in handles:
                worker.done(h)
            raise
        return EventStream(events(req, request, rid, created, prompt, handles, streams, firsts, chat, max_tokens))

    async def events(req, request, rid, created, prompt, handles, streams, firsts, chat,
                     max_tokens) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, delta: dict | None = None, finish: str | None = None, text: str = "") -> str:
            choice = ({"index": i, "delta": delta or {}, "finish_reason": finish} if chat
                      else {"index": i, "text": text, "finish_reason": finish})
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": req.model,
                                          "choices": [choice]}) + "\n\n"

        pending = {i: e for i, e in enumerate(firsts)}
        done = [False] * len(handles)
        try:
            if chat:
                for i in range(len(handles)):
                    yield chunk(i, {"role": "assistant", "content": ""})
            while not all(done):
                for i, h in enumerate(handles):
                    if done[i]:
                        continue
                    event = pending.pop(i, None) or await h.events.get()
                    reasoning, content = streams[i].feed(event.tokens, final=event.finished)
                    if reasoning:
                        yield chunk(i, {"reasoning_content": reasoning})
                    if content:
                        yield chunk(i, {"content": content}, text=content)
                    if event.error:
                        yield "data: " + json.dumps({"error": {"message": event.error, "type": "server_error"}}) \
                              + "\n\n"
                    elif event.finished:
                        yield chunk(i, finish=finish_reason(streams[i], max_tokens))
                    if event.finished:
                        done[i] = True
                        worker.done(h)
                        stats["latency_sum"] += time.perf_counter() - h.submitted
                        stats["latency_count"] += 1
                    if await request.is_disconnected():
                        return
            if req.stream_options and req.stream_options.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": req.model,
                                             "choices": [], "usage": usage(prompt, streams)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for i, h in enumerate(handles):
                if not done[i]:
                    worker.done(h)  # the client left: cancel
            stats["completion_tokens"] += sum(len(s.ids) for s in streams)

    app.state.worker = worker
    return app
