"""The KV index: exact DESIGN.md 4.3 semantics, on protobuf events as workers send them."""

from __future__ import annotations

import pytest
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.router.indexer import ApplyOutcome, ApproxIndexer, EpochReset, KvIndexer
from commutator.v1 import kv_events_pb2

pytestmark = pytest.mark.unit

BS = 4


def chain(start: int, blocks: int) -> list[int]:
    return local_block_hashes(list(range(start, start + blocks * BS)), BS)


def stored(
    worker: int, eid: int, blocks: list[tuple[int, int]], parent: int | None = None, dp: int = 0
) -> kv_events_pb2.KvEvent:
    ev = kv_events_pb2.KvEvent(worker_id=worker, dp_rank=dp, event_id=eid)
    ev.stored.SetInParent()
    if parent is not None:
        ev.stored.parent_hash = parent
    for engine_id, local in blocks:
        ev.stored.blocks.add(block_hash=engine_id, tokens_hash=local)
    return ev


def removed(worker: int, eid: int, engine_ids: list[int]) -> kv_events_pb2.KvEvent:
    ev = kv_events_pb2.KvEvent(worker_id=worker, event_id=eid)
    ev.removed.block_hashes.extend(engine_ids)
    return ev


def cleared(worker: int, eid: int) -> kv_events_pb2.KvEvent:
    ev = kv_events_pb2.KvEvent(worker_id=worker, event_id=eid)
    ev.cleared.SetInParent()
    return ev


def test_store_and_match_leading_blocks() -> None:
    idx = KvIndexer()
    local = chain(0, 4)
    idx.apply_event(stored(1, 0, [(100 + i, h) for i, h in enumerate(local)]))
    assert idx.find_matches(local) == {(1, 0): 4}
    assert idx.find_matches(local[:2]) == {(1, 0): 2}
    other = chain(1000, 3)
    assert idx.find_matches(other) == {}
    # A prompt sharing two blocks then diverging.
    assert idx.find_matches([*local[:2], *other]) == {(1, 0): 2}
    # The same local hashes at another depth are another block (sequence hashes differ).
    assert idx.find_matches(local[1:]) == {}


def test_events_in_several_messages_extend_through_the_parent() -> None:
    idx = KvIndexer()
    local = chain(0, 5)
    idx.apply_event(stored(1, 0, [(10, local[0]), (11, local[1])]))
    assert (
        idx.apply_event(stored(1, 1, [(12, local[2]), (13, local[3]), (14, local[4])], parent=11))
        is ApplyOutcome.APPLIED
    )
    assert idx.find_matches(local) == {(1, 0): 5}
    assert idx.stats.blocks_stored == 5


def test_unknown_parent_skips_the_whole_event_and_is_counted() -> None:
    idx = KvIndexer()
    local = chain(0, 3)
    assert idx.apply_event(stored(1, 0, [(12, local[2])], parent=999)) is ApplyOutcome.SKIPPED_UNKNOWN_PARENT
    assert idx.stats.events_skipped_unknown_parent == 1
    assert idx.num_nodes == 0 and idx.blocks_of((1, 0)) == 0
    # The parent must be known *for that worker*: another worker's id does not count.
    idx.apply_event(stored(2, 0, [(7, local[0])]))
    assert idx.apply_event(stored(1, 1, [(8, local[1])], parent=7)) is ApplyOutcome.SKIPPED_UNKNOWN_PARENT


def test_second_worker_with_its_own_ids_maps_to_shared_nodes_and_extends_them() -> None:
    """The case NVIDIA Dynamo 1.6.1's tree rejects: same path, different engine ids."""
    idx = KvIndexer()
    local = chain(0, 4)
    idx.apply_event(stored(1, 0, [(100, local[0]), (101, local[1]), (102, local[2])]))
    idx.apply_event(stored(2, 0, [(900, local[0]), (901, local[1])]))
    assert idx.num_nodes == 3  # nodes are shared
    # Worker 2 extends the shared path under its own id for the parent.
    assert idx.apply_event(stored(2, 1, [(902, local[2]), (903, local[3])], parent=901)) is ApplyOutcome.APPLIED
    assert idx.find_matches(local) == {(1, 0): 3, (2, 0): 4}
    assert idx.num_nodes == 4 and idx.num_entries == 7


