"""The client side of ``Worker.GenerateMany``: one stream per worker for every request this process
sends it (docs/worker-stream.md), over gRPC or over plain TCP (:mod:`commutator.router.tcp_call`).

:meth:`WorkerMux.open` starts a request on the worker's stream (opening the stream on first use,
and again after it ended) and returns a :class:`MuxRequest`, an async iterator of the request's
``GenerateResponse`` messages, exactly as a ``Generate`` call would yield them; closing it early
cancels the request on the worker, which frees its blocks. On a call that can write without
waiting (``try_write``: TCP) a start or cancel leaves at once; otherwise the starts and cancels
made in the same turn of the event loop leave in one frame. The worker's frames are handed out as they
arrive (over TCP from the connection's ``data_received``, over gRPC by one reader task), each update to
its request without ever waiting for a reader: a request that has more than
``buffer`` updates waiting unread (its client stopped reading) is cancelled, with a metric, so it
cannot hold up the others. A request past its deadline is cancelled with ``DeadlineExceeded``.
When the stream fails (the worker died, its channel closed), every request on it fails with the
typed error of that failure (``Unavailable``), nothing else; a worker that drains ends the
stream once its requests are done.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from commutator.common import metrics
from commutator.common.errors import Cancelled, CommutatorError, DeadlineExceeded, Unavailable
from commutator.common.grpc import error_from_status, map_rpc_error
from commutator.v1 import common_pb2, worker_pb2

__all__ = ["MuxRequest", "SinkFailed", "WorkerMux"]

log = logging.getLogger(__name__)

OpenCall = Callable[[], tuple[Any, Callable[[], None], str]]
"""Opens the bidirectional call: (call, release its channel, description for errors)."""

_UNSET = common_pb2.FINISH_REASON_UNSPECIFIED

FIRSTS_AHEAD = 4
"""A frame with at most this many first responses lets their readers run before its other updates are
delivered (:meth:`WorkerMux._on_frame`). Writing a first response (headers and first event) takes about
0.3 ms; a wave of them (a closed loop's synchronized start) goes behind the other streams' tokens, as
every frame's did before, so that no stream waits for many of them."""


class MuxRequest:
    """One request on a :class:`WorkerMux`: iterate it for its responses, close it to cancel it."""

    __slots__ = (
        "_answered",
        "_done",
        "_error",
        "_finished",
        "_items",
        "_limit",
        "_mux",
        "_sink",
        "_timer",
        "_waiter",
        "tag",
    )

    def __init__(self, mux: WorkerMux, tag: int, limit: int) -> None:
        self._mux = mux
        self.tag = tag
        self._limit = limit
        self._items: collections.deque[common_pb2.GenerateResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: CommutatorError | None = None
        self._finished = False  # the worker sent its last update (or it failed): nothing more comes
        self._done = False  # the reader has had everything
        self._timer: asyncio.TimerHandle | None = None
        self._sink: Callable[[common_pb2.GenerateResponse], bool] | None = None
        self._answered = False  # a response has been delivered (the next one is not the first)

    def __aiter__(self) -> MuxRequest:
        return self

    async def __anext__(self) -> common_pb2.GenerateResponse:
        items = self._items
        while not items:
            if self._error is not None:
                err, self._error = self._error, None
                self._done = True
                raise err
            if self._finished:
                self._done = True
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return items.popleft()

    async def push(self, sink: Callable[[common_pb2.GenerateResponse], bool]) -> None:
        """Hand every further response to ``sink`` as it arrives, instead of queueing it for a reader
        task to wake up for: ``sink`` runs in the stream's reader (it must not block) and returns True
        to end the request early (it is then cancelled on the worker). Returns when the request has
        finished; raises its error, or what ``sink`` raised (the request is then cancelled)."""
        items = self._items
        try:
            while items:
                if sink(items.popleft()):
                    await self.aclose()
                    return
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, Exception) and not isinstance(exc, CommutatorError):
                raise SinkFailed(exc) from exc  # as when the sink fails on a later response
            raise
        self._sink = sink
        try:
            while not self._finished:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._sink = None
        self._done = True
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    async def aclose(self) -> None:
        """Cancel the request on the worker unless it has ended (closing twice is harmless)."""
        self._done = True
        self._items.clear()
        if not self._finished:
            self._finished = True
            self._mux._cancel(self.tag)
        self._stop_timer()

    # -- called by the mux -------------------------------------------------------------------
    def _deliver(self, resp: common_pb2.GenerateResponse) -> None:
        if self._finished:
            return
        self._answered = True
        sink = self._sink
        if sink is not None:
            try:
                end = sink(resp)
            except BaseException as exc:  # the reader must go on; the pusher gets it
                self._mux._cancel(self.tag)
                err = exc if isinstance(exc, CommutatorError) else SinkFailed(exc)
                self._fail(err)
                return
            if resp.finish_reason != _UNSET:
                self._finished = True
                self._mux._forget(self.tag)
                self._stop_timer()
                self._wake()
            elif end:
                self._finished = True
                self._mux._cancel(self.tag)
                self._stop_timer()
                self._wake()
            return
        if len(self._items) >= self._limit:
            metrics.WORKER_STREAM_OVERFLOWS.inc()
            self._mux._cancel(self.tag)
            self._fail(
                Cancelled(f"request cancelled: {self._limit} updates were waiting unread (its client stopped reading)")
            )
            return
        self._items.append(resp)
        if resp.finish_reason != _UNSET:
            self._finished = True
            self._mux._forget(self.tag)
            self._stop_timer()
        self._wake()

    def _fail(self, error: CommutatorError) -> None:
        if self._finished:
            return
        self._finished = True
        self._error = error
        self._stop_timer()
        self._wake()

    def _expire(self) -> None:
        self._timer = None
        if not self._finished:
            self._mux._cancel(self.tag)
            self._fail(DeadlineExceeded(f"{self._mux.where}: request passed its deadline"))

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class SinkFailed(Cancelled):
    """What a push sink raised (e.g. its client went away): the request was cancelled."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"request cancelled: its consumer failed: {exc!r}")
        self.original = exc


class WorkerMux:
    """Every request this process sends one worker, over one ``GenerateMany`` stream."""

    def __init__(self, open_call: OpenCall, *, buffer: int = 4096) -> None:
        self._open_call = open_call
        self._buffer = buffer
        self._call: Any = None
        self._release: Callable[[], None] | None = None
        self.where = ""
        self._requests: dict[int, MuxRequest] = {}
        self._next_tag = 0
        # The starts and cancels made since the last frame left, built in place: copying a start's
        # request into a MuxStart and that into a frame cost two copies of its prompt (18 us each
        # for 1,000 ids); adding it to the frame costs one.
        self._pending = worker_pb2.MuxClientFrame()
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._writing = False
        self.closing = False  # the worker left discovery: end the stream once it is idle
        # Frames' updates (and errors) waiting one turn behind first responses (see _on_frame), in order.
        self._held: list[tuple[Sequence[worker_pb2.MuxUpdate], Sequence[worker_pb2.MuxError]]] | None = None

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    def open(
        self, request: common_pb2.GenerateRequest, timeout_s: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> MuxRequest:
        """Start ``request`` on this worker (typed errors come from iterating the result)."""
        if self._call is None:
            self._connect()
        self._next_tag += 1
        tag = self._next_tag
        req = MuxRequest(self, tag, self._buffer)
        self._requests[tag] = req
        start = self._pending.starts.add()
        start.tag = tag
        start.request.CopyFrom(request)
        start.timeout_s = timeout_s
        for key, value in metadata:
            start.metadata.add(key=key, value=value)
        if timeout_s:
            req._timer = asyncio.get_running_loop().call_later(timeout_s, req._expire)
        self._schedule_flush()
        return req

    async def close(self) -> None:
        """End the stream; requests still on it fail with ``Unavailable``."""
        call = self._call
        if call is not None:
            call.cancel()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the stream --------------------------------------------------------------------------
    def _connect(self) -> None:
        call, release, where = self._open_call()
        self._call, self._release, self.where = call, release, where
        self._spawn(self._read(call), "mux-read")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        call = self._call
        try_write = getattr(call, "try_write", None)
        if try_write is not None and not self._writing:
            # A transport that can write without waiting (TCP) sends the frame from this turn: no
            # callback and no task to wait for behind the event loop's other work (under load each
            # is a queue of its own). Starts made in one turn still leave together when it cannot.
            if try_write(self._pending):
                self._pending = worker_pb2.MuxClientFrame()
                return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what was queued in this turn of the loop as one frame (one write at a time)."""
        self._flush_scheduled = False
        frame = self._pending
        if self._writing or self._call is None or not (frame.starts or frame.cancels):
            return
        self._pending = worker_pb2.MuxClientFrame()
        self._writing = True
        self._spawn(self._write(self._call, frame), "mux-write")

    async def _write(self, call: Any, frame: worker_pb2.MuxClientFrame) -> None:
        try:
            await call.write(frame)
        except (grpc.RpcError, CommutatorError, asyncio.InvalidStateError, RuntimeError) as exc:
            # The stream is failing: the reader reports it to every request.
            log.debug("%s: a frame was not sent: %s", self.where, exc)
            return
        finally:
            self._writing = False
        if self._pending.starts or self._pending.cancels:
            self._schedule_flush()

    async def _read(self, call: Any) -> None:
        where = self.where
        # A draining worker ends its stream only once the requests on it are done, so requests that are
        # still on it when it ends were cut off: the worker exited or was killed (a TCP FIN looks the same).
        error: CommutatorError = Unavailable(
            f"{where}: the worker ended the stream before these requests finished (it exited or was killed)"
        )
        try:
            pump = getattr(call, "pump", None)
            if pump is not None:
                # TCP: each frame is handed over from the connection's data_received, with no wait
                # for this task's turn behind the event loop's other work.
                await pump(self._on_frame)
            else:
                while True:
                    frame = await call.read()
                    if frame is grpc.aio.EOF:
                        break
                    self._on_frame(frame)
        except (grpc.RpcError, CommutatorError) as err:
            # A TCP stream's call raises the typed error (Unavailable) itself.
            error = err if isinstance(err, CommutatorError) else map_rpc_error(err, where)
            if isinstance(error, Cancelled) and self.closing:
                error = Unavailable(f"{where}: the worker left discovery")
        except asyncio.CancelledError:
            error = Unavailable(f"{where}: the stream was closed")
            raise
        finally:
            self._ended(call, error)

    def _on_frame(self, frame: worker_pb2.MuxServerFrame) -> None:
        held = self._held
        if held is not None:  # an earlier frame's updates wait behind first responses: these go after them
            held.append((frame.updates, frame.errors))
            return
        requests = self._requests
        updates = frame.updates
        firsts = 0
        for u in updates:
            req = requests.get(u.tag)
            if req is not None and not req._answered:
                firsts += 1
        if firsts and firsts <= FIRSTS_AHEAD and (firsts < len(updates) or frame.errors):
            # A request's first response wakes the task that writes it (its HTTP headers and first event);
            # the others' responses mostly go straight to their sinks, each a write of its own. Those
            # wait one turn of the event loop, so that the first responses' tasks run before them.
            rest = []
            for u in updates:
                req = requests.get(u.tag)
                if req is None:
                    continue
                if req._answered:
                    rest.append(u)
                else:
                    req._deliver(u.response)
            self._held = [(rest, frame.errors)]
            asyncio.get_running_loop().call_soon(self._release_held)
            return
        self._deliver_all(updates, frame.errors)

    def _deliver_all(self, updates: Sequence[worker_pb2.MuxUpdate], errors: Sequence[worker_pb2.MuxError]) -> None:
        requests = self._requests
        for u in updates:
            req = requests.get(u.tag)
            if req is not None:
                req._deliver(u.response)
        for e in errors:
            req = requests.pop(e.tag, None)
            if req is not None:
                req._fail(error_from_status(e.code, e.message, self.where))

    def _release_held(self) -> None:
        """Deliver the updates held behind first responses (:meth:`_on_frame`), in the order they came."""
        held, self._held = self._held, None
        if held is not None:
            for updates, errors in held:
                self._deliver_all(updates, errors)

    def _ended(self, call: Any, error: CommutatorError) -> None:
        if self._call is not call:
            return
        self._release_held()  # what the worker sent before the end reaches its requests first
        self._call = None
        if self._release is not None:
            self._release()
            self._release = None
        failed = list(self._requests.values())
        self._requests.clear()
        self._pending = worker_pb2.MuxClientFrame()
        for req in failed:
            req._fail(error)
        if failed:
            log.warning("%s: stream ended with %d requests on it: %s", self.where, len(failed), error)

    # -- called by requests ------------------------------------------------------------------
    def _cancel(self, tag: int) -> None:
        if self._requests.pop(tag, None) is None:
            return
        self._pending.cancels.append(tag)
        self._schedule_flush()
        self._maybe_close()

    def _forget(self, tag: int) -> None:
        self._requests.pop(tag, None)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.closing and not self._requests and self._call is not None:
            self._call.cancel()
