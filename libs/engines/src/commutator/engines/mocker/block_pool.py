"""A paged KV block pool with prefix caching: the mocker's memory (pure, no I/O).

Blocks are numbered ``0..num_blocks-1``. A full, computed block can be
*registered* under the sequence hash of its contents (DESIGN.md 4.1); a
registered block is found again by that hash (prefix caching) until it is
evicted. Blocks with no references sit in one of two places:

- ``free``: never registered (or dropped): handed out first;
- ``lru``: registered and reusable, oldest first; evicted (a ``Removed`` event)
  only when ``free`` is empty.

KV events (``Stored`` when a block is registered, ``Removed`` when a registered
block is evicted, ``Cleared``) are appended to :attr:`events` and numbered from
0; the engine shell drains and publishes them. Reusing a cached block emits
nothing. The engine's own id of a block (``block_hash`` in events) is derived
from its sequence hash with a per-engine salt, as vLLM derives its block
hashes from a per-process seed: two engines holding the same prefix report
different ids for it.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

import xxhash
from commutator.engines.base import KvCleared, KvEventRecord, KvRemoved, KvStored

__all__ = ["BlockPool"]

_pack_q = struct.Struct("<Q").pack
_xxh3 = xxhash.xxh3_64_intdigest


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, engine_salt: int = 0, dp_rank: int = 0) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dp_rank = dp_rank
        self._salt = engine_salt & ((1 << 64) - 1)
        self.ref: list[int] = [0] * num_blocks
        self.block_seq_hash: list[int | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[int, int] = {}  # sequence hash -> block id
        self.active = 0  # blocks with ref > 0
        self.events: list[KvEventRecord] = []
        self._next_event_id = 0

    # -- ids and events ---------------------------------------------------------
    def engine_hash(self, seq_hash: int) -> int:
        """The id this engine reports for the block with sequence hash ``seq_hash``."""
        return _xxh3(_pack_q(seq_hash), self._salt)

    def _emit(self, data: KvStored | KvRemoved | KvCleared) -> None:
        self.events.append(KvEventRecord(self._next_event_id, data, self.dp_rank))
        self._next_event_id += 1

    @property
    def next_event_id(self) -> int:
        return self._next_event_id

    def cached_blocks(self) -> list[tuple[int, int]]:
        """``(engine block id, sequence hash)`` of every registered block."""
        return [(self.engine_hash(sh), sh) for sh in self.cached]

    def take_events(self) -> list[KvEventRecord]:
        out, self.events = self.events, []
        return out

    # -- capacity ---------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks that an allocation can use now (free plus evictable)."""
        return len(self.free) + len(self.lru)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running sequences."""
        return self.active / self.num_blocks

    # -- prefix cache -----------------------------------------------------------
    def match_prefix(self, seq_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``seq_hashes`` (at most ``max_blocks``)."""
        out: list[int] = []
        cached = self.cached
        for sh in seq_hashes[:max_blocks]:
            b = cached.get(sh)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take a reference to cached blocks (a prefix-cache hit): no event."""
        ref = self.ref
        for b in block_ids:
            if ref[b] == 0:
                self.lru.pop(b, None)
                self.active += 1
            ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks with one reference each, or ``None`` (nothing taken) if there is no room.

        Evicting registered blocks emits one ``Removed`` event for the call.
        """
        if n <= 0:
            return []
        if n > len(self.free) + len(self.lru):
            return None
        out: list[int] = []
        evicted: list[int] = []
        free, lru, ref, seq_of = self.free, self.lru, self.ref, self.block_seq_hash
        for _ in range(n):
            if free:
                b = free.popleft()
            else:
                b, _ = lru.popitem(last=False)
                sh = seq_of[b]
                if sh is not None:
                    del self.cached[sh]
                    seq_of[b] = None
                    evicted.append(self.engine_hash(sh))
            ref[b] = 1
            out.append(b)
        self.active += n
        if evicted:
            self._emit(KvRemoved(tuple(evicted)))
        return out

    def register(self, parent_seq_hash: int | None, blocks: Sequence[tuple[int, int, int]]) -> None:
        """Register newly full blocks ``(block id, sequence hash, local hash)`` of one sequence, in order.

        Emits one ``Stored`` event for the run of blocks that became cached. A
        block whose sequence hash is already cached elsewhere (the same prefix
        computed twice at once) stays unregistered, and is not reported.
        """
        stored: list[tuple[int, int]] = []
        first_parent = parent_seq_hash
        cached, seq_of = self.cached, self.block_seq_hash
        for b, sh, local in blocks:
            if sh in cached or seq_of[b] is not None:
                if stored:
                    self._emit(KvStored(self._parent_id(first_parent), tuple(stored)))
                    stored = []
                first_parent = sh
                continue
            cached[sh] = b
            seq_of[b] = sh
            stored.append((self.engine_hash(sh), local))
        if stored:
            self._emit(KvStored(self._parent_id(first_parent), tuple(stored)))

    def _parent_id(self, parent_seq_hash: int | None) -> int | None:
        return None if parent_seq_hash is None else self.engine_hash(parent_seq_hash)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block, in the given order.

        Blocks that reach zero references become evictable (registered ones,
        appended to the LRU end in this order) or free. Callers pass a
        sequence's blocks last-first, so its tail is evicted before its prefix.
        """
        ref, seq_of = self.ref, self.block_seq_hash
        for b in block_ids:
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                self.active -= 1
                if seq_of[b] is not None:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    def clear(self) -> bool:
        """Forget every cached block (a cache reset): one ``Cleared`` event.

        Like vLLM's ``reset_prefix_cache``, refused (False) while any block is in use.
        """
        if self.active:
            return False
        for b in list(self.lru):
            sh = self.block_seq_hash[b]
            if sh is not None:
                del self.cached[sh]
                self.block_seq_hash[b] = None
            self.free.append(b)
        self.lru.clear()
        self._emit(KvCleared())
        return True