def test_stores_are_idempotent() -> None:
    idx = KvIndexer()
    local = chain(0, 2)
    idx.apply_event(stored(1, 0, [(100, local[0]), (101, local[1])]))
    idx.apply_event(stored(1, 1, [(100, local[0]), (101, local[1])]))
    assert idx.num_entries == 2 and idx.num_nodes == 2
    assert idx.find_matches(local) == {(1, 0): 2}


def test_removal_stops_matching_at_the_first_missing_block() -> None:
    idx = KvIndexer()
    local = chain(0, 4)
    idx.apply_event(stored(1, 0, [(100 + i, h) for i, h in enumerate(local)]))
    idx.apply_event(stored(2, 0, [(200 + i, h) for i, h in enumerate(local)]))
    idx.apply_event(removed(1, 1, [101]))
    assert idx.find_matches(local) == {(1, 0): 1, (2, 0): 4}
    idx.apply_event(removed(1, 2, [100, 12345]))  # an unknown id is counted, not fatal
    assert idx.find_matches(local) == {(2, 0): 4}
    assert idx.stats.removes_unknown == 1
    assert idx.num_nodes == 4  # worker 2 still holds every block


def test_cleared_and_worker_removal_drop_everything_of_that_worker() -> None:
    idx = KvIndexer()
    a, b = chain(0, 3), chain(500, 2)
    idx.apply_event(stored(1, 0, [(1, a[0]), (2, a[1]), (3, a[2])]))
    idx.apply_event(stored(1, 0, [(4, b[0])], dp=1))
    idx.apply_event(stored(2, 0, [(9, a[0])]))
    idx.apply_event(cleared(1, 1))
    assert idx.find_matches(a) == {(2, 0): 1}
    assert idx.find_matches(b) == {(1, 1): 1}  # another dp rank is another worker
    assert idx.remove_worker(1) == 1
    assert idx.find_matches(b) == {} and idx.workers() == [(2, 0)]
    assert idx.remove_worker(2) == 1 and idx.num_nodes == 0


def test_event_id_gap_resets_the_worker_and_asks_for_recovery() -> None:
    idx = KvIndexer()
    local = chain(0, 3)
    idx.apply_event(stored(1, 0, [(1, local[0])]))
    idx.apply_event(stored(1, 1, [(2, local[1])], parent=1))
    assert idx.apply_event(stored(1, 5, [(3, local[2])], parent=2)) is ApplyOutcome.GAP
    assert idx.find_matches(local) == {}  # reset; the event's parent is gone with it
    assert idx.needs_recovery == {(1, 0)} and idx.stats.gaps == 1
    # Recovery: the worker's dump replaces its entries as of event id 7.
    seq = sequence_hashes(local)
    idx.restore_worker((1, 0), [(1, seq[0]), (2, seq[1]), (3, seq[2])], next_event_id=8)
    assert idx.needs_recovery == set()
    assert idx.find_matches(local) == {(1, 0): 3}
    assert idx.apply_event(removed(1, 6, [3])) is ApplyOutcome.SKIPPED_OLD  # covered by the dump
    assert idx.apply_event(removed(1, 8, [3])) is ApplyOutcome.APPLIED
    assert idx.find_matches(local) == {(1, 0): 2}


