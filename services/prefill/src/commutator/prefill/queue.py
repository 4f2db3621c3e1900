"""The prefill worker's side of the queue: take work, prefill, move the KV, reply.

How the KV moves depends on the decode engine's handoff (``Engine.kv_handoff``, named in the
request's transfer descriptor), which this worker's engine must share: push engines get it
written into their reserved blocks by the transfer backend (``--kv-transfer``); pull engines
get the prefill engine's parameters in the result and fetch it; rendezvous engines get an
early result (``started``) that says where to meet, sent before the prefill runs.

The prefill workers of a model share one durable consumer of the JetStream
work-queue stream (a consumer group): each request goes to one of them. A
worker fetches only as many requests as it has free slots, and reports each
one in progress every ``heartbeat_s``; a worker that dies stops reporting,
and its request is delivered to another one ``redelivery_s`` later. Work that
was cancelled (``PrefillCancel``: the decode worker's client left, or it gave
up) or whose deadline passed is skipped; cancelled work already running is
aborted. Every taken message is acked once handled, whatever the outcome:
only a dead worker's work is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from commutator.common import metrics, subjects
from commutator.common.events import ConsumerSpec, EventPlane, Message, PullConsumer, Subscription
from commutator.common.tasks import Supervisor
from commutator.engines.base import Engine, TokenLogprob
from commutator.engines.wire import request_from_proto
from commutator.prefill.config import PrefillQueueConfig
from commutator.v1 import common_pb2, prefill_pb2
from commutator.worker.kv_transfer import TransferBackend, TransferError

__all__ = ["PrefillQueue"]

log = logging.getLogger(__name__)

_CANCEL_TTL_S = 120.0


class PrefillQueue:
    def __init__(
        self,
        engine: Engine,
        transfer: TransferBackend,
        events: EventPlane,
        namespace: str,
        component: str,
        model: str,
        worker_id: Callable[[], int],
        label: str,
        config: PrefillQueueConfig,
    ) -> None:
        self.engine = engine
        self.transfer = transfer
        self.events = events
        self.config = config
        self._worker_id = worker_id
        self._spec = subjects.prefill_stream_spec(namespace, component)
        self._subject = subjects.prefill_subject(namespace, component, model)
        self._durable = subjects.prefill_consumer(model)
        self._cancel_subject = subjects.prefill_cancel_subject(namespace, component)
        self._consumer: PullConsumer | None = None
        self._cancels: Subscription | None = None
        self._tasks = Supervisor()
        self._active: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelled: dict[str, float] = {}
        self._slot_free = asyncio.Event()
        self._outcomes = {
            o: metrics.PREFILL_REQUESTS.labels(label, o) for o in ("done", "failed", "cancelled", "expired", "bad")
        }
        self._tokens = metrics.PREFILL_TOKENS.labels(label)
        self._stage = {s: metrics.PREFILL_STAGE_SECONDS.labels(s) for s in ("queue", "prefill", "transfer")}
        self._depth = metrics.PREFILL_QUEUE_DEPTH.labels(component)
        self.handled = 0

    @property
    def in_progress(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        await self.events.ensure_stream(self._spec, update=False)
        self._consumer = await self.events.pull_consumer(
            ConsumerSpec(
                stream=self._spec.name,
                durable=self._durable,
                filter_subject=self._subject,
                ack_wait_s=self.config.redelivery_s,
                max_ack_pending=10_000,
            )
        )
        self._cancels = await self.events.subscribe_core(self._cancel_subject)
        self._tasks.start("prefill-cancels", self._read_cancels)
        self._tasks.start("prefill-fetch", self._fetch_loop)
        self._tasks.start("prefill-queue-depth", self._poll_depth)

    async def stop(self, grace_s: float) -> None:
        """Take no more work; give the work in progress ``grace_s`` to finish (the rest is delivered
        again to another worker once its heartbeats stop)."""
        await self._tasks.close()
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._cancels is not None:
            await self._cancels.unsubscribe()
        if self._consumer is not None:
            await self._consumer.close()

    # -- loops -----------------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        loop = asyncio.get_running_loop()
        while True:
            free = self.config.max_concurrent_prefills - len(self._active)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            for msg in await self._consumer.fetch(free, 1.0):
                task = loop.create_task(self._handle(msg), name="prefill")
                self._active.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slot_free.set()

    async def _read_cancels(self) -> None:
        assert self._cancels is not None
        async for msg in self._cancels:
            try:
                rid = prefill_pb2.PrefillCancel.FromString(msg.data).request_id
            except Exception:
                metrics.BAD_MESSAGES.labels("prefill_cancel").inc()
                continue
            now = time.monotonic()
            self._cancelled[rid] = now
            if len(self._cancelled) > 10_000:
                for old in [r for r, at in self._cancelled.items() if now - at > _CANCEL_TTL_S]:
                    del self._cancelled[old]
            task = self._running.get(rid)
            if task is not None:
                task.cancel()

    async def _poll_depth(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._depth.set((await self.events.stream_state(self._spec.name)).messages)
            await asyncio.sleep(1.0)

    # -- one request -------------------------------------------------------------------------
    async def _handle(self, msg: Message) -> None:
        try:
            req = prefill_pb2.PrefillRequest.FromString(msg.data)
            request = request_from_proto(req.request)
        except Exception as exc:
            self._outcomes["bad"].inc()
            log.warning("skipped an unreadable prefill request (seq %d): %s", msg.seq, exc)
            await msg.term()
            return
        rid = request.request_id
        if rid in self._cancelled:
            self._outcomes["cancelled"].inc()
            await msg.ack()
            return
        if req.deadline_s and time.time() > req.deadline_s:
            self._outcomes["expired"].inc()
            await msg.ack()
            return
        queue_s = max(0.0, time.time() - req.enqueued_s) if req.enqueued_s else 0.0
        self._stage["queue"].observe(queue_s)
        task = asyncio.current_task()
        assert task is not None
        self._running[rid] = task
        beat = asyncio.get_running_loop().create_task(self._heartbeat(msg))
        outcome = "failed"
        result = prefill_pb2.PrefillResult(request_id=rid, prefill_worker_id=self._worker_id())
        result.timings.queue_s = queue_s
        try:
            await self._prefill(replace(request, prefill_only=True), req, result)
            outcome = "done"
        except asyncio.CancelledError:
            if rid not in self._cancelled:
                raise  # this worker is stopping, not the request: it goes to another worker
            outcome = "cancelled"  # the decode worker gave up on it: no reply wanted
            task.uncancel()
        except TransferError as exc:
            result.error_message = f"KV transfer failed: {exc}"
            log.warning("prefill %s: %s", rid, result.error_message)
        except ValueError as exc:
            result.error_message = f"refused by the prefill engine: {exc}"
        except Exception as exc:
            result.error_message = f"prefill failed: {type(exc).__name__}: {exc}"
            log.exception("prefill %s failed", rid)
        finally:
            beat.cancel()
            self._running.pop(rid, None)
            release = getattr(self.engine, "release_prefill", None)
            if release is not None:
                release(rid)
            self._outcomes[outcome].inc()
            self.handled += 1
        if outcome != "cancelled":
            result.ok = outcome == "done"
            await self._reply(req.reply_subject, result)
        await msg.ack()

    async def _prefill(self, request, req: prefill_pb2.PrefillRequest, result: prefill_pb2.PrefillResult) -> None:  # type: ignore[no-untyped-def]
        rid = request.request_id
        dest = req.request.disaggregation.transfer
        wanted = dest.handoff or "push"
        have = self.engine.kv_handoff
        if wanted != have:
            raise ValueError(
                f"the decode engine takes the KV by {wanted} handoff; this prefill worker's engine hands it off "
                f"by {have or 'none (it is not set up for disaggregated serving)'}"
            )
        early = self.engine.start_handoff(request)
        if early is not None:  # rendezvous: the decode engine meets this one while it prefills
            started = prefill_pb2.PrefillResult(
                request_id=rid, ok=True, started=True, engine_params=early, prefill_worker_id=result.prefill_worker_id
            )
            await self._reply(req.reply_subject, started)
        t0 = time.perf_counter()
        first = None
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as outputs:  # type: ignore[type-var]
                async for out in outputs:
                    if first is None and (out.token_ids or out.finish_reason is not None):
                        first = out
                        result.first_token_id = out.token_ids[0] if out.token_ids else 0
                        result.cached_prompt_tokens = out.cached_prompt_tokens
                        result.prompt_tokens = out.prompt_tokens or len(request.token_ids)
                        if out.logprobs:
                            _logprob_to_proto(out.logprobs[0], result.first_logprob)
                    if out.finish_reason is not None and out.error:
                        raise ValueError(out.error)
        except BaseException:
            if first is not None:  # drop what the engine kept for the handoff
                with contextlib.suppress(Exception):
                    self.engine.finish_handoff(rid)
            raise
        handoff = self.engine.finish_handoff(rid) if first is not None else b""
        if first is None or (wanted == "push" and not first.token_ids):
            raise ValueError("the engine produced no first token")
        result.engine_params = handoff
        result.timings.prefill_s = time.perf_counter() - t0
        self._stage["prefill"].observe(result.timings.prefill_s)
        self._tokens.inc(max(0, result.prompt_tokens - result.cached_prompt_tokens))
        if rid in self._cancelled:
            raise asyncio.CancelledError
        if wanted != "push":
            return  # the engines move the KV themselves: the prefill engine keeps it until then
        t1 = time.perf_counter()
        await self.transfer.send(self.engine, rid, result.prompt_tokens, dest)
        result.timings.transfer_s = time.perf_counter() - t1
        self._stage["transfer"].observe(result.timings.transfer_s)

    async def _heartbeat(self, msg: Message) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _reply(self, subject: str, result: prefill_pb2.PrefillResult) -> None:
        try:
            await self.events.publish_core(subject, result.SerializeToString())
        except Exception as exc:  # the decode worker times out and prefills by itself
            log.warning("prefill result for %s not delivered: %s", result.request_id, exc)


def _logprob_to_proto(lp: TokenLogprob, out: common_pb2.TokenLogprob) -> None:
    out.token_id = lp.token_id
    out.logprob = lp.logprob
    for tid, value in lp.top:
        out.top.add(token_id=tid, logprob=value)
