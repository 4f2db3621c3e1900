"""``commutator bench compare``: Commutator vs NVIDIA Dynamo 1.6.1 on this machine, the same workloads.

Sections (``--only``), each on freshly started stacks (one frontend, two mocker workers; Commutator
with etcd and nats-server). Repetitions alternate which stack goes first; the first repetition starts
with Dynamo, whose figures set the open-loop rates both stacks get.

- ``overhead``: mocker speed-up 100, ~1,000-token chat prompts, 64 tokens out. (b) closed loop at
  concurrency 1/16/64; in Dynamo's first repetition also a saturation probe (closed loop at
  ``--probe-concurrency``); (a) then open loop (Poisson arrivals, seeded per repetition) at
  ``--open-fractions`` of Dynamo's saturation, the same offered rates and arrivals for both stacks.
- ``slow-stream``: (c) speed-up 1, 200-token prompts, 256 tokens out, closed loop at concurrency 32;
  a second closed loop measured after ``--slow-settle`` seconds of discarded load (the steady state);
  then an open loop at ``--slow-open-fraction`` (0.8) of Dynamo's closed-loop rate.
- ``clients``: (d) the overhead workload at concurrency 64, closed loop, driven in turn by the
  harness's client and by ``benchmarks/independent_client.py`` on the same stack.
- ``routing``: routing quality (issue 13). Traces replayed open loop at speed-up 1 on 4 workers
  with a small KV cache each (1,024 blocks), so that placement decides the hits: the Mooncake
  production trace of ``../shared/traces`` and the shipped prefix-heavy one. Ours with kv,
  kv with ``--router-adaptive``, round-robin, random and least-loaded routing, Dynamo with kv,
  in the same run; beside them
  the offline affinity bound and pooled cache of the same requests (:mod:`commutator.cli.bound`).
  Cached share, TTFT, inter-token latency, goodput at an SLA, and the hit share over time.

Every measurement reads the CPU of every process of the stack, of the client and of the machine
over its window (``measure``). Figures go to ``compare.json`` and ``compare.md`` under ``--out``,
the headline ratios to the terminal, and the figures region of docs/benchmarks.md
(``compare_page``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commutator.cli import compare_page, report
from commutator.cli import compare_stats as stats
from commutator.cli.bound import affinity_bound
from commutator.cli.independent import measure_independent
from commutator.cli.loadgen import RequestResult
from commutator.cli.measure import Measured, measure
from commutator.cli.stacks import DYNAMO_VERSION, CommutatorStack, DynamoStack, Stack, ensure_dynamo
from commutator.cli.workloads import ChatWorkload, RequestSpec, SyntheticWorkload, TraceWorkload, generate_traces
from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model

__all__ = ["SECTIONS", "add_arguments", "apply_quick", "client_combos", "derive_rates", "run_compare", "saturation"]

SECTIONS = ("overhead", "slow-stream", "clients", "routing")
OVERHEAD_SPEEDUP = 100.0  # Dynamo's --speedup-ratio 0 behaves like 1, so "no delay" is compared at 100
OVERHEAD_CONCURRENCY = (1, 16, 64)
OVERHEAD_ISL, OVERHEAD_OSL = 1000, 64
SLOW_ISL, SLOW_OSL, SLOW_CONCURRENCY = 200, 256, 32
CLIENTS_CONCURRENCY = 64
CHAT_LINE_WORDS = 40  # words per line of the harness's chat prompts (workloads.ChatWorkload)
ROUTING_WORKERS = 4
ROUTING_NUM_BLOCKS = 1024  # a small KV cache per worker, so that where a prefix lands matters
ROUTING_MAX_PROMPT = 3584  # the tiny model's context is 4096: longer prompts are cut here (outputs capped below)
ROUTING_MAX_OUTPUT = 256
ROUTING_WINDOW_S = 5.0  # hit share over time, per window of send time
ROUTING_MODES = ("kv", "kv+decode-weight=0.25", "kv-adaptive", "round-robin", "random", "least-loaded")
"""Commutator's router modes in the routing section (:func:`routing_mode_args`)."""


