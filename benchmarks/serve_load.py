"""`leanseek serve` under load: 32 concurrent streaming clients on loopback for a bounded time, against the same
requests sent one at a time, side by side in one run. Reports errors, aggregate generated tokens/s and p50/p99
time to first token.

    .venv/bin/python benchmarks/serve_load.py [--model RUN_DIR | --preset tiny] [--clients 32] [--seconds 30]

Each request is a chat completion of at most --max-tokens tokens at temperature 1 (streamed, with
stream_options.include_usage for the token count). The server is `leanseek serve --max-batch CLIENTS` in a process
of its own (the clients' Python would otherwise share its interpreter lock), so the concurrent clients share
continuous-batching decode steps.
"""

import argparse
import asyncio
import json
import statistics
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import torch


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(time to first token, generated tokens) of one streamed request."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                      for c in chunk["choices"]):
                ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def load(url: str, clients: int, seconds: float, body: dict) -> dict:
    ttfts, tokens, errors = [], 0, 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client):
        nonlocal tokens, errors
        while time.perf_counter() < deadline:
            try:
                t, n = await one(client, url, body)
                ttfts.append(t)
                tokens += n
            except Exception:  # noqa: BLE001 - counted
                errors += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=100) if len(ttfts) > 1 else [ttfts[0]] * 99 if ttfts else [0] * 99
    return {"requests": len(ttfts), "errors": errors, "tok_s": tokens / wall, "p50": q[49], "p99": q[98]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a run folder (default: a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import leanseek
    from leanseek.data import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:  # a random model with a small tokenizer, saved as a run would be
            tok = train_tokenizer(iter(["The quick brown fox jumps over the lazy dog. " * 20] * 20), 512)
            torch.manual_seed(0)
            leanseek.save_hf(leanseek.Transformer(leanseek.ModelConfig.preset(args.preset,
                                                                              vocab_size=tok.vocab_size)), tmp)
            tok.save(tmp)
            path = tmp
        with socket.socket() as probe:  # a free port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "leanseek", "serve", path, "--port", str(port), "--name",
                                   "bench", "--max-batch", str(args.clients), "--max-len", str(128 + args.max_tokens),
                                   "--max-queue", str(args.clients), "--threads", str(args.threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me about the fox."}],
                    "max_tokens": args.max_tokens, "temperature": 1.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            asyncio.run(load(url, 1, 3, body))  # warm-up
            concurrent = asyncio.run(load(url, args.clients, args.seconds, body))
            serial = asyncio.run(load(url, 1, args.seconds, body))
            params = leanseek.load_hf(path).cfg.param_counts()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"# {args.clients} streaming clients for {args.seconds:.0f} s on loopback, {params}, "
          f"<= {args.max_tokens} tokens per reply, {args.threads} threads, torch {torch.__version__}")
    print(f"{'load':<22} {'requests':>8} {'errors':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
    for name, r in ((f"{args.clients} concurrent", concurrent), ("one at a time", serial)):
        print(f"{name:<22} {r['requests']:>8} {r['errors']:>6} {r['tok_s']:>8,.0f} {r['p50'] * 1e3:>7.0f}ms "
              f"{r['p99'] * 1e3:>7.0f}ms")
    print(f"aggregate throughput: {concurrent['tok_s'] / serial['tok_s']:.2f}x one at a time")


if __name__ == "__main__":
    main()
