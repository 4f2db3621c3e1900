"""The router core: the pure scheduler wired to discovery, the event plane and the workers.

The same object serves the standalone router service and is embedded
in-process by the frontend (``--router-mode kv`` there costs no extra hop).
It watches the workers in discovery (a worker that leaves is dropped from
the index and the load view at once), reads their load statistics and KV
events, optionally shares load with other router replicas, and proxies
Generate streams with exact load accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from commutator.common import metrics, subjects
from commutator.common.clock import Clock, SystemClock
from commutator.common.discovery import Discovery, InstanceEvent, InstanceSet, WatchKind
from commutator.common.errors import InvalidRequest, NoInstances, Overloaded
from commutator.common.events import EventPlane, Subscription
from commutator.common.grpc import EndpointClient
from commutator.router.config import RouterConfig
from commutator.router.indexer import ApproxIndexer, KvIndexer, WorkerKey
from commutator.router.ingest import KvEventIngest
from commutator.router.policies import make_policy
from commutator.router.scheduler import Outcome, RouteResult, Scheduler, WorkerView
from commutator.router.sync import ReplicaSync
from commutator.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc

__all__ = ["Router"]

log = logging.getLogger(__name__)

_DEPARTED_KEEP_S = 3600.0


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
    ) -> None:
        self.config = config
        self.discovery = discovery
        self.events = events
        self.namespace = namespace
        self.router_component = router_component
        self.clock = clock or SystemClock()
        indexer: KvIndexer | ApproxIndexer = KvIndexer() if config.kv_events else ApproxIndexer(config.approx_ttl_s)
        policy = make_policy(
            config.router_mode, overlap_weight=config.overlap_weight, temperature=config.router_temperature, rng=rng
        )
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
        )
        self.workers.instance_set.add_listener(self._on_worker)
        self.ingest: KvEventIngest | None = None
        self.sync: ReplicaSync | None = None
        self._routers: InstanceSet | None = None
        self._stats_sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._departed: dict[int, float] = {}
        self._stage = {s: metrics.ROUTER_STAGE_SECONDS.labels(s) for s in ("hash", "match", "select", "total")}
        self._decisions = {o: metrics.ROUTER_DECISIONS.labels(o.value) for o in Outcome}
        self._prompt_blocks = metrics.ROUTER_PROMPT_BLOCKS.labels("prompt")
        self._overlap_blocks = metrics.ROUTER_PROMPT_BLOCKS.labels("overlap")

    @property
    def router_id(self) -> int:
        return self.discovery.instance_id

    @property
    def indexer(self) -> KvIndexer | ApproxIndexer:
        assert self.scheduler.indexer is not None
        return self.scheduler.indexer

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.workers.start()
        loop = asyncio.get_running_loop()
        if self.events is not None:
            self._stats_sub = await self.events.subscribe_core(
                subjects.load_subjects(self.namespace, self.config.worker_component), max_pending=4096
            )
            self._tasks.append(loop.create_task(self._read_stats(), name="router-load-stats"))
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
                )
                await self.ingest.start()
                self._drop_absent_workers()
            if self.config.router_replica_sync:
                self.sync = ReplicaSync(
                    self.events,
                    self.namespace,
                    self.router_component,
                    lambda: self.router_id,
                    self._apply_replica_event,
                )
                await self.sync.start()
                self._routers = InstanceSet(self.discovery, self.namespace, self.router_component)
                self._routers.add_listener(self._on_router)
                await self._routers.start()
        self._tasks.append(loop.create_task(self._housekeeping(), name="router-housekeeping"))
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
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._stats_sub is not None:
            await self._stats_sub.unsubscribe()
        if self.sync is not None:
            await self.sync.close()
        if self._routers is not None:
            await self._routers.close()
        if self.ingest is not None:
            await self.ingest.close()
        await self.workers.close()

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
            except Exception:
                continue
            self.scheduler.update_usage((s.worker_id, s.dp_rank), s.kv_blocks_used, s.kv_blocks_total)

    async def _recover_worker(self, key: WorkerKey) -> tuple[list[tuple[int, int]], int] | None:
        if key[0] not in self.workers.instances:
            return None
        dump: worker_pb2.KvStateDump = await self.workers.call(
            "DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=key[0], timeout_s=30.0
        )
        pairs = [
            (b.block_hash, b.sequence_hash) for ev in dump.events if ev.dp_rank == key[1] for b in ev.stored.blocks
        ]
        nxt = next((w.next_event_id for w in dump.watermarks if w.dp_rank == key[1]), 0)
        return pairs, nxt

    def _on_router(self, ev: InstanceEvent) -> None:
        if ev.kind is WatchKind.DELETE:
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

    async def _housekeeping(self) -> None:
        while True:
            await self.clock.sleep(1.0)
            now = self.clock.monotonic()
            load = self.scheduler.load
            expired = load.expire(now, self.config.load_timeout_s)
            if expired:
                log.warning("force-freed %d requests whose end was never reported", len(expired))
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
        if added and self.sync is not None and result.worker is not None:
            total = -(-result.isl // result.block_size) if result.block_size else 0
            self.sync.added(request_id, result.worker.key, result.prefill_tokens, total, result.seq_hashes)
        return added

    def prefill_done(self, request_id: str) -> bool:
        known = self.scheduler.load.prefill_done(request_id)
        if known and self.sync is not None:
            self.sync.prefill_done(request_id)
        return known

    def free(self, request_id: str) -> bool:
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
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Route ``request`` and stream the chosen worker's responses, with exact load accounting:
        counted when routed, prompt dropped at the first token, freed at the end, on error and on cancel."""
        if not request.request_id:
            raise InvalidRequest("request_id is required")
        result = self.route_or_raise(
            request.model,
            request.token_ids,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
            requested=requested,
        )
        assert result.worker is not None
        worker_id, rank = result.worker.key
        request.dp_rank = rank
        rid = request.request_id
        self.track(rid, result)
        try:
            first = True
            async for resp in self.workers.stream(
                "Generate", request, instance_id=worker_id, timeout_s=self.config.generate_timeout_s, metadata=metadata
            ):
                if first and resp.token_ids:
                    first = False
                    self.prefill_done(rid)
                yield resp
        finally:
            self.free(rid)
