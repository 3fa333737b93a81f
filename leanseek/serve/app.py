"""The OpenAI-compatible HTTP API over the engine's continuous batching (FastAPI) that `leanseek serve` runs.

    GET  /                      the web chat (one page, no outside assets)
    GET  /v1/models, /health, /metrics (Prometheus text)
    POST /v1/chat/completions   messages -> the assistant's reply, the reasoning as `reasoning_content` beside
                                `content`, as DeepSeek's API returns it; streamed as server-sent events or not
    POST /v1/completions        a prompt continued: text, several texts, token ids or several lists of them;
                                `echo` and `logprobs` score a prompt as OpenAI's legacy API does (what evaluation
                                harnesses such as lm-evaluation-harness's local-completions read)

Message text is always text: a message that spells a control token ("<|end|>") gets ordinary tokens, and only the
chat template's own markup becomes control tokens (leanseek.data.chat.ChatFormat.encode); a string prompt on
/v1/completions is text in the same way, and only a prompt sent as token ids can hold control tokens.

Tools, as OpenAI's API has them: `tools` (function definitions, JSON Schema parameters, `strict`), `tool_choice`
("auto", "none", "required" or a named function), `parallel_tool_calls`; a reply's calls come back as
`message.tool_calls` (streamed: `delta.tool_calls` fragments with their index) with finish_reason "tool_calls", and
`role: "tool"` messages and assistant `tool_calls` are taken in the history. The calls are read out of the reply by
the parser of the format the chat template writes (leanseek's own, DeepSeek V3/R1's, V3.1's, V3.2/V4's DSML:
leanseek.serve.toolcalls). With tool_choice "none" the model still sees the tools (as OpenAI's does; the prompt is
the one the other turns of the conversation have) and a call it writes anyway is dropped from the reply. "required",
a named function, `strict: true` tools and `response_format` {"type": "json_object"} or {"type": "json_schema"}
(always enforced, `strict` or not) are kept by constrained decoding: the engine masks every token that would leave
the reply's grammar (leanseek.infer.constrain.reply_grammar), so the reply parses and validates; the free text
before what is enforced (reasoning, text before a required call) gets at most a quarter of max_tokens each. The
grammars are written in leanseek's chat format: for a Hugging Face folder's they are a 400 rather than a promise not
kept.
`parallel_tool_calls: false` allows one call (the grammar's one when constrained, else the first one parsed).
`chat_template_kwargs` (vLLM's) reach the chat template: DeepSeek-V3.1's {"thinking": true} opens the think block,
and reasoning_content is split off in either mode.

Accepted and ignored: `user`, `metadata`, `store`, `service_tier`, and an empty `logit_bias`. vLLM's sampling extras
`top_k`, `min_p` and `repetition_penalty` apply. `reasoning_effort` (or `reasoning.effort`) "none" or "minimal"
closes the think block at the start of the reply (the terminal's /think off); "low", "medium", "high" and "xhigh"
leave it to the model. Refused with a 400 naming the field, rather than answered wrongly: a non-empty `logit_bias`,
the deprecated `functions` and `function_call`, `suffix`, a `best_of` other than n, parts of a message that are not
text. Chat log-probabilities cover every generated token (the think block's included) but the end-of-turn token.

Errors come back as OpenAI error bodies ({"error": {"message", "type", "param", "code"}}) with the right status:
400 for bad input (malformed JSON, wrong types, out-of-range values, an empty conversation, a context overflow, a
request past the server's token budget), 401 for a missing or wrong API key when one is set, 404 for an unknown
model, 411 for a body without a length, 413 for an oversized body, 429 when the queue is full. A client that
disconnects mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from jinja2.defaults import DEFAULT_NAMESPACE
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.chat import LEANSEEK_CHAT, TOOL_NAME, ChatError, ChatFormat, validate, validate_tools
from ..data.tokenizer import BASE_TOKENS, END_OF_TURN, END_THINK, THINK
from ..infer.constrain import Grammar, reply_grammar
from ..infer.engine import Engine
from ..tools import add_tool_routes
from .limits import RequestLog
from .text import TextStream, TokenPieces
from .toolcalls import ToolCallDelta, ToolCallParser, tool_parser
from .worker import EngineWorker, Event, Handle, QueueFull

MAX_BODY_BYTES = 1 << 20
MAX_REQUEST_TOKENS = 16384  # n x max_tokens (x prompts) one request may ask for
CHAT_MAX_TOKENS, COMPLETION_MAX_TOKENS = 256, 16  # when a request names none (OpenAI's legacy default: 16)
# what a chat template's own names are: chat_template_kwargs may not replace them
TEMPLATE_NAMES = frozenset({"messages", "add_generation_prompt", "tools", "tokenizer", "raise_exception",
                            *DEFAULT_NAMESPACE})


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


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class Sampling(BaseModel):
    """The fields both endpoints share. None stands for the default: clients send null for fields they leave
    unset."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extras, which Open WebUI and LiteLLM pass through
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)