def routing_mode_args(spec: str) -> tuple[str, tuple[str, ...]]:
    """A routing-section mode of ours as (``--router-mode``, extra frontend flags): a router mode, or
    ``kv-adaptive`` (kv with ``--router-adaptive``), followed by ``+flag=value`` or ``+flag`` parts, so
    that ``kv+decode-weight=0.25`` is kv with ``--decode-weight 0.25``."""
    base, *extra = spec.split("+")
    flags: list[str] = []
    if base == "kv-adaptive":
        base, flags = "kv", ["--router-adaptive"]
    if base not in ("kv", "round-robin", "random", "least-loaded"):
        raise ValueError(f"routing mode {spec!r}: {base!r} is not kv, kv-adaptive, round-robin, random or least-loaded")
    for part in extra:
        name, eq, value = part.partition("=")
        if not name or name.startswith("-") or (eq and not value):
            raise ValueError(f"routing mode {spec!r}: write extra flags as +name=value or +name")
        flags += [f"--{name}", value] if eq else [f"--{name}"]
    return base, tuple(flags)


def _routing_modes(s: str) -> tuple[str, ...]:
    modes = _names(s)
    for m in modes:
        try:
            routing_mode_args(m)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return modes


SHARED_TRACES = Path("../shared/traces")
WARMUP_S = 2.0


@dataclass(frozen=True)
class RoutingTrace:
    """A trace of the routing section and how it is replayed: ``length_scale`` divides its lengths,
    ``speedup`` its clock; ``duration_s`` of (scaled) trace time by default."""

    key: str
    path: Path
    length_scale: float
    speedup: float
    duration_s: float
    about: str


