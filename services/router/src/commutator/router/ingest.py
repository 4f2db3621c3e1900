"""KV events into the index: a durable JetStream consumer, snapshots, and recovery.

Start: load the newest index snapshot from the object store (tagged with the
stream sequence it covers), then read the stream from the next sequence
through this replica's own durable consumer until caught up. While running:
apply every message in order; snapshot the index every
``snapshot_interval_s`` and purge stream messages that every *live* router
replica has consumed and the snapshot covers; rebuild a worker from a dump of
its cache state when its event ids show lost events.

Engine epochs (docs/kv-events.md, :mod:`commutator.router.indexer`): a newer epoch, in an
event, a worker's load statistics (:meth:`KvEventIngest.observe_epoch`) or a dump, resets
that worker's entries (``commutator_router_epoch_resets_total{source}``, one log line each);
events of an older epoch are dropped
(``commutator_router_kv_events_total{result="dropped_stale_epoch"}``), and a dump of an older
epoch is refused (``commutator_router_recoveries_total{result="stale_epoch"}``). Snapshots keep
each worker's epoch, so a restarted router goes on where the snapshot left off.

Robustness: a message that cannot be read is counted
(``commutator_bad_messages_total{source="kv_events"}``), logged with its stream
sequence, acknowledged with the rest and skipped; the loops run under a
:class:`~commutator.common.tasks.Supervisor`. The consumer of a router that
died holds back no purge (only replicas present in discovery count) and is
deleted by the server after ``CONSUMER_INACTIVE_S``; a drained router deletes
its own at once.

Reading: the consumer keeps one pull request open for ``fetch_batch`` messages
(``ConsumerSpec.standing``), so nats-server pushes each batch of events as it stores it,
and acks go out at most every ``ACK_INTERVAL_S`` (ack-all, so one ack covers every
message before it), and whenever the stream has nothing new. Both save nats-server a
JetStream request per event batch, which it otherwise handles several times per request
routed (docs/hot-path.md, "What nats-server handles per request").

Snapshots are built in chunks with event application paused, so a large
index never stalls the event loop for long (``make bench-router`` measures it).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from commutator.common import metrics, subjects
from commutator.common.events import ConsumerSpec, EventPlane, EventPlaneError, Message, PullConsumer
from commutator.common.logging import Throttle
from commutator.common.tasks import Supervisor
from commutator.router.indexer import ApplyOutcome, EpochReset, KvIndexer, WorkerKey
from commutator.v1 import kv_events_pb2, router_pb2

__all__ = ["IngestStats", "KvEventIngest", "WorkerDump", "snapshot_bucket"]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
_SNAPSHOT_NAME = re.compile(r"^index-(\d{20})-([0-9a-f]+)$")
_RECOVERY_BUFFER = 50_000
_CONSUMER_NAME = re.compile(r"^router-([0-9a-f]+)$")
CONSUMER_INACTIVE_S = 300.0
"""The server deletes a router's durable consumer after this long without a reader (the router died)."""
ACK_INTERVAL_S = 0.25
"""The longest an applied message waits for its ack (far below the consumer's ack wait)."""
SNAPSHOT_CHUNK = 32_768
"""Index entries copied per step of a snapshot (the event loop runs between steps)."""


@dataclass(frozen=True, slots=True)
class WorkerDump:
    """A worker rank's cache state: ``(engine id, sequence hash)`` pairs, valid as of ``next_event_id``
    in engine epoch ``epoch`` (0: not stamped)."""

    pairs: list[tuple[int, int]]
    next_event_id: int
    epoch: int = 0


Recover = Callable[[WorkerKey], Awaitable[WorkerDump | None]]
"""Fetch a worker rank's cache state (``None``: it cannot be had)."""


def snapshot_bucket(namespace: str, component: str) -> str:
    return f"router_index_{namespace}_{component}"


@dataclass(slots=True)
class IngestStats:
    snapshot_seq: int = 0
    snapshot_entries: int = 0
    snapshot_load_s: float = 0.0
    replayed_messages: int = 0
    catch_up_s: float = 0.0
    messages: int = 0
    applied_seq: int = 0
    bad_messages: int = 0


