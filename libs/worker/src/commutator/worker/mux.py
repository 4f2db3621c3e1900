"""The worker's side of ``Worker.GenerateMany``: many requests over one stream (docs/worker-stream.md).

A :class:`MuxSession` lives as long as its stream. Each started request runs as its own task
reading the engine's outputs; what they produce is merged per request into ``pending`` and
leaves in frames: a frame carries every request that advanced since the last one (so the
requests one engine pass moved travel together), at most one frame per
``--stream-interval-ms`` except when a request gets its first tokens, finishes or fails
(then at once). The stream's writer never waits for one request: a request's unsent tokens
merge into one update, bounded by its own output. A cancel, a deadline, or the end of the
stream aborts the engine request, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from commutator.common import tracing
from commutator.engines.base import EngineOutput
from commutator.engines.wire import fill_response, request_from_proto
from commutator.v1 import worker_pb2

__all__ = ["MuxSession"]

log = logging.getLogger(__name__)


class MuxSession:
    """One ``GenerateMany`` stream. ``servicer`` is the :class:`~commutator.worker.servicer.WorkerServicer`
    (engine, metrics, in-flight count); ``draining()`` says whether the worker is draining: then new
    requests are refused with UNAVAILABLE (the client routes them elsewhere) and the stream ends once
    its requests are done."""

    def __init__(self, servicer, draining: Callable[[], bool]) -> None:  # type: ignore[no-untyped-def]
        self._s = servicer
        self._draining = draining
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._pending: dict[int, EngineOutput] = {}
        self._errors: list[worker_pb2.MuxError] = []
        self._wake = asyncio.Event()
        self._urgent = False
        self._reading = True

    def wake(self) -> None:
        """Look again at whether the stream can end (the worker started draining)."""
        self._urgent = True
        self._wake.set()

    async def frames(
        self, requests: AsyncIterator[worker_pb2.MuxClientFrame]
    ) -> AsyncIterator[worker_pb2.MuxServerFrame]:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(requests), name="mux-read")
        interval = self._s.stream_interval_s
        last = 0.0
        try:
            while True:
                await self._wake.wait()
                # Every request the same engine pass woke adds its output before the frame is built.
                await asyncio.sleep(0)
                if interval and not self._urgent:
                    wait = last + interval - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                self._wake.clear()
                self._urgent = False
                if self._pending or self._errors:
                    last = loop.time()
                    yield self._take_frame()
                if not self._tasks and (not self._reading or self._draining()):
                    return  # the client closed its side (or the worker drains) and nothing is left
        finally:
            reader.cancel()
            tasks = list(self._tasks.values())
            for t in tasks:
                t.cancel()  # the client went away: abort every engine request, freeing its blocks
            await asyncio.gather(reader, *tasks, return_exceptions=True)

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
                for tag in frame.cancels:
                    task = self._tasks.get(tag)
                    if task is not None:
                        task.cancel()
                for start in frame.starts:
                    self._start(start)
        finally:
            self._reading = False
            self.wake()

    def _start(self, start: worker_pb2.MuxStart) -> None:
        tag = start.tag
        if tag in self._tasks:
            self._fail(tag, "INVALID_ARGUMENT", f"tag {tag} is already in use on this stream")
            return
        if self._draining():
            self._fail(tag, "UNAVAILABLE", "the worker is draining")
            return
        try:
            ereq = request_from_proto(start.request)
        except ValueError as exc:
            self._s.count_outcome("invalid")
            self._fail(tag, "INVALID_ARGUMENT", str(exc))
            return
        metadata = [(m.key, m.value) for m in start.metadata]
        self._tasks[tag] = asyncio.get_running_loop().create_task(self._run(tag, ereq, start.timeout_s, metadata))

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

    def _push(self, tag: int, out: EngineOutput, first: bool) -> None:
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
        self._wake.set()

    def _fail(self, tag: int, code: str, message: str) -> None:
        self._errors.append(worker_pb2.MuxError(tag=tag, code=code, message=message))
        self._urgent = True
        self._wake.set()