def routing_traces(shared: Path, shipped: Path) -> dict[str, RoutingTrace]:
    return {
        t.key: t
        for t in (
            RoutingTrace(
                "mooncake",
                shared / "mooncake_conversation_trace.jsonl",
                8.0,
                10.0,
                60.0,
                "Mooncake conversation trace (production, kvcache-ai/Mooncake FAST'25): lengths divided by 8 "
                "(64 tokens per hash id, the block size), its clock sped up 10 times",
            ),
            RoutingTrace(
                "prefix-heavy",
                shipped / "prefix_heavy.jsonl",
                4.0,
                1.0,
                20.0,
                "shipped prefix-heavy trace (120 shared prefixes, Zipf popularity): lengths divided by 4, its own pace",
            ),
            RoutingTrace(
                "conversation",
                shipped / "conversation.jsonl",
                4.0,
                1.0,
                60.0,
                "shipped conversation trace (60 sessions of 3-8 turns): lengths divided by 4, its own pace",
            ),
        )
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=int, default=3, help="repetitions of the open loop, closed loop and slow stream")
    p.add_argument("--out", type=Path, default=Path("build/bench-compare"))
    p.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"), help="page whose figures region to fill")
    p.add_argument("--no-docs", action="store_true", help="write build/ only, leave the page alone")
    p.add_argument(
        "--only", action="append", choices=SECTIONS, help="run this section (repeatable); default: all of them"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one repetition, 2-second phases, 1 s warm-up, the page left alone (about 3 minutes)",
    )
    p.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds of discarded load before each measurement")
    g = p.add_argument_group("overhead: open and closed loop (speed-up 100)")
    g.add_argument("--overhead-duration", type=float, default=5.0, help="seconds per closed-loop level")
    g.add_argument("--probe-concurrency", type=int, default=128, help="Dynamo's saturation probe (closed loop)")
    g.add_argument(
        "--open-fractions",
        type=_fractions,
        default=(0.5, 0.9),
        help="open-loop rates as fractions of Dynamo's saturation throughput, comma-separated",
    )
    g.add_argument("--open-duration", type=float, default=8.0, help="seconds of Poisson arrivals per rate")
    g = p.add_argument_group("slow stream (speed-up 1, 256 tokens out, concurrency 32)")
    g.add_argument("--slow-duration", type=float, default=10.0, help="seconds of the closed (and open) loop")
    g.add_argument(
        "--slow-settle",
        type=float,
        default=30.0,
        help="then a second closed loop, measured after this many seconds of discarded load (0: none): the steady"
        " state, once the waves of the users' synchronized start have come apart",
    )
    g.add_argument(
        "--slow-steady-duration", type=float, default=30.0, help="seconds measured of that steady-state closed loop"
    )
    g.add_argument(
        "--slow-open-fraction",
        type=float,
        default=0.8,
        help="then an open loop (Poisson arrivals) at this fraction of Dynamo's closed-loop req/s (0: none);"
        " the closed loop's waves of successors do not arise there",
    )
    g = p.add_argument_group("two clients (concurrency 64, speed-up 100)")
    g.add_argument("--client-reps", type=int, default=2, help="repetitions of the two-client comparison")
    g.add_argument("--clients-duration", type=float, default=6.0, help="seconds per client run")
    g.add_argument(
        "--client-apis",
        type=lambda s: tuple(x for x in s.split(",") if x),
        default=("chat",),
        help="chat (text prompts), completions (token-id prompts), comma-separated",
    )
    g = p.add_argument_group("routing (speed-up 1, 4 workers x 1,024 KV blocks)")
    g.add_argument("--routing-reps", type=int, default=1, help="repetitions of the routing replay")
    g.add_argument(
        "--routing-duration", type=float, default=0.0, help="seconds of (scaled) trace replayed (0: each trace's own)"
    )
    g.add_argument(
        "--routing-traces",
        type=_names,
        default=("mooncake", "prefix-heavy"),
        help="mooncake (../shared/traces), prefix-heavy, conversation (shipped), comma-separated",
    )
    g.add_argument(
        "--routing-modes",
        type=_routing_modes,
        default=ROUTING_MODES,
        help="Commutator's router modes, comma-separated: kv, kv-adaptive (--router-adaptive), round-robin, random, "
        "least-loaded, each optionally followed by router flags as +name=value (kv+decode-weight=0.25)",
    )
    g.add_argument("--routing-dynamo-modes", type=_names, default=("kv",), help="Dynamo's router modes")
    g.add_argument(
        "--shared-traces", type=Path, default=SHARED_TRACES, help="folder of the Mooncake trace (../shared/traces)"
    )
    g.add_argument("--ttft-slo-ms", type=float, default=250.0, help="goodput: TTFT target of the routing replay")
    g.add_argument(
        "--itl-slo-ms", type=float, default=40.0, help="goodput: mean inter-token time target of the routing replay"
    )


def apply_quick(args: argparse.Namespace) -> None:
    """``--quick``: every phase short, one repetition, the page untouched (a smoke run, not figures)."""
    if not args.quick:
        return
    args.reps = args.client_reps = args.routing_reps = 1
    args.warmup = 1.0
    args.overhead_duration = args.open_duration = args.slow_duration = args.clients_duration = 2.0
    args.slow_settle, args.slow_steady_duration = 1.0, 2.0
    args.routing_duration = 6.0
    args.probe_concurrency = min(args.probe_concurrency, 96)
    args.no_docs = True


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _fractions(s: str) -> tuple[float, ...]:
    vals = tuple(float(x) for x in s.split(",") if x.strip())
    if not vals or any(not 0 < v <= 2 for v in vals):
        raise argparse.ArgumentTypeError("fractions in (0, 2], comma-separated")
    return vals


def saturation(closed_loop_rps: Sequence[float]) -> float:
    """A stack's saturation throughput: the best closed-loop rate it reached among the levels tried."""
    vals = [v for v in closed_loop_rps if v == v and v > 0]
    if not vals:
        raise RuntimeError("the saturation probe completed no request")
    return max(vals)


