"""Cost, selection, policies and load accounting (DESIGN.md 4.4)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.router.indexer import KvIndexer
from commutator.router.load import ActiveLoad
from commutator.router.policies import KvPolicy, RouteContext, kv_cost, kv_picks, make_policy, softmax_pick
from commutator.router.scheduler import Outcome, Scheduler, WorkerView
from commutator.v1 import kv_events_pb2

pytestmark = pytest.mark.unit

A, B, C = (1, 0), (2, 0), (3, 0)


def test_worked_example_picks_the_second_worker() -> None:
    bs = 16
    load = ActiveLoad()
    # Decode load: the active blocks of running requests, (10, 5, 9) minus this request's 10 new blocks.
    for w, active in ((A, 0), (B, 0), (C, 0)):
        load.active_blocks[w] = active
    overlaps = {A: 2, B: 5, C: 8}
    decode = {A: 10, B: 5, C: 9}
    ctx = RouteContext(isl=10 * bs, block_size=bs, load=load, overlaps=overlaps)
    # decode_blocks(w) = active + this request's 10 blocks not already active there.
    ctx.active_overlaps = {w: 10 for w in (A, B, C)}
    for w in (A, B, C):
        load.active_blocks[w] = decode[w]
    costs = [kv_cost(ctx, w, 1.0) for w in (A, B, C)]
    assert costs == [18, 10, 11]
    assert KvPolicy().choose(ctx, [A, B, C]) == B


def test_decode_weight_scales_the_load_term_and_can_flip_the_choice() -> None:
    """--decode-weight: 1 is DESIGN.md 4.4 exactly; below 1 a cached prefix outweighs more decode load."""
    bs = 16
    load = ActiveLoad()
    load.active_blocks.update({A: 30, B: 0})
    ctx = RouteContext(isl=20 * bs, block_size=bs, load=load, overlaps={A: 12})
    # A: prefill 20 - 12 = 8, decode 30 + 20 = 50; B: prefill 20, decode 0 + 20 = 20.
    assert [kv_cost(ctx, w, 1.0) for w in (A, B)] == [58, 40]
    assert [kv_cost(ctx, w, 1.0, 1.0) for w in (A, B)] == [58, 40]
    assert KvPolicy().choose(ctx, [A, B]) == B
    assert [kv_cost(ctx, w, 1.0, 0.25) for w in (A, B)] == [8 + 12.5, 20 + 5]
    assert KvPolicy(decode_weight=0.25).choose(ctx, [A, B]) == A
    assert make_policy("kv", decode_weight=0.25).choose(ctx, [A, B]) == A  # type: ignore[arg-type]
    # Pending prefill keeps its full weight: a worker with a long queue of prompt tokens still loses.
    load.prefill_tokens[A] = 40 * bs
    assert KvPolicy(decode_weight=0.25).choose(ctx, [A, B]) == B
    # 0: load counts only through pending prefill tokens.
    assert kv_cost(ctx, B, 1.0, 0.0) == 20


def _contested_ctx() -> RouteContext:
    """A holds 12 of the prompt's 20 blocks and 30 blocks of load; B nothing (see the test above)."""
    load = ActiveLoad()
    load.active_blocks.update({A: 30, B: 0})
    return RouteContext(isl=20 * 16, block_size=16, load=load, overlaps={A: 12})


def test_kv_picks_are_each_settings_own_choice_on_one_shared_draw() -> None:
    ctx = _contested_ctx()
    settings = [(1.0, 0.0, 1.0), (1.0, 0.0, 0.25), (2.0, 0.0, 1.0)]
    picks, costs = kv_picks(ctx, [A, B], settings, 0.3)
    assert costs == [[58, 40], [20.5, 25], [0 + 50, 40]]  # A at weight 2: prefill 20 - 24 floored at 0
    assert picks == [1, 0, 1]
    for (w, t, dw), pick in zip(settings, picks, strict=True):
        assert [A, B][pick] == KvPolicy(w, t, decode_weight=dw).choose(ctx, [A, B])
    # Ties: the shared draw picks the same tied candidate for every setting that ties them.
    tied = RouteContext(isl=64, block_size=16, load=ActiveLoad())
    for u in (0.0, 0.49, 0.5, 0.99):
        picks, _ = kv_picks(tied, [A, B], [(1.0, 0.0, 1.0), (2.0, 0.0, 0.5)], u)
        assert picks == [int(u * 2)] * 2
    # Temperature > 0: the inverse of the softmax distribution at the shared draw.
    counts = Counter(kv_picks(ctx, [A, B], [(1.0, 0.5, 1.0)], random.random())[0][0] for _ in range(20_000))
    p_a = 1 / (1 + math.exp(18 / (18 * 0.5)))  # A costs 18 more, the whole spread: e^-2 against e^0
    assert abs(counts[0] / 20_000 - p_a) < 5 * math.sqrt(p_a * (1 - p_a) / 20_000)


