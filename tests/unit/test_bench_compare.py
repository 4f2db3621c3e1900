"""``bench compare``'s own logic: open-loop rates from Dynamo's saturation,
paired ratios and medians, the CPU budget, the page's figures region."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest
from commutator.cli import compare, compare_page
from commutator.cli.compare_stats import cell, cpu_budget, med, paired_ratio, rps

pytestmark = pytest.mark.unit


# -- rates ---------------------------------------------------------------------------------------
def test_open_loop_rates_are_fractions_of_dynamos_best_closed_loop_rate() -> None:
    assert compare.saturation([20.9, 248.1, 388.7, float("nan"), 371.0]) == 388.7
    with pytest.raises(RuntimeError):
        compare.saturation([0.0, float("nan")])
    assert compare.derive_rates(388.6, (0.5, 0.9)) == {"0.5": 194.3, "0.9": 349.7}
    assert compare.derive_rates(0.05, (0.5,)) == {"0.5": 0.1}
    with pytest.raises(ValueError):
        compare.derive_rates(0.0, (0.5,))


def test_quick_shortens_every_phase_and_leaves_the_page_alone() -> None:
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    full = p.parse_args([])
    assert (full.reps, full.open_fractions, full.client_apis, full.no_docs) == (3, (0.5, 0.9), ("chat",), False)
    quick = p.parse_args(["--quick", "--open-fractions", "0.4,0.8"])
    compare.apply_quick(quick)
    assert (quick.reps, quick.client_reps, quick.routing_reps, quick.no_docs) == (1, 1, 1, True)
    assert compare.client_combos(("chat", "completions")) == [
        ("loadgen", "chat"),
        ("independent", "chat"),
        ("independent-lines", "chat"),
        ("loadgen", "completions"),
        ("independent", "completions"),
    ]
    assert max(quick.overhead_duration, quick.open_duration, quick.slow_duration, quick.clients_duration) <= 2.0
    assert (full.slow_settle, full.slow_steady_duration) == (30.0, 30.0)
    assert quick.slow_settle + quick.slow_steady_duration <= 3.0
    assert quick.open_fractions == (0.4, 0.8)
    with pytest.raises(SystemExit):
        p.parse_args(["--open-fractions", "0.5,3"])


# -- statistics ----------------------------------------------------------------------------------
def run(rps_: float, fe_ms: float | None = None, **cpu_s: float) -> dict[str, Any]:
    r: dict[str, Any] = {"summary": {"requests_per_s": rps_, "requests": 100, "errors": {}}}
    if fe_ms is not None or cpu_s:
        r["cpu"] = {"kinds": {"frontend": {"ms_per_req": fe_ms}}, "wall_s": 2.0}
        r["cpu"].update({k: {"cpu_s": v} for k, v in cpu_s.items()})
    return r


def test_ratios_pair_repetitions_then_take_the_median() -> None:
    ours = [run(200.0), run(100.0), run(330.0)]
    theirs = [run(100.0), run(200.0), run(300.0)]
    # per repetition: 2.0, 0.5, 1.1 -> median 1.1; a ratio of medians would say 200 / 200 = 1.0
    assert paired_ratio(ours, theirs, rps) == pytest.approx((1.1, 0.5, 2.0))
    assert cell(paired_ratio(ours, theirs, rps), 2) == "1.10 [0.50-2.00]"
    assert med(ours, rps) == (200.0, 100.0, 330.0)
    # missing figures, zero denominators and unpaired repetitions are left out
    assert paired_ratio([run(1.0), run(2.0), run(3.0)], [run(0.0), run(1.0)], rps) == (2.0, 2.0, 2.0)
    assert all(math.isnan(x) for x in paired_ratio([run(1.0)], [], rps))
    assert cell((2.0, 2.0, 2.0)) == "2.0" and cell((float("nan"),) * 3) == "-"


def test_cpu_budget_splits_a_run_per_request_and_counts_busy_cores() -> None:
    b = cpu_budget(run(50.0, stack=0.6, client=0.2, other=0.2, machine=1.0))
    assert b == pytest.approx({"stack_ms": 6.0, "client_ms": 2.0, "other_ms": 2.0, "total_ms": 10.0, "cores_busy": 0.5})
    # the identity the two-client section rests on: req/s = 1000 * busy cores / all CPU per request
    assert 1000 * b["cores_busy"] / b["total_ms"] == pytest.approx(50.0)
    assert cpu_budget(run(50.0))["total_ms"] is None


# -- the page ------------------------------------------------------------------------------------
def measured(rps_: float, fe_ms: float, client_ms: float) -> dict[str, Any]:
    dist = {"p50": 10.0, "p90": 15.0, "p99": 20.0, "mean": 11.0}
    per = {"cpu_s": 1.0, "ms_per_req": 1.0, "pct_core": 50.0}
    return {
        "summary": {
            "requests_per_s": rps_,
            "requests": 100,
            "errors": {},
            "output_tokens_per_s": 64 * rps_,
            "ttft_ms": dist,
            "itl_ms": dist,
            "chunk_ms": dist,
            "send_lag_ms": dist,
            "cached_share": 0.5,
        },
        "cpu": {
            "roles": {"frontend": {"kind": "frontend", **per, "ms_per_req": fe_ms}},
            "kinds": {"frontend": {**per, "ms_per_req": fe_ms}, "worker": per},
            "stack": per,
            "client": {**per, "ms_per_req": client_ms},
            "machine": {**per, "cpu_s": 3.0},
            "other": per,
            "wall_s": 2.0,
        },
        "client": {"sse_events": 6700},
    }


def canned_out() -> dict[str, Any]:
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(p.parse_args([])).items()}
    return {
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gib": 8,
            "kernel": "k",
            "python": "3.11",
            "nats_server": "nats",
            "etcd": "etcd",
            "loadavg_before": (0.1, 0.1, 0.1),
            "loadavg_after": (0.2, 0.2, 0.2),
        },
        "dynamo_version": "1.6.1",
        "started": "2026-12-01T10:00:00",
        "wall_s": 600.0,
        "settings": settings,
        "overhead": {
            "concurrency": [64],
            "runs": {"commutator/c64": [measured(400.0, 2.0, 1.0)], "dynamo/c64": [measured(380.0, 1.9, 1.5)]},
        },
        "open_loop": {
            "concurrency": [1, 16, 64],
            "saturation_rps": 380.0,
            "rates": {"0.5": 190.0},
            "runs": {"commutator/0.5": [measured(190.0, 3.0, 1.0)], "dynamo/0.5": [measured(190.0, 2.0, 1.0)]},
        },
        "slow_stream": {},
        "clients": {
            "combos": [("independent", "chat")],
            "runs": {
                "commutator/independent/chat": [measured(200.0, 4.0, 0.7)],
                "dynamo/independent/chat": [measured(220.0, 3.8, 1.3)],
            },
        },
        "routing": {},
    }


def test_the_figures_region_has_each_scenario_run_and_its_ratios() -> None:
    out = canned_out()
    text = compare_page.page(out, [Path("build/x/open_loop_ttft.png")])
    assert "### (a) Open loop" in text and "**380.0 req/s**" in text and "50% = 190 req/s" in text
    assert "| 50% | 1.00 | 1.00 | 1.00 | 1.00 | 1.50 |" in text  # frontend CPU/req ratio 3.0 / 2.0
    assert "| 64 | 1.05 |" in text  # closed-loop req/s ratio 400 / 380
    assert "| independent | chat | dynamo | 220.0 | 0 |" in text and "| 67.0 |" in text  # SSE events per request
    assert "### (c)" not in text and "### Routing" not in text  # sections not run are left out
    assert "![open_loop_ttft](benchmarks/open_loop_ttft.png)" in text
    summary = compare.summary_table(out)
    assert summary.splitlines()[0].startswith("| Commutator / Dynamo | req/s |")
    assert "| (a) open 50% | 1.00 |" in summary and "| (d) c=64 independent chat | 0.91 |" in summary


def test_the_slow_stream_shows_its_steady_state_closed_loop_beside_the_first() -> None:
    out = canned_out()
    out["slow_stream"] = {
        "isl": 200,
        "osl": 256,
        "concurrency": 32,
        "runs": {
            "commutator/closed": [measured(18.0, 7.0, 7.0)],
            "dynamo/closed": [measured(18.0, 11.0, 7.0)],
            "commutator/steady": [measured(19.0, 6.0, 7.0)],
            "dynamo/steady": [measured(18.0, 10.0, 7.0)],
        },
    }
    text = compare_page.page(out, [])
    assert "*Steady*: a second closed loop, 30 s measured after 30 s of discarded load" in text
    assert "| closed c=32, steady | commutator | 19.0 |" in text and "| closed c=32, steady | 0.60 |" in text
    summary = compare.summary_table(out)
    assert "| (c) slow stream c=32 | 1.00 |" in summary and "| (c) slow stream c=32 steady | 1.06 |" in summary
    del out["slow_stream"]["runs"]["commutator/steady"], out["slow_stream"]["runs"]["dynamo/steady"]
    assert "steady" not in compare_page.page(out, []) and "steady" not in compare.summary_table(out)


def test_routing_modes_carry_router_flags() -> None:
    assert compare.routing_mode_args("kv") == ("kv", ())
    assert compare.routing_mode_args("kv-adaptive") == ("kv", ("--router-adaptive",))
    assert compare.routing_mode_args("kv+decode-weight=0.25") == ("kv", ("--decode-weight", "0.25"))
    assert compare.routing_mode_args("kv-adaptive+adaptive-weights=1,2") == (
        "kv",
        ("--router-adaptive", "--adaptive-weights", "1,2"),
    )
    assert compare.routing_mode_args("round-robin") == ("round-robin", ())
    for bad in ("direct", "kv+", "kv+decode-weight=", "kv+--x"):
        with pytest.raises(ValueError, match="routing mode"):
            compare.routing_mode_args(bad)
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    assert "kv+decode-weight=0.25" in p.parse_args([]).routing_modes
    assert p.parse_args(["--routing-modes", "kv,kv+decode-weight=0.1"]).routing_modes == ("kv", "kv+decode-weight=0.1")
    with pytest.raises(SystemExit):
        p.parse_args(["--routing-modes", "kv,nearest"])


def test_the_routing_tables_list_the_modes_that_ran_in_their_order() -> None:
    out = canned_out()
    out["settings"]["routing_modes"] = ["kv", "kv+decode-weight=0.25", "round-robin"]
    pooled = {"hit_share": 0.6}
    out["routing"] = {
        "workers": 4,
        "num_blocks": 1024,
        "max_prompt_tokens": 3584,
        "max_output": 256,
        "ttft_slo_ms": 250.0,
        "itl_slo_ms": 40.0,
        "traces": {
            "t": {
                "about": "a trace",
                "duration_s": 20.0,
                "requests": 100,
                "cut_prompts": 0,
                "bound": {
                    "pooled": pooled,
                    "bound": pooled,
                    "round_robin": {"hit_share": 0.3},
                    "random": {"hit_share": 0.3},
                    "infinite_cache_share": 0.6,
                },
            }
        },
        "runs": {
            "t/commutator/kv": [measured(20.0, 5.0, 1.0)],
            "t/commutator/kv+decode-weight=0.25": [measured(20.0, 5.0, 1.0)],
            "t/dynamo/kv": [measured(20.0, 5.0, 1.0)],
        },
    }
    text = compare_page.page(out, [])
    assert text.index("| kv | commutator |") < text.index("| kv+decode-weight=0.25 | commutator |")
    assert "| ours kv+decode-weight=0.25 / Dynamo kv | 1.00 |" in text
    assert "| round-robin |" not in text and "ours round-robin" not in text  # not measured: no row


def test_splice_replaces_only_the_figures_region() -> None:
    doc = f"# Title\n\nprose\n\n{compare_page.BEGIN}\nold figures\n{compare_page.END}\n\nmore prose\n"
    new = compare_page.splice(doc, "new figures\n")
    assert new == f"# Title\n\nprose\n\n{compare_page.BEGIN}\n\nnew figures\n\n{compare_page.END}\n\nmore prose\n"
    assert compare_page.splice(new, "again") == new.replace("new figures", "again")
    with pytest.raises(ValueError):
        compare_page.splice("# no region\n", "x")


def test_the_shipped_page_has_a_figures_region() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "benchmarks.md").read_text()
    assert doc.count(compare_page.BEGIN) == 1 and doc.count(compare_page.END) == 1


# -- stacks --------------------------------------------------------------------------------------
async def test_a_stack_that_fails_to_start_leaves_no_process_behind(tmp_path: Path) -> None:
    """A stack whose start fails part way (a role that never serves) is stopped all the same."""
    import sys

    from commutator.cli.stacks import Stack

    spawned = []

    class Broken(Stack):
        async def start(self) -> None:
            spawned.append(self._spawn([sys.executable, "-c", "import time; time.sleep(60)"], {}, "worker"))
            raise RuntimeError("the stack did not serve")

    ran: list[object] = []
    with pytest.raises(RuntimeError, match="did not serve"):
        await compare._with_stack(Broken(speedup=1.0, router_mode="kv", log_dir=tmp_path), ran.append)
    assert ran == []
    assert spawned[0].poll() is not None  # the role it spawned was stopped


async def test_a_stack_that_does_not_start_is_started_again_on_fresh_ports(tmp_path: Path) -> None:
    """A role that exits while starting (a port taken between its choice and the bind) costs a
    second start on other ports, not the run; a stack that never starts fails with the last error."""
    import sys

    from commutator.cli.stacks import Stack, StackStartError

    class Flaky(Stack):
        def __init__(self, fail: int, **kw: Any) -> None:
            super().__init__(**kw)
            self.fail, self.ports, self.spawned = fail, [], []

        async def start(self) -> None:
            self.ports.append(self.port)
            self.spawned.append(self._spawn([sys.executable, "-c", "import time; time.sleep(60)"], {}, "worker"))
            if len(self.ports) <= self.fail:
                raise StackStartError(f"attempt {len(self.ports)}: port in use")

    async def url(stack: Stack) -> str:
        return stack.base_url

    once = Flaky(1, speedup=1.0, router_mode="kv", log_dir=tmp_path / "once")
    (tmp_path / "once").mkdir()
    assert await compare._with_stack(once, url) == f"http://127.0.0.1:{once.ports[1]}/v1"
    assert len(once.ports) == 2 and once.ports[0] != once.ports[1]
    assert all(p.poll() is not None for p in once.spawned)  # the failed start's role, and the stack after
    assert sorted(f.name for f in (tmp_path / "once").iterdir()) == ["worker-0.log", "worker-1.log"]

    never = Flaky(99, speedup=1.0, router_mode="kv", log_dir=tmp_path)
    with pytest.raises(StackStartError, match="attempt 3"):
        await compare._with_stack(never, url)
    assert len(never.ports) == 3 and all(p.poll() is not None for p in never.spawned)