def derive_rates(saturation_rps: float, fractions: Sequence[float]) -> dict[str, float]:
    """Open-loop offered rates, keyed by the fraction as the page shows it ("0.5"), to 0.1 req/s."""
    if saturation_rps <= 0:
        raise ValueError("saturation throughput must be positive")
    return {f"{f:g}": max(0.1, round(f * saturation_rps, 1)) for f in fractions}


# -- running ------------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    dyn_py: Path
    out: dict[str, Any]
    samples: dict[str, list[RequestResult]] = field(default_factory=dict)

    def systems(self, rep: int) -> list[tuple[str, Callable[..., Stack]]]:
        both: list[tuple[str, Callable[..., Stack]]] = [
            ("dynamo", lambda **kw: DynamoStack(self.dyn_py, **kw)),
            ("commutator", lambda **kw: CommutatorStack(**kw)),
        ]
        return both if rep % 2 == 0 else both[::-1]  # Dynamo first in the first repetition: it sets the rates

    def record(self, section: str, key: str, m: Measured | dict[str, Any]) -> dict[str, Any]:
        d = m.as_dict() if isinstance(m, Measured) else m
        self.out[section].setdefault("runs", {}).setdefault(key, []).append(d)
        return d

    def sample(self, key: str, results: list[RequestResult]) -> None:
        self.samples.setdefault(key, []).extend(results)

    async def measure(self, stack: Stack, workload: Iterator[RequestSpec] | TraceWorkload, **kw: Any) -> Measured:
        kw.setdefault("warmup_s", self.args.warmup)
        return await measure(stack.base_url, MODEL_NAME, workload, roles=stack.roles(), **kw)


async def _with_stack(stack: Stack, fn: Callable[[Stack], Any]) -> Any:
    try:  # a stack that fails to start is stopped too: none of its processes may outlive the run
        await stack.launch()
        return await fn(stack)
    finally:
        await stack.stop()


def _chat(rep: int) -> Iterator[RequestSpec]:
    return ChatWorkload(isl=OVERHEAD_ISL, osl=OVERHEAD_OSL, prefix_groups=32, prefix_ratio=0.75, seed=rep)


def _print(section: str, rep: int, name: str, what: str, d: dict[str, Any]) -> None:
    print(f"  {section:<7} rep {rep + 1} {name:<10} {what:<20} {compare_page.one_line(d)}", flush=True)


async def _set_open_rates(run: Run, stack: Stack, rep: int, closed_rps: list[float]) -> None:
    """Dynamo's saturation (its best closed-loop rate, with a probe above the closed levels), and from it
    the open-loop rates both stacks get."""
    args, ol = run.args, run.out["open_loop"]
    ol["concurrency"] = list(OVERHEAD_CONCURRENCY)
    if args.probe_concurrency > OVERHEAD_CONCURRENCY[-1]:
        m = await run.measure(
            stack, _chat(rep), concurrency=args.probe_concurrency, duration_s=args.overhead_duration, warmup_s=0
        )
        closed_rps.append(m.summary.requests_per_s)
        ol["probe"] = {"concurrency": args.probe_concurrency, **m.as_dict()}
        _print("probe", rep, "dynamo", f"c={args.probe_concurrency}", ol["probe"])
    ol["saturation_rps"] = saturation(closed_rps)
    ol["closed_levels_rps"] = closed_rps
    ol["rates"] = derive_rates(ol["saturation_rps"], args.open_fractions)
    print(
        f"  Dynamo's saturation: {ol['saturation_rps']:.1f} req/s; open-loop rates "
        + ", ".join(f"{float(k):.0%} -> {v:g} req/s" for k, v in ol["rates"].items()),
        flush=True,
    )


