"""The Worker gRPC service in front of an engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from commutator.common import metrics, tracing
from commutator.common.errors import InvalidRequest, RemoteError, Unavailable, Unsupported
from commutator.common.grpc import abort_with
from commutator.engines.base import Engine, EngineOutput
from commutator.engines.wire import output_to_proto, request_from_proto, stats_to_proto
from commutator.v1 import common_pb2, kv_events_pb2, worker_pb2, worker_pb2_grpc
from commutator.worker.mux import ENGINE_GONE, DirectSend, MuxSession

__all__ = ["WorkerServicer"]

log = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Generate streams tokens as the engine makes them; GenerateMany carries many requests over one
    stream (:mod:`commutator.worker.mux`).

    The engine coalesces the tokens a slow client has not taken yet (at most
    the request's own output), so a stream never buffers without bound; a
    cancelled stream aborts the engine request, which frees its blocks.
    """

    def __init__(
        self, engine: Engine, worker_label: str, worker_id: object, stream_interval_s: float = 0.0, epoch: int = 0
    ) -> None:
        self.engine = engine
        self.epoch = epoch
        """The engine's epoch (:mod:`commutator.worker.epoch`), stamped on stats and dumps."""
        self.stream_interval_s = stream_interval_s
        self._worker_id = worker_id  # callable returning the current instance id
        self._active = metrics.WORKER_ACTIVE_REQUESTS.labels(worker_label)
        self._tokens = metrics.WORKER_OUTPUT_TOKENS.labels(worker_label)
        self._messages = metrics.WORKER_STREAM_MESSAGES.labels(worker_label)
        self._ttft = metrics.WORKER_TTFT_SECONDS.labels(worker_label)
        self._prompt = metrics.WORKER_PROMPT_TOKENS.labels(worker_label, "received")
        self._cached = metrics.WORKER_PROMPT_TOKENS.labels(worker_label, "cached")
        self._outcomes: dict[str, Any] = {}
        self._label = worker_label
        self._sessions: set[MuxSession] = set()
        self.draining = False
        self.engine_failed: str | None = None
        """Set once the engine has failed (the worker replaces it, or exits): the requests it ends
        (aborted or failed by its shutdown) end with UNAVAILABLE instead, which the router migrates."""
        self.in_flight = 0

    # -- accounting shared by Generate and GenerateMany -----------------------------------
    def count_outcome(self, outcome: str) -> None:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = metrics.WORKER_REQUESTS.labels(self._label, outcome)
        counter.inc()

    def request_started(self) -> None:
        self.in_flight += 1
        self._active.inc()

    def request_ended(self, outcome: str) -> None:
        self.in_flight -= 1
        self._active.dec()
        self.count_outcome(outcome)

    def first_output(self, out: EngineOutput, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._prompt.inc(out.prompt_tokens)
        self._cached.inc(out.cached_prompt_tokens)

    def count_tokens(self, n: int) -> None:
        self._tokens.inc(n)

    def count_message(self) -> None:
        self._messages.inc()

    def switch_engine(self, engine: Engine, epoch: int) -> None:
        """Serve ``engine`` (of epoch ``epoch``) from now on: an engine restart. Both change in one step,
        so a dump or a stat never pairs one engine's state with the other's epoch."""
        self.engine = engine
        self.epoch = epoch
        self.engine_failed = None

    def start_drain(self) -> None:
        """Refuse new multiplexed requests (UNAVAILABLE: routed elsewhere); end each stream once it is idle."""
        self.draining = True
        for session in list(self._sessions):
            session.wake()

    def open_session(self, direct: DirectSend | None = None) -> MuxSession:
        """A multiplexed session whose transport hands the client's frames over itself
        (:meth:`MuxSession.client_frame`; a TCP connection of :mod:`commutator.worker.tcp_stream`).
        Known to :meth:`start_drain` from now on; its frames come from :meth:`mux_frames`
        (``client_frames`` None, ``session`` it), which forgets it when done (so does
        :meth:`close_session`, for one whose frames were never asked for)."""
        session = MuxSession(self, lambda: self.draining, direct)
        self._sessions.add(session)
        return session

    def close_session(self, session: MuxSession) -> None:
        self._sessions.discard(session)

    async def mux_frames(
        self,
        client_frames: AsyncIterator[worker_pb2.MuxClientFrame] | None,
        direct: DirectSend | None = None,
        session: MuxSession | None = None,
    ) -> AsyncGenerator[worker_pb2.MuxServerFrame, None]:
        """One multiplexed stream, whatever carries it (GenerateMany, or a TCP connection of
        :mod:`commutator.worker.tcp_stream`): the frames for the client's ``client_frames`` (or, for
        a ``session`` of :meth:`open_session`, for what its transport hands it). The session is
        known to :meth:`start_drain` while it lives. ``direct``: a transport that can also take frames
        synchronously, so that an engine pass's frame leaves from the pass itself."""
        if session is None:
            session = self.open_session(direct)
        try:
            async with contextlib.aclosing(session.frames(client_frames)) as frames:
                async for frame in frames:
                    yield frame
        finally:
            self._sessions.discard(session)

    # -- RPCs ------------------------------------------------------------------------------
    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        t0 = time.perf_counter()
        try:
            ereq = request_from_proto(request)
        except ValueError as exc:
            self.count_outcome("invalid")
            await abort_with(context, InvalidRequest(str(exc)))
        if self.engine_failed is not None:  # being replaced: another worker serves it now
            self.count_outcome("error")
            await abort_with(context, Unavailable(f"the worker's engine stopped ({self.engine_failed})"))
        outcome = "cancelled"
        self.request_started()
        gen = self.engine.generate(ereq)
        try:
            with tracing.server_span("Worker.Generate", context.invocation_metadata(), request_id=ereq.request_id):
                first = True
                interval = self.stream_interval_s
                async for out in gen:
                    if first:
                        first = False
                        self.first_output(out, time.perf_counter() - t0)
                    self._tokens.inc(len(out.token_ids))
                    self._messages.inc()
                    if out.finish_reason is not None:
                        outcome = out.finish_reason.value
                        if self.engine_failed is not None and out.finish_reason in ENGINE_GONE:
                            outcome = "error"
                            if out.token_ids:
                                out.finish_reason = None
                                yield output_to_proto(out)
                            raise Unavailable(f"the worker's engine stopped ({self.engine_failed})")
                    yield output_to_proto(out)
                    if interval and out.finish_reason is None:
                        # Tokens the engine makes meanwhile wait in its channel and leave as one message.
                        await asyncio.sleep(interval)
        except ValueError as exc:
            outcome = "invalid"
            await abort_with(context, InvalidRequest(str(exc)))
        except Unavailable as exc:
            await abort_with(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            outcome = "error"
            log.exception("engine failed request %s", ereq.request_id)
            await abort_with(context, RemoteError(f"engine failed: {exc}"))
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
            self.request_ended(outcome)

    async def GenerateMany(
        self, request_iterator: AsyncIterator[worker_pb2.MuxClientFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.MuxServerFrame]:
        async with contextlib.aclosing(self.mux_frames(request_iterator)) as frames:
            async for frame in frames:
                yield frame

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        if not request.request_id:
            await abort_with(context, InvalidRequest("request_id is required"))
        return worker_pb2.AbortResponse(aborted=await self.engine.abort(request.request_id))

    async def DumpKvState(
        self, request: worker_pb2.DumpKvStateRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.KvStateDump:
        state = self.engine.kv_dump()
        epoch = self.epoch
        if state is None:
            await abort_with(context, Unsupported("this engine cannot dump its KV cache state"))
        blocks, watermarks = state
        worker_id = self._worker_id()  # type: ignore[operator]
        dump = worker_pb2.KvStateDump(epoch=epoch)
        by_rank: dict[int, kv_events_pb2.KvEvent] = {}
        for rank, engine_hash, seq_hash in blocks:
            ev = by_rank.get(rank)
            if ev is None:
                ev = by_rank[rank] = dump.events.add(
                    worker_id=worker_id, dp_rank=rank, event_id=max(watermarks.get(rank, 1) - 1, 0), epoch=epoch
                )
                ev.stored.SetInParent()
            ev.stored.blocks.add(block_hash=engine_hash, sequence_hash=seq_hash)
        for rank, nxt in sorted(watermarks.items()):
            dump.watermarks.add(dp_rank=rank, next_event_id=nxt)
        return dump

    async def Stats(
        self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StatsResponse:
        now = time.time()
        worker_id = self._worker_id()  # type: ignore[operator]
        return worker_pb2.StatsResponse(
            ranks=[stats_to_proto(s, worker_id, now, self.epoch) for s in self.engine.stats()]
        )