def test_event_id_back_to_zero_is_an_engine_restart() -> None:
    idx = KvIndexer()
    a, b = chain(0, 2), chain(100, 1)
    idx.apply_event(stored(1, 0, [(1, a[0]), (2, a[1])]))
    idx.apply_event(stored(1, 1, [(3, b[0])]))
    assert idx.apply_event(stored(1, 0, [(7, b[0])])) is ApplyOutcome.RESTART
    assert idx.find_matches(a) == {} and idx.find_matches(b) == {(1, 0): 1}
    assert idx.needs_recovery == set() and idx.stats.restarts == 1


def test_first_event_of_an_unknown_worker_past_zero_is_a_gap() -> None:
    idx = KvIndexer()
    assert idx.apply_event(stored(3, 42, [(1, chain(0, 1)[0])])) is ApplyOutcome.GAP
    assert idx.needs_recovery == {(3, 0)}


def test_dump_rebuilds_an_identical_index() -> None:
    idx = KvIndexer()
    a, b = chain(0, 4), chain(300, 3)
    idx.apply_event(stored(1, 0, [(10 + i, h) for i, h in enumerate(a)]))
    idx.apply_event(stored(2, 0, [(20, a[0]), (21, a[1])]))
    idx.apply_event(stored(2, 1, [(30 + i, h) for i, h in enumerate(b)]))
    idx.apply_event(removed(1, 1, [13]))
    copy = KvIndexer()
    for ev in idx.dump_events():
        copy.load_dump_event(kv_events_pb2.KvEvent.FromString(ev.SerializeToString()))
    assert copy.canonical() == idx.canonical()
    assert copy.find_matches(a) == idx.find_matches(a) == {(1, 0): 3, (2, 0): 2}
    # Continuing the stream works on the copy: ids continue, parents resolve.
    nxt = stored(2, 2, [(22, a[2])], parent=21)
    assert copy.apply_event(nxt) is ApplyOutcome.APPLIED and copy.find_matches(a)[(2, 0)] == 3


def at(epoch: int, ev: kv_events_pb2.KvEvent) -> kv_events_pb2.KvEvent:
    ev.epoch = epoch
    return ev


def test_a_newer_epoch_resets_the_worker_whatever_the_event_id() -> None:
    resets: list[EpochReset] = []
    idx = KvIndexer(on_epoch_reset=resets.append)
    a, b = chain(0, 3), chain(100, 2)
    idx.apply_event(at(10, stored(1, 0, [(1, a[0]), (2, a[1]), (3, a[2])])))
    idx.apply_event(at(10, stored(1, 1, [(9, b[0])])))
    idx.apply_event(at(10, stored(2, 0, [(1, a[0])])))  # another worker, untouched throughout
    # The restarted engine's first event has id 0 (a lower id than the last one): applied after a reset.
    assert idx.apply_event(at(20, stored(1, 0, [(5, b[0]), (6, b[1])]))) is ApplyOutcome.EPOCH_RESET
    assert idx.find_matches(a) == {(2, 0): 1}  # none of worker 1's old blocks is left
    assert idx.find_matches(b) == {(1, 0): 2}
    assert resets == [EpochReset((1, 0), 10, 20, 4, "event")]
    assert idx.epoch_of((1, 0)) == 20 and idx.stats.epoch_resets == 1 and idx.stats.restarts == 0
    # The next event of the new epoch continues from there.
    assert idx.apply_event(at(20, removed(1, 1, [6]))) is ApplyOutcome.APPLIED
    assert idx.find_matches(b) == {(1, 0): 1}


def test_a_newer_epoch_whose_ids_look_like_the_next_ones_still_resets() -> None:
    """Event ids alone cannot see this restart: the new engine's ids happen to continue the old ones."""
    idx = KvIndexer()
    a, b = chain(0, 2), chain(100, 1)
    idx.apply_event(at(10, stored(1, 0, [(1, a[0]), (2, a[1])])))
    # Id 1 follows id 0, but it is the new engine's: its ids 0 were lost. Reset, and recover from a dump.
    assert idx.apply_event(at(11, stored(1, 1, [(3, b[0])]))) is ApplyOutcome.GAP
    assert idx.find_matches(a) == {} and idx.needs_recovery == {(1, 0)}
    assert idx.stats.epoch_resets == 1


