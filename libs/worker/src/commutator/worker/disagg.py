"""The decode side of disaggregated serving (DESIGN.md 2): an engine wrapper, so the Worker
service stays the same.

For each request :class:`DisaggEngine` decides where its prompt is prefilled
(conditional disaggregation): remotely when prefill workers serve this model,
the part of the prompt its engine has not cached is longer than
``--max-local-prefill-length``, and fewer than ``--max-prefill-queue-size``
requests wait in the prefill queue (polled twice a second, cached); else here.

Remote: the engine prepares (push engines reserve the prompt's blocks; no room:
local), a ``PrefillRequest`` goes to the JetStream work queue of the model's
prefill workers, and the wrapper waits for the ``PrefillResult`` on this
worker's reply subject, at most ``--prefill-timeout-s``. The KV arrives by the
transfer backend (:mod:`commutator.worker.kv_transfer`) before the result does;
then the engine decodes from the prefill's first token, and the first output
reports the prompt tokens the prefill found cached. A prefill that fails or
times out is done here instead (the client never sees it); a client that
leaves while its prefill is queued or running frees the reservation at once
and a ``PrefillCancel`` tells the prefill workers to skip or abort it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from commutator.common import metrics, subjects
from commutator.common.config import option
from commutator.common.discovery import InstanceSet
from commutator.common.events import EventPlaneError, Publisher, Subscription
from commutator.common.logging import Throttle
from commutator.common.runtime import Runtime
from commutator.common.tasks import Supervisor
from commutator.engines.base import (
    Engine,
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvDump,
    KvEventRecord,
    KvImport,
    TokenLogprob,
)
from commutator.engines.wire import request_to_proto
from commutator.v1 import prefill_pb2
from commutator.worker.kv_transfer import TransferBackend

__all__ = ["DisaggConfig", "DisaggEngine", "Reservations"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    """Where a decode worker's prompts are prefilled."""

    prefill_component: str = option(
        "prefill", "Discovery component of the prefill workers (remote prefill only while one serves this model)"
    )
    remote_prefill: str = option(
        "auto",
        "auto: conditional disaggregation (the length and queue limits below); always: every prompt goes to "
        "the prefill workers while any serve the model; never: every prompt is prefilled here",
        choices=("auto", "always", "never"),
    )
    max_local_prefill_length: int = option(
        1000, "auto: prefill remotely only when the uncached part of the prompt is longer than this (tokens)"
    )
    max_prefill_queue_size: int = option(
        16, "auto: prefill here while this many prefill requests (or more) are in the prefill queue"
    )
    prefill_timeout_s: float = option(30.0, "Prefill here when a remote prefill has not finished after this long")


@dataclass(slots=True)
class _Reservation:
    blocks: tuple[int, ...]
    writers: int = 0
    abandoned: bool = False


@dataclass(slots=True)
class Reservations:
    """Blocks reserved for prompts being prefilled elsewhere.

    A reservation is released when the decode side gives up on it (:meth:`abandon`) but never
    while a KV write into it is under way (:meth:`writing`): then when that write ends.
    :meth:`hand_over` ends it without a release (the blocks now belong to the decoding request).
    """

    release: Callable[[str], None]
    _by_id: dict[str, _Reservation] = field(default_factory=dict)

    def add(self, request_id: str, blocks: Sequence[int]) -> None:
        self._by_id[request_id] = _Reservation(tuple(blocks))

    def get(self, request_id: str) -> tuple[int, ...] | None:
        r = self._by_id.get(request_id)
        return None if r is None or r.abandoned else r.blocks

    @contextlib.contextmanager
    def writing(self, request_id: str) -> Iterator[Sequence[int] | None]:
        r = self._by_id.get(request_id)
        if r is None or r.abandoned:
            yield None
            return
        r.writers += 1
        try:
            yield r.blocks
        finally:
            r.writers -= 1
            if r.abandoned and r.writers == 0:
                self._finish(request_id, release=True)

    def abandon(self, request_id: str) -> None:
        r = self._by_id.get(request_id)
        if r is None:
            return
        r.abandoned = True
        if r.writers == 0:
            self._finish(request_id, release=True)

    def hand_over(self, request_id: str) -> bool:
        """The KV is in place: the decoding request takes the blocks. False if it was abandoned."""
        r = self._by_id.get(request_id)
        if r is None or r.abandoned or r.writers:
            return False
        self._finish(request_id, release=False)
        return True

    def _finish(self, request_id: str, release: bool) -> None:
        self._by_id.pop(request_id, None)
        if release:
            self.release(request_id)

    def __len__(self) -> int:
        return len(self._by_id)


