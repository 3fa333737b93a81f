"""The limits of a public server (leanseek.serve.limits), on a real uvicorn on 127.0.0.1 with raw sockets for the
clients that misbehave: header, body and keep-alive timeouts, a stalled reader cut and its slot freed, 503 past
the connection cap, request ids on every answer, one access-log line per request, the open-network warning."""

import argparse
import json
import logging
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import LiveServer, ScriptedEngine

from leanseek.data import train_tokenizer
from leanseek.serve import create_app
from leanseek.serve import server as serve_cli
from leanseek.serve.limits import RequestLog, server_config

TEXTS = ["What is the sum of numbers? A harbor is a port. Be brief and think about it."] * 50
CHAT = [{"role": "user", "content": "What is a harbor?"}]
TIMEOUT = 0.5
GENERATED_ID = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(TEXTS), 300)


class Server(LiveServer):
    """create_app over a scripted engine, served by uvicorn with the connection layer's limits."""

    def __init__(self, tok, reply: str = " harbor" * 3, delay: float = 0.001, **limits):
        self.engine = ScriptedEngine([tok.encode_markup("<think></think>" + reply + "<|end|>")], delay=delay)
        limits = {"timeout": TIMEOUT, "keep_alive": 5.0, "max_connections": 16, **limits}
        app = create_app(self.engine, tok, "micro")
        super().__init__(app, lambda port: server_config(app, port=port, log_level="error", **limits))

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so that the window the server sees is small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def wait_idle(self, seconds: float = 5.0) -> None:
        """Until the engine and the worker hold no request."""
        worker, start = self.app.state.worker, time.perf_counter()
        while (self.engine.pending or worker._inflight or worker.running) and time.perf_counter() - start < seconds:
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tok):
    with Server(tok) as s:
        yield s


def read_until_closed(sock: socket.socket, limit: float = 5.0) -> bytes:
    sock.settimeout(limit)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def trickle(sock: socket.socket, data: bytes, every: float = 0.1, limit: float = 5.0) -> tuple[bytes, float]:
    """Send one byte every `every` seconds until the server closes the connection; what it said, and when."""
    start, got = time.perf_counter(), b""
    sock.settimeout(every)
    for byte in data:
        assert time.perf_counter() - start < limit, "the server held a trickling client past the limit"
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:  # reset: the server closed while bytes were in flight
            break
        got += chunk
        if not chunk:
            break
    else:
        pytest.fail("the client ran out of bytes before the server closed the connection")
    try:
        got += read_until_closed(sock)
    except OSError:
        pass
    return got, time.perf_counter() - start


def read_response(sock: socket.socket, limit: float = 5.0) -> bytes:
    """One response with a Content-Length, whole."""
    sock.settimeout(limit)
    got = b""
    while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(header(got, "content-length")):
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return got


