"""The router core: the pure scheduler wired to discovery, the event plane and the workers.

The same object serves the standalone router service and is embedded
in-process by the frontend (``--router-mode kv`` there costs no extra hop).
It watches the workers in discovery (a worker that leaves is dropped from
the index and the load view at once), reads their load statistics and KV
events, optionally shares load with other router replicas, and proxies
Generate streams with exact load accounting.

Presence: every router (service or embedded in a frontend) registers
``{router_component}/replica-{id}`` in discovery, so that the other replicas
free its requests' load the moment it leaves, and so that its KV-event
consumer only holds back the stream's purge while it lives.

Cache-hit check: for every request it routes and tracks, the router remembers the hits it predicted
on the chosen worker (:attr:`RouteResult.predicted_hit_blocks`); at the first response it compares
them with the worker's ``cached_prompt_tokens`` (``commutator_router_cache_hit_error_blocks``) and
warns, at most once a minute per worker, when a worker persistently finds far fewer than predicted
(:mod:`commutator.router.hits`).

Failover: a worker that cannot be reached (a connection failure, not an
application error) is inhibited at once: it gets no requests until it leaves
discovery or answers a gRPC health check again, and a request that had no
response yet is routed to another worker (``worker_retries`` times), and one
that had streamed tokens is migrated: continued on another worker from its
prompt plus the tokens streamed so far (``migration_limit`` times).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from commutator.common import metrics, subjects, tracing
from commutator.common.clock import Clock, SystemClock
from commutator.common.discovery import Discovery, InstanceEvent, InstanceInfo, InstanceSet, Registration, WatchKind
from commutator.common.errors import (
    DeadlineExceeded,
    InstanceNotFound,
    InvalidRequest,
    NoInstances,
    Overloaded,
    Unavailable,
    Unsupported,
)
from commutator.common.events import EventPlane, EventPlaneError, Subscription
from commutator.common.grpc import EndpointClient
from commutator.common.logging import Throttle
from commutator.common.prompt import prompt_ids, with_token_ids
from commutator.common.tasks import Supervisor
from commutator.common.tls import MutualTls
from commutator.router.adaptive import AdaptiveTuner
from commutator.router.config import RouterConfig
from commutator.router.hits import HitTracker
from commutator.router.indexer import ApproxIndexer, KvIndexer, WorkerKey
from commutator.router.ingest import KvEventIngest, WorkerDump
from commutator.router.migration import Progress
from commutator.router.mux import MuxRequest, WorkerMux
from commutator.router.policies import KvPolicy, make_policy
from commutator.router.scheduler import Outcome, RouteResult, Scheduler, WorkerView
from commutator.router.sync import ReplicaSync
from commutator.router.tcp_call import open_worker_stream
from commutator.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc

__all__ = ["Router"]

log = logging.getLogger(__name__)

_DEPARTED_KEEP_S = 3600.0
REPLICA_ENDPOINT = "replica"
"""Discovery endpoint under the router component where every router core announces itself."""


class Router:
    def __init__(
        self,
        config: RouterConfig,
        discovery: Discovery,
        events: EventPlane | None,
        namespace: str,
        *,
        router_component: str = "router",
        clock: Clock | None = None,
        rng: random.Random | None = None,
        tls: MutualTls | None = None,
    ) -> None:
        """``tls``: mutual TLS to the workers (their gRPC calls and their TCP streams)."""
        self.config = config
        self.discovery = discovery
        self.events = events
        self.namespace = namespace
        self.router_component = router_component
        self.clock = clock or SystemClock()
        indexer: KvIndexer | ApproxIndexer = KvIndexer() if config.kv_events else ApproxIndexer(config.approx_ttl_s)
        policy = make_policy(
            config.router_mode,
            overlap_weight=config.overlap_weight,
            temperature=config.router_temperature,
            rng=rng,
            decode_weight=config.decode_weight,
        )
        self.adaptive: AdaptiveTuner | None = None
        if config.router_adaptive:
            if not isinstance(policy, KvPolicy):
                raise ValueError("--router-adaptive tunes the kv cost: it needs --router-mode kv")
            self.adaptive = AdaptiveTuner(
                config.adaptive_weights,
                config.adaptive_temperatures,
                decode_weights=config.adaptive_decode_weights,
                explore=config.adaptive_explore,
                half_life=config.adaptive_half_life,
                start=(config.overlap_weight, config.router_temperature, config.decode_weight),
                rng=rng,
            )
            policy.overlap_weight, policy.temperature, policy.decode_weight = self.adaptive.params(self.adaptive.best)
        # Adaptive routing: request -> (arm, contested, when routed).
        self._arms: dict[str, tuple[int, bool, float]] = {}
        # Requests routed and tracked here, until their first response: (worker, predicted hit blocks, block size).
        self._predicted: dict[str, tuple[WorkerKey, int, int]] = {}
        self.hits = HitTracker()
        self.scheduler = Scheduler(
            policy,
            indexer,
            busy_kv_usage=config.busy_kv_usage,
            busy_prefill_tokens=config.busy_prefill_tokens,
            block_size=config.router_block_size,
        )
        self.workers: EndpointClient[worker_pb2_grpc.WorkerStub] = EndpointClient(
            discovery,
            namespace,
            config.worker_component,
            config.worker_endpoint,
            worker_pb2_grpc.WorkerStub,
            default_timeout_s=config.generate_timeout_s,
            tls=tls,
        )
        self.workers.instance_set.add_listener(self._on_worker)
        self.ingest: KvEventIngest | None = None
        self.sync: ReplicaSync | None = None
        self._routers = InstanceSet(discovery, namespace, router_component, REPLICA_ENDPOINT)
        self._routers.add_listener(self._on_router)
        self._presence: Registration | None = None
        self._stats_sub: Subscription | None = None
        self._tasks = Supervisor(clock=self.clock)
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._departed: dict[int, float] = {}
        self._no_dump: set[int] = set()  # workers whose engine cannot dump its cache: live events only
        self._stream_bytes = 0
        self._muxes: dict[int, WorkerMux] = {}
        self._bad_stats = metrics.BAD_MESSAGES.labels("worker_stats")
        self._bad_stats_log = Throttle()
        self._stage = {s: metrics.ROUTER_STAGE_SECONDS.labels(s) for s in ("hash", "match", "select", "total")}
        self._decisions = {o: metrics.ROUTER_DECISIONS.labels(o.value) for o in Outcome}
        self._prompt_blocks = metrics.ROUTER_PROMPT_BLOCKS.labels("prompt")
        self._overlap_blocks = metrics.ROUTER_PROMPT_BLOCKS.labels("overlap")
        self._adaptive_weight = metrics.ROUTER_ADAPTIVE.labels("overlap_weight")
        self._adaptive_decode_weight = metrics.ROUTER_ADAPTIVE.labels("decode_weight")
        self._adaptive_accuracy = metrics.ROUTER_ADAPTIVE.labels("index_accuracy")
        self._hit_error = metrics.ROUTER_CACHE_HIT_ERROR
        self._predicted_hits = metrics.ROUTER_PROMPT_BLOCKS.labels("predicted_hit")
        self._found_hits = metrics.ROUTER_PROMPT_BLOCKS.labels("found_hit")

    @property
    def router_id(self) -> int:
        return self.discovery.instance_id

    @property
    def indexer(self) -> KvIndexer | ApproxIndexer:
        assert self.scheduler.indexer is not None
        return self.scheduler.indexer

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        # Announced first: from here on, other replicas count this one's KV-event consumer as live.
        self._presence = await self.discovery.register(
            self.namespace, self.router_component, REPLICA_ENDPOINT, InstanceInfo(address="", role="router")
        )
        await self._routers.start()
        await self.workers.start()
        if self.events is not None:
            self._stats_sub = await self.events.subscribe_core(
                subjects.load_subjects(self.namespace, self.config.worker_component), max_pending=4096
            )
            self._tasks.start("router-load-stats", self._read_stats)
            if isinstance(self.indexer, KvIndexer):
                self.ingest = KvEventIngest(
                    self.indexer,
                    self.events,
                    self.namespace,
                    self.config.worker_component,
                    self.router_id,
                    recover=self._recover_worker,
                    snapshot_interval_s=self.config.snapshot_interval_s,
                    is_departed=self._departed.__contains__,
                    live_routers=lambda: self._routers.instances.keys(),
                )
                await self.ingest.start()
                self._drop_absent_workers()
                await self._size_kv_stream()
            if self.config.router_replica_sync:
                self.sync = ReplicaSync(
                    self.events,
                    self.namespace,
                    self.router_component,
                    lambda: self.router_id,
                    self._apply_replica_event,
                )
                await self.sync.start()
        self._tasks.start("router-housekeeping", self._housekeeping)
        log.info(
            "router started",
            extra={
                "commutator_fields": {
                    "mode": self.config.router_mode,
                    "kv_events": self.config.kv_events,
                    "workers": len(self.scheduler.workers),
                    "replica_sync": self.config.router_replica_sync,
                }
            },
        )

    async def close(self) -> None:
        """Stop (a drain: every stream through this router has ended). The KV-event consumer is
        deleted and the presence key removed, so nothing waits for this replica any more."""
        await self._tasks.close()
        for t in self._probes.values():
            t.cancel()
        for t in self._probes.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._probes.clear()
        muxes, self._muxes = list(self._muxes.values()), {}
        for mux in muxes:
            await mux.close()
        if self._stats_sub is not None:
            await self._stats_sub.unsubscribe()
        if self.sync is not None:
            await self.sync.close()
        await self._routers.close()
        if self.ingest is not None:
            await self.ingest.close(delete_consumer=True)
        await self.workers.close()
        if self._presence is not None:
            try:
                await self.discovery.deregister(self._presence)
            except Exception as exc:
                log.warning("router presence not removed (its lease expiry removes it): %s", exc)
            self._presence = None

    # -- the worker set ---------------------------------------------------------------------
    def _on_worker(self, ev: InstanceEvent) -> None:
        inst = ev.instance
        if ev.kind is WatchKind.PUT:
            for rank in range(max(1, inst.info.dp_size)):
                self.scheduler.add_worker(
                    WorkerView(
                        (inst.instance_id, rank),
                        inst.info.address,
                        inst.info.model,
                        inst.info.block_size,
                        inst.info.kv_capacity_blocks,
                    )
                )
            self._departed.pop(inst.instance_id, None)
        else:
            self._departed[inst.instance_id] = self.clock.monotonic()
            self.scheduler.remove_worker(inst.instance_id)
            mux = self._muxes.pop(inst.instance_id, None)
            if mux is not None:  # its stream ends once the requests on it are done (a draining worker)
                mux.closing = True
                mux._maybe_close()
            self._no_dump.discard(inst.instance_id)
            self.hits.forget(inst.instance_id)
            probe = self._probes.pop(inst.instance_id, None)
            if probe is not None:
                probe.cancel()
            for kind in ("active_blocks", "prefill_tokens", "requests", "kv_usage"):
                with contextlib.suppress(KeyError):
                    metrics.ROUTER_WORKER_LOAD.remove(f"{inst.instance_id:x}", kind)
            log.info("worker %x left: dropped from the index and the load view", inst.instance_id)

    def _drop_absent_workers(self) -> None:
        """After replaying history, forget index entries of workers that are gone."""
        present = {k[0] for k in self.scheduler.workers}
        gone = {k[0] for k in self.indexer.workers()} - present
        for worker_id in gone:
            self.indexer.remove_worker(worker_id)
        if gone:
            log.info("dropped %d departed workers from the replayed index", len(gone))

    async def _read_stats(self) -> None:
        assert self._stats_sub is not None
        async for msg in self._stats_sub:
            try:
                s = common_pb2.WorkerStats.FromString(msg.data)
            except Exception as exc:
                self._bad_stats.inc()
                held = self._bad_stats_log.allow()
                if held is not None:
                    log.warning(
                        "skipped an unreadable worker-stats message on %s (%d more held back): %s",
                        msg.subject,
                        held,
                        exc,
                    )
                continue
            key = (s.worker_id, s.dp_rank)
            self.scheduler.update_usage(key, s.kv_blocks_used, s.kv_blocks_total)
            ingest = self.ingest
            if ingest is not None and key in self.scheduler.workers and ingest.indexer.is_newer_epoch(key, s.epoch):
                await ingest.observe_epoch(key, s.epoch)  # its engine restarted: its cache is empty

    # -- unreachable workers ----------------------------------------------------------------
    def inhibit(self, worker_id: int, reason: str) -> None:
        """Route nothing to ``worker_id`` until it leaves discovery or answers a health check."""
        if not self.scheduler.inhibit(worker_id):
            return
        metrics.ROUTER_INHIBITIONS.labels("inhibited").inc()
        log.warning("worker %x cannot be reached (%s): no requests until it answers a health check", worker_id, reason)
        self._probes[worker_id] = asyncio.get_running_loop().create_task(
            self._probe(worker_id), name=f"probe-{worker_id:x}"
        )

    async def _probe(self, worker_id: int) -> None:
        try:
            while worker_id in self.scheduler.inhibited:
                await self.clock.sleep(self.config.health_probe_interval_s)
                if await self.workers.health_check(worker_id, timeout_s=min(1.0, self.config.health_probe_interval_s)):
                    if self.scheduler.lift(worker_id):
                        metrics.ROUTER_INHIBITIONS.labels("lifted").inc()
                        log.info("worker %x answers its health check again: routing to it", worker_id)
                    return
        finally:
            if self._probes.get(worker_id) is asyncio.current_task():
                del self._probes[worker_id]

    async def _recover_worker(self, key: WorkerKey) -> WorkerDump | None:
        """A worker's cache state after lost events; ``None``: keep rebuilding it from live events."""
        if key[0] not in self.workers.instances or key[0] in self._no_dump:
            return None
        try:
            dump: worker_pb2.KvStateDump = await self.workers.call(
                "DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=key[0], timeout_s=30.0
            )
        except Unsupported:
            self._no_dump.add(key[0])
            log.info("worker %x cannot dump its KV cache: its index entries come from live events only", key[0])
            return None
        pairs = [
            (b.block_hash, b.sequence_hash) for ev in dump.events if ev.dp_rank == key[1] for b in ev.stored.blocks
        ]
        nxt = next((w.next_event_id for w in dump.watermarks if w.dp_rank == key[1]), 0)
        return WorkerDump(pairs, nxt, dump.epoch)

    def _on_router(self, ev: InstanceEvent) -> None:
        if ev.kind is WatchKind.DELETE and ev.instance.instance_id != self.router_id:
            freed = self.scheduler.load.free_owner(ev.instance.instance_id)
            if freed:
                log.info("router %x left: freed %d of its requests", ev.instance.instance_id, freed)

    def _apply_replica_event(self, ev: router_pb2.LoadEvent) -> None:
        rid = f"{ev.router_id:x}/{ev.request_id}"
        load = self.scheduler.load
        kind = ev.WhichOneof("kind")
        if kind == "added":
            a = ev.added
            load.add(
                rid,
                (a.worker_id, a.dp_rank),
                a.prefill_tokens,
                list(a.sequence_hashes),
                a.total_blocks,
                self.clock.monotonic(),
                owner=ev.router_id,
            )
        elif kind == "prefill_done":
            load.prefill_done(rid)
        elif kind == "freed":
            load.free(rid)

    async def _size_kv_stream(self) -> None:
        """Keep the KV-event stream's byte limit in step with the index it feeds (the workers' capacity)."""
        if self.ingest is None or self.events is None:
            return
        total = sum(w.kv_capacity_blocks for w in self.scheduler.workers.values())
        want = subjects.kv_stream_max_bytes(total)
        if self._stream_bytes and abs(want - self._stream_bytes) <= self._stream_bytes // 8:
            return  # small changes (a worker more or less of many) are not worth a stream update
        try:
            await self.events.ensure_stream(
                subjects.kv_events_stream_spec(self.namespace, self.config.worker_component, want)
            )
        except EventPlaneError as exc:
            log.warning("could not size the KV-event stream: %s", exc)
            return
        if want != self._stream_bytes:
            log.info("KV-event stream limit set to %d MiB (%d KV blocks across workers)", want >> 20, total)
        self._stream_bytes = want

    async def _housekeeping(self) -> None:
        timeout_s = self.config.effective_load_timeout_s
        while True:
            await self.clock.sleep(1.0)
            await self._size_kv_stream()
            now = self.clock.monotonic()
            load = self.scheduler.load
            expired = load.expire(now, timeout_s)
            if expired:
                log.warning("force-freed %d requests whose end was never reported", len(expired))
            if len(self._predicted) > len(load.requests):  # ended without a word (expired, worker gone)
                self._predicted = {r: p for r, p in self._predicted.items() if r in load.requests}
            if isinstance(self.indexer, ApproxIndexer):
                self.indexer.expire(now)
            for worker_id, at in list(self._departed.items()):
                if now - at > _DEPARTED_KEEP_S:
                    del self._departed[worker_id]
            idx = self.indexer
            metrics.ROUTER_INDEX.labels("nodes").set(idx.num_nodes)
            metrics.ROUTER_INDEX.labels("entries").set(idx.num_entries)
            metrics.ROUTER_INDEX.labels("workers").set(len(idx.workers()))
            for key in self.scheduler.workers:
                label = f"{key[0]:x}" if key[1] == 0 else f"{key[0]:x}-{key[1]}"
                metrics.ROUTER_WORKER_LOAD.labels(label, "active_blocks").set(load.active_blocks.get(key, 0))
                metrics.ROUTER_WORKER_LOAD.labels(label, "prefill_tokens").set(load.prefill_tokens.get(key, 0))
                metrics.ROUTER_WORKER_LOAD.labels(label, "requests").set(load.active_requests.get(key, 0))
                metrics.ROUTER_WORKER_LOAD.labels(label, "kv_usage").set(self.scheduler.kv_usage.get(key, 0.0))

    # -- routing ----------------------------------------------------------------------------
    def route(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str = "",
        cache_salt: str = "",
        requested: WorkerKey | None = None,
    ) -> RouteResult:
        """Choose a worker (no load is counted: see :meth:`track`)."""
        t0 = time.perf_counter()
        try:
            result = self.scheduler.route(
                model, token_ids, lora_name=lora_name, cache_salt=cache_salt, requested=requested
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._decisions[result.outcome].inc()
        if result.outcome is Outcome.ROUTED:
            self._stage["total"].observe(time.perf_counter() - t0)
            if result.seq_hashes:
                self._stage["hash"].observe(result.hash_s)
                self._stage["match"].observe(result.match_s)
            self._stage["select"].observe(result.select_s)
            self._prompt_blocks.inc(result.prompt_blocks)
            self._overlap_blocks.inc(result.overlap_blocks)
        return result

    def track(self, request_id: str, result: RouteResult) -> bool:
        """Count a routed request's load until :meth:`free` (or the load timeout)."""
        added = self.scheduler.track(request_id, result, self.clock.monotonic())
        if added and result.seq_hashes and result.worker is not None:  # the route looked at the index
            self._predicted[request_id] = (result.worker.key, result.predicted_hit_blocks, result.block_size)
        if added and self.sync is not None and result.worker is not None:
            total = -(-result.isl // result.block_size) if result.block_size else 0
            self.sync.added(request_id, result.worker.key, result.prefill_tokens, total, result.seq_hashes)
        return added

    def _route_observed(
        self,
        model: str,
        token_ids: Sequence[int],
        lora_name: str,
        cache_salt: str,
    ) -> RouteResult:
        """:meth:`route_or_raise` for a request whose first token will be observed: under adaptive
        routing the kv policy weighs every arm's pick and the tuner chooses (see
        :mod:`commutator.router.adaptive`); every other decision uses the best arm."""
        policy = self.scheduler.policy
        if self.adaptive is None or not isinstance(policy, KvPolicy):
            return self.route_or_raise(model, token_ids, lora_name=lora_name, cache_salt=cache_salt)
        policy.tuner = self.adaptive
        try:
            return self.route_or_raise(model, token_ids, lora_name=lora_name, cache_salt=cache_salt)
        finally:
            policy.tuner = None

    def _use_best_arm(self) -> None:
        tuner = self.adaptive
        assert tuner is not None
        policy = self.scheduler.policy
        assert isinstance(policy, KvPolicy)
        policy.overlap_weight, policy.temperature, policy.decode_weight = tuner.params(tuner.best)
        self._adaptive_weight.set(policy.overlap_weight)
        self._adaptive_decode_weight.set(policy.decode_weight)

    def prefill_done(self, request_id: str, first: common_pb2.GenerateResponse | None = None) -> bool:
        """The request's prompt is computed (its first tokens came, in ``first``, which says how much of
        the prompt the worker found cached)."""
        predicted = self._predicted.pop(request_id, None)
        found = -1
        if predicted is not None and first is not None:
            found = self._check_hits(predicted, first.cached_prompt_tokens)
        tuner = self.adaptive
        if tuner is not None:
            picked = self._arms.pop(request_id, None)
            if picked is not None and first is not None:
                arm, contested, routed_at = picked
                tuner.observe(
                    arm,
                    time.perf_counter() - routed_at,
                    predicted[1] if predicted else 0,
                    max(found, 0),
                    contested=contested,
                )
                self._use_best_arm()
                self._adaptive_accuracy.set(tuner.accuracy)
        known = self.scheduler.load.prefill_done(request_id)
        if known and self.sync is not None:
            self.sync.prefill_done(request_id)
        return known

    def _check_hits(self, predicted: tuple[WorkerKey, int, int], cached_tokens: int) -> int:
        """Compare a request's predicted hits with the cached tokens its worker reported; returns the
        blocks found cached. Warns (at most once a minute per worker) on a persistent shortfall."""
        key, blocks, bs = predicted
        found = cached_tokens // bs if bs else 0
        self._hit_error.observe(found - blocks)
        self._predicted_hits.inc(blocks)
        self._found_hits.inc(found)
        div = self.hits.observe(key, blocks, found, self.clock.monotonic())
        if div is not None:
            log.warning(
                "worker %x rank %d found %d of the %d prompt blocks the router predicted cached over its last %d "
                "requests (%.0f%%): is its prefix caching off, or do its block hashes differ from the router's "
                "(block size, LoRA, cache salt), or are its KV events stale? KV routing to it falls back to load "
                "balancing",
                key[0],
                key[1],
                div.found_blocks,
                div.predicted_blocks,
                div.requests,
                div.share * 100,
            )
        return found

    def free(self, request_id: str) -> bool:
        self._predicted.pop(request_id, None)
        known = self.scheduler.load.free(request_id)
        if known and self.sync is not None:
            self.sync.freed(request_id)
        return known

    def overlaps(
        self, token_ids: Sequence[int], lora_name: str = "", cache_salt: str = "", model: str = ""
    ) -> tuple[int, dict[WorkerKey, int]]:
        """The block size used and the cached leading blocks per worker."""
        cands = self.scheduler.candidates(model)
        bs = self.config.router_block_size or (self.scheduler.workers[cands[0]].block_size if cands else 0)
        if not bs:
            return 0, {}
        try:
            return bs, self.scheduler.overlaps(token_ids, bs, lora_name, cache_salt)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def route_or_raise(self, model: str, token_ids: Sequence[int], **kw: Any) -> RouteResult:
        result = self.route(model, token_ids, **kw)
        if result.outcome is Outcome.NO_WORKERS:
            raise NoInstances(f"no worker serves model {model!r}" if model else "no workers registered")
        if result.outcome is Outcome.ALL_BUSY:
            raise Overloaded("all workers are busy")
        return result

    async def generate(
        self,
        request: common_pb2.GenerateRequest,
        *,
        requested: WorkerKey | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        prompt: Sequence[int] | None = None,
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Route ``request`` and stream the chosen worker's responses, with exact load accounting:
        counted when routed, prompt dropped at the first token, freed at the end, on error and on cancel.

        A worker that cannot be reached is inhibited. While nothing has been streamed yet the
        request is routed again (up to ``worker_retries`` times); once tokens have been streamed it
        is migrated (up to ``migration_limit`` times): the prompt plus the tokens streamed so far go
        to another worker, which continues the output where it broke off, and the consumer sees
        one stream (see :class:`Progress`). Neither happens for a ``requested`` worker.

        Push mode: a consumer that sends a callable with ``asend`` (instead of ``__anext__``) after a
        response asks for the rest of the responses to be handed to it as they arrive, with no task
        woken per response (see :meth:`MuxRequest.push`); ``asend`` then returns when the request has
        ended (``StopAsyncIteration``) or raises its error. Where that is not possible (a unary
        worker stream) ``asend`` returns the next response as ``__anext__`` would.

        ``prompt``: the request's prompt (``token_ids``, or ``token_bytes`` as an ``array('I')``) as the
        caller built the request from it (the frontend does). Routing hashes the prompt; reading a
        thousand ids from a protobuf repeated field takes 35-60 µs, from a list 8 µs, from an array 1 µs.
        It must hold the same ids: only routing reads it.
        """
        if not request.request_id:
            raise InvalidRequest("request_id is required")
        rid = request.request_id
        attempt = 0
        migratable = requested is None and self.config.migration_limit > 0
        progress = Progress(request) if migratable else None
        sink: Callable[[common_pb2.GenerateResponse], bool] | None = None  # a push consumer, once handed over
        deadline = time.monotonic() + self.config.generate_timeout_s
        while True:
            try:
                tokens = prompt_ids(request) if prompt is None else prompt
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if requested is None:
                result = self._route_observed(request.model, tokens, request.lora_name, request.cache_salt)
            else:
                result = self.route_or_raise(
                    request.model,
                    tokens,
                    lora_name=request.lora_name,
                    cache_salt=request.cache_salt,
                    requested=requested,
                )
            assert result.worker is not None
            worker_id, rank = result.worker.key
            request.dp_rank = rank
            streamed = False
            stream: AsyncIterator[common_pb2.GenerateResponse] | None = None
            try:
                stream = self._worker_stream(worker_id, request, metadata, deadline - time.monotonic())
                # Counted once the start is on its way (over TCP it has left by now), in the same turn of
                # the event loop as the routing: no other request is routed in between.
                self.track(rid, result)
                if result.arm is not None:
                    self._arms[rid] = (result.arm, result.contested, time.perf_counter())
                prefilling = True
                if sink is not None and isinstance(stream, MuxRequest):
                    # Migrated while pushing: the new stream pushes to the same consumer.
                    await stream.push(self._prefill_watch(rid, sink))
                    return
                async for resp in stream:
                    first = None
                    if prefilling and resp.token_ids:
                        prefilling = False
                        first = resp
                    streamed = True
                    if progress is not None:
                        progress.take(resp)
                    try:
                        sink = yield resp
                    finally:
                        # The first tokens reach the consumer before the prefill's accounting is done (it
                        # is not on the time to first token); done when the consumer comes back for more,
                        # or closes the stream at them.
                        if first is not None:
                            self.prefill_done(rid, first)
                    if sink is not None and isinstance(stream, MuxRequest):
                        if progress is not None:
                            sink = progress.counting(sink)
                        await stream.push(self._prefill_watch(rid, sink) if prefilling else sink)
                        return
                return
            except (Unavailable, InstanceNotFound) as exc:
                # Not found: discovery is dropping it right now; inhibited until it is gone.
                self.inhibit(worker_id, str(exc))
                if requested is not None:
                    raise
                if progress is not None and progress.started:
                    limit = self.config.migration_limit
                    request = progress.migrate_or_raise(request, exc, limit, metrics.ROUTER_MIGRATIONS)
                    prompt = None  # the new request's prompt holds the tokens streamed so far too
                    log.warning(
                        "request %s: worker %x failed after %d tokens (%s); migrating it to another worker",
                        rid,
                        worker_id,
                        len(progress.generated),
                        exc,
                    )
                    if progress.done:  # every token it may generate was streamed: only the end was lost
                        yield progress.final()
                        return
                    continue
                if streamed or attempt >= self.config.worker_retries:
                    raise
                attempt += 1
                metrics.ROUTER_RETRIES.inc()
                log.warning(
                    "request %s: worker %x unreachable before its first response; routing again", rid, worker_id
                )
            finally:
                if stream is not None:
                    await stream.aclose()  # type: ignore[attr-defined]
                self._arms.pop(rid, None)  # ended (or failed) before its first token: no observation
                self.free(rid)

    def _prefill_watch(
        self, rid: str, sink: Callable[[common_pb2.GenerateResponse], bool]
    ) -> Callable[[common_pb2.GenerateResponse], bool]:
        """``sink``, also reporting the end of the prompt's prefill at the first tokens."""
        prefilling = True

        def watch(resp: common_pb2.GenerateResponse) -> bool:
            nonlocal prefilling
            if prefilling and resp.token_ids:
                prefilling = False
                self.prefill_done(rid, resp)
            return sink(resp)

        return watch

    def _worker_stream(
        self,
        worker_id: int,
        request: common_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float,
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """The worker's responses to ``request``: over its multiplexed stream, or a Generate call of its own."""
        if timeout_s <= 0:
            raise DeadlineExceeded(f"request {request.request_id}: generate timeout reached while migrating it")
        if request.token_bytes and not self.workers.pick("direct", worker_id).info.token_bytes:
            request = with_token_ids(request)  # a worker that does not read token_bytes (an older one)
        if self.config.worker_stream == "unary":
            return self.workers.stream(
                "Generate", request, instance_id=worker_id, timeout_s=timeout_s, metadata=metadata
            )
        mux = self._muxes.get(worker_id)
        if mux is None:
            mux = self._muxes[worker_id] = WorkerMux(
                lambda: open_worker_stream(self.workers, worker_id, self.config.worker_stream),
                buffer=self.config.worker_stream_buffer,
            )
        return mux.open(request, timeout_s, tracing.inject_metadata(metadata))