class DisaggEngine:
    """The inner engine, with remote prefill. See the module docstring and ``Engine``."""

    def __init__(
        self,
        inner: Engine,
        config: DisaggConfig,
        transfer: TransferBackend,
        runtime: Runtime,
        model_name: str,
        worker_label: str,
        grpc_address: Callable[[], str],
    ) -> None:
        self.inner = inner
        self.config = config
        self.transfer = transfer
        self._rt = runtime
        self._model = model_name
        self._grpc_address = grpc_address
        self.reservations = Reservations(inner.release_import)
        self._waiting: dict[str, asyncio.Future[prefill_pb2.PrefillResult]] = {}
        self._tasks = Supervisor()
        self._prefill: InstanceSet | None = None
        self._publisher: Publisher | None = None
        self._replies: Subscription | None = None
        self._spec = subjects.prefill_stream_spec(runtime.namespace, config.prefill_component)
        self._subject = subjects.prefill_subject(runtime.namespace, config.prefill_component, model_name)
        self._cancel_subject = subjects.prefill_cancel_subject(runtime.namespace, config.prefill_component)
        self._reply_subject = ""
        self.queue_depth = 0
        self._where = {w: metrics.DISAGG_PREFILLS.labels(worker_label, w) for w in ("local", "remote", "fallback")}
        self._depth_gauge = metrics.PREFILL_QUEUE_DEPTH.labels(config.prefill_component)
        self._publish_errors = Throttle(5.0)

    # -- the Engine protocol, delegated --------------------------------------------------
    @property
    def capacity(self) -> EngineCapacity:
        return self.inner.capacity

    def stats(self) -> list[EngineStats]:
        return self.inner.stats()

    async def kv_events(self) -> list[KvEventRecord]:
        return await self.inner.kv_events()

    def kv_dump(self) -> KvDump | None:
        return self.inner.kv_dump()

    async def abort(self, request_id: str) -> bool:
        return await self.inner.abort(request_id)

    def failure(self) -> str | None:
        return self.inner.failure()

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        return self.inner.reserve_import(request)

    def release_import(self, request_id: str) -> None:
        self.inner.release_import(request_id)

    def kv_import(self, block_ids: Sequence[int], data: bytes):  # type: ignore[no-untyped-def]
        return self.inner.kv_import(block_ids, data)  # type: ignore[attr-defined]

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.inner.start()
        await self.transfer.start(self.inner)  # nixl: registers the engine's KV memory
        rt = self._rt
        assert rt.discovery is not None and rt.events is not None
        events = rt.events
        await events.ensure_stream(self._spec, update=False)
        self._publisher = events.publisher(self._spec.name)
        self._reply_subject = subjects.prefill_reply_subject(
            rt.namespace, self.config.prefill_component, rt.discovery.instance_id
        )
        self._replies = await events.subscribe_core(self._reply_subject)
        self._prefill = InstanceSet(rt.discovery, rt.namespace, self.config.prefill_component)
        await self._prefill.start()
        self._tasks.start("prefill-replies", self._read_replies)
        self._tasks.start("prefill-queue-depth", self._poll_queue)

    async def shutdown(self) -> None:
        await self._tasks.close()
        if self._replies is not None:
            await self._replies.unsubscribe()
        if self._prefill is not None:
            await self._prefill.close()
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.close(2.0)
        await self.transfer.close()
        await self.inner.shutdown()

    async def _read_replies(self) -> None:
        assert self._replies is not None
        async for msg in self._replies:
            try:
                result = prefill_pb2.PrefillResult.FromString(msg.data)
            except Exception:
                metrics.BAD_MESSAGES.labels("prefill_result").inc()
                continue
            fut = self._waiting.get(result.request_id)
            if fut is not None and not fut.done():
                fut.set_result(result)

    async def _poll_queue(self) -> None:
        assert self._rt.events is not None
        while True:
            try:
                self.queue_depth = (await self._rt.events.stream_state(self._spec.name)).messages
                self._depth_gauge.set(self.queue_depth)
            except EventPlaneError:
                pass
            await asyncio.sleep(0.5)

    # -- routing a prompt ----------------------------------------------------------------
    def prefill_workers(self) -> int:
        """Prefill workers registered for this model now."""
        if self._prefill is None:
            return 0
        return sum(1 for i in self._prefill.instances.values() if i.info.model == self._model)

    def decide(self, request: EngineRequest) -> str:
        """``remote`` or ``local`` for ``request`` (conditional disaggregation)."""
        mode = self.config.remote_prefill
        if mode == "never" or request.prefill_only or request.kv_import is not None or not self.prefill_workers():
            return "local"
        if mode == "always":
            return "remote"
        cached_fn = getattr(self.inner, "cached_prefix_tokens", None)
        cached = cached_fn(request) if cached_fn is not None else 0
        if len(request.token_ids) - cached <= self.config.max_local_prefill_length:
            return "local"
        if self.queue_depth >= self.config.max_prefill_queue_size:
            return "local"
        return "remote"

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        # Every stream below is closed with this one (aclosing): an abandoned request stops at once.
        if self.decide(request) == "remote":
            blocks = self.inner.reserve_import(request)  # None: no room for it now (prefill here)
            if blocks is not None:
                async with contextlib.aclosing(self._remote(request, blocks)) as remote:
                    async for out in remote:
                        yield out
                return
        self._where["local"].inc()
        async with contextlib.aclosing(self.inner.generate(request)) as local:  # type: ignore[type-var]
            async for out in local:
                yield out

    async def _remote(self, request: EngineRequest, blocks: tuple[int, ...]) -> AsyncGenerator[EngineOutput, None]:
        rid = request.request_id
        self.reservations.add(rid, blocks)
        fut: asyncio.Future[prefill_pb2.PrefillResult] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        handed_over = False
        result: prefill_pb2.PrefillResult | None = None
        try:
            try:
                await self._enqueue(request, blocks)
                result = await asyncio.wait_for(fut, self.config.prefill_timeout_s)
            except (TimeoutError, EventPlaneError) as exc:
                log.warning("remote prefill of %s failed (%s): prefilling here", rid, exc or "timed out")
            if result is not None and not result.ok:
                log.warning("remote prefill of %s failed: %s; prefilling here", rid, result.error_message)
                result = None
            if result is not None:
                handed_over = self.reservations.hand_over(rid)
        finally:
            self._waiting.pop(rid, None)
            if not handed_over:
                self.reservations.abandon(rid)
                await self._cancel(rid)  # skipped if still queued, aborted if running
        if result is None:
            self._where["fallback"].inc()
            async with contextlib.aclosing(self.inner.generate(request)) as local:  # type: ignore[type-var]
                async for out in local:
                    yield out
            return
        self._where["remote"].inc()
        imported = replace(
            request,
            kv_import=KvImport(result.first_token_id, blocks, engine_params=result.engine_params),
        )
        first = True
        async with contextlib.aclosing(self.inner.generate(imported)) as decoding:  # type: ignore[type-var]
            async for out in decoding:
                if first:
                    first = False
                    out.prompt_tokens = len(request.token_ids)
                    out.cached_prompt_tokens = result.cached_prompt_tokens
                    if request.logprobs is not None and result.HasField("first_logprob"):
                        lp = result.first_logprob
                        head = TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                        out.logprobs = [head, *(out.logprobs or [])[1:]] if out.logprobs else [head]
                yield out

    async def _enqueue(self, request: EngineRequest, blocks: Sequence[int]) -> None:
        assert self._publisher is not None and self._rt.discovery is not None
        g = request_to_proto(replace(request, prefill_only=True))
        g.model = self._model
        g.disaggregation.transfer.CopyFrom(self.transfer.descriptor(self._grpc_address(), blocks))
        now = time.time()
        msg = prefill_pb2.PrefillRequest(
            request=g,
            decode_worker_id=self._rt.discovery.instance_id,
            reply_subject=self._reply_subject,
            deadline_s=now + self.config.prefill_timeout_s,
            enqueued_s=now,
        )
        await self._publisher.publish(self._subject, msg.SerializeToString())

    async def _cancel(self, request_id: str) -> None:
        if self._rt.events is None:
            return
        data = prefill_pb2.PrefillCancel(request_id=request_id).SerializeToString()
        try:
            await self._rt.events.publish_core(self._cancel_subject, data)
        except Exception as exc:  # the prefill worker then finds no reservation and gives up by itself
            if self._publish_errors.allow() is not None:
                log.warning("prefill cancel for %s not published: %s", request_id, exc)
