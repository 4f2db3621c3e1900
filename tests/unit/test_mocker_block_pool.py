"""Block pool semantics with exact state and exact KV events."""

from __future__ import annotations

import pytest
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.engines.base import KvCleared, KvRemoved, KvStored
from commutator.engines.mocker.block_pool import BlockPool

pytestmark = pytest.mark.unit

BS = 4


def chain(tokens: list[int]) -> tuple[list[int], list[int]]:
    local = local_block_hashes(tokens, BS)
    return local, sequence_hashes(local)


def test_store_emits_one_event_with_parent_and_engine_ids() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS, engine_salt=42)
    local, seq = chain(list(range(12)))
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2] and pool.active == 3 and pool.ref[:3] == [1, 1, 1]
    pool.register(None, [(blocks[0], seq[0], local[0]), (blocks[1], seq[1], local[1])])
    pool.register(seq[1], [(blocks[2], seq[2], local[2])])
    events = pool.take_events()
    assert [e.event_id for e in events] == [0, 1]
    assert events[0].data == KvStored(
        None, ((pool.engine_hash(seq[0]), local[0]), (pool.engine_hash(seq[1]), local[1]))
    )
    assert events[1].data == KvStored(pool.engine_hash(seq[1]), ((pool.engine_hash(seq[2]), local[2]),))
    assert pool.cached == {seq[0]: 0, seq[1]: 1, seq[2]: 2}


def test_engine_ids_differ_between_engines_for_the_same_prefix() -> None:
    _, seq = chain(list(range(4)))
    a, b = BlockPool(4, BS, engine_salt=1), BlockPool(4, BS, engine_salt=2)
    assert a.engine_hash(seq[0]) != b.engine_hash(seq[0])
    assert a.engine_hash(seq[0]) == BlockPool(4, BS, engine_salt=1).engine_hash(seq[0])


def test_reuse_of_cached_blocks_emits_nothing_and_counts_references() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    local, seq = chain(list(range(8)))
    blocks = pool.allocate(2)
    pool.register(None, list(zip(blocks, seq, local, strict=True)))
    pool.take_events()
    pool.release(blocks[::-1])
    assert pool.active == 0 and list(pool.lru) == [1, 0]  # tail first in eviction order
    hits = pool.match_prefix(seq, max_blocks=2)
    assert hits == [0, 1]
    pool.acquire(hits)
    pool.acquire(hits)  # a second sequence on the same prefix
    assert pool.ref[:2] == [2, 2] and pool.active == 2 and not pool.lru
    assert pool.take_events() == []
    assert pool.match_prefix(seq, max_blocks=1) == [0]
    _, other = chain([9, 9, 9, 9])
    assert pool.match_prefix(other, 2) == []


def test_eviction_takes_free_blocks_first_then_lru_oldest_with_one_removed_event() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    local, seq = chain(list(range(8)))
    a = pool.allocate(2)
    pool.register(None, list(zip(a, seq, local, strict=True)))
    pool.release(a[::-1])
    pool.take_events()
    fresh = pool.allocate(2)  # two never-used blocks remain free: no eviction
    assert fresh == [2, 3] and pool.take_events() == []
    evicting = pool.allocate(2)
    assert evicting == [1, 0]  # block 1 (the tail) was released first, so it goes first
    [ev] = pool.take_events()
    assert ev.data == KvRemoved((pool.engine_hash(seq[1]), pool.engine_hash(seq[0])))
    assert pool.cached == {} and pool.available == 0
    assert pool.allocate(1) is None  # nothing taken when there is no room
    assert pool.active == 4


def test_duplicate_prefix_is_not_registered_twice() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    local, seq = chain(list(range(8)))
    first, second = pool.allocate(2), pool.allocate(2)
    pool.register(None, list(zip(first, seq, local, strict=True)))
    pool.take_events()
    pool.register(None, list(zip(second, seq, local, strict=True)))  # computed at the same time elsewhere
    assert pool.take_events() == []
    pool.release(second[::-1])
    assert sorted(pool.free) == [2, 3, 4, 5, 6, 7] and not pool.lru  # the copies are simply free


def test_clear_drops_the_cache_only_when_idle() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    local, seq = chain(list(range(4)))
    [b] = pool.allocate(1)
    pool.register(None, [(b, seq[0], local[0])])
    assert pool.clear() is False
    pool.release([b])
    pool.take_events()
    assert pool.clear() is True
    [ev] = pool.take_events()
    assert ev.data == KvCleared() and ev.event_id == 1
    assert pool.match_prefix(seq, 1) == [] and pool.available == 4
