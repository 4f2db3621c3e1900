"""The affinity bound (issue 13): an offline replay through the mocker's block pool, checked by hand."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from commutator.cli import bound
from commutator.cli.main import main as cli_main
from commutator.cli.workloads import RequestSpec, TraceWorkload
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.engines.base import EngineRequest, StopParams
from commutator.engines.mocker import MockerConfig, Scheduler
from commutator.engines.mocker.block_pool import BlockPool

pytestmark = pytest.mark.unit

BS = 4


def spec(prompt: list[int], max_tokens: int = 1, at_s: float = 0.0) -> RequestSpec:
    return RequestSpec("/completions", {"prompt": prompt, "max_tokens": max_tokens}, at_s=at_s)


def blk(tag: int) -> list[int]:
    """One full block of distinct tokens; equal tags give equal blocks."""
    return [tag * 10 + k for k in range(BS)]


def run(specs: list[RequestSpec], placement: bound.Placement, *, workers: int, num_blocks: int) -> bound.ReplayResult:
    prepared, refused = bound.prepare(specs, block_size=BS, context_length=10_000)
    assert refused == 0
    return bound.replay(prepared, placement, workers=workers, num_blocks=num_blocks, block_size=BS, window_s=1.0)


def cached_per_request(specs: list[RequestSpec], num_blocks: int) -> list[int]:
    """One worker, one window per request (``at_s`` = its index): each request's cached tokens."""
    timed = [spec(s.body["prompt"], s.body["max_tokens"], at_s=float(i)) for i, s in enumerate(specs)]
    res = run(timed, bound.AffinityPlacement(), workers=1, num_blocks=num_blocks)
    assert [w.requests for w in res.windows] == [1] * len(specs)
    return [w.cached_tokens for w in res.windows]


# -- the replay is the mocker's scheduler, run one request at a time ---------------------------------------
def test_admit_alone_leaves_the_pool_as_the_mocker_scheduler_does() -> None:
    rng = random.Random(3)
    prefixes = [[rng.randrange(1, 500) for _ in range(rng.randint(4, 13))] for _ in range(4)]
    requests = []
    for i in range(40):
        prompt = prefixes[rng.randrange(4)] + [rng.randrange(1, 500) for _ in range(rng.randint(0, 6))]
        requests.append((f"r{i}", prompt, rng.randint(1, 9)))
    sched = Scheduler(MockerConfig(block_size=BS, num_blocks=14, watermark=0.0), vocab_size=1000, context_length=10_000)
    mine = BlockPool(14, BS)
    prepared, _ = bound.prepare([spec(p, o) for _, p, o in requests], block_size=BS, context_length=10_000)
    prompt_hashes = {h for r in prepared for h in r.seq_hashes}
    for (rid, prompt, out), r in zip(requests, prepared, strict=True):
        seq = sched.add(EngineRequest(rid, list(prompt), stop=StopParams(max_tokens=out, ignore_eos=True)))
        while sched.has_work:
            sched.step()
        cached, _ = bound.admit_alone(mine, r)
        theirs = sched.pool
        assert cached == seq.cached_tokens
        assert mine.ref == theirs.ref and list(mine.free) == list(theirs.free) and list(mine.lru) == list(theirs.lru)
        assert {h: b for h, b in mine.cached.items() if h in prompt_hashes} == {
            h: b for h, b in theirs.cached.items() if h in prompt_hashes
        }
        assert len(mine.cached) == len(theirs.cached)
    assert sum(1 for _, p, _ in requests if len(p) > BS) > 30  # the check ran on cacheable prompts


# -- hand-made traces ---------------------------------------------------------------------------------------
def test_two_prefixes_on_two_workers_hit_every_time_after_their_first_occurrence() -> None:
    a, b = blk(1) + blk(2), blk(3) + blk(4)
    order = "ABBAAB"
    specs = [spec((a if c == "A" else b) + blk(100 + i)) for i, c in enumerate(order)]  # 12 tokens, 3 blocks
    # Three blocks per worker: a prefix and one request's own block fit exactly.
    aff = run(specs, bound.AffinityPlacement(), workers=2, num_blocks=3)
    assert aff.prompt_tokens == 72
    assert aff.cached_tokens == 4 * 8  # every repeat hits its 2 prefix blocks (its own block is new)
    assert aff.per_worker_requests == (3, 3)
    rr = run(specs, bound.RoundRobinPlacement(), workers=2, num_blocks=3)
    assert rr.cached_tokens == 0  # A B | B A | A B alternate on each worker: each evicts the other
    prepared, _ = bound.prepare(specs, block_size=BS, context_length=10_000)
    assert bound.infinite_cache_share(prepared, BS) == pytest.approx(32 / 72)


