"""Limits a public server needs, in two layers.

The connection layer (`server_config`: uvicorn's h11 protocol with timers, which `leanseek serve` uses) bounds what
one client can hold: a request must arrive in full, headers and body, within `timeout` seconds of its first byte (of its
opening, for a new connection), so a client sending a byte a second is cut off; a response whose client
reads nothing for `timeout` seconds (the send buffer stays full) is cut, which cancels its generation and frees its
slot; connections beyond `max_connections` are answered 503 and closed; idle keep-alive connections close after
`keep_alive` seconds (uvicorn's own timer).

The ASGI layer (`RequestLog`, which create_app installs) gives every request an id (the `x-request-id` header of
the response, a client's own echoed when well-formed), writes one access-log line per request (logger
"leanseek.access"), answers 408 to a body that misses the connection layer's deadline, and turns an unexpected
exception into a 500 error body with the id (the traceback goes to the log under the same id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("leanseek.access")

DEADLINE = "leanseek.request_deadline"  # scope["extensions"] key: {"at": event-loop time the body must be in by}
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")  # echoed only when it cannot garble a log line


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is 1-128 characters of [A-Za-z0-9._:/+=@-]; otherwise a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            sent = value.decode("latin-1")
            if _CLIENT_ID.fullmatch(sent):
                return sent
    return f"req_{uuid.uuid4().hex}"


def _access_line(client, method: str, path: str, status: int | None, usage: dict | None, seconds: float, rid: str,
                 note: str = "") -> str:
    """`client method path status tokens=prompt/completion latency id=...`, "-" where a field is unknown."""
    tokens = f"{usage.get('prompt_tokens', '-')}/{usage.get('completion_tokens', '-')}" if usage else "-"
    host = client[0] if client else "-"
    path = path.encode("unicode_escape").decode("ascii")  # a control character cannot break the line
    return (f"{host} {method} {path} {status if status is not None else '-'} tokens={tokens} {seconds:.3f}s "
            f"id={rid}{' ' + note if note else ''}")


def _error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


async def _answer(send, status: int, body: bytes, close: bool = False, extra: tuple = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:  # the rest of the request is unread: the connection cannot carry another one
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestLog:
    """ASGI middleware: request ids, the access log, the body deadline, and 500s with an id (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = _request_id(scope["headers"])
        deadline = scope.get("extensions", {}).get(DEADLINE, {}).get("at")
        loop = asyncio.get_running_loop()
        body_in = deadline is None
        status, complete, answered, left = None, False, False, False  # left: the client went before the end

        async def send_with_id(message) -> None:
            nonlocal status, complete
            if answered:  # already answered 408: what the app says after is dropped
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def receive_in_time():
            nonlocal body_in, answered, left
            if body_in:
                message = await receive()
                left = left or (message["type"] == "http.disconnect" and not complete)
                return message
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                body_in = True
                if status is None:
                    await _answer(send_with_id, 408, _error_body("the request's body did not arrive in time",
                                                                 "request_timeout"), close=True)
                    answered = True
                return {"type": "http.disconnect"}  # the app stops reading and gives up
            body_in = message["type"] != "http.request" or not message.get("more_body", False)
            left = left or message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, receive_in_time, send_with_id)
        except Exception:  # noqa: BLE001 - answered and logged here with the request's id
            log.exception("request %s failed", rid)
            if status is None:
                await _answer(send_with_id, 500, _error_body(f"internal error (request id {rid})", "internal_error",
                                                             "server_error"))
        finally:
            path = scope.get("raw_path") or scope["path"].encode()  # as sent: a decoded %0A would forge a line
            log.info(_access_line(scope.get("client"), scope["method"], path.decode("latin-1"), status,
                                  scope.get("state", {}).get("usage"), time.perf_counter() - start, rid,
                                  "incomplete" if status is not None and (left or not complete) else ""))


def _refuse_all(limit: int):
    """The ASGI app that answers every request on a connection past the limit."""

    async def refuse(scope, receive, send) -> None:
        await _answer(send, 503, _error_body(f"the server holds its limit of {limit} open connections; retry later",
                                             "too_many_connections", "server_error"),
                      close=True, extra=((b"retry-after", b"1"),))

    return refuse


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection layer's limits (module docstring); `server_config` makes a
    subclass with `timeout` and `max_connections` set."""

    timeout: float = 30.0
    max_connections: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.admitted = True
        self._deadline: float | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None:
            held = sum(1 for c in self.connections if c is not self and getattr(c, "admitted", False))
            if held >= self.max_connections:
                self.admitted = False
                self.app = RequestLog(_refuse_all(self.max_connections))
        self._start_clock()

    def connection_lost(self, exc) -> None:
        self._stop_clock()
        if self._write_timer is not None:
            self._write_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._request_timer is None and self.conn.their_state is h11.IDLE:  # a new request's first byte
            self._start_clock()
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._deadline is not None:  # a new request: RequestLog holds its body to it
            self.scope.setdefault("extensions", {})[DEADLINE] = {"at": self._deadline}
        if self.conn.their_state is h11.SEND_BODY:
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request (pipelined too)
            if self._request_timer is None:
                self._start_clock()
            return
        self._stop_clock()  # the request is all in, or the client has gone
        if self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None:
            # answered before its body was read (413, 411): now idle, with no keep-alive timer armed after the answer
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.timeout, self._reader_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _start_clock(self) -> None:
        self._deadline = self.loop.time() + self.timeout
        self._request_timer = self.loop.call_at(self._deadline, self._request_late)

    def _stop_clock(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = self._deadline = None

    def _request_late(self) -> None:
        self._request_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # the headers never came in full
            if self.conn.trailing_data[0]:  # part of a request came: say why it ends
                self._answer_and_close(408, b"Request Timeout", f"the request did not arrive within "
                                       f"{self.timeout:g} s", "request_timeout", self.timeout, "headers too slow")
            else:
                self.transport.close()
        elif self.cycle is None or self.cycle.response_complete:  # answered without reading the whole body
            self.transport.close()
        else:  # RequestLog answers 408 at the same deadline; this is the backstop should the app not be reading
            self._request_timer = self.loop.call_later(1.0, self._abort_if_open)

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP: uvicorn's answer, as an error body with a request id (and a line in the access log)."""
        self._answer_and_close(400, b"Bad Request", "malformed HTTP request", "invalid_http", 0.0, "malformed")

    def _answer_and_close(self, status: int, reason: bytes, message: str, code: str, seconds: float,
                          note: str) -> None:
        """Answer below the ASGI app, where no request was parsed, and close."""
        rid, body = _request_id([]), _error_body(message, code)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"x-request-id: %s\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(body), rid.encode(), body))
        log.warning(_access_line(self.client, "-", "-", status, None, seconds, rid, note))
        self.transport.close()

    def _abort_if_open(self) -> None:
        self._request_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    def _reader_stalled(self) -> None:
        self._write_timer = None
        log.warning(f"{self.client[0] if self.client else '-'}: cut a response the client has read nothing of "
                    f"for {self.timeout:g} s")
        self.transport.abort()  # close() would wait for the full buffer to drain; the app sees a disconnect


def server_config(app, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0, keep_alive: float = 5.0,
                  max_connections: int | None = 512, **kw) -> uvicorn.Config:
    """uvicorn's Config with the connection layer's limits (other keywords go to uvicorn.Config)."""
    protocol = type("LimitedH11Protocol", (LimitedH11Protocol,),
                    {"timeout": timeout, "max_connections": max_connections})
    return uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", timeout_keep_alive=keep_alive,
                          access_log=False, **kw)
