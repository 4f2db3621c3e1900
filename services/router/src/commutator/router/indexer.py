"""The KV index: which worker holds which prompt prefix (DESIGN.md 4.3). Pure: no I/O.

Representation: a flat table keyed by *sequence hash* (a block together with
its whole prefix), which is the radix tree of DESIGN.md 4.3 flattened: a node
is its sequence hash, its children are the hashes that extend it. Each entry
holds a bit mask of the (worker, dp_rank) pairs that hold the block; every
pair owns one bit (a "slot"). Per slot, a map from the engine's own block id to
the sequence hash gives parent lookup and removal.

Why this shape (measured, see ``make bench-router``):

- ``find_matches`` looks the prompt's sequence hashes up lazily
  (``map(table.get)``) and walks runs of equal masks (``groupby``), both in C;
  Python code runs only where the set of matching workers shrinks, and the
  walk stops where the last worker drops out.
- A block held by one worker costs about 150 bytes (two dict entries and two
  64-bit ints; a single-worker mask is the shared bit object).
- Storing a block is one XXH3 (the child's sequence hash from its parent's) and
  two dict updates.

Event ids: each (worker, dp_rank) numbers its events from 0. An event that is
not the next one is a gap (lost events) or, at 0, an engine restart: the
worker's entries are dropped, and after a gap the worker is marked as needing
recovery (the shell asks it for a dump of its cache state, then
:meth:`KvIndexer.restore_worker`). Older ids (a replay overlapping a snapshot)
are skipped.

Epochs (docs/kv-events.md): events, load statistics and dumps carry the epoch of
the engine incarnation that produced them, which only grows within a worker.
Per (worker, dp_rank) the index keeps the newest epoch seen. A newer one (from an
event, :meth:`KvIndexer.observe_epoch` for statistics, or a dump) drops the
worker's entries and forgets its event ids whatever the event id says, then
the event is applied as the first of its epoch (an id above 0 is then a gap:
the worker is recovered from a dump). An older epoch is a dead engine's late
news: the event is dropped and counted, the dump refused. Epoch 0 means "not
stamped": only the event-id rules apply, and the first stamped epoch is adopted
without a reset.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby, repeat

import xxhash
from commutator.common.hashing import BLOCK_HASH_SEED, sequence_hashes
from commutator.v1 import kv_events_pb2

__all__ = ["ApplyOutcome", "ApproxIndexer", "EpochReset", "IndexStats", "KvIndexer", "WorkerKey", "match_masks"]

WorkerKey = tuple[int, int]
"""(worker_id, dp_rank)"""

_pack_pair = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest


class ApplyOutcome(enum.Enum):
    APPLIED = "applied"
    SKIPPED_UNKNOWN_PARENT = "skipped_unknown_parent"
    SKIPPED_OLD = "skipped_old"  # event id already covered (replay overlap)
    GAP = "gap"  # events were lost: the worker was reset and needs recovery
    RESTART = "restart"  # event id back to 0: the engine restarted; the worker was reset
    EPOCH_RESET = "epoch_reset"  # a newer epoch: the worker was reset, then the event applied
    STALE_EPOCH = "dropped_stale_epoch"  # an older epoch than the worker's: a dead engine's event


@dataclass(frozen=True, slots=True)
class EpochReset:
    """A worker rank's entries dropped because its engine restarted (a newer epoch was seen)."""

    key: WorkerKey
    old_epoch: int
    new_epoch: int
    dropped_blocks: int
    source: str  # what carried the new epoch: event, stats or dump


@dataclass(slots=True)
class IndexStats:
    events_applied: int = 0
    events_skipped_unknown_parent: int = 0
    events_skipped_old: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    removes_unknown: int = 0
    gaps: int = 0
    restarts: int = 0
    worker_resets: int = 0
    epoch_resets: int = 0
    events_stale_epoch: int = 0