class ChatRequest(Sampling):
    messages: Any  # checked and normalised by leanseek.data.chat.validate
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    reasoning: Reasoning | None = None  # the Responses API's form of reasoning_effort, which some proxies send
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    tools: Any = None  # checked and normalised by leanseek.data.chat.validate_tools
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: passed to the chat template (V3.1's `thinking`)
    functions: Any = None  # OpenAI's deprecated forms of tools and tool_choice: refused with a pointer to them
    function_call: Any = None


class CompletionRequest(Sampling):
    prompt: Any  # text, texts, token ids or lists of token ids: read by completion_prompts
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's legacy limit
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


TOOL_CHOICES = '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}'


@dataclass
class ReplySpec:
    """What a chat request asks of its reply besides text: the tools it may call, how, and the reply's form."""

    tools: list[dict] = field(default_factory=list)  # validated definitions, OpenAI's shape
    choice: str | dict = "none"  # "auto", "none", "required" or {"name": ...}: exactly that function
    parallel: bool = True
    json_schema: dict | None = None  # the content must validate against it
    any_json: bool = False  # the content must be a JSON object

    @property
    def calls(self) -> bool:
        """Whether the reply may hold tool calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def strict(self) -> list[str]:
        """The functions whose arguments must validate against their schema."""
        return [t["function"]["name"] for t in self.tools if t["function"].get("strict")] if self.calls else []

    @property
    def constrained(self) -> bool:
        """Whether the engine must mask tokens so that the reply keeps to its form (else it is only parsed)."""
        return self.any_json or self.choice == "required" or isinstance(self.choice, dict) or bool(self.strict)


def read_tool_choice(choice: Any, tools: list[dict]) -> str | dict:
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ApiError(400, f"tool_choice: must be {TOOL_CHOICES}, not {choice!r}", param="tool_choice")
        if choice == "required" and not tools:
            raise ApiError(400, "tool_choice: \"required\" needs tools", param="tool_choice")
        return choice
    if not isinstance(choice, dict):
        raise ApiError(400, f"tool_choice: must be {TOOL_CHOICES}", param="tool_choice")
    if choice.get("type") != "function":
        raise ApiError(400, "tool_choice.type: must be \"function\"", param="tool_choice.type")
    function = choice.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, "tool_choice.function.name: must be a string", param="tool_choice.function.name")
    if function["name"] not in names:
        offered = ", ".join(names) if names else "none were given"
        raise ApiError(400, f"tool_choice.function.name: {function['name']!r} is not one of the tools ({offered})",
                       param="tool_choice.function.name")
    return {"name": function["name"]}


def read_response_format(value: Any) -> tuple[dict | None, bool]:
    """(the JSON schema the content must validate against, whether the content must be JSON)."""
    if value is None:
        return None, False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, False
    if kind == "json_object":
        return None, True
    if kind != "json_schema":
        raise ApiError(400, "response_format.type: must be \"text\", \"json_object\" or \"json_schema\"",
                       param="response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "response_format.json_schema: must be an object with a name and a schema",
                       param="response_format.json_schema")
    if not isinstance(spec.get("name"), str) or not TOOL_NAME.fullmatch(spec["name"]):
        raise ApiError(400, "response_format.json_schema.name: 1 to 64 letters, digits, underscores or dashes",
                       param="response_format.json_schema.name")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ApiError(400, "response_format.json_schema.strict: must be a boolean",
                       param="response_format.json_schema.strict")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema: must be a JSON Schema object",
                       param="response_format.json_schema.schema")
    return schema, True


@dataclass
class Choice:
    """One sequence of a response: its request in the engine, its text, its log-probabilities."""

    index: int
    prompt: list[int]
    handle: Handle
    stream: TextStream
    echo: str = ""  # the prompt's text, put before the completion (echo)
    logprobs: list = field(default_factory=list)  # the engine's TokenLogprob per generated token
    prompt_logprobs: list | None = None
    cached: int = 0  # prompt tokens the engine reused from its prefix cache
    offset: int = 0  # where the next generated token starts in the choice's text (legacy text_offset)
    echoed: bool = False
    released: bool = False
    spec: ReplySpec | None = None  # a chat choice's tools and form
    parser: ToolCallParser | None = None  # reads tool calls out of the answer, when tools are given
    call_ids: dict[int, str] = field(default_factory=dict)

    def call_id(self, index: int) -> str:
        return self.call_ids.setdefault(index, f"call_{uuid.uuid4().hex[:24]}")

    def answer(self, content: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """New answer text as content and tool-call deltas: with tools, the parser takes what is a call (and
        holds back what may become one until it knows); the calls tool_choice "none" or parallel_tool_calls
        false leave out are dropped."""
        if self.parser is None:
            return content, []
        text, deltas = self.parser.feed(content) if content else ("", [])
        if final:
            rest, more = self.parser.finish()
            text, deltas = text + rest, deltas + more
        return text, [d for d in deltas if d.index < self.kept]

    @property
    def kept(self) -> int:
        """How many of the parsed calls the reply keeps."""
        return 0 if not self.spec.calls else 1 if not self.spec.parallel else 1 << 30

    def tool_calls(self) -> list[dict]:
        """The reply's calls, once the parser has finished."""
        return [{"id": self.call_id(i), "type": "function", "function": {"name": call.name,
                                                                        "arguments": call.arguments}}
                for i, call in enumerate(self.parser.calls[:self.kept] if self.parser else [])]


def _param(loc: tuple) -> str:
    """The field path of a validation error, e.g. "stream_options.include_usage" or "stop[1]", without the type
    tags pydantic adds inside unions."""
    path = str(loc[0]) if loc else "body"
    for x in loc[1:]:
        if isinstance(x, int):
            path += f"[{x}]"
        elif re.fullmatch(r"[a-z_]+", x) and x not in ("str", "int", "float", "bool", "list", "dict"):
            path += f".{x}"
        else:
            break
    return path


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = MAX_BODY_BYTES, worker_thread: bool = True,
               chat_format: ChatFormat = LEANSEEK_CHAT, max_request_tokens: int = MAX_REQUEST_TOKENS) -> FastAPI:
    """The app. chat_format: how the model writes conversations (leanseek's, or a Hugging Face folder's template
    and end-of-reply token: leanseek.data.chat.chat_format). worker_thread: run the engine loop in a thread
    started with the app; otherwise the caller runs app.state.worker.run() (leanseek serve does, in the main
    thread). max_request_tokens: the most tokens one request may ask to generate, all its choices together."""
    worker = EngineWorker(engine, max_queue)
    end = tokenizer.token_id(chat_format.end)
    if end is None:
        raise ValueError(f"the tokenizer has no token {chat_format.end!r} to end a reply")
    pieces = TokenPieces(tokenizer)
    parser = tool_parser(chat_format)
    # reply grammars write leanseek's replies (<think>...</think>ANSWER<|end|>), as its models before tools do too
    grammars = chat_format.end == END_OF_TURN and all(tokenizer.token_id(t) is not None for t in BASE_TOKENS)
    max_len = getattr(engine, "max_len", None)
    stats = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_sum": 0.0,
             "latency_count": 0, "ttft_sum": 0.0, "ttft_count": 0, "cached_tokens": 0}
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
        if first.get("type") == "json_invalid":
            return error_body(ApiError(400, "the body is not valid JSON", param="body"))
        where = _param(tuple(first.get("loc", ()))[1:])
        return error_body(ApiError(400, f"{where}: {first['msg']}", param=where))

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
            ("prompt_tokens_total", "counter", stats["prompt_tokens"], "prompt tokens received"),
            ("prefix_cache_hit_tokens_total", "counter", stats["cached_tokens"],
             "prompt tokens whose latents came from the prefix cache"),
            ("generation_tokens_total", "counter", stats["completion_tokens"], "tokens generated"),
            ("request_latency_seconds_sum", "counter", stats["latency_sum"], "total request latency"),
            ("request_latency_seconds_count", "counter", stats["latency_count"], "requests completed"),
            ("time_to_first_token_seconds_sum", "counter", stats["ttft_sum"], "total time to first token"),
            ("time_to_first_token_seconds_count", "counter", stats["ttft_count"], "first tokens"),
            ("queue_depth", "gauge", worker.waiting, "requests waiting for a slot"),
            ("running_requests", "gauge", worker.running, "requests decoding"),
            ("cache_usage", "gauge", engine.cache_usage(), "fraction of the latent cache that running requests hold"),
        ]:
            lines += [f"# HELP leanseek_{name} {help_}", f"# TYPE leanseek_{name} {kind}", f"leanseek_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------------------------ reading requests

    def check_common(req: Sampling) -> list[str]:
        """The model, the stop strings and the fields refused outright; returns the stop strings."""
        if req.model != model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found", kind="not_found_error")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        if req.logit_bias:
            raise ApiError(400, "logit_bias: not supported (only an empty map is accepted)", param="logit_bias")
        return stop

    def check_chat(req: ChatRequest) -> ReplySpec:
        """The request's fields besides the messages; the reply it asks for."""
        if req.functions:
            raise ApiError(400, "functions: OpenAI's deprecated form of tools; send tools", param="functions")
        if req.function_call not in (None, "none"):
            raise ApiError(400, "function_call: OpenAI's deprecated form of tool_choice; send tool_choice",
                           param="function_call")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        clash = sorted(set(req.chat_template_kwargs or {}) & TEMPLATE_NAMES.union(chat_format.context))
        if clash:
            raise ApiError(400, f"chat_template_kwargs.{clash[0]}: set by the server, not by the request",
                           param=f"chat_template_kwargs.{clash[0]}")
        try:
            tools = validate_tools(req.tools) if req.tools is not None else []
        except ChatError as e:
            raise ApiError(400, str(e), param=e.param or "tools") from None
        json_schema, any_json = read_response_format(req.response_format)
        return ReplySpec(tools, read_tool_choice(req.tool_choice, tools), req.parallel_tool_calls is not False,
                         json_schema, any_json)

    def chat_prompt(req: ChatRequest, spec: ReplySpec) -> tuple[list[int], str]:
        """The conversation's ids with the generation prompt, and the text the prompt opened the reply with."""
        try:
            messages = validate(req.messages, where="")
            history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
            if spec.tools or history:
                problem = chat_format.tools_error(tokenizer)
                if problem is None and spec.tools and parser is None:
                    problem = "this model's chat template writes tool calls in a format leanseek does not read"
                if problem:
                    raise ApiError(400, f"{'tools' if spec.tools else 'messages'}: {problem}",
                                   param="tools" if spec.tools else "messages")
            prompt = chat_format.encode(tokenizer, messages, add_generation_prompt=True, tools=spec.tools or None,
                                        **(req.chat_template_kwargs or {}))
        except ChatError as e:
            raise ApiError(400, str(e), param=getattr(e, "param", None) or "messages") from None
        except TemplateError as e:  # a Hugging Face template that refuses the conversation
            raise ApiError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
        except TypeError as e:  # a template given a value of a type it cannot use
            where = "chat_template_kwargs" if req.chat_template_kwargs else "messages"
            raise ApiError(400, f"{where}: the model's chat template failed on them: {e}", param=where) from None
        tail = tokenizer.decode(prompt[-3:]).rstrip()
        opened = THINK if tail.endswith(THINK) else ""
        if thinks(req) or tail.endswith(END_THINK) or spec.constrained:  # a grammar writes the closed block itself
            return prompt, opened
        closing = END_THINK if opened else THINK + END_THINK  # answer at once: close the think block
        return prompt + tokenizer.encode_markup(closing), opened + closing

    def thinks(req: ChatRequest) -> bool:
        """Whether the reply may reason (reasoning_effort "none" and "minimal" say no)."""
        effort = req.reasoning_effort or (req.reasoning.effort if req.reasoning else None)
        return effort not in ("none", "minimal")

    def completion_prompts(prompt: Any) -> list[tuple[list[int], str]]:
        """(ids, text) of each prompt: a string is text (a control token's spelling stays text); ids are taken as
        they are."""
        def ids_of(x: Any, where: str) -> list[int]:
            bad = [t for t in x if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"{where}: token ids {bad[:5]} are outside the vocabulary "
                                    f"(0..{tokenizer.vocab_size - 1})", param=where)
            return x

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str):
            prompts = [(tokenizer.encode(prompt), prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(zip(tokenizer.encode_batch(prompt), prompt))
        elif isinstance(prompt, list) and prompt and is_ids(prompt):
            prompts = [(ids_of(prompt, "prompt"), None)]
        elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
            prompts = [(ids_of(p, f"prompt[{i}]"), None) for i, p in enumerate(prompt)]
        else:
            raise ApiError(400, "prompt: a non-empty string, list of strings, list of token ids or list of token-id "
                                "lists", param="prompt")
        for i, (ids, _) in enumerate(prompts):
            if not ids:
                where = "prompt" if len(prompts) == 1 and isinstance(prompt, str) else f"prompt[{i}]"
                raise ApiError(400, f"{where}: empty", param=where)
        return [(ids, text if text is not None else tokenizer.decode(ids)) for ids, text in prompts]

    def sampling(req: Sampling, stop: list[str], prompts: list[list[int]], max_tokens: int | None, default: int,
                 max_name: str, prompt_name: str) -> dict:
        """The engine's parameters; checks each prompt against the context and the request against the budget."""
        n = req.n or 1
        sequences = n * len(prompts)
        longest = max(len(p) for p in prompts)
        if max_len is not None:
            if longest >= max_len:
                raise ApiError(400, f"{prompt_name}: {longest} tokens leave no room in the context of {max_len}",
                               param=prompt_name)
            if max_tokens is not None and longest + max_tokens > max_len:
                raise ApiError(400, f"{max_name}: the prompt ({longest} tokens) + {max_name} ({max_tokens}) "
                                    f"exceeds the context of {max_len}", param=max_name)
        if max_tokens is None:  # unnamed: as much as fits, up to the default
            max_tokens = max(1, min(default, max_request_tokens // sequences,
                                    default if max_len is None else max_len - longest))
        if sequences * max_tokens > max_request_tokens:
            count = f"{len(prompts)} prompts x n ({n})" if len(prompts) > 1 else f"n ({n})"
            raise ApiError(400, f"{'n' if n > 1 else max_name}: {count} x {max_name} ({max_tokens}) = "
                                f"{sequences * max_tokens} tokens, past this server's budget of {max_request_tokens} "
                                "per request", param="n" if n > 1 else max_name)
        capacity = engine.max_batch + worker.max_queue
        if sequences > capacity:
            raise ApiError(400, f"n: {sequences} sequences, more than this server holds at once ({capacity})",
                           param="n" if len(prompts) == 1 else "prompt")
        return {"max_new_tokens": max_tokens, "temperature": 1.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p, "presence_penalty": req.presence_penalty or 0.0,
                "frequency_penalty": req.frequency_penalty or 0.0, "stop": [end, *stop],
                "top_k": max(0, req.top_k or 0), "min_p": req.min_p or 0.0,
                "repetition_penalty": req.repetition_penalty or 1.0}

    async def constraint(spec: ReplySpec, think: bool, max_tokens: int) -> Grammar:
        """The grammar the reply keeps to, built off the event loop (constrain.py keeps the recent ones compiled:
        repeated schemas and tools cost nothing). The free text before what is enforced (reasoning, text before a
        call) gets at most a quarter of max_tokens each, so a model that rambles still writes its JSON or its call."""
        if not grammars:
            where = ("response_format" if spec.any_json else "tools" if spec.choice == "auto" else "tool_choice")
            raise ApiError(400, f"{where}: constrained decoding is written for leanseek's chat format, not this "
                                "model's", param=where)
        try:
            return await asyncio.to_thread(
                reply_grammar, tokenizer, "leanseek", json_schema=spec.json_schema, any_json=spec.any_json,
                tools=spec.tools if spec.calls else None, tool_choice=spec.choice, strict_tools=spec.strict,
                parallel=spec.parallel, think=think, free_tokens=max_tokens // 4)
        except ValueError as e:  # a schema the grammar library cannot compile
            where = await asyncio.to_thread(blame, spec)
            raise ApiError(400, f"{where}: cannot be enforced: {e}", param=where) from None

    def blame(spec: ReplySpec) -> str:
        """The field whose schema the grammar library refuses: each is compiled alone."""
        schemas = [("response_format.json_schema.schema", spec.json_schema)] if spec.json_schema is not None else []
        schemas += [(f"tools[{i}].function.parameters", t["function"].get("parameters"))
                    for i, t in enumerate(spec.tools) if t["function"]["name"] in spec.strict]
        for where, schema in schemas:
            try:
                Grammar.json(tokenizer, schema)
            except ValueError:
                return where
        return "response_format" if spec.any_json else "tools"

    # ------------------------------------------------------------------------------------------ endpoints

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        stop = check_common(req)
        spec = check_chat(req)
        prompt, opened = chat_prompt(req, spec)
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = sampling(req, stop, [prompt], req.max_completion_tokens or req.max_tokens, CHAT_MAX_TOKENS, name,
                          "messages")
        if req.logprobs:
            params["logprobs"] = req.top_logprobs or 0
        if spec.constrained:
            params["constraint"] = await constraint(spec, thinks(req), params["max_new_tokens"])
        return await respond(req, request, [(prompt, "")], params, stop, chat=True, prefix=opened, spec=spec)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        stop = check_common(req)
        if req.suffix:
            raise ApiError(400, "suffix: not supported", param="suffix")
        if req.best_of not in (None, req.n or 1):
            raise ApiError(400, "best_of: only equal to n (the server does not rank candidates)", param="best_of")
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt with echo",
                           param="max_tokens")
        prompts = completion_prompts(req.prompt)
        params = sampling(req, stop, [p for p, _ in prompts], req.max_tokens, COMPLETION_MAX_TOKENS, "max_tokens",
                          "prompt")
        if req.logprobs is not None:
            params["logprobs"] = req.logprobs
        if req.echo and (req.logprobs is not None or req.max_tokens == 0):
            params["prompt_logprobs"] = req.logprobs or 0  # the engine scores the prompt even if nothing is made
        return await respond(req, request, [(p, text if req.echo else "") for p, text in prompts], params, stop,
                             chat=False)

    # ------------------------------------------------------------------------------------------ responding

    def submit(prompts: list[tuple[list[int], str]], params: dict, stop: list[str], req: Sampling, chat: bool,
               prefix: str, spec: ReplySpec | None) -> list[Choice]:
        """Choice prompt_index * n + j is prompt prompt_index's j-th sample, seeded seed + j."""
        n = req.n or 1
        stats["requests"] += 1
        choices: list[Choice] = []
        try:
            for p, (prompt, echo) in enumerate(prompts):
                for j in range(n):
                    handle = worker.submit(prompt, {**params, "seed": None if req.seed is None else req.seed + j})
                    stream = TextStream(tokenizer, stop, chat, chat_format.end, prefix)
                    choices.append(Choice(p * n + j, prompt, handle, stream, echo, offset=len(echo), spec=spec,
                                          parser=parser() if spec and spec.tools else None))
        except QueueFull as e:
            release(choices)
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from None
        stats["prompt_tokens"] += sum(len(c.prompt) for c in choices)
        return choices

    def release(choices: list[Choice]) -> None:
        """Done with these requests (finished, failed, or their client left): cancel those still running."""
        for c in choices:
            if not c.released:
                c.released = True
                worker.done(c.handle)

    def take(c: Choice, event: Event) -> None:
        if event.logprobs:
            c.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            c.prompt_logprobs = event.prompt_logprobs

    async def first(c: Choice, prompt_name: str) -> Event:
        """The first event; a rejection (bad input found by the engine) becomes a 400."""
        event = await c.handle.events.get()
        if event.rejected:
            raise ApiError(400, event.error, param=prompt_name)
        stats["ttft_sum"] += time.perf_counter() - c.handle.submitted
        stats["ttft_count"] += 1
        c.cached = event.cached_tokens
        stats["cached_tokens"] += c.cached
        return event

    def finished(c: Choice) -> None:
        release([c])
        stats["latency_sum"] += time.perf_counter() - c.handle.submitted
        stats["latency_count"] += 1

    def finish_reason(stream: TextStream, max_tokens: int) -> str:
        stopped = stream.ids[-1:] == [end] or any(x in tokenizer.decode(stream.ids) for x in stream.stop)
        return "length" if len(stream.ids) >= max_tokens and not stopped else "stop"

    def usage(request: Request, prompts: list[tuple[list[int], str]], choices: list[Choice]) -> dict:
        """The body's usage (each prompt counted once, as OpenAI counts it, however many choices it has; its cached
        tokens those all its choices reused from the prefix cache), also left on request.state for the access log."""
        prompt = sum(len(p) for p, _ in prompts)
        completion = sum(len(c.stream.ids) for c in choices)
        n = len(choices) // len(prompts)
        cached = sum(min(c.cached for c in choices[i * n:(i + 1) * n]) for i in range(len(prompts)))
        request.state.usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def chat_logprobs(entries: list) -> dict:
        def one(token: int, logprob: float) -> dict:
            return {"token": pieces.text(token), "logprob": logprob, "bytes": list(pieces.bytes(token))}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries if e.token != end]}

    def legacy(c: Choice, tokens: list[int], entries: list, wants_logprobs: bool) -> tuple[str, dict | None]:
        """The text and OpenAI's legacy logprobs of these generated tokens, after the echoed prompt the first time
        (its first entry None: the first token has no context)."""
        text, prompt, prompt_entries = "", [], []
        if not c.echoed:
            c.echoed, text = True, c.echo
            if c.echo and c.prompt_logprobs is not None:
                prompt, prompt_entries = c.prompt, c.prompt_logprobs
        if not wants_logprobs:
            return text, None
        offsets = pieces.offsets(prompt) + pieces.offsets(tokens, c.offset)
        c.offset += pieces.chars(tokens)
        tokens, entries = prompt + tokens, prompt_entries + entries
        return text, {"tokens": [pieces.text(t) for t in tokens],
                      "token_logprobs": [e.logprob if e is not None else None for e in entries],
                      "top_logprobs": [{pieces.text(t): lp for t, lp in e.top} if e is not None else None
                                       for e in entries],
                      "text_offset": offsets}

    async def respond(req: Sampling, request: Request, prompts: list[tuple[list[int], str]], params: dict,
                      stop: list[str], chat: bool, prefix: str = "", spec: ReplySpec | None = None):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        prompt_name = "messages" if chat else "prompt"
        wants_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        choices = submit(prompts, params, stop, req, chat, prefix, spec)
        max_tokens = params["max_new_tokens"]
        if req.stream:  # the first event of each choice decides between a 400 and a stream
            firsts = []
            try:
                for c in choices:
                    firsts.append(await first(c, prompt_name))
            except BaseException:
                release(choices)
                raise
            return EventStream(events(req, request, rid, created, prompts, choices, firsts, chat, max_tokens,
                                      wants_logprobs))
        try:
            for c in choices:
                event = await first(c, prompt_name)
                while True:
                    c.stream.feed(event.tokens)
                    take(c, event)
                    if event.error:
                        raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
                    if event.finished:
                        break
                    event = await c.handle.events.get()
                finished(c)
        finally:
            release(choices)
        stats["completion_tokens"] += sum(len(c.stream.ids) for c in choices)
        body = []
        for c in choices:
            reasoning, content = c.stream.parts(final=True)
            finish = finish_reason(c.stream, max_tokens)
            if chat:
                content, _ = c.answer(content, final=True)
                calls = c.tool_calls()
                message = {"role": "assistant", "content": content or (None if calls else ""),
                           "reasoning_content": reasoning}
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
                out = {"message": message, "logprobs": chat_logprobs(c.logprobs) if wants_logprobs else None}
            else:
                echo, logprobs = legacy(c, c.stream.ids, c.logprobs, wants_logprobs)
                out = {"text": echo + content, "logprobs": logprobs}
            body.append({"index": c.index, **out, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": req.model, "choices": body, "usage": usage(request, prompts, choices)}

    async def events(req, request, rid, created, prompts, choices, firsts, chat, max_tokens,
                     wants_logprobs) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(c: Choice, delta: dict | None = None, finish: str | None = None, text: str = "",
                  logprobs: dict | None = None) -> str:
            choice = ({"index": c.index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish} if chat
                      else {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": req.model,
                                          "choices": [choice]}) + "\n\n"

        def tool_delta(c: Choice, d: ToolCallDelta) -> dict:
            """A call's first fragment names it (with its id); the others carry pieces of its arguments."""
            if d.name is None:
                return {"index": d.index, "function": {"arguments": d.arguments}}
            return {"index": d.index, "id": c.call_id(d.index), "type": "function",
                    "function": {"name": d.name, "arguments": d.arguments}}

        def pieces_of(c: Choice, event: Event, reasoning: str, content: str) -> list[str]:
            """This event's chunks; its tokens' log-probabilities ride on the first (an empty delta when the
            text is held back)."""
            if chat:
                logprobs = chat_logprobs(event.logprobs or []) if wants_logprobs else None
                if logprobs is not None and not logprobs["content"]:
                    logprobs = None
                content, calls = c.answer(content, final=event.finished)
                deltas = [d for d in ({"reasoning_content": reasoning} if reasoning else None,
                                      {"content": content} if content else None,
                                      {"tool_calls": [tool_delta(c, d) for d in calls]} if calls else None) if d]
                if logprobs and not deltas:
                    deltas = [{}]
                return [chunk(c, d, logprobs=logprobs if i == 0 else None) for i, d in enumerate(deltas)]
            echo, logprobs = legacy(c, event.tokens, event.logprobs or [], wants_logprobs)
            if logprobs is not None and not logprobs["tokens"]:
                logprobs = None
            return [chunk(c, text=echo + content, logprobs=logprobs)] if echo or content or logprobs else []

        pending = {c.index: e for c, e in zip(choices, firsts)}
        done = {c.index: False for c in choices}
        try:
            if chat:
                for c in choices:
                    yield chunk(c, {"role": "assistant", "content": ""})
            while not all(done.values()):
                for c in choices:
                    if done[c.index]:
                        continue
                    event = pending.pop(c.index, None) or await c.handle.events.get()
                    reasoning, content = c.stream.feed(event.tokens, final=event.finished)
                    take(c, event)
                    for piece in pieces_of(c, event, reasoning, content):
                        yield piece
                    if event.error:
                        yield "data: " + json.dumps({"error": {"message": event.error, "type": "server_error"}}) \
                              + "\n\n"
                    elif event.finished:
                        yield chunk(c, finish="tool_calls" if c.tool_calls() else finish_reason(c.stream, max_tokens))
                    if event.finished:
                        done[c.index] = True
                        finished(c)
                    if await request.is_disconnected():
                        return
            totals = usage(request, prompts, choices)
            if req.stream_options and req.stream_options.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": req.model,
                                             "choices": [], "usage": totals}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            release(choices)  # those not finished: the client left, cancel them
            stats["completion_tokens"] += sum(len(c.stream.ids) for c in choices)
            usage(request, prompts, choices)  # a client that left: what it got

    add_tool_routes(app, offer=chat_format.tools_error(tokenizer) is None)  # the web chat's built-in tools
    app.state.worker = worker
    app.add_middleware(RequestLog)  # outermost: ids and the access log cover every answer
    return app
