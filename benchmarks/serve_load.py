"""`leanseek serve` under load, with clients that misbehave: --clients streaming clients on loopback for a bounded
time, --bad of them misbehaving, then the same good requests one at a time, side by side in one run.

    .venv/bin/python benchmarks/serve_load.py [--model RUN_DIR | --preset tiny] [--clients 64] [--bad 8]
                                              [--seconds 30] [--max-tokens 64] [--timeout 10]

Each good request is a chat completion of at most --max-tokens tokens at temperature 1 (streamed, with
stream_options.include_usage for the token count). The misbehaving clients, in four classes taken in turn:
  disconnect   streams a request and leaves after its first token
  one byte/s   sends a request's headers (or, every other client, its body) one byte a second
  bad JSON     sends a malformed JSON body
  1 MiB        sends a prompt of 1 MiB (with a Content-Length, or, every other client, chunked)
Reports errors among the good clients (must be 0), their generated tokens/s and p50/p99 time to first token, what
each misbehaving class got, and the slots /metrics shows held once every client has stopped (must be 0).

The server is `leanseek serve --max-batch CLIENTS --timeout TIMEOUT` in a process of its own (the clients' Python
would otherwise share its interpreter lock), so the concurrent clients share continuous-batching decode steps; its
access log goes to a temporary file, summarised at the end.
"""

import argparse
import asyncio
import collections
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

BAD = ["disconnect", "one byte/s", "bad JSON", "1 MiB"]


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


async def trickle(port: int, head: bytes, body: bytes, slow_body: bool) -> str:
    """Send a request a byte a second (the headers, or only the body) until the server answers or closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if slow_body:
            writer.write(head)
        for byte in (body if slow_body else head + body):
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(4096), 1.0)
            except asyncio.TimeoutError:
                continue
            return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
        return "never cut"
    except ConnectionError:
        return "closed"
    finally:
        writer.close()


async def misbehave(kind: str, variant: int, port: int, body: dict, deadline: float, outcomes: collections.Counter,
                    held: list[float]) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    data = json.dumps(body).encode()
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(10_000):  # bounded in count as well as time
            if time.perf_counter() >= deadline:
                return
            start = time.perf_counter()
            try:
                if kind == "disconnect":
                    async with client.stream("POST", url, json=body) as r:
                        async for line in r.aiter_lines():
                            if '"content"' in line or '"reasoning_content"' in line:
                                break
                        outcome = f"{r.status_code}, left"
                elif kind == "one byte/s":
                    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(data))
                    outcome = await trickle(port, head, data, slow_body=variant % 2 == 1)
                    held.append(time.perf_counter() - start)
                elif kind == "bad JSON":
                    r = await client.post(url, content=data[: len(data) // 2],
                                          headers={"content-type": "application/json"})
                    outcome = str(r.status_code)
                    await asyncio.sleep(0.05)
                else:
                    big = json.dumps({**body, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
                    async def chunked():
                        yield big[: 1 << 19]
                        yield big[1 << 19:]

                    content = big if variant % 2 == 0 else chunked()
                    r = await client.post(url, content=content, headers={"content-type": "application/json"})
                    outcome = str(r.status_code)
                    await asyncio.sleep(0.2)
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            outcomes[outcome] += 1


async def load(port: int, clients: int, bad: int, seconds: float, body: dict) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    ttfts, tokens, errors = [], 0, []
    deadline = time.perf_counter() + seconds

    async def client_loop(client):
        nonlocal tokens
        while time.perf_counter() < deadline:
            try:
                t, n = await one(client, url, body)
                ttfts.append(t)
                tokens += n
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"{type(e).__name__}: {e}"[:200])

    outcomes = {kind: collections.Counter() for kind in BAD}
    held: list[float] = []
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients - bad)),
                             *(misbehave(BAD[i % 4], i // 4, port, body, deadline, outcomes[BAD[i % 4]], held)
                               for i in range(bad)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=100) if len(ttfts) > 1 else [ttfts[0]] * 99 if ttfts else [0] * 99
    return {"requests": len(ttfts), "errors": errors, "tok_s": tokens / wall, "p50": q[49], "p99": q[98],
            "outcomes": outcomes, "held": held}


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^leanseek_(\w+) (\S+)$", text, re.MULTILINE)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a run folder (default: a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients, the misbehaving ones included")
    ap.add_argument("--bad", type=int, default=8, help="misbehaving clients among them (the four kinds in turn)")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=10, help="the server's --timeout")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not 0 <= args.bad < args.clients:
        ap.error("--bad must be at least 0 and fewer than --clients")
    torch.set_num_threads(args.threads)

    import leanseek
    from leanseek.data import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as log:
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
                                   "--max-queue", str(args.clients), "--threads", str(args.threads),
                                   "--timeout", str(args.timeout)],
                                  stdout=subprocess.DEVNULL, stderr=log)
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me about the fox."}],
                    "max_tokens": args.max_tokens, "temperature": 1.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            asyncio.run(load(port, 1, 0, 3, body))  # warm-up
            concurrent = asyncio.run(load(port, args.clients, args.bad, args.seconds, body))
            settle = time.perf_counter()  # every client has stopped: the slots must all come free
            while (time.perf_counter() - settle < 5
                   and (m := metrics(port))["running_requests"] + m["queue_depth"] > 0):
                time.sleep(0.1)
            end = metrics(port)
            serial = asyncio.run(load(port, 1, 0, args.seconds, body))
            params = leanseek.load_hf(path).cfg.param_counts()
        finally:
            server.terminate()
            server.wait(timeout=30)
        log.seek(0)
        access = collections.Counter(m[1] for m in re.finditer(r" (\d{3}|-) tokens=\S+ .* id=\S+", log.read()))
    good = args.clients - args.bad
    print(f"# {args.clients} streaming clients ({args.bad} misbehaving) for {args.seconds:.0f} s on loopback, "
          f"{params}, <= {args.max_tokens} tokens per reply, {args.threads} threads, server --timeout "
          f"{args.timeout:g}, torch {torch.__version__}")
    print(f"{'load':<26} {'requests':>8} {'errors':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
    for name, r in ((f"{good} good of {args.clients}", concurrent), ("one at a time", serial)):
        print(f"{name:<26} {r['requests']:>8} {len(r['errors']):>6} {r['tok_s']:>8,.0f} {r['p50'] * 1e3:>7.0f}ms "
              f"{r['p99'] * 1e3:>7.0f}ms")
    for e in concurrent["errors"][:5]:
        print(f"  error: {e}")
    print(f"aggregate throughput: {concurrent['tok_s'] / serial['tok_s']:.2f}x one at a time")
    if args.bad:
        print("misbehaving clients (what they got: count):")
        for kind, got in concurrent["outcomes"].items():
            extra = (f"; held {min(concurrent['held']):.1f}-{max(concurrent['held']):.1f} s each"
                     if kind == "one byte/s" and concurrent["held"] else "")
            print(f"  {kind:<12} " + ", ".join(f"{k}: {v}" for k, v in sorted(got.items())) + extra)
    stuck = end["running_requests"] + end["queue_depth"]
    print(f"after the clients stopped: /metrics running_requests {end['running_requests']:g}, queue_depth "
          f"{end['queue_depth']:g}, cache_usage {end['cache_usage']:g}; stuck slots {stuck:g}")
    print("server access log, lines by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(access.items())))


if __name__ == "__main__":
    main()
