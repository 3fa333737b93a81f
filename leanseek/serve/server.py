"""`leanseek serve MODEL`: a model folder loaded on the chosen device, the engine stepping in the main thread and
the OpenAI-compatible HTTP API (leanseek.serve.app) answering in another; Ctrl-C stops both."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import uvicorn

from ..data.chat import chat_format
from ..data.tokenizer import TextTokenizer
from ..device import add_device_arguments, inference_dtype, use_device
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..train.checkpoint import checkpoint_of
from .app import create_app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder or checkpoint (a Hugging Face DeepseekV3/V2 folder with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY")
    p.add_argument("--name", help="the model id clients use (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded at once")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per sequence, prompt and reply")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond --max-batch (then 429)")
    p.add_argument("--compile", action="store_true", help="compiled decode steps (faster after a warm-up)")
    add_device_arguments(p)


def run(args) -> None:
    device = use_device(args)
    path = checkpoint_of(Path(args.model))
    model = load_hf(path, dtype=inference_dtype(device), device=device)
    tokenizer = TextTokenizer.load(path, strict=False)  # any DeepSeek-architecture folder
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len, compile=args.compile)
    name = args.name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, api_key=args.api_key, max_queue=args.max_queue, worker_thread=False,
                     chat_format=chat_format(path))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
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
