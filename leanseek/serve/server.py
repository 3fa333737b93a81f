"""`leanseek serve MODEL`: a model folder loaded on the chosen device, the engine stepping in the main thread and
the OpenAI-compatible HTTP API (leanseek.serve.app) answering in another, behind the limits of
leanseek.serve.limits (timeouts, a connection cap, request ids, the access log); Ctrl-C stops both."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import threading
import time
from pathlib import Path

import uvicorn

from ..data.chat import chat_format
from ..data.tokenizer import TextTokenizer
from ..device import (add_compile_argument, add_device_arguments, add_prefix_cache_argument, add_quantize_argument,
                      inference_dtype, quantize_mode, use_device, wants_compile)
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..train.checkpoint import checkpoint_of
from .app import MAX_REQUEST_TOKENS, create_app
from .limits import server_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder or checkpoint (a Hugging Face DeepseekV3/V2 folder with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY")
    p.add_argument("--name", help="the model id clients use (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded at once")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per sequence, prompt and reply")
    p.add_argument("--cache-tokens", type=int, metavar="N",
                   help="positions the paged latent cache holds for all requests together (default: max-batch x "
                        "max-len); a request waits until its prompt + max_tokens fits")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond --max-batch (then 429)")
    p.add_argument("--max-request-tokens", type=int, default=MAX_REQUEST_TOKENS, metavar="N",
                   help="the most tokens one request may ask to generate, prompts x n x max_tokens (past it: a 400 "
                        "naming n or max_tokens; default: %(default)d)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request must arrive in full (headers and body) within SECONDS of its first byte (else 408 "
                        "and the connection closed), and a stream whose client reads nothing for SECONDS is cut and "
                        "its generation cancelled (default: %(default)g)")
    p.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="close a connection idle between requests for SECONDS (default: %(default)g)")
    p.add_argument("--max-connections", type=int, default=512, metavar="N",
                   help="open connections served at once; more are answered 503 and closed (default: %(default)d)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr: client, method, path, status, tokens (prompt/completion), "
                        "latency, request id (the response's x-request-id); on unless --no-access-log")
    add_device_arguments(p)
    add_compile_argument(p)
    add_prefix_cache_argument(p)
    add_quantize_argument(p)


def open_network_warning(host: str, api_key: str | None) -> str | None:
    """The warning `leanseek serve` prints when it listens beyond this machine without an API key."""
    if api_key:
        return None
    try:
        local = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        return None
    return (f"warning: serving on {host} without --api-key: anyone who can reach this port can use the API; "
            f"set --api-key KEY (clients send Authorization: Bearer KEY) or serve on 127.0.0.1")


def log_to_stderr(access_log: bool) -> None:
    """The access log (leanseek.access) on stderr; with access_log off, only its warnings (cut clients)."""
    logger = logging.getLogger("leanseek.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if access_log else logging.WARNING)
    logger.propagate = False


def run(args) -> None:
    for flag, value in (("--timeout", args.timeout), ("--keep-alive", args.keep_alive),
                        ("--max-connections", args.max_connections), ("--max-request-tokens", args.max_request_tokens)):
        if not value > 0:
            sys.exit(f"{flag} must be positive, not {value}")
    if args.cache_tokens is not None and args.cache_tokens < args.max_len:
        sys.exit(f"--cache-tokens ({args.cache_tokens}) must hold at least one sequence of --max-len ({args.max_len})")
    if (warning := open_network_warning(args.host, args.api_key)) is not None:
        print(warning, file=sys.stderr)
    device = use_device(args)
    path = checkpoint_of(Path(args.model))
    model = load_hf(path, dtype=inference_dtype(device), device=device, quantize=quantize_mode(args, device))
    tokenizer = TextTokenizer.load(path, strict=False)  # any DeepSeek-architecture folder
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len,
                    compile=wants_compile(args, device, model.cfg.v4), cache_tokens=args.cache_tokens,
                    prefix_cache=args.prefix_cache)
    engine.warm_up()
    name = args.name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, api_key=args.api_key, max_queue=args.max_queue, worker_thread=False,
                     chat_format=chat_format(path), max_request_tokens=args.max_request_tokens)
    log_to_stderr(args.access_log)
    server = uvicorn.Server(server_config(app, args.host, args.port, timeout=args.timeout, keep_alive=args.keep_alive,
                                          max_connections=args.max_connections, log_level="warning"))
    server.install_signal_handlers = lambda: None  # Ctrl-C reaches the main thread, which stops both
    http = threading.Thread(target=server.run, daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            sys.exit(f"could not serve on {args.host}:{args.port} (is the port in use?)")
        time.sleep(0.05)
    print(f"serving {path} as {name!r} on http://{args.host}:{args.port} (OpenAI API at /v1), "
          f"{str(engine.dtype).removeprefix('torch.')} on {device}")
    try:
        app.state.worker.run()  # the engine in the main thread (see leanseek.serve.worker)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
