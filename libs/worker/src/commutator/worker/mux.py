"""The worker's side of ``Worker.GenerateMany``: many requests over one stream (docs/worker-stream.md).

A :class:`MuxSession` lives as long as its stream. A started request either runs as its own
task reading the engine's outputs, or, with an engine that can push (``start_request``: the
mocker), with no task at all: the engine's pass loop marks it ready and the next frame takes
its output. What they produce is merged per request into ``pending`` and leaves in frames: a
frame carries every request that advanced since the last one (so the requests one engine pass
moved travel together), at most one frame per ``--stream-interval-ms`` except when a request
gets its first tokens, finishes or fails (then at once). The stream's writer never waits for
one request: a request's unsent tokens merge into one update, bounded by its own output. A
cancel, a deadline, or the end of the stream aborts the engine request, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

from commutator.common import tracing
from commutator.engines.base import EngineOutput, FinishReason
from commutator.engines.wire import fill_response, request_from_proto
from commutator.v1 import worker_pb2

__all__ = ["DirectSend", "MuxSession"]

log = logging.getLogger(__name__)


class DirectSend(Protocol):
    """A transport that takes a frame synchronously (the TCP stream's): ``can_send`` says whether it
    can take one now without waiting, ``send`` writes it."""

    def can_send(self) -> bool: ...

    def send(self, frame: worker_pb2.MuxServerFrame) -> None: ...


ENGINE_GONE = (FinishReason.ABORT, FinishReason.ERROR)
"""How an engine that failed, or is shut down after failing, ends the requests it held."""


class MuxSession:
    """One ``GenerateMany`` stream. ``servicer`` is the :class:`~commutator.worker.servicer.WorkerServicer`
    (engine, metrics, in-flight count); ``draining()`` says whether the worker is draining: then new
    requests are refused with UNAVAILABLE (the client routes them elsewhere) and the stream ends once
    its requests are done."""

    def __init__(self, servicer, draining: Callable[[], bool], direct: DirectSend | None = None) -> None:  # type: ignore[no-untyped-def]
        self._s = servicer
        self._draining = draining
        self._direct = direct
        self._loop = asyncio.get_running_loop()
        self._last = 0.0  # when the last frame left (loop time)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._pushed: dict[int, _Pushed] = {}  # requests the engine pushes to (no task each)
        self._ready: set[int] = set()  # pushed requests with output not taken yet
        self._pending: dict[int, EngineOutput] = {}
        self._errors: list[worker_pb2.MuxError] = []
        self._wake = asyncio.Event()
        self._urgent = False
        self._reading = True
        self._listening = False  # the engine's passes call _after_pass, which sends their frame itself
        self._check_soon = False  # a _check_left is scheduled

    def wake(self) -> None:
        """Look again at whether the stream can end (the worker started draining)."""
        self._urgent = True
        self._wake.set()

    async def frames(
        self, requests: AsyncIterator[worker_pb2.MuxClientFrame] | None
    ) -> AsyncGenerator[worker_pb2.MuxServerFrame, None]:
        """The session's frames to the client. Its frames come from ``requests``, read by a task of the
        session's; or, where ``requests`` is None, the transport hands each over itself as it arrives
        (:meth:`client_frame`, then :meth:`client_closed`)."""
        loop = self._loop
        reader = loop.create_task(self._read(requests), name="mux-read") if requests is not None else None
        interval = self._s.stream_interval_s
        engine = self._s.engine  # the one whose passes call _after_pass (a restarted engine's do not)
        listen = getattr(engine, "add_pass_listener", None) if self._direct is not None else None
        if listen is not None:
            listen(self._after_pass)
            self._listening = True
        try:
            while True:
                await self._wake.wait()
                if self._tasks:
                    # Every request task the same engine pass woke adds its output before the frame is
                    # built. Pushed requests need no turn: the pass put theirs in before this ran, and a
                    # turn here would let the KV-event publisher the pass also woke go first.
                    await asyncio.sleep(0)
                if interval and not self._urgent:
                    wait = self._last + interval - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                self._wake.clear()
                self._urgent = False
                if self._ready:
                    self._take_pushed()
                if self._pending or self._errors:
                    self._last = loop.time()
                    yield self._take_frame()
                if self._pending or self._errors or self._ready:
                    continue  # came in while the frame was being sent (a request's last update, say)
                if not self._tasks and not self._pushed and (not self._reading or self._draining()):
                    return  # the client closed its side (or the worker drains) and nothing is left
        finally:
            if listen is not None:
                self._listening = False
                engine.remove_pass_listener(self._after_pass)
            if reader is not None:
                reader.cancel()
            self._reading = False  # nothing handed over from now on starts anything
            for tag in list(self._pushed):
                self._end_pushed(tag, "cancelled")  # the client went away: abort, freeing the blocks
            tasks = list(self._tasks.values())
            for t in tasks:
                t.cancel()  # the client went away: abort every engine request, freeing its blocks
            await asyncio.gather(*tasks, *([reader] if reader is not None else []), return_exceptions=True)

    def _after_pass(self) -> None:
        """The engine ended a pass and handed its outputs to its requests: send their frame from here,
        in the same turn of the event loop, rather than from the frames task's next turn (which comes
        after whatever else the loop has queued). Left to that task: a frame the stream interval holds
        back, and any frame while the connection cannot take one at once."""
        if not self._ready or self._direct is None:
            return
        now = self._loop.time()
        interval = self._s.stream_interval_s
        if interval and not self._urgent and now < self._last + interval:
            return
        if not self._direct.can_send():
            return
        self._urgent = False  # before taking: a request that ends here may mark the stream urgent again
        self._take_pushed()
        if not (self._pending or self._errors):
            return
        self._last = now
        self._direct.send(self._take_frame())
        if (self._pushed or self._tasks) and self._reading and not self._draining():
            self._wake.clear()  # nothing left for the frames task (it still ends the stream when it must)

    def _take_frame(self) -> worker_pb2.MuxServerFrame:
        frame = worker_pb2.MuxServerFrame()
        updates = frame.updates
        for tag, out in self._pending.items():
            u = updates.add()
            u.tag = tag
            fill_response(u.response, out)
        self._pending.clear()
        if self._errors:
            frame.errors.extend(self._errors)
            self._errors.clear()
        self._s.count_message()
        return frame

    async def _read(self, requests: AsyncIterator[worker_pb2.MuxClientFrame]) -> None:
        try:
            async for frame in requests:
                self.client_frame(frame)
        finally:
            self.client_closed()

    def client_frame(self, frame: worker_pb2.MuxClientFrame) -> None:
        """One frame of the client's: its cancels, then its starts. Ignored once the session ended."""
        if not self._reading:
            return
        for tag in frame.cancels:
            task = self._tasks.get(tag)
            if task is not None:
                task.cancel()
            elif tag in self._pushed:
                self._end_pushed(tag, "cancelled")
                self._pending.pop(tag, None)  # the client cancelled it: it wants nothing more
        for start in frame.starts:
            self._start(start)

    def client_closed(self) -> None:
        """The client has closed its side: the session ends once its requests are done."""
        self._reading = False
        self.wake()

    def _start(self, start: worker_pb2.MuxStart) -> None:
        tag = start.tag
        if tag in self._tasks or tag in self._pushed:
            self._fail(tag, "INVALID_ARGUMENT", f"tag {tag} is already in use on this stream")
            return
        if self._draining():
            self._fail(tag, "UNAVAILABLE", "the worker is draining")
            return
        if self._s.engine_failed is not None:
            self._fail(tag, "UNAVAILABLE", f"the worker's engine stopped ({self._s.engine_failed})")
            return
        try:
            ereq = request_from_proto(start.request)
        except ValueError as exc:
            self._s.count_outcome("invalid")
            self._fail(tag, "INVALID_ARGUMENT", str(exc))
            return
        metadata = [(m.key, m.value) for m in start.metadata]
        start_request = getattr(self._s.engine, "start_request", None)
        if start_request is not None and self._start_pushed(start_request, tag, ereq, start.timeout_s, metadata):
            return
        self._tasks[tag] = asyncio.get_running_loop().create_task(self._run(tag, ereq, start.timeout_s, metadata))

    # -- requests the engine pushes to -------------------------------------------------------
    def _start_pushed(self, start_request, tag: int, ereq, timeout_s: float, metadata: list[tuple[str, str]]) -> bool:  # type: ignore[no-untyped-def]
        """Start ``ereq`` on the engine's push path; False when the engine wants it generated instead."""
        s = self._s
        t0 = time.perf_counter()
        try:
            handle = start_request(ereq, lambda: self._on_ready(tag))
        except ValueError as exc:
            s.count_outcome("invalid")
            self._fail(tag, "INVALID_ARGUMENT", str(exc))
            return True
        except Exception as exc:
            s.count_outcome("error")
            log.exception("engine failed request %s", ereq.request_id)
            self._fail(tag, "INTERNAL", f"engine failed: {exc}")
            return True
        if handle is None:
            return False  # e.g. its prefill goes to a prefill worker
        s.request_started()
        span = tracing.server_span("Worker.GenerateMany", metadata, request_id=ereq.request_id)
        span.__enter__()
        timer = None
        if timeout_s > 0:
            timer = asyncio.get_running_loop().call_later(timeout_s, self._expire_pushed, tag, ereq.request_id)
        self._pushed[tag] = _Pushed(handle, span, timer, t0)
        return True

    def _on_ready(self, tag: int) -> None:
        """The engine has news for a pushed request (called from its pass loop)."""
        self._ready.add(tag)
        p = self._pushed.get(tag)
        if p is None or p.first or p.handle.channel.finish is not None:
            self._urgent = True  # first tokens and finishes leave at once
        self._signal()

    def _signal(self) -> None:
        """There is something to send. Where the engine's pass sends its own frame (:meth:`_after_pass`,
        which runs in the same turn as the pass hands over its outputs), the frames task is woken a turn
        later and only for what the pass left (held back by the stream interval, a connection that
        cannot take the frame, news from outside a pass such as an abort): waking it on every pass only
        for it to find nothing cost a resumption of the task and its generators per pass."""
        if not self._listening:
            self._wake.set()
        elif not self._check_soon:
            self._check_soon = True
            self._loop.call_soon(self._check_left)

    def _check_left(self) -> None:
        self._check_soon = False
        if self._ready or self._pending or self._errors:
            self._wake.set()

    def _take_pushed(self) -> None:
        """Move the news of every ready pushed request into ``pending`` (once per frame)."""
        s = self._s
        ready, self._ready = self._ready, set()
        now = time.perf_counter()
        tokens = 0
        for tag in ready:
            p = self._pushed.get(tag)
            if p is None:
                continue
            out = p.handle.take()
            if out is None:
                continue
            first = p.first
            if first:
                p.first = False
                s.first_output(out, now - p.t0)
            tokens += len(out.token_ids)
            self._push(tag, out, first, wake=False)  # taken to build a frame now
            if out.finish_reason is not None:
                self._end_pushed(tag, out.finish_reason.value, finished=True)
        if tokens:
            s.count_tokens(tokens)  # one metric update per frame, not per request

    def _expire_pushed(self, tag: int, request_id: str) -> None:
        if tag in self._pushed:
            self._end_pushed(tag, "deadline")
            self._pending.pop(tag, None)
            self._fail(tag, "DEADLINE_EXCEEDED", f"request {request_id} passed its deadline")

    def _end_pushed(self, tag: int, outcome: str, *, finished: bool = False) -> None:
        p = self._pushed.pop(tag)
        self._ready.discard(tag)
        if not finished:
            p.handle.cancel()  # aborts the engine request, freeing its blocks
        if p.timer is not None:
            p.timer.cancel()
        p.span.__exit__(None, None, None)
        self._s.request_ended(outcome)
        if not self._pushed and not self._tasks:
            self.wake()

    async def _run(self, tag: int, ereq, timeout_s: float, metadata: list[tuple[str, str]]) -> None:  # type: ignore[no-untyped-def]
        s = self._s
        t0 = time.perf_counter()
        outcome = "cancelled"
        s.request_started()
        gen = s.engine.generate(ereq)
        try:
            with tracing.server_span("Worker.GenerateMany", metadata, request_id=ereq.request_id):
                async with asyncio.timeout(timeout_s or None):
                    first = True
                    async for out in gen:
                        if first:
                            s.first_output(out, time.perf_counter() - t0)
                        s.count_tokens(len(out.token_ids))
                        if out.finish_reason is not None:
                            outcome = out.finish_reason.value
                        self._push(tag, out, first)
                        first = False
        except TimeoutError:
            outcome = "deadline"
            self._fail(tag, "DEADLINE_EXCEEDED", f"request {ereq.request_id} passed its deadline")
        except ValueError as exc:
            outcome = "invalid"
            self._fail(tag, "INVALID_ARGUMENT", str(exc))
        except Exception as exc:
            outcome = "error"
            log.exception("engine failed request %s", ereq.request_id)
            self._fail(tag, "INTERNAL", f"engine failed: {exc}")
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
            s.request_ended(outcome)
            if self._tasks.get(tag) is asyncio.current_task():
                del self._tasks[tag]
            if outcome == "cancelled":
                self._pending.pop(tag, None)  # the client cancelled it: it wants nothing more
            if not self._tasks:
                self.wake()

    def _push(self, tag: int, out: EngineOutput, first: bool, wake: bool = True) -> None:
        """Add ``out`` to the next frame; ``wake=False`` where the caller is about to build that frame."""
        failed = self._s.engine_failed
        if failed is not None and out.finish_reason in ENGINE_GONE:
            # The engine failed, not the request: UNAVAILABLE, which the router migrates.
            out = EngineOutput(out.token_ids, None, out.prompt_tokens, out.cached_prompt_tokens, out.logprobs)
            self._fail(tag, "UNAVAILABLE", f"the worker's engine stopped ({failed})")
            if not out.token_ids:
                return
        p = self._pending.get(tag)
        if p is None:
            self._pending[tag] = EngineOutput(
                list(out.token_ids),
                out.finish_reason,
                out.prompt_tokens,
                out.cached_prompt_tokens,
                list(out.logprobs) if out.logprobs else None,
                out.error,
            )
        else:  # the stream has not taken the last ones yet: one update carries both
            p.token_ids.extend(out.token_ids)
            if out.logprobs:
                p.logprobs = (p.logprobs or []) + list(out.logprobs)
            p.finish_reason = out.finish_reason
            p.error = out.error or p.error
        if first or out.finish_reason is not None:
            self._urgent = True
        if wake:
            self._wake.set()

    def _fail(self, tag: int, code: str, message: str) -> None:
        self._errors.append(worker_pb2.MuxError(tag=tag, code=code, message=message))
        self._urgent = True
        self._wake.set()


class _Pushed:
    """A request on the engine's push path: its handle, trace span, deadline timer, start time."""

    __slots__ = ("first", "handle", "span", "t0", "timer")

    def __init__(self, handle, span, timer: asyncio.TimerHandle | None, t0: float) -> None:  # type: ignore[no-untyped-def]
        self.handle = handle
        self.span = span
        self.timer = timer
        self.t0 = t0
        self.first = True