def test_a_small_cache_evicts_least_recently_released_blocks_first() -> None:
    a = blk(1) + blk(2)
    specs = [spec(a + blk(3)), spec(blk(5) + blk(6) + blk(7)), spec(a + blk(8))]
    # 4 blocks: after r0, LRU = [its own block, A2, A1] (released last-first) and one free block.
    # r1 takes the free block and evicts r0's own block and A2: A1 is left, so r2 hits one block.
    assert cached_per_request(specs, num_blocks=4) == [0, 0, 4]
    res = run(specs, bound.AffinityPlacement(), workers=1, num_blocks=4)
    assert res.evicted_blocks == 4  # 2 by r1, then r1's last two blocks by r2


@pytest.mark.parametrize(("other_output", "hit"), [(1, 8), (8, 4)])
def test_output_tokens_take_room_in_the_cache(other_output: int, hit: int) -> None:
    a = blk(1) + blk(2) + [7]  # 9 tokens: 2 full blocks and one token
    # a with 8 output tokens computes 16 tokens: all 4 blocks. Then 5 tokens of another prompt: with 1 output
    # token it holds 2 blocks (evicting a's two output blocks), with 8 it holds 3 and evicts A2 as well.
    specs = [spec(a, 8), spec([*blk(5), 9], other_output), spec(a)]
    assert cached_per_request(specs, num_blocks=4)[2] == hit


def test_the_last_prompt_token_is_always_computed() -> None:
    two_blocks = blk(1) + blk(2)
    nine = blk(3) + blk(4) + [5]
    short = blk(6)
    specs = [spec(two_blocks), spec(two_blocks), spec(nine), spec(nine), spec(short), spec(short)]
    assert cached_per_request(specs, num_blocks=64) == [0, 4, 0, 8, 0, 0]


def test_ties_go_to_the_worker_that_has_gone_longest_without_a_request() -> None:
    aff = bound.AffinityPlacement()
    assert aff.pick([0, 0, 0], [-1, -1, -1]) == 0
    assert aff.pick([2, 2, 0], [5, 3, -1]) == 1
    assert aff.pick([0, 0, 1], [-1, -1, 7]) == 2  # a hit beats any tie rule
    a, b, c, d = (blk(t) + blk(t + 1) + [1] for t in (10, 20, 30, 40))
    res = run([spec(a), spec(b), spec(c), spec(a), spec(d)], aff, workers=3, num_blocks=64)
    assert res.per_worker_requests == (2, 2, 1)  # a, b, c on 0, 1, 2; a again on 0; d on 1, the least recent
    assert res.cached_tokens == 8


def test_affinity_ignoring_load_collapses_onto_one_worker_when_every_prompt_shares_a_first_block() -> None:
    shared = blk(1)
    x1, x2 = [*shared, *blk(2), 1], [*shared, *blk(3), 1]  # 9 tokens: 3 blocks, 2 of them cacheable
    specs = [spec(x1), spec(x2), spec(x1), spec(x2)]
    aff = run(specs, bound.AffinityPlacement(), workers=2, num_blocks=3)
    assert aff.per_worker_requests == (4, 0)  # worker 0 always holds the shared block: the longest prefix
    assert aff.cached_tokens == 3 * 4  # x1 and x2 evict each other's own block there: only the shared one hits
    rr = run(specs, bound.RoundRobinPlacement(), workers=2, num_blocks=3)
    assert rr.cached_tokens == 2 * 8  # one prompt per worker: both repeats hit in full
    pooled = run(specs, bound.AffinityPlacement(), workers=1, num_blocks=6)
    assert pooled.cached_tokens == 4 + 8 + 8  # one pool of both workers' blocks holds everything once