def match_masks(masks: Iterable[int], keys: Sequence[WorkerKey | None]) -> dict[WorkerKey, int]:
    """Per worker, its number of leading blocks, from the blocks' masks in prompt order.

    Runs of equal masks are taken whole (``groupby``, in C); only where the
    mask changes does Python intersect and record who dropped out. ``masks``
    may be lazy: nothing past the block where the last worker drops out is read.
    """
    out: dict[WorkerKey, int] = {}
    current = -1
    depth = 0
    for mask, run in groupby(masks):
        new = current & mask
        if new != current:
            if current != -1:
                dropped = current & ~new
                while dropped:
                    low = dropped & -dropped
                    out[keys[low.bit_length() - 1]] = depth  # type: ignore[index]
                    dropped ^= low
            current = new
            if not current:
                return out
        depth += len(list(run))
    while current > 0:
        low = current & -current
        out[keys[low.bit_length() - 1]] = depth  # type: ignore[index]
        current ^= low
    return out


class _MaskTable:
    """Sequence hash -> bit mask of slots, with slot bookkeeping and matching."""

    def __init__(self) -> None:
        self.table: dict[int, int] = {}
        self.slots: dict[WorkerKey, int] = {}
        self.slot_keys: list[WorkerKey | None] = []
        self.bits: list[int] = []
        self._free_slots: list[int] = []

    def slot_for(self, key: WorkerKey) -> int:
        slot = self.slots.get(key)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self.slot_keys[slot] = key
            else:
                slot = len(self.slot_keys)
                self.slot_keys.append(key)
                self.bits.append(1 << slot)
            self.slots[key] = slot
            self._on_new_slot(slot)
        return slot

    def _on_new_slot(self, slot: int) -> None:
        pass

    def _release_slot(self, key: WorkerKey) -> int | None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.slot_keys[slot] = None
            self._free_slots.append(slot)
        return slot

    def _drop_bit(self, seq_hashes: Iterable[int], bit: int) -> int:
        table = self.table
        clear = ~bit
        n = 0
        for sh in seq_hashes:
            m = table.get(sh)
            if m is None:
                continue
            m &= clear
            if m:
                table[sh] = m
            else:
                del table[sh]
            n += 1
        return n

    def find_matches_seq(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """Per (worker, dp_rank), how many leading blocks of the prompt it holds (only those holding >= 1)."""
        return match_masks(map(self.table.get, seq_hashes, repeat(0)), self.slot_keys)

    def find_matches(self, local_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """:meth:`find_matches_seq` from local block hashes (computes the sequence hashes first)."""
        return self.find_matches_seq(sequence_hashes(local_hashes))

    @property
    def num_nodes(self) -> int:
        return len(self.table)

    def workers(self) -> list[WorkerKey]:
        return list(self.slots)


class KvIndexer(_MaskTable):
    """The event-fed index. See the module docstring.

    ``on_epoch_reset`` is called (synchronously) after every reset caused by a newer epoch, for the
    shell's log line and metric.
    """

    def __init__(self, on_epoch_reset: Callable[[EpochReset], None] | None = None) -> None:
        super().__init__()
        self.maps: list[dict[int, int] | None] = []  # per slot: engine block id -> sequence hash
        self.last_event: list[int] = []  # per slot: last applied event id, -1 for none
        self.epochs: list[int] = []  # per slot: newest engine epoch seen, 0 for none
        self.needs_recovery: set[WorkerKey] = set()
        self.stats = IndexStats()
        self.on_epoch_reset = on_epoch_reset
        self._early_epochs: dict[WorkerKey, int] = {}  # epochs reported before the worker's first event

    def _on_new_slot(self, slot: int) -> None:
        epoch = self._early_epochs.pop(self.slot_keys[slot], 0) if self._early_epochs else 0  # type: ignore[arg-type]
        if slot == len(self.maps):
            self.maps.append({})
            self.last_event.append(-1)
            self.epochs.append(epoch)
        else:
            self.maps[slot] = {}
            self.last_event[slot] = -1
            self.epochs[slot] = epoch

    def epoch_of(self, key: WorkerKey) -> int:
        """The newest epoch seen for a worker rank (0: none, or not stamped)."""
        slot = self.slots.get(key)
        return self.epochs[slot] if slot is not None else 0

    # -- epochs -------------------------------------------------------------------------
    def _new_epoch(self, slot: int, epoch: int, source: str) -> None:
        """Move a slot to a newer ``epoch``: an engine restart, unless no epoch was known (adopted)."""
        old = self.epochs[slot]
        self.epochs[slot] = epoch
        if not old:
            return
        key = self.slot_keys[slot]
        assert key is not None
        dropped = len(self.maps[slot] or ())
        self._reset_slot(slot)
        self.last_event[slot] = -1
        self.needs_recovery.discard(key)
        self.stats.epoch_resets += 1
        if self.on_epoch_reset is not None:
            self.on_epoch_reset(EpochReset(key, old, epoch, dropped, source))

    def is_newer_epoch(self, key: WorkerKey, epoch: int) -> bool:
        """Whether ``epoch`` is newer than the one known for a worker rank."""
        slot = self.slots.get(key)
        known = self.epochs[slot] if slot is not None else self._early_epochs.get(key, 0)
        return epoch > known

    def observe_epoch(self, key: WorkerKey, epoch: int, source: str = "stats") -> bool:
        """A worker rank reports ``epoch`` outside its events (load statistics): a newer one than
        known resets its entries. Returns whether it did. For a worker rank the index holds nothing
        of yet, the epoch is kept for its first event (an older event is then dropped); the caller
        reports only workers present in discovery (:meth:`remove_worker` forgets it)."""
        slot = self.slots.get(key)
        if not epoch:
            return False
        if slot is None:
            if epoch > self._early_epochs.get(key, 0):
                self._early_epochs[key] = epoch
            return False
        known = self.epochs[slot]
        if epoch <= known:
            return False
        self._new_epoch(slot, epoch, source)
        return bool(known)

    @property
    def num_entries(self) -> int:
        """(block, worker) entries."""
        return sum(len(m) for m in self.maps if m)

    def blocks_of(self, key: WorkerKey) -> int:
        slot = self.slots.get(key)
        return len(self.maps[slot] or ()) if slot is not None else 0

    # -- events -------------------------------------------------------------------------
    def apply_event(self, ev: kv_events_pb2.KvEvent) -> ApplyOutcome:
        """Apply one event, checking its id against the worker's last one."""
        key = (ev.worker_id, ev.dp_rank)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slot_for(key)
        outcome = ApplyOutcome.APPLIED
        epoch = ev.epoch
        if epoch and epoch != self.epochs[slot]:
            known = self.epochs[slot]
            if epoch < known:
                self.stats.events_stale_epoch += 1
                return ApplyOutcome.STALE_EPOCH
            self._new_epoch(slot, epoch, "event")
            if known:
                outcome = ApplyOutcome.EPOCH_RESET
        last = self.last_event[slot]
        eid = ev.event_id
        if eid != last + 1:
            if eid == 0:
                self.stats.restarts += 1
                self._reset_slot(slot)
                self.needs_recovery.discard(key)
                outcome = ApplyOutcome.RESTART
            elif eid <= last:
                self.stats.events_skipped_old += 1
                return ApplyOutcome.SKIPPED_OLD
            else:
                self.stats.gaps += 1
                self._reset_slot(slot)
                self.needs_recovery.add(key)
                outcome = ApplyOutcome.GAP
        self.last_event[slot] = eid
        which = ev.WhichOneof("data")
        if which == "stored":
            if not self._store(slot, ev.stored) and outcome is ApplyOutcome.APPLIED:
                outcome = ApplyOutcome.SKIPPED_UNKNOWN_PARENT
        elif which == "removed":
            self._remove(slot, ev.removed.block_hashes)
        elif which == "cleared":
            self._reset_slot(slot)
        if outcome is not ApplyOutcome.SKIPPED_UNKNOWN_PARENT:
            self.stats.events_applied += 1
        return outcome

    def apply_batch(self, batch: kv_events_pb2.KvEventBatch) -> list[ApplyOutcome]:
        return [self.apply_event(ev) for ev in batch.events]

    def _store(self, slot: int, stored: kv_events_pb2.KvStored) -> bool:
        wmap = self.maps[slot]
        assert wmap is not None
        blocks = stored.blocks
        if not blocks:
            return True
        if stored.HasField("parent_hash"):
            prev = wmap.get(stored.parent_hash)
            if prev is None:
                self.stats.events_skipped_unknown_parent += 1
                return False
        else:
            prev = None
        table = self.table
        tget = table.get
        wget = wmap.get
        bit = self.bits[slot]
        dump = blocks[0].HasField("sequence_hash")  # index dumps carry their keys
        for b in blocks:
            if dump:
                sh = b.sequence_hash
            elif prev is None:
                sh = b.tokens_hash  # a root block: its sequence hash is its local hash
            else:
                sh = _xxh3(_pack_pair(prev, b.tokens_hash), BLOCK_HASH_SEED)
            bh = b.block_hash
            old = wget(bh)
            if old != sh:  # a repeated store of the same block changes nothing
                if old is not None:
                    self._drop_bit((old,), bit)  # the engine reused an id for other content
                wmap[bh] = sh
                m = tget(sh)
                table[sh] = bit if m is None else (m | bit)
            prev = sh
        self.stats.blocks_stored += len(blocks)
        return True

    def _remove(self, slot: int, block_hashes: Iterable[int]) -> None:
        wmap = self.maps[slot]
        assert wmap is not None
        table = self.table
        clear = ~self.bits[slot]
        for bh in block_hashes:
            sh = wmap.pop(bh, None)
            if sh is None:
                self.stats.removes_unknown += 1
                continue
            m = table.get(sh)
            if m is None:
                continue
            m &= clear
            if m:
                table[sh] = m
            else:
                del table[sh]
            self.stats.blocks_removed += 1

    def _reset_slot(self, slot: int) -> None:
        wmap = self.maps[slot]
        if wmap:
            self._drop_bit(wmap.values(), self.bits[slot])
            wmap.clear()
        self.stats.worker_resets += 1

    def remove_worker(self, worker_id: int) -> int:
        """Drop every block of every dp rank of a worker (it left discovery). Returns blocks dropped."""
        dropped = 0
        for key in [k for k in self.slots if k[0] == worker_id]:
            slot = self.slots[key]
            dropped += len(self.maps[slot] or ())
            self._reset_slot(slot)
            self.maps[slot] = None
            self._release_slot(key)
            self.needs_recovery.discard(key)
        for key in [k for k in self._early_epochs if k[0] == worker_id]:
            del self._early_epochs[key]
        return dropped

    # -- recovery, dumps and snapshots ----------------------------------------------------
    def restore_worker(
        self, key: WorkerKey, pairs: Iterable[tuple[int, int]], next_event_id: int, epoch: int = 0
    ) -> bool:
        """Replace a worker's entries with ``(engine block id, sequence hash)`` pairs valid as of
        ``next_event_id`` (every event with a lower id is reflected) in engine epoch ``epoch``.

        Returns False, changing nothing, for a dump of an older epoch than the index knows (taken
        before an engine restart it has seen since)."""
        slot = self.slot_for(key)
        if epoch:
            known = self.epochs[slot]
            if epoch < known:
                return False
            if epoch > known:
                self._new_epoch(slot, epoch, "dump")
        self._reset_slot(slot)
        wmap = self.maps[slot]
        assert wmap is not None
        table = self.table
        bit = self.bits[slot]
        for engine_hash, sh in pairs:
            wmap[engine_hash] = sh
            m = table.get(sh)
            table[sh] = bit if m is None else (m | bit)
        self.last_event[slot] = next_event_id - 1
        self.needs_recovery.discard(key)
        return True

    def worker_pairs(self, key: WorkerKey) -> tuple[list[int], list[int], int]:
        """A worker's (engine ids, sequence hashes, last event id), for snapshots (its epoch: :meth:`epoch_of`)."""
        slot = self.slots[key]
        wmap = self.maps[slot] or {}
        return list(wmap.keys()), list(wmap.values()), self.last_event[slot]

    def dump_events(self) -> list[kv_events_pb2.KvEvent]:
        """The whole index as events: per worker one Stored event whose blocks carry their
        sequence hashes, with the worker's last event id. Applying them with
        :meth:`load_dump_event` to an empty index rebuilds this one."""
        out = []
        for key, slot in sorted(self.slots.items()):
            wmap = self.maps[slot] or {}
            ev = kv_events_pb2.KvEvent(
                worker_id=key[0], dp_rank=key[1], event_id=max(self.last_event[slot], 0), epoch=self.epochs[slot]
            )
            blocks = ev.stored.blocks
            for engine_hash, sh in sorted(wmap.items()):
                blocks.add(block_hash=engine_hash, sequence_hash=sh)
            out.append(ev)
        return out

    def load_dump_event(self, ev: kv_events_pb2.KvEvent, last_event_id: int | None = None) -> None:
        """Add a dump event's blocks for its worker (no id checks); sets the worker's last event id."""
        key = (ev.worker_id, ev.dp_rank)
        pairs = [(b.block_hash, b.sequence_hash) for b in ev.stored.blocks]
        slot = self.slots.get(key)
        if slot is not None and self.maps[slot] and ev.epoch in (0, self.epochs[slot]):
            existing = list((self.maps[slot] or {}).items())
            pairs = existing + pairs
        self.restore_worker(key, pairs, (ev.event_id if last_event_id is None else last_event_id) + 1, ev.epoch)

    def canonical(self) -> dict[WorkerKey, tuple[int, int, list[tuple[int, int]]]]:
        """Order-independent view of the whole index (last event id, epoch, entries per worker rank),
        for comparing two indexes."""
        return {
            key: (self.last_event[slot], self.epochs[slot], sorted((self.maps[slot] or {}).items()))
            for key, slot in self.slots.items()
        }


class ApproxIndexer(_MaskTable):
    """Approximate mode (no KV events): the router records its own routing decisions.

    Routing a prompt to a worker inserts the prompt's blocks for that worker
    with a time-to-live (120 s by default); expired entries are dropped by
    :meth:`expire`. Time is passed in (a clock's ``monotonic()``), never read here.
    """

    def __init__(self, ttl_s: float = 120.0) -> None:
        super().__init__()
        self.ttl_s = ttl_s
        self._expiry: list[dict[int, float] | None] = []  # per slot: seq hash -> expiry, oldest first

    def _on_new_slot(self, slot: int) -> None:
        if slot == len(self._expiry):
            self._expiry.append({})
        else:
            self._expiry[slot] = {}

    def insert(self, key: WorkerKey, seq_hashes: Sequence[int], now: float) -> None:
        slot = self.slot_for(key)
        exp = self._expiry[slot]
        assert exp is not None
        bit = self.bits[slot]
        table = self.table
        deadline = now + self.ttl_s
        for sh in seq_hashes:
            if sh in exp:
                del exp[sh]  # re-insert at the end: dict order stays expiry order
            exp[sh] = deadline
            m = table.get(sh)
            table[sh] = bit if m is None else (m | bit)

    def expire(self, now: float) -> int:
        """Drop every entry whose time is up. Returns how many."""
        dropped = 0
        for slot, exp in enumerate(self._expiry):
            if not exp:
                continue
            gone = []
            for sh, deadline in exp.items():
                if deadline > now:
                    break
                gone.append(sh)
            for sh in gone:
                del exp[sh]
            dropped += self._drop_bit(gone, self.bits[slot])
        return dropped

    def remove_worker(self, worker_id: int) -> int:
        dropped = 0
        for key in [k for k in self.slots if k[0] == worker_id]:
            slot = self.slots[key]
            exp = self._expiry[slot] or {}
            dropped += self._drop_bit(list(exp), self.bits[slot])
            self._expiry[slot] = None
            self._release_slot(key)
        return dropped

    @property
    def num_entries(self) -> int:
        return sum(len(e) for e in self._expiry if e)