async def _overhead(run: Run) -> None:
    """(b) closed loop at each level, then (a) open loop at the rates Dynamo's first repetition set."""
    args = run.args
    run.out["overhead"]["concurrency"] = list(OVERHEAD_CONCURRENCY)
    for rep in range(args.reps):
        for name, make in run.systems(rep):

            async def levels(stack: Stack, name: str = name, rep: int = rep) -> None:
                closed_rps = []
                for conc in OVERHEAD_CONCURRENCY:
                    m = await run.measure(stack, _chat(rep), concurrency=conc, duration_s=args.overhead_duration)
                    closed_rps.append(m.summary.requests_per_s)
                    if conc == 16:
                        run.sample(f"closed {name}", m.results)
                    _print("closed", rep, name, f"c={conc}", run.record("overhead", f"{name}/c{conc}", m))
                ol = run.out["open_loop"]
                if "rates" not in ol:
                    if name != "dynamo":
                        raise RuntimeError("the open-loop rates come from Dynamo's first repetition")
                    await _set_open_rates(run, stack, rep, closed_rps)
                top = max(ol["rates"], key=float)
                for frac, rate in ol["rates"].items():
                    m = await run.measure(stack, _chat(rep), rate=rate, duration_s=args.open_duration, seed=rep)
                    m.extra["offered_rps"] = rate
                    if frac == top:
                        run.sample(f"open {name}", m.results)
                    _print(
                        "open",
                        rep,
                        name,
                        f"{rate:g}/s ({float(frac):.0%})",
                        run.record("open_loop", f"{name}/{frac}", m),
                    )

            await _with_stack(make(speedup=OVERHEAD_SPEEDUP, router_mode="kv"), levels)


async def _slow_stream(run: Run) -> None:
    """(c) closed loop at concurrency 32; unless ``--slow-settle`` is 0, the same closed loop measured in its
    steady state; then, unless ``--slow-open-fraction`` is 0, an open loop."""
    args, ss = run.args, run.out["slow_stream"]
    ss.update(isl=SLOW_ISL, osl=SLOW_OSL, concurrency=SLOW_CONCURRENCY)
    for rep in range(args.reps):
        for name, make in run.systems(rep):

            async def both(stack: Stack, name: str = name, rep: int = rep) -> None:
                wl = SyntheticWorkload(isl_mean=SLOW_ISL, osl_mean=SLOW_OSL, seed=rep)
                m = await run.measure(stack, wl, concurrency=SLOW_CONCURRENCY, duration_s=args.slow_duration)
                run.sample(f"slow {name}", m.results)
                _print("slow", rep, name, f"c={SLOW_CONCURRENCY}", run.record("slow_stream", f"{name}/closed", m))
                if args.slow_settle > 0:
                    # All users start at once, so the first waves of successors are whole; they come apart
                    # over tens of seconds (sooner or later on either stack), and the short loop above
                    # measures that transient. This one is measured after it.
                    m = await run.measure(
                        stack,
                        wl,
                        concurrency=SLOW_CONCURRENCY,
                        duration_s=args.slow_steady_duration,
                        warmup_s=0,
                        settle_s=args.slow_settle,
                    )
                    _print(
                        "slow",
                        rep,
                        name,
                        f"c={SLOW_CONCURRENCY} steady",
                        run.record("slow_stream", f"{name}/steady", m),
                    )
                if args.slow_open_fraction <= 0:
                    return
                if "rate" not in ss:
                    if name != "dynamo":
                        raise RuntimeError("the slow-stream rate comes from Dynamo's first repetition")
                    ss["rate"] = derive_rates(m.summary.requests_per_s, [args.slow_open_fraction])[
                        f"{args.slow_open_fraction:g}"
                    ]
                m = await run.measure(stack, wl, rate=ss["rate"], duration_s=args.slow_duration, warmup_s=0, seed=rep)
                m.extra["offered_rps"] = ss["rate"]
                _print("slow", rep, name, f"{ss['rate']:g}/s", run.record("slow_stream", f"{name}/open", m))

            await _with_stack(make(speedup=1.0, router_mode="kv"), both)


def _prompts(api: str, rep: int) -> Iterator[RequestSpec]:
    if api == "chat":
        return _chat(rep)
    return SyntheticWorkload(
        isl_mean=OVERHEAD_ISL, osl_mean=OVERHEAD_OSL, prefix_groups=32, prefix_ratio=0.75, seed=rep
    )


