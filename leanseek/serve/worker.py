"""The engine loop, in a thread apart from the server's event loop. The event loop hands it requests and
cancellations through a queue; the loop admits them, runs engine steps while any request is pending, and passes
each step's tokens back to the waiting coroutine with call_soon_threadsafe. Only this loop touches the engine.

`leanseek serve` runs this loop in the main thread and the HTTP server in another: PyTorch's CPU thread pool
belongs to the thread that first uses it, and decoding from a second thread measured 3x slower."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from ..infer.engine import Engine


class QueueFull(Exception):
    """More requests are waiting than the server accepts (HTTP 429)."""


@dataclass
class Event:
    tokens: list[int]
    finished: bool = False
    error: str | None = None
    rejected: bool = False  # the engine refused the request before running it (bad input: HTTP 400)
    logprobs: list | None = None  # the engine's TokenLogprob for each of `tokens`, when the request asked
    prompt_logprobs: list | None = None  # on the first event, when the request asked: one per prompt token
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache


@dataclass
class Handle:
    """One request's mailbox on the event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int | None = None
    submitted: float = field(default_factory=time.perf_counter)

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine, self.max_queue = engine, max_queue
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, Handle] = {}
        self._inflight = 0  # submitted and not finished; changed on the event loop only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="leanseek-engine", daemon=True)
        self.running = 0  # requests in the engine (read by /metrics)

    def start(self) -> None:
        """Run the loop in a thread of its own."""
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def waiting(self) -> int:
        return max(0, self._inflight - self.engine.max_batch)

    def submit(self, prompt: list[int], params: dict) -> Handle:
        """Queue a request (on the event loop). Raises QueueFull when max_queue requests already wait."""
        if self._inflight >= self.engine.max_batch + self.max_queue:
            raise QueueFull(f"{self._inflight} requests in flight; the queue holds {self.max_queue} beyond the "
                            f"{self.engine.max_batch} that run at once")
        handle = Handle(asyncio.get_running_loop())
        self._inflight += 1
        self._inbox.put(("submit", handle, prompt, params))
        return handle

    def done(self, handle: Handle) -> None:
        """The coroutine is finished with a request (normally, or its client left): cancel it if it runs."""
        self._inflight -= 1
        self._inbox.put(("cancel", handle, None, None))

    def run(self) -> None:
        """The loop, in the calling thread, until close()."""
        while not self._stop.is_set():
            try:  # block while idle; otherwise only drain what is there
                items = [self._inbox.get(timeout=0.1 if not self.engine.pending else 0)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, handle, prompt, params in items:
                if kind == "submit":
                    try:
                        handle.id = self.engine.submit(prompt, **params)
                        self._handles[handle.id] = handle
                    except ValueError as e:
                        handle.put(Event([], True, str(e), rejected=True))
                elif handle.id is not None and self._handles.pop(handle.id, None) is not None:
                    self.engine.cancel(handle.id)
            self.running = len(self._handles)  # here, not after a step: cancellations leave the engine idle
            if not self.engine.pending:
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine guards its requests; this is a last resort
                for rid in list(self._handles):
                    self.engine.cancel(rid)
                    self._handles.pop(rid).put(Event([], True, f"{type(e).__name__}: {e}"))
                continue
            for o in outputs:
                handle = self._handles.get(o.request)
                if handle is None:
                    continue
                if o.finished:
                    del self._handles[o.request]
                handle.put(Event(o.tokens, o.finished, o.error, logprobs=o.logprobs,
                                 prompt_logprobs=o.prompt_logprobs, cached_tokens=o.cached_tokens))
