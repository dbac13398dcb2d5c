"""One engine loop for many concurrent HTTP requests.

The engine is not thread-safe and its `step()` blocks for a whole forward, so it lives on one
background thread. The asyncio side talks to it only through a command queue (submit, abort,
snapshot the stats, stop); the thread hands every `RequestOutput` back to the event loop of the
request that owns it. A request's stream is an async iterator: leaving it early (a client that
disconnected, a cancelled task) aborts the request and frees its cache blocks.

Admission is bounded: `reserve(n)` holds room for n generations (running + queued) and raises
`Overloaded` when the server is full; the HTTP layer answers that with 503 and `Retry-After`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field


log = logging.getLogger("dsv32.serve")


class Overloaded(Exception):
    """No room for more requests right now."""


class EngineStopped(Exception):
    """The engine loop has stopped (shutdown) or failed."""


class EngineFailed(Exception):
    """A forward step raised; the requests in it were aborted."""


@dataclass
class _Sub:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Submit:
    request_id: str
    prompt: list[int]
    params: object
    sub: _Sub


@dataclass
class _Call:
    fn: object
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(default=None)


class EngineLoop:
    """Drives `engine.step()` on a thread; see the module docstring."""

    def __init__(self, engine, *, max_pending: int, metrics=None, idle_wait: float = 0.05):
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics
        self.idle_wait = idle_wait
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._subs: dict[str, _Sub] = {}
        self._ids = itertools.count()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._stopping = False        # no new submissions
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dsv32-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self._failure is None

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new work; let in-flight requests run for up to `drain_timeout` seconds, then abort
        the rest (their streams end with finish reason "abort") and join the thread."""
        if self._stopped.is_set():
            return
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while drain_timeout > 0 and time.monotonic() < deadline and self.num_pending() and self._thread.is_alive():
            time.sleep(0.02)
        self._commands.put(("stop", None))
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ admission
    def num_pending(self) -> int:
        with self._pending_lock:
            return self._pending

    def reserve(self, n: int) -> "Reservation":
        """Room for n generations until the reservation is released; raises Overloaded when full
        and EngineStopped while shutting down."""
        if not self.alive:
            raise EngineStopped("the server is shutting down")
        with self._pending_lock:
            if self._pending + n > self.max_pending:
                raise Overloaded(f"the server is at capacity ({self._pending} requests in flight, "
                                 f"limit {self.max_pending}); retry shortly")
            self._pending += n
        return Reservation(self, n)

    def _release(self, n: int) -> None:
        with self._pending_lock:
            self._pending -= n

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: list[int], params):
        """Run one engine request; yields its `RequestOutput`s (the last one has finished=True).

        Raises ValueError when the engine rejects the request, EngineStopped when the loop stops.
        Closing the iterator early aborts the request.
        """
        if self._failure is not None or not self._thread.is_alive():
            raise EngineStopped("the engine loop is not running")
        loop = asyncio.get_running_loop()
        request_id = f"srv-{next(self._ids)}"
        sub = _Sub(loop, asyncio.Queue())
        self._commands.put(("submit", _Submit(request_id, list(prompt), params, sub)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await sub.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def call(self, fn):
        """Run `fn(engine)` on the engine thread (between steps) and return its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", _Call(fn, loop, future)))
        self._wake.set()
        return await asyncio.wait_for(future, timeout=30)

    # ------------------------------------------------------------------ the thread
    def _deliver(self, sub: _Sub, item) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _handle(self, kind: str, payload) -> bool:
        """Run one command; returns False on "stop"."""
        engine = self.engine
        if kind == "submit":
            try:
                engine.add_request(payload.prompt, payload.params, request_id=payload.request_id)
            except ValueError as exc:
                self._deliver(payload.sub, exc)
                return True
            self._subs[payload.request_id] = payload.sub
        elif kind == "abort":
            sub = self._subs.pop(payload, None)
            out = engine.abort(payload)
            if sub is not None and out is not None:
                self._deliver(sub, out)
        elif kind == "call":
            call = payload
            try:
                result = call.fn(engine)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                call.loop.call_soon_threadsafe(_set_exception, call.future, exc)
            else:
                call.loop.call_soon_threadsafe(_set_result, call.future, result)
        elif kind == "stop":
            return False
        return True

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the engine failed: fail every request, keep serving errors
            log.exception("engine loop failed")
            self._failure = exc
            for rid, sub in list(self._subs.items()):
                self._deliver(sub, EngineStopped(f"the engine failed: {type(exc).__name__}: {exc}"))
            self._subs.clear()
        finally:
            self._abort_all()
            self._stopped.set()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            while True:
                try:
                    kind, payload = self._commands.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(kind, payload):
                    return
            if engine.has_unfinished():
                t0 = time.monotonic()
                try:
                    outputs = engine.step()
                except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                    log.exception("engine step failed; aborting the requests in flight")
                    self._fail_all(EngineFailed(f"the engine failed: {type(exc).__name__}: {exc}"))
                    continue
                now = time.monotonic()
                if self.metrics is not None:
                    self.metrics.on_step(now - t0, sum(len(o.token_ids) for o in outputs))
                for out in outputs:
                    sub = self._subs.get(out.request_id)
                    if sub is None:
                        continue
                    if out.finished:
                        del self._subs[out.request_id]
                    self._deliver(sub, out)
            else:
                self._wake.wait(self.idle_wait)
                self._wake.clear()

    def _fail_all(self, error: BaseException) -> None:
        for rid, sub in list(self._subs.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine is already in trouble
                pass
            self._deliver(sub, error)
        self._subs.clear()

    def _abort_all(self) -> None:
        for rid, sub in list(self._subs.items()):
            try:
                out = self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - best effort while shutting down
                out = None
            self._deliver(sub, out if out is not None else EngineStopped("the server is shutting down"))
        self._subs.clear()
        # requests submitted but not yet seen by the thread
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._deliver(payload.sub, EngineStopped("the server is shutting down"))
            elif kind == "call":
                payload.loop.call_soon_threadsafe(_set_exception, payload.future, EngineStopped("stopped"))


class Reservation:
    def __init__(self, loop: EngineLoop, n: int):
        self._loop, self._n = loop, n

    def release(self) -> None:
        if self._n:
            self._loop._release(self._n)
            self._n = 0


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