def test_an_older_epochs_late_event_is_dropped_and_resurrects_nothing() -> None:
    idx = KvIndexer()
    a, b = chain(0, 2), chain(100, 2)
    idx.apply_event(at(10, stored(1, 0, [(1, a[0])])))
    idx.apply_event(at(20, stored(1, 0, [(5, b[0])])))
    # The dead engine's next event arrives late (its ids continue its own): dropped, counted.
    assert idx.apply_event(at(10, stored(1, 1, [(2, a[1])], parent=1))) is ApplyOutcome.STALE_EPOCH
    assert idx.apply_event(at(10, stored(1, 0, [(1, a[0])]))) is ApplyOutcome.STALE_EPOCH
    assert idx.find_matches(a) == {} and idx.find_matches(b) == {(1, 0): 1}
    assert idx.stats.events_stale_epoch == 2 and idx.epoch_of((1, 0)) == 20
    # The new epoch's ids are not disturbed by them.
    assert idx.apply_event(at(20, stored(1, 1, [(6, b[1])], parent=5))) is ApplyOutcome.APPLIED
    assert idx.find_matches(b) == {(1, 0): 2}


def test_load_statistics_with_a_newer_epoch_reset_the_worker() -> None:
    resets: list[EpochReset] = []
    idx = KvIndexer(on_epoch_reset=resets.append)
    a = chain(0, 2)
    idx.apply_event(at(10, stored(1, 0, [(1, a[0]), (2, a[1])])))
    assert not idx.observe_epoch((1, 0), 10)  # the same epoch
    assert not idx.observe_epoch((1, 0), 5)  # an older one (stale statistics)
    assert not idx.observe_epoch((1, 0), 0)  # not stamped
    assert idx.find_matches(a) == {(1, 0): 2} and resets == []
    assert idx.is_newer_epoch((1, 0), 30) and not idx.is_newer_epoch((1, 0), 10)
    assert idx.observe_epoch((1, 0), 30)
    assert idx.find_matches(a) == {} and resets == [EpochReset((1, 0), 10, 30, 2, "stats")]
    # The dead engine's events that were still on their way are dropped; the new engine's apply from id 0.
    assert idx.apply_event(at(10, removed(1, 1, [1]))) is ApplyOutcome.STALE_EPOCH
    assert idx.apply_event(at(30, stored(1, 0, [(8, a[0])]))) is ApplyOutcome.APPLIED
    assert idx.find_matches(a) == {(1, 0): 1} and len(resets) == 1


def test_an_epoch_reported_before_a_workers_first_event_fences_its_older_events() -> None:
    idx = KvIndexer()
    a, b = chain(0, 1), chain(100, 1)
    assert not idx.observe_epoch((7, 0), 20)  # statistics first: nothing to drop, but remembered
    assert (7, 0) not in idx.slots and not idx.is_newer_epoch((7, 0), 20) and idx.is_newer_epoch((7, 0), 21)
    # Its dead engine's events, late in the stream, do not make it into the index.
    assert idx.apply_event(at(10, stored(7, 3, [(1, a[0])]))) is ApplyOutcome.STALE_EPOCH
    assert idx.find_matches(a) == {} and idx.epoch_of((7, 0)) == 20
    assert idx.apply_event(at(20, stored(7, 0, [(2, b[0])]))) is ApplyOutcome.APPLIED
    assert idx.find_matches(b) == {(7, 0): 1} and idx.stats.epoch_resets == 0
    # A worker that leaves takes its remembered epoch with it.
    idx.observe_epoch((8, 0), 5)
    idx.remove_worker(8)
    assert idx.apply_event(at(4, stored(8, 0, [(1, a[0])]))) is ApplyOutcome.APPLIED


