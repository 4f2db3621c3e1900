"""The benchmark harness's own logic: workloads, trace replay, statistics, the settled closed loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from commutator.cli.loadgen import ClientCounters, RequestResult, arrival_offsets, run_closed_loop, summarize
from commutator.cli.workloads import (
    ChatWorkload,
    ConversationWorkload,
    RequestSpec,
    SyntheticWorkload,
    TraceWorkload,
    generate_traces,
    read_trace,
)

pytestmark = pytest.mark.unit


def test_trace_ids_become_deterministic_shared_blocks(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [1, 2]},
        {"timestamp": 500, "input_length": 700, "output_length": 20, "hash_ids": [1, 3]},
        {"timestamp": 2000, "input_length": 300, "output_length": 5, "hash_ids": [1]},
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    reqs = list(TraceWorkload(trace, speedup=2.0, block_tokens=512, length_scale=2.0))
    assert [r.at_s for r in reqs] == [0.0, 0.25, 1.0]
    p = [r.body["prompt"] for r in reqs]
    assert [len(x) for x in p] == [500, 350, 150]
    assert p[0][:256] == p[1][:256] and p[2] == p[0][:150]  # hash id 1 is the same 256 tokens everywhere
    assert p[0][256:] != p[1][256:350]
    assert [r.body["max_tokens"] for r in reqs] == [5, 10, 2]
    again = [r.body["prompt"] for r in TraceWorkload(trace, speedup=2.0, length_scale=2.0)]
    assert again == p
    assert len(list(TraceWorkload(trace, max_duration_s=0.4))) == 1


def test_the_shipped_mooncake_trace_reads() -> None:
    path = Path(__file__).parents[3] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
    if not path.is_file():
        pytest.skip("the shared trace is not beside this checkout")
    reqs = read_trace(path, limit=100)
    assert len(reqs) == 100 and all(len(r.hash_ids) * 512 >= r.input_length for r in reqs)


def test_generated_workload_set_is_reproducible(tmp_path: Path) -> None:
    a = generate_traces(tmp_path / "a")
    b = generate_traces(tmp_path / "b")
    assert [p.name for p in a] == ["prefix_heavy.jsonl", "conversation.jsonl", "long_prompt.jsonl"]
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes()
    shipped = Path(__file__).parents[2] / "benchmarks" / "traces"
    for p in a:
        assert (shipped / p.name).read_bytes() == p.read_bytes(), f"benchmarks/traces/{p.name} is stale: regenerate"
    conv = read_trace(a[1])
    by_first = {}
    for r in conv:
        by_first.setdefault(r.hash_ids[0], []).append(r.hash_ids)
    grown = [turns for turns in by_first.values() if len(turns) > 1]
    assert grown and all(t[i][: len(t[i - 1])] == t[i - 1] for t in grown for i in range(1, len(t)))


def test_synthetic_and_chat_workloads() -> None:
    w = SyntheticWorkload(isl_mean=200, osl_mean=8, prefix_groups=2, prefix_ratio=0.5, seed=1)
    reqs = [next(w) for _ in range(20)]
    assert all(len(r.body["prompt"]) == 200 for r in reqs)
    prefixes = {tuple(r.body["prompt"][:100]) for r in reqs}
    assert len(prefixes) == 2
    assert len({tuple(r.body["prompt"][100:]) for r in reqs}) == 20
    chat = ChatWorkload(isl=400, osl=4, prefix_groups=3)
    msgs = [next(chat).body["messages"][0]["content"] for _ in range(10)]
    assert len({m[:200] for m in msgs}) <= 3


def test_conversations_grow_their_prefix() -> None:
    w = ConversationWorkload(users=2, turns=3, system_tokens=32, user_tokens=8, reply_tokens=4)
    turns = [w.next_turn(0) for _ in range(4)]
    assert turns[3] is None
    p = [t.body["prompt"] for t in turns[:3]]  # type: ignore[union-attr]
    assert [len(x) for x in p] == [40, 52, 64]
    assert p[1][:40] == p[0] and p[2][:52] == p[1]
    assert w.next_turn(1).body["prompt"][:32] == p[0][:32]  # type: ignore[union-attr]


def test_summary_statistics_and_goodput() -> None:
    def r(ttft: float, total: float, tokens: int, ok: bool = True, cached: int = 0) -> RequestResult:
        return RequestResult(
            ok=ok,
            start=0.0,
            end=total,
            ttft_s=ttft,
            output_tokens=tokens,
            prompt_tokens=100,
            cached_tokens=cached,
            error=None if ok else "http_503",
        )

    results = [r(0.010, 0.110, 11, cached=50), r(0.020, 0.220, 21), r(0.500, 0.600, 11), r(0, 0, 0, ok=False)]
    s = summarize(results, wall_s=2.0, ttft_slo_ms=100, itl_slo_ms=15)
    assert s.requests == 3 and s.errors == {"http_503": 1}
    assert s.requests_per_s == 1.5 and s.output_tokens_per_s == 21.5
    assert s.ttft_ms["p50"] == 20.0
    assert s.itl_ms["p50"] == pytest.approx(10.0)  # (0.22 - 0.02) / 20
    assert s.cached_share == pytest.approx(50 / 300)
    assert s.goodput_per_s == 1.0  # the 500 ms TTFT misses the target; two of three meet both


def specs(n: int | None = None, at: list[float] | None = None) -> Iterator[RequestSpec]:
    i = 0
    while n is None or i < n:
        yield RequestSpec("/completions", {"n": i}, at_s=at[i] if at else None)
        i += 1


# -- the schedule --------------------------------------------------------------------------------
def test_poisson_offsets_are_seeded_increasing_and_inside_the_window() -> None:
    a = [t for t, _ in arrival_offsets(specs(), rate=50.0, duration_s=200.0, seed=3)]
    b = [t for t, _ in arrival_offsets(specs(), rate=50.0, duration_s=200.0, seed=3)]
    c = [t for t, _ in arrival_offsets(specs(), rate=50.0, duration_s=200.0, seed=4)]
    assert a == b and a != c  # same seed, same offsets: both stacks get the same arrivals
    assert all(x < y for x, y in itertools.pairwise(a)) and a[-1] <= 200.0
    assert len(a) == pytest.approx(10_000, rel=0.05)
    gaps = [y - x for x, y in zip([0.0, *a], a, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.02, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.02, rel=0.1)  # exponential: sd = mean


def test_offsets_follow_a_trace_or_go_all_at_once_and_stop_when_specs_do() -> None:
    got = list(arrival_offsets(specs(4, at=[0.0, 0.5, 1.5, 3.0]), rate=None, duration_s=2.0))
    assert [t for t, _ in got] == [0.0, 0.5, 1.5] and [s.body["n"] for _, s in got] == [0, 1, 2]
    assert [t for t, _ in arrival_offsets(specs(3), rate=None, duration_s=None)] == [0.0, 0.0, 0.0]
    assert len(list(arrival_offsets(specs(5), rate=1000.0, duration_s=None))) == 5


def test_a_trace_replay_cuts_long_prompts_keeping_their_start(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(o)
            for o in (
                {"timestamp": 0, "input_length": 2048, "output_length": 10, "hash_ids": [1, 2, 3, 4]},
                {"timestamp": 5, "input_length": 700, "output_length": 10, "hash_ids": [1, 9]},
            )
        )
    )
    full = list(TraceWorkload(path))
    wl = TraceWorkload(path, max_prompt_tokens=1000)
    cut = list(wl)
    assert wl.cut_prompts == 1
    assert cut[0].body["prompt"] == full[0].body["prompt"][:1000] and cut[0].prompt_tokens == 1000
    assert cut[1].body["prompt"] == full[1].body["prompt"]  # within the cap: unchanged
    assert list(wl) == cut and wl.cut_prompts == 1  # counted per pass, not accumulated


def test_hit_share_windows_group_by_send_time() -> None:
    from commutator.cli.report import hit_share_windows

    def r(start: float, prompt: int, cached: int, ok: bool = True) -> RequestResult:
        return RequestResult(ok=ok, start=start, end=start + 1, prompt_tokens=prompt, cached_tokens=cached)

    results = [r(100.0, 100, 50), r(101.0, 100, 0), r(106.0, 200, 150), r(107.0, 100, 100, ok=False)]
    assert hit_share_windows(results, 5.0) == [
        {"start_s": 0.0, "requests": 2, "hit_share": 0.25},
        {"start_s": 5.0, "requests": 1, "hit_share": 0.75},
    ]
    assert hit_share_windows([], 5.0) == []


async def test_a_settled_closed_loop_measures_only_what_it_sends_after_settling() -> None:
    """The steady-state closed loop of ``bench compare``: the same clients keep going through the settle
    period, and only requests sent after it count (a real HTTP server streaming SSE, not a stand-in)."""
    served: list[float] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        served.append(time.perf_counter())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("a", "b"):
            await asyncio.sleep(0.01)
            await resp.write(b'data: {"choices": [{"index": 0, "text": "%s"}]}\n\n' % text.encode())
        await resp.write(b'data: {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 3}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settled: list[float] = []
    counters = ClientCounters()
    try:
        t0 = time.perf_counter()
        results, wall = await run_closed_loop(
            f"http://127.0.0.1:{port}/v1",
            "m",
            SyntheticWorkload(isl_mean=3, osl_mean=2, seed=0),
            concurrency=2,
            duration_s=0.3,
            counters=counters,
            settle_s=0.3,
            on_settled=lambda: settled.append(time.perf_counter()),
        )
    finally:
        await runner.cleanup()
    assert len(settled) == 1 and settled[0] - t0 >= 0.3
    assert results and all(r.ok and r.output_tokens == 2 and r.start >= settled[0] for r in results)
    sent_before = sum(1 for t in served if t < settled[0])
    assert sent_before >= 4 and len(served) == sent_before + len(results)  # the settle period's were left out
    assert 0.3 <= wall < 0.6  # from the window's start (from the loop's start it would be over 0.6)
    # the two connections were opened while settling and kept: none opened in the window
    assert counters.connections_opened == 0 and counters.connections_reused >= len(results) - 2
    assert counters.sse_events == 4 * len(results)  # two tokens, usage, [DONE] of measured requests only


async def test_settling_is_refused_for_an_open_loop() -> None:
    from commutator.cli.measure import measure

    with pytest.raises(ValueError, match="closed loop only"):  # refused before any request is sent
        await measure("http://127.0.0.1:9/v1", "m", SyntheticWorkload(isl_mean=3, osl_mean=2), rate=5.0, settle_s=1.0)