def client_combos(apis: Sequence[str]) -> list[tuple[str, str]]:
    """(client, API) pairs of the two-client section: the harness's client, the independent one with
    one-line prompts, and for chat the independent one with prompts in lines like the harness's."""
    combos = []
    for api in apis:
        combos += [("loadgen", api), ("independent", api)]
        if api == "chat":
            combos.append(("independent-lines", api))
    return combos


async def _clients(run: Run) -> None:
    """(d) each client in turn on the same stack, the order of the clients alternating too."""
    args = run.args
    tokenizer = ensure_tiny_model() / "tokenizer.json"
    combos = client_combos(args.client_apis)
    run.out["clients"].update(concurrency=CLIENTS_CONCURRENCY, combos=combos, line_words=CHAT_LINE_WORDS)
    for rep in range(args.client_reps):
        for name, make in run.systems(rep):

            async def each(stack: Stack, name: str = name, rep: int = rep) -> None:
                for client, api in combos if rep % 2 == 0 else combos[::-1]:
                    if client == "loadgen":
                        m = await run.measure(
                            stack, _prompts(api, rep), concurrency=CLIENTS_CONCURRENCY, duration_s=args.clients_duration
                        )
                        d = m.as_dict()
                    else:
                        d = await measure_independent(
                            stack.base_url,
                            MODEL_NAME,
                            roles=stack.roles(),
                            api=api,
                            concurrency=CLIENTS_CONCURRENCY,
                            duration_s=args.clients_duration,
                            warmup_s=args.warmup,
                            tokenizer=tokenizer,
                            seed=rep,
                            lines=CHAT_LINE_WORDS if client == "independent-lines" else 0,
                        )
                    _print("clients", rep, name, f"{client} {api}", run.record("clients", f"{name}/{client}/{api}", d))

            await _with_stack(make(speedup=OVERHEAD_SPEEDUP, router_mode="kv"), each)


async def _routing(run: Run, shipped: Path) -> None:
    args, ro = run.args, run.out["routing"]
    specs = routing_traces(args.shared_traces, shipped)
    unknown = [k for k in args.routing_traces if k not in specs]
    if unknown:
        raise SystemExit(f"unknown routing trace(s) {unknown}; choose from {sorted(specs)}")
    ro.update(
        workers=ROUTING_WORKERS,
        num_blocks=ROUTING_NUM_BLOCKS,
        max_prompt_tokens=ROUTING_MAX_PROMPT,
        max_output=ROUTING_MAX_OUTPUT,
        ttft_slo_ms=args.ttft_slo_ms,
        itl_slo_ms=args.itl_slo_ms,
        window_s=ROUTING_WINDOW_S,
        traces={},
    )
    for key in args.routing_traces:
        spec = specs[key]
        if not spec.path.is_file():
            print(f"routing: {spec.path} is missing; trace {key} skipped", flush=True)
            continue
        duration = args.routing_duration or spec.duration_s

        def workload(spec: RoutingTrace = spec, duration: float = duration) -> TraceWorkload:
            return TraceWorkload(
                spec.path,
                speedup=spec.speedup,
                length_scale=spec.length_scale,
                max_duration_s=duration,
                max_output=ROUTING_MAX_OUTPUT,
                max_prompt_tokens=ROUTING_MAX_PROMPT,
            )

        wl = workload()
        bound = affinity_bound(wl, workers=ROUTING_WORKERS, num_blocks=ROUTING_NUM_BLOCKS, window_s=ROUTING_WINDOW_S)
        tr = ro["traces"][key] = {
            "path": str(spec.path),
            "about": spec.about,
            "duration_s": duration,
            "requests": bound.bound.requests + bound.refused,
            "cut_prompts": wl.cut_prompts,
            "bound": bound.as_dict(),
        }
        print(
            f"routing {key}: {tr['requests']} requests ({wl.cut_prompts} prompts cut to {ROUTING_MAX_PROMPT} tokens); "
            f"offline: affinity bound {bound.bound.hit_share:.1%}, pooled cache {bound.pooled.hit_share:.1%}, "
            f"round-robin {bound.round_robin.hit_share:.1%}",
            flush=True,
        )
        for rep in range(args.routing_reps):
            for name, make in run.systems(rep):
                for mode in args.routing_modes if name == "commutator" else args.routing_dynamo_modes:

                    async def replay(
                        stack: Stack, name: str = name, mode: str = mode, rep: int = rep, key: str = key
                    ) -> None:
                        m = await run.measure(
                            stack, workload(), warmup_s=0, ttft_slo_ms=args.ttft_slo_ms, itl_slo_ms=args.itl_slo_ms
                        )
                        if rep == 0:
                            run.sample(f"routing {key} {name} {mode}", m.results)
                        d = run.record("routing", f"{key}/{name}/{mode}", m)
                        d["hit_share_windows"] = report.hit_share_windows(m.results, ROUTING_WINDOW_S)
                        if name == "commutator":
                            d["router"] = await _router_figures(stack)
                            print(f"    router: {d['router']}", flush=True)
                        _print("routing", rep, name, f"{key} {mode} cached {m.summary.cached_share:.1%}", d)

                    router_mode, frontend_args = routing_mode_args(mode) if name == "commutator" else (mode, ())
                    stack = make(
                        speedup=1.0,
                        router_mode=router_mode,
                        workers=ROUTING_WORKERS,
                        num_blocks=ROUTING_NUM_BLOCKS,
                        frontend_args=frontend_args,
                    )
                    await _with_stack(stack, replay)