def header(response: bytes, name: str) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    found = re.search(rf"^{name}: *(.*?)\r?$", head, re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


def test_headers_sent_a_byte_at_a_time_are_cut_off(server):
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 200
    with server.connect() as sock:
        got, seconds = trickle(sock, request)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert b'"code": "request_timeout"' in got and GENERATED_ID.fullmatch(header(got, "x-request-id"))
    assert TIMEOUT * 0.8 < seconds < TIMEOUT + 1.5
    with server.connect() as sock:  # a connection that says nothing is closed too, without an answer
        start = time.perf_counter()
        assert read_until_closed(sock) == b""
        assert time.perf_counter() - start < TIMEOUT + 1.5
    assert httpx.get(server.url + "/health").status_code == 200


def logged(caplog, rid: str, seconds: float = 3.0) -> str:
    """The access-log line of request `rid`, written as its response ends (just after the client has it)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        lines = [r.getMessage() for r in caplog.records if r.name == "leanseek.access"
                 and f"id={rid}" in r.getMessage()]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.02)
    raise AssertionError(f"no access-log line for {rid}: {[r.getMessage() for r in caplog.records]}")


def test_a_body_sent_a_byte_at_a_time_gets_a_408(server, caplog):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: 400\r\nx-request-id: slow-body\r\n\r\n")
    caplog.set_level(logging.INFO, logger="leanseek.access")
    with server.connect() as sock:
        sock.sendall(head)
        got, seconds = trickle(sock, b'{"model": "micro", "messages": ' + b" " * 360)
        server.wait_idle()
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert header(got, "x-request-id") == "slow-body" and header(got, "connection") == "close"
    assert b"did not arrive in time" in got and got.count(b"HTTP/1.1") == 1  # the app's own answer is dropped
    assert seconds < TIMEOUT + 1.5
    assert logged(caplog, "slow-body").split()[1:4] == ["POST", "/v1/chat/completions", "408"]


def test_idle_keep_alive_connections_close(tok):
    with Server(tok, keep_alive=0.3) as s, s.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        start = time.perf_counter()
        got = read_until_closed(sock)
        assert got.startswith(b"HTTP/1.1 200 ") and time.perf_counter() - start < 2


def test_a_body_answered_early_neither_holds_the_connection_nor_cuts_the_next_request(tok):
    """A body over the limit is answered 413 before it is read; the client sends it all the same. The connection
    must then close when idle (no keep-alive timer was armed: the body's bytes came after the answer), and a next
    request on it has a deadline of its own, not the first one's."""
    big = 1_100_000
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % big)
    with Server(tok, keep_alive=0.5) as s:
        with s.connect() as sock:
            sock.sendall(head)
            assert read_response(sock).startswith(b"HTTP/1.1 413 ")
            sock.sendall(b" " * big)
            start = time.perf_counter()
            assert read_until_closed(sock) == b""
            assert time.perf_counter() - start < 2
        with s.connect() as sock:
            start = time.perf_counter()
            sock.sendall(head)
            assert read_response(sock).startswith(b"HTTP/1.1 413 ")
            sock.sendall(b" " * big)
            time.sleep(max(0.0, start + 0.35 - time.perf_counter()))
            for piece in [b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"]:  # 0.2 s of 0.5
                sock.sendall(piece)
                time.sleep(0.1)
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^leanseek_{name} (\S+)$", text, re.MULTILINE).group(1))


def test_a_stream_whose_client_stops_reading_is_cut_and_its_slot_freed(tok, caplog):
    """A reply of 20000 tokens, which would take 20 s or more; the client reads its headers and stops: once the
    send buffers are full the stream is cut after TIMEOUT, the generation cancelled, the slot free. The server's
    kernel send buffer is made small, as the client's receive buffer is: loopback's autotuned 4 MiB would take
    20000 tokens to fill."""
    caplog.set_level(logging.INFO, logger="leanseek.access")
    body = (b'{"model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, '
            b'"stream": true}')
    with Server(tok, reply=" harbor" * 20000) as s, s.connect(rcvbuf=4096) as sock:
        while not s.server.server_state.connections:
            time.sleep(0.01)
        for protocol in s.server.server_state.connections:
            protocol.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"x-request-id: stalled\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(256).startswith(b"HTTP/1.1 200 ")
        start = time.perf_counter()
        while not s.engine.cancelled and time.perf_counter() - start < 15:
            time.sleep(0.05)
        assert s.engine.cancelled == 1, "the stalled stream was not cut"
        s.wait_idle()
        assert not s.engine.pending and not s.app.state.worker._inflight
        assert metric(s, "running_requests") == 0 and metric(s, "queue_depth") == 0
        try:  # the connection is gone: what the buffers held, then a reset or the end (not a timeout)
            read_until_closed(sock, limit=2.0)
        except ConnectionResetError:
            pass
        line = logged(caplog, "stalled").split()
        assert line[3] == "200" and line[-1] == "incomplete"
        s.engine.replies = [tok.encode_markup("<think></think> harbor<|end|>")]  # and the server serves on
        assert httpx.post(s.url + "/v1/chat/completions", json={"model": "micro", "messages": CHAT,
                                                                "max_tokens": 5}).status_code == 200


def test_connections_past_the_limit_get_a_503(tok):
    with Server(tok, max_connections=2) as s:
        held = [s.connect(), s.connect()]
        for sock in held:  # served, and kept open
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        with s.connect() as third:
            third.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nx-request-id: third\r\n\r\n")
            got = read_until_closed(third)
        assert got.startswith(b"HTTP/1.1 503 "), got
        assert b"limit of 2 open connections" in got and header(got, "retry-after") == "1"
        assert header(got, "x-request-id") == "third" and header(got, "connection") == "close"
        held.pop().close()
        start = time.perf_counter()
        while time.perf_counter() - start < 3:  # the freed place is given to the next connection
            try:
                if httpx.get(s.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("no place was freed")
        held[0].close()


def test_every_answer_carries_a_request_id(server):
    ok = httpx.get(server.url + "/health")
    assert ok.status_code == 200 and GENERATED_ID.fullmatch(ok.headers["x-request-id"])
    assert httpx.get(server.url + "/health").headers["x-request-id"] != ok.headers["x-request-id"]
    echoed = httpx.get(server.url + "/health", headers={"x-request-id": "client-7f3a:1"})
    assert echoed.headers["x-request-id"] == "client-7f3a:1"
    for bad in ["two words", "x" * 129, "a\tb", ""]:  # not echoed: replaced by a new id
        r = httpx.get(server.url + "/health", headers={"x-request-id": bad})
        assert GENERATED_ID.fullmatch(r.headers["x-request-id"]), bad
    malformed = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "micro", "messages": [',
                           headers={"content-type": "application/json", "x-request-id": "m-1"})
    assert malformed.status_code == 400 and malformed.headers["x-request-id"] == "m-1"
    with server.connect() as sock:  # not HTTP at all: uvicorn's 400, with an id too
        sock.sendall(b"HELLO THERE\r\n\r\n")
        got = read_until_closed(sock)
    assert got.startswith(b"HTTP/1.1 400 ") and GENERATED_ID.fullmatch(header(got, "x-request-id")), got
    for r in [httpx.get(server.url + "/nowhere"),
              httpx.post(server.url + "/v1/chat/completions", json={"model": "other", "messages": CHAT})]:
        assert r.status_code == 404 and GENERATED_ID.fullmatch(r.headers["x-request-id"])


LINE = re.compile(r"127\.0\.0\.1 (\S+) (\S+) (\d+) tokens=(\S+) (\d+\.\d{3})s id=(\S+)( incomplete)?")


def test_one_access_log_line_per_request(server, caplog):
    caplog.set_level(logging.INFO, logger="leanseek.access")
    plain = httpx.post(server.url + "/v1/chat/completions", headers={"x-request-id": "log-1"},
                       json={"model": "micro", "messages": CHAT, "max_tokens": 8})
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"x-request-id": "log-2"},
                      json={"model": "micro", "messages": CHAT, "max_tokens": 8, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        streamed = json.loads([line for line in r.iter_lines() if '"usage"' in line][0][6:])["usage"]
    bad = httpx.post(server.url + "/v1/completions", headers={"x-request-id": "log-3"},
                     json={"model": "micro", "prompt": "hi", "max_tokens": -1})
    httpx.get(server.url + "/health", headers={"x-request-id": "log-4"})
    httpx.get(server.url + "/a%0Ab%20c", headers={"x-request-id": "log-5"})  # decoded, it would break the line
    lines = {rid: LINE.fullmatch(logged(caplog, rid)) for rid in ["log-1", "log-2", "log-3", "log-4", "log-5"]}
    assert all(m is not None and float(m.group(5)) < 10 and m.group(7) is None for m in lines.values()), lines
    usage = plain.json()["usage"]
    assert lines["log-1"].group(1, 2, 3, 4) == ("POST", "/v1/chat/completions", "200",
                                                 f"{usage['prompt_tokens']}/{usage['completion_tokens']}")
    assert lines["log-2"].group(3, 4) == ("200", f"{streamed['prompt_tokens']}/{streamed['completion_tokens']}")
    assert bad.status_code == 400 and lines["log-3"].group(1, 2, 3, 4) == ("POST", "/v1/completions", "400", "-")
    assert lines["log-4"].group(1, 2, 3, 4) == ("GET", "/health", "200", "-")
    assert lines["log-5"].group(1, 2, 3) == ("GET", "/a%0Ab%20c", "404")


@pytest.mark.parametrize("host,api_key,warns", [
    ("0.0.0.0", None, True), ("::", None, True), ("[::]", None, True), ("192.168.1.20", None, True),
    ("myhost.example", None, True), ("0.0.0.0", "sekret", False), ("127.0.0.1", None, False),
    ("127.0.0.2", None, False), ("::1", None, False), ("localhost", None, False)])
def test_serving_beyond_loopback_without_a_key_warns(host, api_key, warns):
    warning = serve_cli.open_network_warning(host, api_key)
    assert (warning is not None) == warns
    if warns:
        assert host in warning and "--api-key" in warning


def test_leanseek_serve_prints_the_warning_before_loading(tmp_path, capsys):
    """The CLI path, stopped at loading a model that is not there (nothing binds a port)."""
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    args = p.parse_args([str(tmp_path / "missing"), "--host", "0.0.0.0", "--device", "cpu"])
    assert (args.timeout, args.keep_alive, args.max_connections, args.access_log) == (30.0, 5.0, 512, True)
    with pytest.raises((Exception, SystemExit)):
        serve_cli.run(args)
    assert "without --api-key" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--timeout must be positive"):
        serve_cli.run(p.parse_args([str(tmp_path), "--timeout", "0"]))


def test_an_unexpected_exception_is_a_500_with_the_id_in_body_and_log(caplog):
    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    caplog.set_level(logging.INFO, logger="leanseek.access")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(RequestLog(broken), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/x", headers={"x-request-id": "boom"})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom" and "boom" in r.json()["error"]["message"]
    failed = [rec for rec in caplog.records if rec.getMessage() == "request boom failed"]
    assert failed and "a bug" in str(failed[0].exc_info[1])
    assert logged(caplog, "boom").split()[1:4] == ["GET", "/x", "500"]