def test_a_dump_of_an_older_epoch_is_refused_and_a_newer_one_replaces_everything() -> None:
    idx = KvIndexer()
    a = chain(0, 3)
    seq = sequence_hashes(a)
    idx.apply_event(at(20, stored(1, 0, [(1, a[0])])))
    assert not idx.restore_worker((1, 0), [(1, seq[0]), (2, seq[1])], next_event_id=2, epoch=10)
    assert idx.find_matches(a) == {(1, 0): 1} and idx.last_event[idx.slots[(1, 0)]] == 0
    assert idx.restore_worker((1, 0), [(4, seq[0]), (5, seq[1]), (6, seq[2])], next_event_id=3, epoch=30)
    assert idx.find_matches(a) == {(1, 0): 3} and idx.epoch_of((1, 0)) == 30 and idx.stats.epoch_resets == 1
    assert idx.apply_event(at(30, removed(1, 3, [6]))) is ApplyOutcome.APPLIED


def test_unstamped_events_follow_the_id_rules_and_the_first_epoch_is_adopted() -> None:
    idx = KvIndexer()
    a = chain(0, 2)
    idx.apply_event(stored(1, 0, [(1, a[0])]))  # epoch 0: an older worker, or a snapshot without epochs
    assert idx.apply_event(at(10, stored(1, 1, [(2, a[1])], parent=1))) is ApplyOutcome.APPLIED
    assert idx.find_matches(a) == {(1, 0): 2} and idx.epoch_of((1, 0)) == 10 and idx.stats.epoch_resets == 0
    assert idx.apply_event(removed(1, 2, [2])) is ApplyOutcome.APPLIED  # unstamped: no epoch check
    assert idx.find_matches(a) == {(1, 0): 1}


def test_dumps_carry_each_workers_epoch() -> None:
    idx = KvIndexer()
    a = chain(0, 2)
    idx.apply_event(at(10, stored(1, 0, [(1, a[0]), (2, a[1])])))
    idx.apply_event(at(20, stored(2, 4, [(3, a[0])])))
    copy = KvIndexer()
    for ev in idx.dump_events():
        copy.load_dump_event(kv_events_pb2.KvEvent.FromString(ev.SerializeToString()))
    assert copy.canonical() == idx.canonical()
    assert (copy.epoch_of((1, 0)), copy.epoch_of((2, 0))) == (10, 20)
    assert copy.apply_event(at(10, removed(2, 5, [3]))) is ApplyOutcome.STALE_EPOCH


def test_long_prompts_match_across_chunks() -> None:
    idx = KvIndexer()
    local = chain(0, 300)
    idx.apply_event(stored(1, 0, [(i, h) for i, h in enumerate(local)]))
    idx.apply_event(stored(2, 0, [(1000 + i, h) for i, h in enumerate(local[:130])]))
    assert idx.find_matches(local) == {(1, 0): 300, (2, 0): 130}


def test_approximate_mode_inserts_decisions_with_a_ttl() -> None:
    idx = ApproxIndexer(ttl_s=120.0)
    seq = sequence_hashes(chain(0, 3))
    idx.insert((1, 0), seq, now=0.0)
    idx.insert((2, 0), seq[:2], now=60.0)
    assert idx.find_matches_seq(seq) == {(1, 0): 3, (2, 0): 2}
    assert idx.expire(now=119.9) == 0
    assert idx.expire(now=120.0) == 3
    assert idx.find_matches_seq(seq) == {(2, 0): 2}
    idx.insert((2, 0), seq[:1], now=150.0)  # refreshed: lives until 270
    assert idx.expire(now=180.0) == 1
    assert idx.find_matches_seq(seq) == {(2, 0): 1}
    assert idx.expire(now=270.0) == 1 and idx.num_nodes == 0
    idx.insert((3, 0), seq, now=300.0)
    assert idx.remove_worker(3) == 3 and idx.find_matches_seq(seq) == {}