async def _router_figures(stack: Stack) -> dict[str, float | None]:
    """From the stack's metrics: the share of prompt blocks the embedded router predicted cached on the
    chosen worker, how late KV events reached its index (mean, and the share applied within 10 ms),
    and the mean TTFT as the frontend and the workers measured it (the client's minus these is
    the stack's own part)."""
    import aiohttp

    root = stack.base_url.rsplit("/v1", 1)[0]
    values: dict[str, float] = {}
    async with aiohttp.ClientSession() as s:
        for url in [root + "/metrics", *(f"http://127.0.0.1:{p}/metrics" for p in stack.metrics_ports["decode"])]:
            async with s.get(url) as r:
                text = await r.text()
            for line in text.splitlines():
                if line.startswith(("commutator_router_", "commutator_frontend_ttft", "commutator_worker_ttft")):
                    series, _, v = line.rpartition(" ")
                    series = series.split("{")[0] if "_ttft_seconds_" in series else series
                    values[series] = values.get(series, 0.0) + float(v)
    prompt = values.get('commutator_router_prompt_blocks_total{kind="prompt"}', 0.0)
    overlap = values.get('commutator_router_prompt_blocks_total{kind="overlap"}', 0.0)
    n = values.get("commutator_router_kv_event_lag_seconds_count", 0.0)
    lag_sum = values.get("commutator_router_kv_event_lag_seconds_sum", 0.0)
    within = values.get('commutator_router_kv_event_lag_seconds_bucket{le="0.01"}', 0.0)

    def mean_ms(hist: str) -> float | None:
        n = values.get(hist + "_count", 0.0)
        return 1000 * values.get(hist + "_sum", 0.0) / n if n else None

    return {
        "frontend_ttft_mean_ms": mean_ms("commutator_frontend_ttft_seconds"),
        "worker_ttft_mean_ms": mean_ms("commutator_worker_ttft_seconds"),
        "predicted_share": overlap / prompt if prompt else None,
        "event_lag_mean_ms": 1000 * lag_sum / n if n else None,
        "event_lag_within_10ms": within / n if n else None,
        "event_batches": n,
        "adaptive_weight": values.get('commutator_router_adaptive{kind="overlap_weight"}'),
        "adaptive_decode_weight": values.get('commutator_router_adaptive{kind="decode_weight"}'),
        "adaptive_accuracy": values.get('commutator_router_adaptive{kind="index_accuracy"}'),
    }