class _Tuner:
    """A hand-written ArmSelector: two arms, always choosing ``arm``."""

    def __init__(self, arm: int) -> None:
        self.arm = arm
        self.seen: list[list[int]] = []

    def settings(self) -> list[tuple[float, float, float]]:
        return [(1.0, 0.0, 1.0), (1.0, 0.0, 0.25)]

    def select(self, picks: list[int]) -> int:
        self.seen.append(list(picks))
        return self.arm


def test_an_adaptive_kv_policy_routes_with_the_arm_its_tuner_selects() -> None:
    policy = KvPolicy()
    for arm, worker in ((0, B), (1, A)):
        policy.tuner = _Tuner(arm)  # type: ignore[assignment]
        ctx = _contested_ctx()
        assert policy.choose(ctx, [A, B]) == worker
        assert ctx.arm == arm and ctx.contested and ctx.costs == [[58, 40], [20.5, 25]][arm]
        assert policy.tuner.seen == [[1, 0]]  # type: ignore[attr-defined]
    agreed = RouteContext(isl=64, block_size=16, load=ActiveLoad(), overlaps={B: 3})
    assert policy.choose(agreed, [A, B]) == B and not agreed.contested and agreed.arm == 1
    policy.tuner = None  # without a tuner: the policy's own weights, no arm
    ctx = _contested_ctx()
    assert policy.choose(ctx, [A, B]) == B and ctx.arm is None


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_a_bad_decode_weight_is_refused_clearly(bad: float) -> None:
    with pytest.raises(ValueError, match="--decode-weight"):
        KvPolicy(decode_weight=bad)


def test_prefill_term_is_floored_and_weighted() -> None:
    load = ActiveLoad()
    ctx = RouteContext(isl=64, block_size=16, load=load, overlaps={A: 10})
    assert kv_cost(ctx, A, 1.0) == 0 + 4  # 4 - 10 floored at 0; decode = 4 new blocks
    assert kv_cost(ctx, A, 0.0) == 4 + 4  # overlap ignored: pure load balancing


def test_softmax_frequencies_match_the_formula() -> None:
    rng = random.Random(7)
    costs = [10.0, 12.0, 20.0]
    t = 0.5
    lo, hi = min(costs), max(costs)
    weights = [math.exp(-(c - lo) / ((hi - lo) * t)) for c in costs]
    expected = [w / sum(weights) for w in weights]
    n = 40_000
    counts = Counter(softmax_pick(costs, t, rng) for _ in range(n))
    for i, p in enumerate(expected):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[i] / n - p) < 5 * sigma, (i, counts[i] / n, p)


def test_ties_are_broken_uniformly() -> None:
    rng = random.Random(3)
    n = 30_000
    counts = Counter(softmax_pick([5.0, 7.0, 5.0, 5.0], 0.0, rng) for _ in range(n))
    assert 1 not in counts
    for i in (0, 2, 3):
        assert abs(counts[i] / n - 1 / 3) < 5 * math.sqrt((1 / 3) * (2 / 3) / n)
    assert softmax_pick([1.0, 2.0], 0.0, rng) == 0
    assert set(Counter(softmax_pick([4.0, 4.0], 1.0, rng) for _ in range(200))) == {0, 1}


def test_load_accounting_lifecycle_and_shared_blocks() -> None:
    load = ActiveLoad()
    seq = sequence_hashes(local_block_hashes(list(range(64)), 16))  # 4 full blocks
    assert load.add("r1", A, prefill_tokens=70, seq_hashes=seq, total_blocks=5, now=0.0)
    assert not load.add("r1", A, 70, seq, 5, 0.0)  # the same id twice counts once
    assert (load.prefill_tokens[A], load.active_blocks[A]) == (70, 5)
    # A second request sharing the first 2 blocks: only its own blocks are new.
    assert load.active_overlap([*seq[:2], 999]) == {A: 2}
    load.add("r2", A, prefill_tokens=30, seq_hashes=[*seq[:2], 999], total_blocks=3, now=1.0)
    assert load.active_blocks[A] == 5 + 1
    assert load.prefill_done("r1") and load.prefill_tokens[A] == 30
    assert load.prefill_done("r1") and load.prefill_tokens[A] == 30  # idempotent
    assert load.free("r1") and load.active_blocks[A] == 3 and load.prefill_tokens[A] == 30
    assert not load.free("r1")
    assert load.active_overlap(seq) == {A: 2}
    assert load.expire(now=500.0, timeout_s=600.0) == []
    assert load.expire(now=602.0, timeout_s=600.0) == ["r2"]
    assert (load.prefill_tokens[A], load.active_blocks[A], load.active_requests[A]) == (0, 0, 0)
    assert load.active_overlap(seq) == {}


