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
5. Restart: load the index snapshot from the object store, replay the stream
   tail, ready to serve.
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
        shared = (PROMPT_TOKENS // 4) // self.bs
        for w in range(WORKERS):
            salt = (w * 0x9E3779B97F4A7C15) & (2**64 - 1)
            batch = kv_events_pb2.KvEventBatch()
            prompts = [self.prompt(w % GROUPS) for _ in range(self.prompts_per_worker)]
            if w == 0:
                self.cached[w] = prompts[:1]  # kept for queries; the rest would only load the GC
            for i, toks in enumerate(prompts):
                local = local_block_hashes(toks, self.bs)
                seq = sequence_hashes(local)
                ev = batch.events.add(worker_id=1000 + w, event_id=i)
                ev.stored.SetInParent()
                first = 0 if i == 0 else shared
                if first:
                    ev.stored.parent_hash = seq[first - 1] ^ salt
                for sh, lh in zip(seq[first:], local[first:], strict=True):
                    ev.stored.blocks.add(block_hash=sh ^ salt, tokens_hash=lh)
            out.append(batch)
        return out


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


async def bench_jetstream_and_restart(idx: KvIndexer, block_size: int) -> None:
    wl = Workload(block_size, seed=5)
    batches = wl.events()
    with NatsProcess() as server:
        plane = NatsEventPlane(server.url)
        await plane.connect()
        ns, comp = "bench", "decode"
        spec = subjects.kv_events_stream_spec(ns, comp)
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
        assert fresh.num_entries == fresh.num_entries and ingest.stats.applied_seq == msgs
        print(f"\nend to end from JetStream (nats-server {server.binary}): {msgs:,} messages, {stored:,} blocks")
        rate = f"{stored / elapsed:,.0f} blocks/s ({msgs / elapsed:,.0f} messages/s)"
        print(f"  fetch + parse + apply: {rate}   [target >= 100k]")

        t0 = time.perf_counter()
        seq = await ingest.snapshot_now()
        print(f"  snapshot of {fresh.num_entries:,} entries written in {time.perf_counter() - t0:.2f} s (seq {seq})")
        await ingest.close()

        # Traffic after the snapshot, replayed at restart.
        tail = Workload(block_size, seed=6)
        tail.prompts_per_worker = 2
        pub = plane.publisher(spec.name)
        tail_msgs = 0
        for b in tail.events():
            for ev in b.events:
                ev.event_id += 10_000  # later events of the same workers would continue their ids
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
        await ingest2.close()
        await plane.close()


def main() -> None:
    bench_index(16)
    idx = bench_index(64)
    asyncio.run(bench_jetstream_and_restart(idx, 16))


if __name__ == "__main__":
    main()