HEADLINE: list[tuple[str, stats.Getter]] = [
    ("req/s", stats.rps),
    ("TTFT p99", stats.latency("ttft_ms", "p99")),
    ("ITL p99", stats.latency("itl_ms", "p99")),
    ("frontend CPU/req", compare_page.FE_MS),
    ("stack CPU/req", compare_page.STACK_MS),
    ("client CPU/req", compare_page.CLIENT_MS),
]


def summary_table(out: dict[str, Any]) -> str:
    """The headline ratios for the terminal, Commutator / Dynamo: one row per scenario and load."""
    keys: list[tuple[str, str, str]] = [
        *((f"(a) open {float(f):.0%}", "open_loop", f) for f in out["open_loop"].get("rates", {})),
        *((f"(b) closed c={c}", "overhead", f"c{c}") for c in out["overhead"].get("concurrency", [])),
        ("(c) slow stream c=32", "slow_stream", "closed"),
        ("(c) slow stream c=32 steady", "slow_stream", "steady"),
        *((f"(d) c=64 {c} {a}", "clients", f"{c}/{a}") for c, a in out["clients"].get("combos", [])),
    ]
    rows = []
    for label, section, key in keys:
        runs = out[section].get("runs", {})
        a, b = runs.get(f"commutator/{key}", []), runs.get(f"dynamo/{key}", [])
        if a and b:
            rows.append(f"| {label} | " + " | ".join(stats.ratio_cell(a, b, g) for _, g in HEADLINE) + " |")
    if not rows:
        return ""
    head = "| Commutator / Dynamo | " + " | ".join(h for h, _ in HEADLINE) + " |"
    return "\n".join([head, "|" + "---|" * (len(HEADLINE) + 1), *rows])


async def run_compare(args: argparse.Namespace) -> int:
    apply_quick(args)
    t_start = time.monotonic()
    sections = args.only or list(SECTIONS)
    dyn_py = ensure_dynamo()
    traces = Path.cwd() / "benchmarks" / "traces"
    if "routing" in sections and not (traces / "prefix_heavy.jsonl").is_file():
        generate_traces(traces)
    machine = report.machine_info()
    out: dict[str, Any] = {
        "machine": machine,
        "dynamo_version": DYNAMO_VERSION,
        "started": dt.datetime.now().isoformat(),
        "sections": sections,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "overhead": {},
        "open_loop": {},
        "slow_stream": {},
        "clients": {},
        "routing": {},
    }
    run = Run(args, dyn_py, out)
    steps: dict[str, Callable[[], Awaitable[None]]] = {
        "overhead": lambda: _overhead(run),
        "slow-stream": lambda: _slow_stream(run),
        "clients": lambda: _clients(run),
        "routing": lambda: _routing(run, traces),
    }
    out["section_wall_s"] = {}
    for name in SECTIONS:
        if name in sections:
            t0 = time.monotonic()
            print(f"{name}:", flush=True)
            await steps[name]()
            out["section_wall_s"][name] = time.monotonic() - t0
            print(f"{name}: {out['section_wall_s'][name]:.0f} s", flush=True)
    out["finished"] = dt.datetime.now().isoformat()
    out["wall_s"] = time.monotonic() - t_start
    machine["loadavg_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "compare.json", out)
    plot_paths = compare_page.plots(args.out, run.samples, out)
    figures = compare_page.page(out, plot_paths)
    (args.out / "compare.md").write_text(figures + "\n")
    print()
    print(summary_table(out))
    print()
    written = [f"{args.out}/compare.json", f"{args.out}/compare.md", *(str(p) for p in plot_paths)]
    if not args.no_docs:
        args.docs.write_text(compare_page.splice(args.docs.read_text(), figures))
        docs_plots = args.docs.parent / "benchmarks"
        docs_plots.mkdir(parents=True, exist_ok=True)
        for p in plot_paths:
            (docs_plots / p.name).write_bytes(p.read_bytes())
        written.append(f"{args.docs} (figures region) and {docs_plots}/")
    print(f"wrote {', '.join(written)} ({out['wall_s'] / 60:.1f} min)")
    return 0
