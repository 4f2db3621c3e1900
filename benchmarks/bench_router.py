"""Router benchmarks (issue 4), one process on this machine.

The index holds 1M (block, worker) entries across 64 workers, built from KV
events as workers send them: each worker caches 4096-token prompts; a quarter
of each prompt is a system prompt shared by the workers of its group (16
groups), the rest is unique. Figures:

1. find_matches for a 4096-token prompt (64 blocks at block size 64; 256 at 16):
   a full hit (the walk goes through every block: the worst case), and a miss.
2. A whole routing decision: hash the tokens + match + kv cost over 64 workers.
3. Event application in-process, and end to end from JetStream (nats-server).
4. Memory per (block, worker) entry (tracemalloc).
5. Snapshots: the longest event-loop stall while the 1M-entry index is
   snapshotted (in one step, as before, and in chunks, as the router does now).
6. Restart: load the index snapshot from the object store, replay the stream
   tail (later events of the same workers), ready to serve; the restored index
   must equal the index of every event applied in order.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
import tracemalloc

from commutator.common import subjects
from commutator.common.events import NatsEventPlane
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.common.local_servers import NatsProcess
from commutator.router.indexer import KvIndexer
from commutator.router.ingest import KvEventIngest
from commutator.router.policies import make_policy
from commutator.router.scheduler import Scheduler, WorkerView
from commutator.v1 import kv_events_pb2

WORKERS = 64
TARGET_ENTRIES = 1_000_000
PROMPT_TOKENS = 4096
GROUPS = 16


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def timeit_us(fn, n: int = 3000) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    for _ in range(200):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return percentiles(out)


class Workload:
    """Prompts as token lists and the KV events that workers caching them would send."""

    def __init__(self, block_size: int, seed: int = 0) -> None:
        self.bs = block_size
        self.rng = random.Random(seed)
        blocks = PROMPT_TOKENS // block_size
        self.system = [[self.rng.randrange(32000) for _ in range(PROMPT_TOKENS // 4)] for _ in range(GROUPS)]
        self.blocks_per_prompt = blocks
        # A worker stores its system prompt once and 3/4 of every prompt: about TARGET_ENTRIES in all.
        per_worker = TARGET_ENTRIES / WORKERS
        self.prompts_per_worker = round(1 + (per_worker - blocks) / (blocks * 3 / 4))
        self.cached: dict[int, list[list[int]]] = {}

    def prompt(self, group: int) -> list[int]:
        return self.system[group] + [self.rng.randrange(32000) for _ in range(PROMPT_TOKENS - len(self.system[group]))]

    def events(self) -> list[kv_events_pb2.KvEventBatch]:
        """One batch per worker: a Stored event per cached prompt; engine ids are per worker.

        Every prompt of a worker starts with its group's system prompt, stored
        once: later prompts store their own blocks under its last block.
        """
        out = []
        for w in range(WORKERS):
            batch = kv_events_pb2.KvEventBatch()
            prompts = [self.prompt(w % GROUPS) for _ in range(self.prompts_per_worker)]
            if w == 0:
                self.cached[w] = prompts[:1]  # kept for queries; the rest would only load the GC
            for i, toks in enumerate(prompts):
                batch.events.append(self._stored(w, i, toks, with_system=i == 0))
            out.append(batch)
        return out

    def tail_events(self, prompts_per_worker: int) -> list[kv_events_pb2.KvEventBatch]:
        """Later traffic of the same workers: their event ids go on, new prompts under the same system prompts."""
        out = []
        for w in range(WORKERS):
            batch = kv_events_pb2.KvEventBatch()
            for i in range(prompts_per_worker):
                toks = self.prompt(w % GROUPS)
                batch.events.append(self._stored(w, self.prompts_per_worker + i, toks, with_system=False))
            out.append(batch)
        return out

    def _stored(self, w: int, event_id: int, toks: list[int], with_system: bool) -> kv_events_pb2.KvEvent:
        salt = (w * 0x9E3779B97F4A7C15) & (2**64 - 1)
        shared = (PROMPT_TOKENS // 4) // self.bs
        local = local_block_hashes(toks, self.bs)
        seq = sequence_hashes(local)
        ev = kv_events_pb2.KvEvent(worker_id=1000 + w, event_id=event_id)
        ev.stored.SetInParent()
        first = 0 if with_system else shared
        if first:
            ev.stored.parent_hash = seq[first - 1] ^ salt
        for sh, lh in zip(seq[first:], local[first:], strict=True):
            ev.stored.blocks.add(block_hash=sh ^ salt, tokens_hash=lh)
        return ev


def bench_index(block_size: int) -> KvIndexer:
    wl = Workload(block_size)
    batches = wl.events()
    data = [b.SerializeToString() for b in batches]
    stored = sum(len(ev.stored.blocks) for b in batches for ev in b.events)
    gc.collect()
    gc.freeze()  # as a long-running router would after start-up: keep the set-up out of GC passes

    def fill(parse: bool) -> tuple[float, KvIndexer]:
        """Blocks/s of one fill of a fresh index, from parsed events or from their bytes."""
        idx = KvIndexer()
        gc.collect()
        t0 = time.perf_counter()
        if parse:
            for d in data:
                idx.apply_batch(kv_events_pb2.KvEventBatch.FromString(d))
        else:
            for b in batches:
                idx.apply_batch(b)
        return stored / (time.perf_counter() - t0), idx

    # One pass swings by +-20% on this machine: the median of 3 fresh fills, with the spread.
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for parse in (False, True):
            rate, idx = fill(parse)
            rates[parse].append(rate)
            entries, nodes = idx.num_entries, idx.num_nodes
            del idx
            gc.collect()
    gc.collect()
    tracemalloc.start()
    idx = KvIndexer()
    for d in data:
        idx.apply_batch(kv_events_pb2.KvEventBatch.FromString(d))
    gc.collect()
    index_mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    print(
        f"\nblock size {block_size}: {entries:,} (block, worker) entries, {nodes:,} distinct blocks, {WORKERS} workers"
    )
    for parse, label in ((False, "parsed events:            "), (True, "bytes -> parse -> apply:  ")):
        r = sorted(rates[parse])
        print(
            f"  event application, {label}{r[1]:12,.0f} blocks/s  (median of 3; {r[0]:,.0f}-{r[2]:,.0f})"
            + ("   [target >= 1M]" if not parse else "")
        )
    print(f"  memory: {index_mem / entries:.0f} bytes per entry ({index_mem / 2**20:.0f} MiB)   [target <= 200]")

    hit_worker = 0
    hit = wl.cached[hit_worker][0]
    hit_seq = sequence_hashes(local_block_hashes(hit, block_size))
    miss = [random.Random(9).randrange(32000) for _ in range(PROMPT_TOKENS)]
    miss_seq = sequence_hashes(local_block_hashes(miss, block_size))
    partial = wl.system[3] + miss[len(wl.system[3]) :]
    partial_seq = sequence_hashes(local_block_hashes(partial, block_size))
    assert idx.find_matches_seq(hit_seq)[(1000 + hit_worker, 0)] == len(hit_seq)
    nblocks = len(hit_seq)
    print(f"  find_matches, {nblocks} blocks (sequence hashes in):   p50 / p99 us   [target <= 20 / 100]")
    for name, seq in (("full hit (worst case)", hit_seq), ("shared system prompt", partial_seq), ("miss", miss_seq)):
        p50, p99 = timeit_us(lambda s=seq: idx.find_matches_seq(s))
        print(f"    {name:<28} {p50:7.1f} / {p99:7.1f}")
    local = local_block_hashes(hit, block_size)
    p50, p99 = timeit_us(lambda: idx.find_matches(local))
    print(f"    {'full hit, from local hashes':<28} {p50:7.1f} / {p99:7.1f}   (includes the sequence-hash chain)")

    sched = Scheduler(make_policy("kv", rng=random.Random(0)), idx)
    for w in range(WORKERS):
        sched.add_worker(WorkerView((1000 + w, 0), f"h{w}:1", "m", block_size, 16384))
        sched.load.active_blocks[(1000 + w, 0)] = random.Random(w).randrange(2000)
    for name, toks in (("full hit", hit), ("miss", miss)):
        p50, p99 = timeit_us(lambda t=toks: sched.route("m", t), n=2000)
        print(
            f"  routing decision ({name}: hash 4096 tokens + match + cost x {WORKERS}): "
            f"p50 {p50:6.1f} us  p99 {p99:6.1f} us   [target p99 <= 200]"
        )
    return idx


async def loop_stall_ms(work) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Run ``work()`` (a coroutine function) beside a 1 ms ticker: (longest gap between ticks, wall time), ms."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await work()
    wall = time.perf_counter() - t0
    stop.set()
    await ticker
    return max(gaps) * 1000, wall * 1000


async def bench_jetstream_and_restart(block_size: int) -> None:
    wl = Workload(block_size, seed=5)
    batches = wl.events()
    tail = wl.tail_events(2)
    # What the restarted router must rebuild: every event, applied in order, in one process.
    reference = KvIndexer()
    for b in (*batches, *tail):
        reference.apply_batch(b)
    with NatsProcess() as server:
        plane = NatsEventPlane(server.url)
        await plane.connect()
        ns, comp = "bench", "decode"
        spec = subjects.kv_events_stream_spec(ns, comp, subjects.kv_stream_max_bytes(WORKERS * 16384))
        await plane.ensure_stream(spec)
        pub = plane.publisher(spec.name, max_pending=8192)
        stored = 0
        msgs = 0
        for b in batches:
            # Workers publish up to 1024 events per message; these carry 1 prompt (64-256 blocks) each.
            for ev in b.events:
                one = kv_events_pb2.KvEventBatch(events=[ev])
                await pub.publish(subjects.kv_events_subject(ns, comp, ev.worker_id), one.SerializeToString())
                stored += len(ev.stored.blocks)
                msgs += 1
        await pub.flush(120)
        await pub.close()

        fresh = KvIndexer()
        ingest = KvEventIngest(fresh, plane, ns, comp, router_id=1, snapshot_interval_s=0)
        t0 = time.perf_counter()
        await ingest.start()
        elapsed = time.perf_counter() - t0
        assert ingest.stats.applied_seq == msgs, (ingest.stats.applied_seq, msgs)
        print(f"\nend to end from JetStream (nats-server {server.binary}): {msgs:,} messages, {stored:,} blocks")
        rate = f"{stored / elapsed:,.0f} blocks/s ({msgs / elapsed:,.0f} messages/s)"
        print(f"  fetch + parse + apply: {rate}   [target >= 100k]")

        # Event-loop stall while a snapshot of the whole index is taken (a router keeps routing meanwhile).
        n = fresh.num_entries

        async def one_step() -> None:
            ingest.build_snapshot().SerializeToString()

        async def chunked() -> None:
            await ingest.snapshot_bytes()

        one_stall, one_wall = await loop_stall_ms(one_step)
        chunk_stall, chunk_wall = await loop_stall_ms(chunked)
        print(f"  snapshot of {n:,} entries, longest event-loop stall (wall time of the snapshot):")
        print(f"    built in one step (before):   {one_stall:6.1f} ms  ({one_wall:.0f} ms)")
        print(f"    built in chunks (now):        {chunk_stall:6.1f} ms  ({chunk_wall:.0f} ms)")
        t0 = time.perf_counter()
        stall, _ = await loop_stall_ms(ingest.snapshot_now)
        print(
            f"  snapshot written to the object store in {time.perf_counter() - t0:.2f} s "
            f"(seq {ingest.stats.applied_seq}; longest stall {stall:.1f} ms)"
        )
        await ingest.close()

        # Traffic after the snapshot (the same workers, event ids going on), replayed at restart.
        pub = plane.publisher(spec.name)
        tail_msgs = 0
        for b in tail:
            for ev in b.events:
                one = kv_events_pb2.KvEventBatch(events=[ev])
                await pub.publish(subjects.kv_events_subject(ns, comp, ev.worker_id), one.SerializeToString())
                tail_msgs += 1
        await pub.close()

        restarted = KvIndexer()
        ingest2 = KvEventIngest(restarted, plane, ns, comp, router_id=2, snapshot_interval_s=0)
        t0 = time.perf_counter()
        st = await ingest2.start()
        ready = time.perf_counter() - t0
        print(
            f"  restart: snapshot {st.snapshot_entries:,} entries loaded in {st.snapshot_load_s:.2f} s, "
            f"{st.replayed_messages} tail messages replayed in {st.catch_up_s:.2f} s; "
            f"ready after {ready:.2f} s   [target <= 2 s]"
        )
        stats = restarted.stats
        same = restarted.canonical() == reference.canonical()
        print(
            f"  restored index: {restarted.num_entries:,} entries; equal to the index of every event applied "
            f"in order: {'yes' if same else 'NO'} (gaps {stats.gaps}, engine restarts {stats.restarts}, "
            f"events skipped {stats.events_skipped_unknown_parent})"
        )
        if not same or stats.gaps or stats.restarts or stats.events_skipped_unknown_parent:
            raise SystemExit("the restored index differs from the reference")
        await ingest2.close()
        await plane.close()


def main() -> None:
    bench_index(16)
    bench_index(64)
    asyncio.run(bench_jetstream_and_restart(16))


if __name__ == "__main__":
    main()