def scheduler(mode: str = "kv", **kw: object) -> Scheduler:
    s = Scheduler(make_policy(mode, rng=random.Random(1)), KvIndexer(), **kw)  # type: ignore[arg-type]
    for key in (A, B, C):
        s.add_worker(WorkerView(key, f"h{key[0]}:1", "m", 16, 1000))
    return s


def store_prompt(s: Scheduler, worker: int, tokens: list[int]) -> None:
    local = local_block_hashes(tokens, 16)
    ev = kv_events_pb2.KvEvent(worker_id=worker, event_id=0)
    for i, h in enumerate(local):
        ev.stored.blocks.add(block_hash=worker * 10_000 + i, tokens_hash=h)
    assert s.indexer is not None
    s.indexer.apply_event(ev)  # type: ignore[union-attr]


def test_kv_routing_prefers_the_cached_worker_until_it_is_loaded() -> None:
    s = scheduler()
    prompt = list(range(160))
    store_prompt(s, 2, prompt)
    r = s.route("m", [*prompt, 7, 8, 9])
    assert r.outcome is Outcome.ROUTED and r.worker is not None and r.worker.key == B and r.overlap_blocks == 10
    assert r.prefill_tokens == 3
    s.track("q1", r, now=0.0)
    # Heavy load on B outweighs the cache.
    s.load.active_blocks[B] += 100
    r2 = s.route("m", [*prompt, 1])
    assert r2.worker is not None and r2.worker.key != B


def test_no_workers_and_all_busy_are_distinct_outcomes() -> None:
    s = scheduler(busy_kv_usage=0.9)
    assert s.route("other-model", [1, 2]).outcome is Outcome.NO_WORKERS
    for key in (A, B, C):
        s.update_usage(key, 950, 1000)
    assert s.route("m", [1, 2]).outcome is Outcome.ALL_BUSY
    s.update_usage(C, 100, 1000)
    r = s.route("m", [1, 2])
    assert r.worker is not None and r.worker.key == C
    s2 = scheduler(busy_prefill_tokens=100)
    for i in range(3):
        res = s2.route("m", list(range(200)))
        s2.track(f"r{i}", res, 0.0)
    assert s2.route("m", [1]).outcome is Outcome.ALL_BUSY


def test_worker_leaving_drops_its_index_entries_and_load() -> None:
    s = scheduler()
    store_prompt(s, 1, list(range(64)))
    r = s.route("m", list(range(64)))
    assert r.worker is not None and r.worker.key == A
    s.track("x", r, 0.0)
    s.remove_worker(1)
    assert s.indexer is not None and s.indexer.find_matches_seq(r.seq_hashes) == {}
    assert "x" not in s.load.requests
    r = s.route("m", list(range(64)))
    assert r.worker is not None and r.worker.key != A


def test_simple_policies() -> None:
    rr = scheduler("round-robin")
    assert [rr.route("m", [1]).worker.key for _ in range(6)] == [A, B, C, A, B, C]  # type: ignore[union-attr]
    ll = scheduler("least-loaded")
    picks = []
    for i in range(6):
        res = ll.route("m", list(range(32)))
        ll.track(f"r{i}", res, 0.0)
        picks.append(res.worker.key)  # type: ignore[union-attr]
    assert Counter(picks) == {A: 2, B: 2, C: 2}
    d = scheduler("direct")
    assert d.route("m", [1], requested=C).worker.key == C  # type: ignore[union-attr]
    assert d.route("m", [1], requested=(3, 5)).worker.key == C  # type: ignore[union-attr]
    assert d.route("m", [1], requested=(9, 0)).outcome is Outcome.NO_WORKERS
    rnd = scheduler("random")
    assert {rnd.route("m", [1]).worker.key for _ in range(60)} == {A, B, C}  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown router mode"):
        make_policy("fastest")


def test_an_inhibited_worker_gets_nothing_until_lifted_or_gone() -> None:
    s = Scheduler(make_policy("round-robin"), None)
    for key in (A, B):
        s.add_worker(WorkerView(key, f"h{key[0]}:1", "m", 16, 100))
    assert s.inhibit(A[0]) and not s.inhibit(A[0]) and not s.inhibit(99)  # once; unknown ids are ignored
    assert {s.route("m", [1] * 20).worker.key for _ in range(6)} == {B}  # type: ignore[union-attr]
    assert s.candidates("") == [B]
    s.inhibit(B[0])
    assert s.route("m", [1] * 20).outcome is Outcome.NO_WORKERS
    assert s.lift(B[0]) and not s.lift(B[0])
    assert {s.route("m", [1] * 20).worker.key for _ in range(6)} == {B}  # type: ignore[union-attr]
    s.remove_worker(A[0])  # leaving discovery forgets the inhibition too
    assert s.inhibited == set()
    s.add_worker(WorkerView(A, "h1:1", "m", 16, 100))
    assert {s.route("m", [1] * 20).worker.key for _ in range(6)} == {A, B}  # type: ignore[union-attr]