def test_prompts_over_the_context_are_refused_and_output_is_capped() -> None:
    specs = [spec(list(range(1, 20)), 50), spec(list(range(1, 31)), 5), spec(list(range(1, 40)), 5)]
    prepared, refused = bound.prepare(specs, block_size=BS, context_length=30)
    assert refused == 2
    assert [(r.prompt_tokens, r.output_tokens) for r in prepared] == [(19, 11)]
    local = local_block_hashes(list(range(1, 20)), BS, 1337)
    assert prepared[0].seq_hashes == tuple(sequence_hashes(local))
    # The mocker lowers the context to what its blocks hold: (8 - 0) * 4 + 1 = 33 tokens with 8 blocks.
    _, refused = bound.prepare(specs, block_size=BS, context_length=100, num_blocks=8)
    assert refused == 1


def test_time_windows_sum_to_the_totals() -> None:
    a = blk(1) + blk(2) + [3]
    specs = [spec(a, at_s=t) for t in (0.1, 0.5, 1.2, 2.7, 2.9)]
    res = run(specs, bound.AffinityPlacement(), workers=2, num_blocks=16)
    assert [(w.start_s, w.requests, w.cached_tokens) for w in res.windows] == [(0.0, 2, 8), (1.0, 1, 8), (2.0, 2, 16)]
    assert res.windows[0].hit_share == pytest.approx(8 / 18)
    assert res.hit_share == pytest.approx(32 / 45)


# -- a shipped trace and the command -------------------------------------------------------------------------
TRACE = Path(__file__).parents[2] / "benchmarks" / "traces" / "prefix_heavy.jsonl"


def test_the_bound_beats_round_robin_and_random_on_the_prefix_heavy_trace() -> None:
    wl = TraceWorkload(TRACE, length_scale=4.0, max_duration_s=20.0)
    res = bound.affinity_bound(wl, workers=2, num_blocks=256, block_size=64)
    assert res.bound.requests == 402 and res.refused == 0
    assert res.round_robin.prompt_tokens == res.bound.prompt_tokens == res.random.prompt_tokens
    assert res.bound.hit_share > res.round_robin.hit_share + 0.1
    assert res.bound.hit_share > res.random.hit_share + 0.1
    assert res.round_robin.hit_share < res.pooled.hit_share <= res.infinite_cache_share
    assert res.bound.hit_share <= res.infinite_cache_share
    assert sum(res.bound.per_worker_requests) == 402


def test_the_bound_command_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 1000 * i, "input_length": 1000, "output_length": 16, "hash_ids": [1, 2]} for i in range(4)]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "bound.json"
    argv = ["bench", "bound", "--trace", str(trace), "--workers", "2", "--length-scale", "8"]
    assert cli_main([*argv, "--window-s", "2", "--measured", "kv=50%", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # 125-token prompts: one block cacheable (124 // 64); three repeats of four hit 64 of 125 tokens.
    assert "| affinity bound | 38.4% | 1.00 | 1.00 |" in text and "| pooled cache | 38.4% | 1.00 | 1.00 |" in text
    assert "| round-robin replay | 25.6% | 0.67 | 0.67 |" in text
    assert "| measured: kv | 50.0% | 1.30 | 1.30 |" in text
    doc = json.loads(out.read_text())
    assert doc["bound"]["cached_tokens"] == 3 * 64 and doc["bound"]["prompt_tokens"] == 500
    assert [w["requests"] for w in doc["bound"]["windows"]] == [2, 2]
    assert doc["measured"][0]["share_of_bound"] == pytest.approx(0.5 / 0.384)


def test_the_bound_command_cuts_prompts_as_the_routing_benchmark_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 1000 * i, "input_length": 8000, "output_length": 16, "hash_ids": [1, 2]} for i in range(4)]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "bound.json"
    argv = ["bench", "bound", "--trace", str(trace), "--workers", "2", "--length-scale", "1", "--json", str(out)]
    assert cli_main(argv) == 0  # 8,000-token prompts: over the 4,096-token context, all refused
    assert json.loads(out.read_text())["refused"] == 4
    assert cli_main([*argv, "--max-prompt-tokens", "1000", "--max-output", "4"]) == 0  # cut, then served
    doc = json.loads(out.read_text())
    capsys.readouterr()
    assert doc["refused"] == 0 and doc["bound"]["prompt_tokens"] == 4 * 1000
    assert doc["bound"]["cached_tokens"] == 3 * (999 // 64) * 64  # the three repeats hit the cut prefix
