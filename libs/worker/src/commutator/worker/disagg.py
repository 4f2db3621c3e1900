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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from commutator.common import metrics, subjects
from commutator.common.config import option
from commutator.common.discovery import InstanceSet
from commutator.common.events import EventPlaneError, Publisher, Subscription
from commutator.common.logging import Throttle
from commutator.common.runtime import Runtime
from commutator.common.tasks import Supervisor
from commutator.engines.base import (
    KV_HANDOFFS,
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
from commutator.v1 import common_pb2, prefill_pb2
from commutator.worker.kv_transfer import TransferBackend

__all__ = ["DisaggConfig", "DisaggEngine", "Reservations"]

log = logging.getLogger(__name__)

_REMEMBERED_DECISIONS = 4096
"""Remote-prefill decisions kept from start_request for the generate() that follows it."""


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


class _Pending:
    """The replies one remote prefill waits for: ``first`` (rendezvous: the early result that says
    where to meet; otherwise the final one) and ``final``."""

    __slots__ = ("final", "first")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.first: asyncio.Future[prefill_pb2.PrefillResult] = loop.create_future()
        self.final: asyncio.Future[prefill_pb2.PrefillResult] = loop.create_future()

    def deliver(self, result: prefill_pb2.PrefillResult) -> None:
        if not self.first.done():
            self.first.set_result(result)
        if not result.started and not self.final.done():
            self.final.set_result(result)


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
        # The inner engine's pass listeners, where it has them: the worker stream sends a pass's frame
        # from its listener (docs/hot-path.md); without them here, every decode worker (remote prefill
        # is on by default) fell back to waking the stream's frames task after each pass.
        self.add_pass_listener: Callable[[Callable[[], None]], None] | None = getattr(inner, "add_pass_listener", None)
        self.remove_pass_listener: Callable[[Callable[[], None]], None] | None = getattr(
            inner, "remove_pass_listener", None
        )
        self.transfer = transfer
        self._rt = runtime
        self._model = model_name
        self._grpc_address = grpc_address
        self.reservations = Reservations(inner.release_import)
        self._waiting: dict[str, _Pending] = {}
        # start_request found these go to a prefill worker; generate(), called next, need not decide again.
        self._remote_decided: set[str] = set()
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

    @property
    def kv_handoff(self) -> str:
        return self.inner.kv_handoff

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        return self.inner.start_handoff(request)

    def finish_handoff(self, request_id: str) -> bytes:
        return self.inner.finish_handoff(request_id)

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
            pending = self._waiting.get(result.request_id)
            if pending is not None:
                pending.deliver(result)

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
        if mode == "never" or request.prefill_only or request.kv_import is not None:
            return "local"
        if self.inner.kv_handoff not in KV_HANDOFFS or not self.prefill_workers():
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

    def start_request(self, request: EngineRequest, notify: Callable[[], None]) -> Any:
        """The inner engine's :meth:`start_request` for a request prefilled here; None (use
        :meth:`generate`) when the inner engine has none or the prefill goes to a prefill worker."""
        start = getattr(self.inner, "start_request", None)
        if start is None:
            return None
        if self.decide(request) != "local":
            if len(self._remote_decided) >= _REMEMBERED_DECISIONS:
                self._remote_decided.clear()  # ids whose generate() never came (cancelled first): decide again
            self._remote_decided.add(request.request_id)
            return None
        pushed = start(request, notify)
        self._where["local"].inc()
        return pushed

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        # Every stream below is closed with this one (aclosing): an abandoned request stops at once.
        rid = request.request_id
        if rid in self._remote_decided:
            self._remote_decided.discard(rid)
            where = "remote"
        else:
            where = self.decide(request)
        if where == "remote":
            handoff = self.inner.kv_handoff
            blocks: tuple[int, ...] | None = ()
            if handoff == "push":
                blocks = self.inner.reserve_import(request)  # None: no room for it now (prefill here)
            if blocks is not None:
                async with contextlib.aclosing(self._remote(request, handoff, blocks)) as remote:
                    async for out in remote:
                        yield out
                return
        self._where["local"].inc()
        async with contextlib.aclosing(self.inner.generate(request)) as local:  # type: ignore[type-var]
            async for out in local:
                yield out

    async def _remote(
        self, request: EngineRequest, handoff: str, blocks: tuple[int, ...]
    ) -> AsyncGenerator[EngineOutput, None]:
        """Prefill ``request`` on a prefill worker, then decode it here; on any failure before the
        first token, prefill it here instead (the client never sees the failure)."""
        rid = request.request_id
        push = handoff == "push"
        if push:
            self.reservations.add(rid, blocks)
        pending = _Pending(asyncio.get_running_loop())
        self._waiting[rid] = pending
        done = False  # the KV is here (push: the reservation handed over) and the first token came
        try:
            result = await self._await_prefill(request, handoff, blocks, pending)
            if result is not None and push and not self.reservations.hand_over(rid):
                log.warning("remote prefill of %s: its KV write had not ended; prefilling here", rid)
                result = None
            if result is not None:
                imported = replace(
                    request, kv_import=KvImport(result.first_token_id, blocks, engine_params=result.engine_params)
                )
                async with contextlib.aclosing(self.inner.generate(imported)) as decoding:  # type: ignore[type-var]
                    first = await self._first_output(rid, decoding, pending, handoff)
                    if first is not None:
                        done = True
                        self._where["remote"].inc()
                        yield self._with_prefill_figures(request, first, handoff, result, pending)
                        async for out in decoding:
                            yield out
        finally:
            self._waiting.pop(rid, None)
            if push and not done:
                self.reservations.abandon(rid)
            if not done:
                await self._cancel(rid)  # skipped if still queued, aborted if running
        if done:
            return
        self._where["fallback"].inc()
        async with contextlib.aclosing(self.inner.generate(request)) as local:  # type: ignore[type-var]
            async for out in local:
                yield out

    async def _await_prefill(
        self, request: EngineRequest, handoff: str, blocks: Sequence[int], pending: _Pending
    ) -> prefill_pb2.PrefillResult | None:
        """Queue the prefill and wait for its result (rendezvous: for the early one that says where
        to meet); ``None`` when it failed or timed out."""
        rid = request.request_id
        try:
            await self._enqueue(request, handoff, blocks)
            wanted = pending.first if handoff == "rendezvous" else pending.final
            result = await asyncio.wait_for(asyncio.shield(wanted), self.config.prefill_timeout_s)
        except (TimeoutError, EventPlaneError) as exc:
            log.warning("remote prefill of %s failed (%s): prefilling here", rid, exc or "timed out")
            return None
        if not result.ok:
            log.warning("remote prefill of %s failed: %s; prefilling here", rid, result.error_message)
            return None
        return result

    async def _first_output(
        self,
        rid: str,
        decoding: AsyncIterator[EngineOutput],
        pending: _Pending,
        handoff: str,
    ) -> EngineOutput | None:
        """The decode engine's first output, or ``None`` (the caller prefills here) when it fails
        first. Push engines have the KV in place and emit the prefill's token at once. Pull and
        rendezvous engines fetch the KV themselves: an error, a finish without tokens, the
        prefill worker reporting failure (rendezvous: the final result) or
        ``--prefill-timeout-s`` running out before their first token all count as the remote
        prefill failing."""
        if handoff == "push":
            return await anext(decoding, None)
        deadline = time.monotonic() + self.config.prefill_timeout_s
        step = asyncio.ensure_future(anext(decoding, None))
        watched: set[asyncio.Future[Any]] = {step}
        if handoff == "rendezvous":
            watched.add(pending.final)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("remote prefill of %s: no first token before the timeout; prefilling here", rid)
                    return None
                finished, _ = await asyncio.wait(watched, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if step in finished:
                    first = step.result()
                    if first is None or (first.finish_reason is not None and not first.token_ids):
                        why = first.error if first is not None and first.error else "it ended without a token"
                        log.warning("remote prefill of %s: the decode engine failed (%s); prefilling here", rid, why)
                        return None
                    return first
                if pending.final in finished:
                    watched.discard(pending.final)
                    final = pending.final.result()
                    if not final.ok:
                        log.warning("remote prefill of %s failed: %s; prefilling here", rid, final.error_message)
                        return None
        except Exception as exc:  # the engine refused the handoff (ValueError) or broke on it
            log.warning("remote prefill of %s: the decode engine failed (%s); prefilling here", rid, exc)
            return None
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step

    @staticmethod
    def _with_prefill_figures(
        request: EngineRequest,
        out: EngineOutput,
        handoff: str,
        result: prefill_pb2.PrefillResult,
        pending: _Pending,
    ) -> EngineOutput:
        """The first output reports the prompt tokens the prefill found cached (rendezvous: when
        its final result is in by then; else the decode engine's own count stays) and, for push
        engines, whose first token is the prefill's, that token's logprob."""
        final = pending.final.result() if pending.final.done() else None
        if final is not None or not result.started:
            out.prompt_tokens = len(request.token_ids)
            out.cached_prompt_tokens = (final or result).cached_prompt_tokens
        if handoff == "push" and request.logprobs is not None and result.HasField("first_logprob"):
            lp = result.first_logprob
            head = TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
            out.logprobs = [head, *(out.logprobs or [])[1:]] if out.logprobs else [head]
        return out

    async def _enqueue(self, request: EngineRequest, handoff: str, blocks: Sequence[int]) -> None:
        assert self._publisher is not None and self._rt.discovery is not None
        g = request_to_proto(replace(request, prefill_only=True))
        g.model = self._model
        if handoff == "push":
            g.disaggregation.transfer.CopyFrom(self.transfer.descriptor(self._grpc_address(), blocks))
        else:  # the engines move the KV themselves (their connector, their rendezvous)
            g.disaggregation.transfer.kind = common_pb2.TransferDescriptor.KIND_ENGINE
        g.disaggregation.transfer.handoff = handoff
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
