"""Scheduler behaviour and the timing model, on pure passes (no clock, no loop)."""

from __future__ import annotations

import pytest
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.engines.base import (
    EngineRequest,
    FinishReason,
    KvImport,
    KvRemoved,
    KvStored,
    SamplingParams,
    StopParams,
)
from commutator.engines.mocker import MockerConfig, Scheduler, decode_ms, prefill_ms
from commutator.engines.mocker.tokens import token_at

pytestmark = pytest.mark.unit


def make(**kw: object) -> Scheduler:
    base = {"speedup_ratio": 1.0, "watermark": 0.0}
    base.update(kw)
    return Scheduler(MockerConfig(**base), vocab_size=50_000, context_length=65_536, engine_salt=7)  # type: ignore[arg-type]


def req(rid: str, n: int, max_tokens: int = 4, start: int = 0, **kw: object) -> EngineRequest:
    return EngineRequest(rid, list(range(start, start + n)), stop=StopParams(max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


def ttft_ms(s: Scheduler, rid: str) -> float:
    """Simulated time from submission to the pass that emits the first token."""
    total = 0.0
    for _ in range(100):
        r = s.step()
        total += r.pass_ms
        if any(seq.request_id == rid for seq, *_ in r.outputs):
            return total
    raise AssertionError("no first token")


@pytest.mark.parametrize(("isl", "expected_ms"), [(512, 24.4), (4096, 85.8), (8192, 169.1)])
def test_reference_ttft_within_2_percent(isl: int, expected_ms: float) -> None:
    s = make()
    s.add(req("r", isl))
    assert ttft_ms(s, "r") == pytest.approx(expected_ms, rel=0.02)


def test_repeated_16384_prompt_is_served_from_cache() -> None:
    s = make()
    s.add(req("first", 16384, max_tokens=1))
    cold = ttft_ms(s, "first")
    assert cold == pytest.approx(2 * prefill_ms(8192), rel=0.02)  # chunked: two 8192-token passes
    s.add(req("again", 16384, max_tokens=1))
    seq = s.by_id["again"]
    warm = ttft_ms(s, "again")
    assert seq.cached_tokens == 16384 - 64  # every block but the last, recomputed to sample from
    assert warm == pytest.approx(prefill_ms(64), rel=0.02)
    assert warm < cold / 15


def test_decode_passes_follow_the_usage_formula() -> None:
    s = make(num_blocks=100)
    s.add(req("d", 640, max_tokens=3))
    s.step()  # prefill
    r = s.step()
    assert r.decode_seqs == 1 and r.prefill_tokens == 0
    usage = 11 / 100  # 10 prompt blocks + the block of the 641st token
    assert r.kv_usage == pytest.approx(usage)
    assert r.pass_ms == pytest.approx(decode_ms(usage))
    assert decode_ms(0.0) == pytest.approx(5.74) and decode_ms(1.0) == pytest.approx(34.01)
    assert decode_ms(2.5) == 1.0  # floored at 1 ms


def test_two_prompts_arriving_together_share_one_pass() -> None:
    s = make()
    s.add(req("a", 1000))
    s.add(req("b", 3000, start=5000))
    r = s.step()
    assert r.admitted == 2 and r.prefill_tokens == 4000
    assert r.pass_ms == pytest.approx(prefill_ms(4000))
    assert sorted(seq.request_id for seq, *_ in r.outputs) == ["a", "b"]


def test_a_prefix_planned_earlier_in_the_same_pass_is_a_cache_hit() -> None:
    """As vLLM's v1 scheduler: blocks are cached when a pass is planned, so a request admitted later
    in the same pass reuses the blocks an earlier one is computing in it."""
    s = make()
    s.add(req("a", 1000))
    s.add(EngineRequest("b", [*range(1000), *range(7000, 7100)], stop=StopParams(max_tokens=4)))  # a's 1000, then 100
    r = s.step()
    assert r.admitted == 2
    cached = 1000 // 64 * 64  # a's 15 full blocks
    assert s.by_id["b"].cached_tokens == cached
    assert r.prefill_tokens == 1000 + (1100 - cached)
    assert r.pass_ms == pytest.approx(prefill_ms(1000 + 1100 - cached))
    stored = [ev.data for ev in s.pool.take_events()]
    assert sum(len(d.blocks) for d in stored if isinstance(d, KvStored)) == 1100 // 64  # the shared 15 stored once


def test_chunked_prefill_respects_the_token_budget_and_decodes_ride_along() -> None:
    s = make(max_batched_tokens=1024)
    s.add(req("short", 100, max_tokens=10))
    s.step()
    s.add(req("long", 3000, start=10_000))
    budgets = []
    for _ in range(3):
        r = s.step()
        budgets.append((r.prefill_tokens, r.decode_seqs))
    assert budgets == [(1023, 1), (1023, 1), (954, 1)]  # running decode first, then the chunk
    assert s.by_id["long"].num_output == 1


def test_speedup_divides_and_zero_means_no_delay() -> None:
    fast = make(speedup_ratio=10.0)
    fast.add(req("f", 512))
    assert ttft_ms(fast, "f") == pytest.approx(prefill_ms(512) / 10)
    instant = make(speedup_ratio=0.0)
    instant.add(req("i", 8192))
    assert ttft_ms(instant, "i") == 0.0


def test_stop_conditions() -> None:
    seed = 1234
    stream = [token_at(seed, 16 + i, 50_000) for i in range(20)]  # after a 16-token prompt
    s = make()
    stop_tok = stream[5]
    s.add(
        EngineRequest(
            "stop",
            list(range(16)),
            sampling=SamplingParams(seed=seed),
            stop=StopParams(max_tokens=50, stop_token_ids=(stop_tok,)),
        )
    )
    outs = run_all(s)
    assert outs["stop"] == (stream[:6], FinishReason.STOP)

    s = Scheduler(MockerConfig(watermark=0.0), vocab_size=50_000, context_length=65_536, eos_token_ids=(stream[2],))
    s.add(EngineRequest("eos", list(range(16)), sampling=SamplingParams(seed=seed), stop=StopParams(max_tokens=50)))
    s.add(
        EngineRequest(
            "min",
            list(range(16)),
            sampling=SamplingParams(seed=seed),
            stop=StopParams(max_tokens=50, min_tokens=4, stop_token_ids=(stream[3],)),
        )
    )
    s.add(
        EngineRequest(
            "ignore",
            list(range(16)),
            sampling=SamplingParams(seed=seed),
            stop=StopParams(max_tokens=8, ignore_eos=True),
        )
    )
    outs = run_all(s)
    assert outs["eos"] == (stream[:3], FinishReason.STOP)
    assert outs["min"] == (stream[:4], FinishReason.STOP)  # EOS at 3 is too early; the stop id at 4 counts
    assert outs["ignore"] == (stream[:8], FinishReason.LENGTH)


def test_tokens_are_deterministic_per_seed_and_differ_between_requests() -> None:
    def tokens(rid: str, seed: int | None) -> list[int]:
        s = make()
        s.add(req(rid, 8, max_tokens=6, sampling=SamplingParams(seed=seed)))
        return run_all(s)[rid][0]

    assert tokens("a", 5) == tokens("b", 5)
    assert tokens("a", None) == tokens("a", None)
    assert tokens("a", None) != tokens("b", None)


def run_all(s: Scheduler, limit: int = 10_000) -> dict[str, tuple[list[int], FinishReason]]:
    got: dict[str, list[int]] = {}
    done: dict[str, tuple[list[int], FinishReason]] = {}
    for _ in range(limit):
        if not s.has_work:
            break
        for seq, tok, reason, _ in s.step().outputs:
            got.setdefault(seq.request_id, []).append(tok)
            if reason is not None:
                done[seq.request_id] = (got[seq.request_id], reason)
    return done


def test_preemption_when_blocks_run_out_and_recompute_after() -> None:
    # 12 blocks of 4 tokens: two 16-token prompts (4 blocks each) that each grow by 12 tokens.
    s = make(block_size=4, num_blocks=12, max_batched_tokens=64)
    s.add(req("old", 16, max_tokens=12, start=0))
    s.add(req("new", 16, max_tokens=12, start=100))
    preempted = 0
    outs: dict[str, list[int]] = {"old": [], "new": []}
    finished: list[str] = []
    for _ in range(200):
        if not s.has_work:
            break
        r = s.step()
        preempted += r.preempted
        assert s.pool.active <= 12
        for seq, tok, reason, _ in r.outputs:
            outs[seq.request_id].append(tok)
            if reason is not None:
                finished.append(seq.request_id)
    assert preempted >= 1 and s.total_preemptions == preempted
    assert finished == ["old", "new"]  # the later admission was the one preempted
    assert len(outs["old"]) == 12 and len(outs["new"]) == 12
    # Recompute produced the same tokens: a preempted request continues where it was.
    seed = s.config.mocker_seed
    from commutator.engines.mocker.tokens import request_seed

    assert outs["new"] == [token_at(request_seed("new", None, seed), 16 + i, 50_000) for i in range(12)]
    assert s.pool.active == 0


def test_exact_kv_events_for_store_reuse_and_evict() -> None:
    s = make(block_size=4, num_blocks=6, max_batched_tokens=64)
    prompt = list(range(10))
    local = local_block_hashes(prompt, 4)
    seqh = sequence_hashes(local)
    e = s.pool.engine_hash
    s.add(EngineRequest("a", prompt, stop=StopParams(max_tokens=1)))
    s.step()
    ev = s.pool.take_events()
    assert [(x.event_id, x.data) for x in ev] == [(0, KvStored(None, ((e(seqh[0]), local[0]), (e(seqh[1]), local[1]))))]

    s.add(EngineRequest("b", [*prompt, 77, 78], stop=StopParams(max_tokens=1)))  # same 2 blocks, then a third
    s.step()
    local_b = local_block_hashes([*prompt, 77, 78], 4)
    seq_b = sequence_hashes(local_b)
    assert s.by_id.get("b") is None  # finished
    ev = s.pool.take_events()  # reuse of blocks 0-1 emits nothing; block 2 is new
    assert [(x.event_id, x.data) for x in ev] == [(1, KvStored(e(seqh[1]), ((e(seq_b[2]), local_b[2]),)))]

    # A 5-block unrelated prompt needs the evictable blocks: the LRU tail goes first.
    s.add(EngineRequest("c", list(range(500, 520)), stop=StopParams(max_tokens=1)))
    s.step()
    ev = s.pool.take_events()
    assert isinstance(ev[0].data, KvRemoved) and ev[0].event_id == 2
    assert ev[0].data.block_hashes == (e(seq_b[2]), e(seqh[1]))
    assert isinstance(ev[1].data, KvStored) and ev[1].data.parent_hash is None and len(ev[1].data.blocks) == 5


def test_bad_requests_are_rejected_clearly() -> None:
    s = Scheduler(MockerConfig(), vocab_size=1000, context_length=2048)
    with pytest.raises(ValueError, match="empty"):
        s.add(EngineRequest("e", []))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.add(EngineRequest("v", [1, 5000]))
    with pytest.raises(ValueError, match="context is 2048"):
        s.add(EngineRequest("c", [1] * 2048))
    s.add(EngineRequest("dup", [1]))
    with pytest.raises(ValueError, match="already in use"):
        s.add(EngineRequest("dup", [1]))
    assert s.abort("dup") is True and s.abort("dup") is False


def test_max_tokens_is_capped_by_the_context() -> None:
    s = Scheduler(MockerConfig(watermark=0.0), vocab_size=1000, context_length=20)
    s.add(EngineRequest("x", list(range(16)), stop=StopParams(max_tokens=100, ignore_eos=True)))
    toks, reason = run_all(s)["x"]
    assert len(toks) == 4 and reason is FinishReason.LENGTH


def test_abort_frees_blocks() -> None:
    s = make()
    s.add(req("a", 1000, max_tokens=100))
    s.step()
    assert s.pool.active == 16
    assert s.abort("a") is True
    assert s.pool.active == 0 and not s.has_work


def test_prefill_only_and_import_hooks() -> None:
    s = make(block_size=4, num_blocks=10)
    s.add(req("p", 10, max_tokens=50, prefill_only=True))
    out = run_all(s)
    assert len(out["p"][0]) == 1 and out["p"][1] is FinishReason.STOP
    assert s.pool.active == 0 and len(s.pool.cached) == 2  # its full blocks stay cached

    d = make(block_size=4, num_blocks=10)
    r = EngineRequest("i", list(range(10)), stop=StopParams(max_tokens=3), kv_import=KvImport(first_token_id=42))
    blocks = d.reserve_import(r)
    assert blocks is not None and len(blocks) == 3 and d.pool.active == 3
    seq, reason = d.add_imported(r, 42)
    assert reason is None and seq.num_output == 1
    assert [type(x.data) for x in d.pool.take_events()] == [KvStored]  # the imported full blocks are cached
    toks, reason = run_all(d)["i"]
    assert len(toks) == 2 and reason is FinishReason.LENGTH  # 42 came from the prefill worker
    with pytest.raises(ValueError, match="KV cache"):
        d.reserve_import(EngineRequest("big", list(range(100))))  # can never run here
    d.reserve_import(EngineRequest("hold", list(range(20))))  # 5 of the 10 blocks
    assert d.reserve_import(EngineRequest("more", list(range(24)))) is None  # no room now: prefill locally
    d.release_import("hold")
    d.reserve_import(EngineRequest("gone", list(range(8))))
    assert d.pool.active == 2
    d.release_import("gone")
    assert d.pool.active == 0


# -- the longest sequence the KV cache can run ---------------------------------------------------------
# 8 blocks of 16 tokens, 2 kept free when admitting: a sequence is admitted with all of its blocks at
# once whenever its prefix is cached, so it can never hold more than 6 blocks at admission; the last
# sampled token needs no KV: 6 * 16 + 1 = 97 tokens of prompt plus output.
TINY = {"block_size": 16, "num_blocks": 8, "watermark": 0.25}


def tiny(**kw: object) -> Scheduler:
    return Scheduler(MockerConfig(**{**TINY, **kw}), vocab_size=1000, context_length=4096, engine_salt=7)  # type: ignore[arg-type]


def unlimited(rid: str, n: int, start: int = 0) -> EngineRequest:
    return EngineRequest(rid, list(range(start, start + n)), stop=StopParams(max_tokens=0, ignore_eos=True))


def test_the_context_length_is_what_fits_in_the_kv_cache() -> None:
    assert tiny().context_length == 97
    assert tiny(max_batched_tokens=16).context_length == 97  # chunked prefill does not raise it (see below)
    assert tiny(watermark=0.0).context_length == 8 * 16 + 1
    assert make().context_length == 65_536  # the default cache holds the whole model context
    assert Scheduler(MockerConfig(**TINY), vocab_size=1000, context_length=50).context_length == 50  # type: ignore[arg-type]


def test_a_prompt_over_the_kv_capacity_is_refused_naming_it() -> None:
    s = tiny()
    with pytest.raises(ValueError, match=r"the prompt has 97 tokens; this engine's KV cache .* 96 prompt tokens"):
        s.add(unlimited("over", 97))
    assert not s.has_work
    s.add(unlimited("at", 96))
    toks, reason = run_all(s, limit=1000)["at"]
    assert (len(toks), reason) == (1, FinishReason.LENGTH)


def test_a_generation_that_would_outgrow_the_cache_ends_with_length() -> None:
    s = tiny()
    s.add(unlimited("grow", 10))
    toks, reason = run_all(s, limit=1000)["grow"]
    assert (len(toks), reason) == (97 - 10, FinishReason.LENGTH)
    assert s.total_preemptions == 0 and s.pool.active == 0


def test_a_cached_prefix_makes_the_first_chunk_the_whole_prompt() -> None:
    # Why chunked prefill does not raise the limit: the second time, 6 blocks come from the cache and the
    # admission check counts them, so 7 blocks would have to fit under the watermark (the old stall).
    s = tiny(max_batched_tokens=16)
    with pytest.raises(ValueError, match="KV cache"):
        s.add(unlimited("seven-blocks", 112))
    for rid in ("first", "again"):
        s.add(EngineRequest(rid, list(range(96)), stop=StopParams(max_tokens=1)))
        assert run_all(s, limit=1000)[rid][1] is FinishReason.LENGTH
    assert s.by_id == {} and s.pool.active == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_blocks", [3, 8, 21])
@pytest.mark.parametrize("watermark", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("max_batched_tokens", [1, 5, 8192])
def test_every_sequence_within_the_limit_completes(
    block_size: int, num_blocks: int, watermark: float, max_batched_tokens: int
) -> None:
    s = Scheduler(
        MockerConfig(
            block_size=block_size, num_blocks=num_blocks, watermark=watermark, max_batched_tokens=max_batched_tokens
        ),
        vocab_size=1000,
        context_length=4096,
    )
    limit = (num_blocks - int(watermark * num_blocks)) * block_size + 1
    for prompt in sorted({1, limit // 2, limit - 1}):
        # Alone, twice (the second time with its prefix cached), then two at once (one preempts the other).
        for rids in (["a"], ["b"], ["c", "d"]):
            for rid in rids:
                s.add(
                    EngineRequest(rid, list(range(prompt)), stop=StopParams(max_tokens=limit - prompt, ignore_eos=True))
                )
            done = run_all(s, limit=20 * limit + 100)
            assert {rid: (len(done[rid][0]), done[rid][1]) for rid in rids} == {
                rid: (limit - prompt, FinishReason.LENGTH) for rid in rids
            }, (prompt, rids)
            assert s.pool.active == 0
    assert s.context_length == limit


# -- a pass in two calls: schedule, then complete with sampled tokens (what a real engine does) ---------
def test_schedule_then_complete_is_the_same_pass_as_step() -> None:
    # Two schedulers in lockstep: one steps, the other plans and completes with the same synthetic tokens.
    a, b = (
        make(block_size=4, num_blocks=12, max_batched_tokens=20),
        make(block_size=4, num_blocks=12, max_batched_tokens=20),
    )
    for s in (a, b):
        s.add(req("x", 30, max_tokens=12))
        s.add(req("y", 9, max_tokens=12, start=100))
    for _ in range(100):
        if not a.has_work:
            break
        ra = a.step()
        batch = b.schedule()
        # Who samples is known at planning: the sequences whose computed tokens reach their end.
        assert [seq.request_id for seq in batch.samples] == [seq.request_id for seq, *_ in ra.outputs]
        rb = b.complete(batch, [(tok, lp) for _, tok, _, lp in ra.outputs])
        assert [(s.request_id, t, r) for s, t, r, _ in rb.outputs] == [
            (s.request_id, t, r) for s, t, r, _ in ra.outputs
        ]
        assert (rb.prefill_tokens, rb.decode_seqs, rb.preempted, rb.admitted) == (
            ra.prefill_tokens,
            ra.decode_seqs,
            ra.preempted,
            ra.admitted,
        )
        assert a.pool.take_events() == b.pool.take_events()
    assert not a.has_work and not b.has_work and a.total_preemptions == b.total_preemptions > 0


def test_complete_wants_one_token_per_sampling_sequence() -> None:
    s = make()
    s.add(req("a", 10))
    batch = s.schedule()
    with pytest.raises(ValueError, match="0 sampled tokens for 1"):
        s.complete(batch, [])


def test_held_prefill_blocks_stay_until_released() -> None:
    s = Scheduler(
        MockerConfig(block_size=4, num_blocks=10, watermark=0.0),
        vocab_size=1000,
        context_length=64,
        hold_prefill_blocks=True,
    )
    s.add(req("p", 10, max_tokens=50, prefill_only=True))
    out = run_all(s)
    assert len(out["p"][0]) == 1 and out["p"][1] is FinishReason.STOP
    held = s.held["p"].blocks
    assert len(held) == 3 and s.pool.active == 3  # the partial third block too: its KV is part of the prompt
    with pytest.raises(ValueError, match="already in use"):
        s.add(req("p", 4))
    assert s.release_held("p") is True and s.release_held("p") is False
    assert s.pool.active == 0 and len(s.pool.cached) == 2