class KvEventIngest:
    def __init__(
        self,
        indexer: KvIndexer,
        events: EventPlane,
        namespace: str,
        component: str,
        router_id: int,
        *,
        recover: Recover | None = None,
        snapshot_interval_s: float = 60.0,
        keep_snapshots: int = 2,
        fetch_batch: int = 512,
        is_departed: Callable[[int], bool] = lambda _: False,
        live_routers: Callable[[], Collection[int]] | None = None,
    ) -> None:
        """``live_routers`` gives the ids of the router replicas present in discovery: only their
        consumers hold back a purge (``None``: every consumer does)."""
        self.indexer = indexer
        self.events = events
        self.namespace = namespace
        self.component = component
        self.router_id = router_id
        self._recover = recover
        self._snapshot_interval = snapshot_interval_s
        self._keep = keep_snapshots
        self._batch = fetch_batch
        self._is_departed = is_departed
        self._live_routers = live_routers
        self._spec = subjects.kv_events_stream_spec(namespace, component)
        self._bucket = snapshot_bucket(namespace, component)
        self._consumer: PullConsumer | None = None
        self._durable = f"router-{router_id:x}"
        self._tasks = Supervisor()
        self._lock = asyncio.Lock()  # held while the index changes, and across a snapshot
        self._recovering: dict[WorkerKey, list[kv_events_pb2.KvEvent]] = {}
        self._recovery_tasks: set[asyncio.Task[None]] = set()
        self.stats = IngestStats()
        self._last_snapshot_seq = 0
        self._unacked: Message | None = None
        self._acked_at = 0.0
        self._counters = {o: metrics.ROUTER_KV_EVENTS.labels(o.value) for o in ApplyOutcome}
        self._lag = metrics.ROUTER_KV_EVENT_LAG
        self._buffered = metrics.ROUTER_KV_EVENTS.labels("buffered_for_recovery")
        self._departed_events = metrics.ROUTER_KV_EVENTS.labels("dropped_departed_worker")
        self._bad = metrics.BAD_MESSAGES.labels("kv_events")
        self._bad_log = Throttle()
        indexer.on_epoch_reset = self._epoch_reset

    # -- start ------------------------------------------------------------------------------
    async def start(self) -> IngestStats:
        """Load the newest snapshot, replay the stream until caught up, then keep reading."""
        await self.events.ensure_stream(self._spec, update=False)  # the router core sizes it
        t0 = time.perf_counter()
        start_seq = await self._load_snapshot() + 1
        self.stats.snapshot_load_s = time.perf_counter() - t0
        await self.events.delete_consumer(self._spec.name, self._durable)
        self._consumer = await self.events.pull_consumer(
            ConsumerSpec(
                stream=self._spec.name,
                durable=self._durable,
                start_seq=start_seq if start_seq > 1 else None,
                ack_all=True,
                ack_wait_s=60.0,
                inactive_threshold_s=CONSUMER_INACTIVE_S,
                standing=self._batch,
            )
        )
        t1 = time.perf_counter()
        target = (await self.events.stream_state(self._spec.name)).last_seq
        empty = 0
        while self.stats.applied_seq < target and empty < 3:
            empty = 0 if await self._fetch_and_apply(timeout_s=0.5) else empty + 1
        await self._ack()
        self.stats.replayed_messages = self.stats.messages
        self.stats.catch_up_s = time.perf_counter() - t1
        self._tasks.start("kv-ingest", self._run)
        if self._snapshot_interval > 0:
            self._tasks.start("kv-snapshots", self._snapshot_loop)
        log.info(
            "KV index ready: snapshot seq %d (%d entries, %.0f ms), replayed %d messages (%.0f ms)",
            self.stats.snapshot_seq,
            self.stats.snapshot_entries,
            self.stats.snapshot_load_s * 1000,
            self.stats.replayed_messages,
            self.stats.catch_up_s * 1000,
        )
        return self.stats

    async def _load_snapshot(self) -> int:
        names = await self.events.object_list(self._bucket)
        best = max(((int(m.group(1)), n) for n in names if (m := _SNAPSHOT_NAME.match(n))), default=None)
        if best is None:
            return 0
        _, name = best
        data = await self.events.object_get(self._bucket, name)
        if data is None:
            return 0
        snap = router_pb2.IndexSnapshot.FromString(data)
        if snap.format != SNAPSHOT_FORMAT:
            log.warning("ignoring index snapshot %s of unknown format %d", name, snap.format)
            return 0
        entries = 0
        for w in snap.workers:
            engine = array.array("Q")
            engine.frombytes(w.engine_hashes)
            seqs = array.array("Q")
            seqs.frombytes(w.sequence_hashes)
            nxt = w.next_event_id if w.HasField("next_event_id") else w.last_event_id + 1
            self.indexer.restore_worker(
                (w.worker_id, w.dp_rank), zip(engine.tolist(), seqs.tolist(), strict=True), nxt, w.epoch
            )
            entries += len(engine)
        self.stats.snapshot_seq = snap.stream_seq
        self.stats.snapshot_entries = entries
        self.stats.applied_seq = snap.stream_seq
        self._last_snapshot_seq = snap.stream_seq
        return snap.stream_seq

    # -- reading ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._fetch_and_apply(timeout_s=1.0)
            except EventPlaneError as exc:
                log.warning("KV event fetch failed: %s", exc)
                await asyncio.sleep(0.5)

    async def _fetch_and_apply(self, timeout_s: float) -> int:
        assert self._consumer is not None
        msgs = await self._consumer.fetch(self._batch, timeout_s)
        if not msgs:
            await self._ack()  # the stream has nothing new: ack what was applied
            return 0
        async with self._lock:
            for m in msgs:
                try:
                    self._apply_message(m)
                except Exception as exc:  # one unreadable message must never stop ingestion
                    self._bad_message(m, exc)
            self.stats.messages += len(msgs)
            self.stats.applied_seq = msgs[-1].seq
        now = time.time()
        for m in msgs:
            if m.stored_at:
                self._lag.observe(max(0.0, now - m.stored_at))
        self._unacked = msgs[-1]  # its ack acks everything up to here, bad messages included
        if now - self._acked_at >= ACK_INTERVAL_S:
            await self._ack()
        return len(msgs)

    async def _ack(self) -> None:
        m, self._unacked = self._unacked, None
        if m is not None:
            self._acked_at = time.time()
            await m.ack()

    def _apply_message(self, m: Message) -> None:
        batch = kv_events_pb2.KvEventBatch.FromString(m.data)
        indexer = self.indexer
        counters = self._counters
        recovering = self._recovering
        for ev in batch.events:
            if self._is_departed(ev.worker_id):
                self._departed_events.inc()
                continue
            if recovering:
                key = (ev.worker_id, ev.dp_rank)
                buf = recovering.get(key)
                if buf is not None:
                    if len(buf) < _RECOVERY_BUFFER:
                        buf.append(ev)
                        self._buffered.inc()
                    continue
            outcome = indexer.apply_event(ev)
            counters[outcome].inc()
            if outcome is ApplyOutcome.GAP:
                self._start_recovery((ev.worker_id, ev.dp_rank))

    # -- epochs -----------------------------------------------------------------------------
    async def observe_epoch(self, key: WorkerKey, epoch: int) -> None:
        """A worker rank's load statistics carry ``epoch``: a newer one than the index knows means
        its engine restarted, and its entries go (under the lock, so never inside a snapshot)."""
        if not self.indexer.is_newer_epoch(key, epoch):
            return
        if key not in self.indexer.slots:  # nothing to drop: kept for its first event, no lock needed
            self.indexer.observe_epoch(key, epoch, "stats")
            return
        async with self._lock:
            self.indexer.observe_epoch(key, epoch, "stats")

    def _epoch_reset(self, r: EpochReset) -> None:
        metrics.ROUTER_EPOCH_RESETS.labels(r.source).inc()
        log.info(
            "worker %x rank %d: its engine restarted (epoch %d -> %d, seen in its %s): %d index entries dropped",
            r.key[0],
            r.key[1],
            r.old_epoch,
            r.new_epoch,
            r.source,
            r.dropped_blocks,
        )

    def _bad_message(self, m: Message, exc: Exception) -> None:
        self.stats.bad_messages += 1
        self._bad.inc()
        held = self._bad_log.allow()
        if held is not None:
            log.warning(
                "skipped an unreadable KV-event message: stream %s seq %d, subject %s, %d bytes "
                "(%d more held back): %s",
                self._spec.name,
                m.seq,
                m.subject,
                len(m.data),
                held,
                exc,
            )

    # -- recovery ---------------------------------------------------------------------------
    def _start_recovery(self, key: WorkerKey) -> None:
        if self._recover is None or key in self._recovering:
            return
        self._recovering[key] = []
        task = asyncio.get_running_loop().create_task(self._run_recovery(key), name=f"kv-recover-{key[0]:x}")
        self._recovery_tasks.add(task)
        task.add_done_callback(self._recovery_tasks.discard)

    async def _run_recovery(self, key: WorkerKey) -> None:
        assert self._recover is not None
        result = None
        try:
            result = await self._recover(key)
        except Exception as exc:
            log.warning("could not fetch the cache state of worker %x: %s", key[0], exc)
        async with self._lock:
            self._finish_recovery(key, result)

    def _finish_recovery(self, key: WorkerKey, result: WorkerDump | None) -> None:
        buffered = self._recovering.pop(key, [])
        if result is None:
            metrics.ROUTER_RECOVERIES.labels("failed").inc()
            # Keep what the live events rebuild; a later gap tries again.
            self._replay(key, buffered)
            return
        if not self.indexer.restore_worker(key, result.pairs, result.next_event_id, result.epoch):
            # Taken before an engine restart the index has seen since (its statistics said so):
            # the live events of the new epoch rebuild it (a gap among them asks again).
            metrics.ROUTER_RECOVERIES.labels("stale_epoch").inc()
            log.info("worker %x: its cache-state dump predates its engine's restart; not used", key[0])
            self._replay(key, buffered)
            return
        self._replay(key, buffered)  # events older than the dump are skipped by id (or epoch)
        metrics.ROUTER_RECOVERIES.labels("ok").inc()
        log.info(
            "worker %x rebuilt from its cache state: %d blocks as of event %d, %d events replayed",
            key[0],
            len(result.pairs),
            result.next_event_id,
            len(buffered),
        )

    def _replay(self, key: WorkerKey, buffered: list[kv_events_pb2.KvEvent]) -> None:
        """Apply the events held back while ``key`` was being recovered; a gap among them (a
        restarted engine whose first events were lost, say) starts another recovery, which holds
        back the rest."""
        for i, ev in enumerate(buffered):
            outcome = self.indexer.apply_event(ev)
            self._counters[outcome].inc()
            if outcome is ApplyOutcome.GAP:
                self._start_recovery(key)
                rest = self._recovering.get(key)
                if rest is not None:
                    rest.extend(buffered[i + 1 :])
                    return

    # -- snapshots --------------------------------------------------------------------------
    def build_snapshot(self) -> router_pb2.IndexSnapshot:
        """The index as it is now, in one synchronous step (tests and tools; the service uses
        :meth:`snapshot_bytes`, which does not stall the event loop)."""
        snap = router_pb2.IndexSnapshot(
            format=SNAPSHOT_FORMAT, stream_seq=self.stats.applied_seq, created_s=time.time()
        )
        for key in sorted(self.indexer.slots):
            engine, seqs, last = self.indexer.worker_pairs(key)
            snap.workers.add(
                worker_id=key[0],
                dp_rank=key[1],
                last_event_id=max(last, 0),
                engine_hashes=array.array("Q", engine).tobytes(),
                sequence_hashes=array.array("Q", seqs).tobytes(),
                epoch=self.indexer.epoch_of(key),
                next_event_id=last + 1,
            )
        return snap

    async def snapshot_bytes(self, chunk: int = SNAPSHOT_CHUNK) -> tuple[int, bytes]:
        """A serialized snapshot and the stream sequence it covers, built in steps of
        ``chunk`` entries with event application paused (so it is consistent with
        that sequence) while routing goes on between the steps.

        The bytes are one ``IndexSnapshot``: serialized protobuf messages concatenate into their
        merge, so each worker's entry is serialized on its own and the pieces are joined.
        """
        async with self._lock:
            seq = self.stats.applied_seq
            head = router_pb2.IndexSnapshot(format=SNAPSHOT_FORMAT, stream_seq=seq, created_s=time.time())
            parts = [head.SerializeToString()]
            for key in sorted(self.indexer.slots):
                piece = await self._worker_piece(key, chunk)
                if piece is not None:
                    parts.append(piece)
                await asyncio.sleep(0)
        return seq, b"".join(parts)

    async def _worker_piece(self, key: WorkerKey, chunk_size: int) -> bytes | None:
        idx = self.indexer
        slot = idx.slots.get(key)
        if slot is None:
            return None  # left discovery meanwhile
        wmap = idx.maps[slot] or {}
        last = idx.last_event[slot]
        epoch = idx.epochs[slot]
        engine = array.array("Q")
        seqs = array.array("Q")
        items = iter(wmap.items())
        try:
            while True:
                chunk = list(itertools.islice(items, chunk_size))
                if not chunk:
                    break
                engine.extend([e for e, _ in chunk])
                seqs.extend([q for _, q in chunk])
                if len(chunk) < chunk_size:
                    break
                await asyncio.sleep(0)
        except RuntimeError:  # the map changed under us: the worker left discovery (or was reset)
            return None
        one = router_pb2.IndexSnapshot()
        one.workers.add(
            worker_id=key[0],
            dp_rank=key[1],
            last_event_id=max(last, 0),
            engine_hashes=engine.tobytes(),
            sequence_hashes=seqs.tobytes(),
            epoch=epoch,
            next_event_id=last + 1,
        )
        return one.SerializeToString()

    async def snapshot_now(self) -> int | None:
        """Write a snapshot (if there is anything new), prune old ones, purge the stream. Returns its seq."""
        if self._recovering or self.stats.applied_seq <= self._last_snapshot_seq:
            return None
        seq, data = await self.snapshot_bytes()
        name = f"index-{seq:020d}-{self.router_id:x}"
        await self.events.object_put(self._bucket, name, data)
        self._last_snapshot_seq = seq
        metrics.ROUTER_SNAPSHOTS.inc()
        names = sorted(
            (n for n in await self.events.object_list(self._bucket) if _SNAPSHOT_NAME.match(n)), reverse=True
        )
        for old in names[self._keep :]:
            await self.events.object_delete(self._bucket, old)
        await self._ack()  # this replica's own floor is then up to date
        purge_to = await self._purge_bound(seq)
        if purge_to > 0:
            await self.events.purge(self._spec.name, before_seq=purge_to + 1)
        log.info("index snapshot %s: %d entries; stream purged below %d", name, self.indexer.num_entries, purge_to + 1)
        return seq

    async def _purge_bound(self, snapshot_seq: int) -> int:
        """The highest sequence that may go: covered by this snapshot and consumed by every live
        router replica. A consumer whose router is not in discovery (it died) holds nothing back."""
        floors = await self.events.consumer_ack_floors(self._spec.name)
        live = self._live_routers() if self._live_routers is not None else None
        bound = snapshot_seq
        for name, floor in floors.items():
            m = _CONSUMER_NAME.match(name)
            if m is None:
                continue
            owner = int(m.group(1), 16)
            if live is not None and owner != self.router_id and owner not in live:
                continue
            bound = min(bound, floor)
        return bound

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self._snapshot_interval)
            try:
                await self.snapshot_now()
            except EventPlaneError as exc:
                log.warning("index snapshot failed: %s", exc)

    async def close(self, *, delete_consumer: bool = False) -> None:
        """Stop reading. ``delete_consumer`` (a drain): remove this replica's durable consumer, so
        that it holds back no purge; a router that dies leaves it to the server's inactivity timeout."""
        await self._tasks.close()
        for task in list(self._recovery_tasks):
            task.cancel()
        for task in list(self._recovery_tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._consumer is not None:
            if not delete_consumer:
                await self._ack()
            await self._consumer.close()
            self._consumer = None
            if delete_consumer:
                try:
                    await self.events.delete_consumer(self._spec.name, self._durable)
                except EventPlaneError as exc:
                    log.warning("could not delete KV-event consumer %s: %s", self._durable, exc)
