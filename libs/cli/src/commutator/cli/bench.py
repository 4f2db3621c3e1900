"""``commutator bench``: load generation, trace replay, and a side-by-side with NVIDIA Dynamo.

commutator bench run --url http://host:8000/v1 --model M [workload] [--concurrency N | --rate R]
commutator bench run --launch commutator --speedup-ratio 100 ...      # starts a stack first
commutator bench compare                                              # Commutator vs Dynamo 1.6.1
commutator bench gen-traces [DIR]                                     # the shipped workload set
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from commutator.cli import report
from commutator.cli.loadgen import RequestResult
from commutator.cli.measure import Measured, measure
from commutator.cli.stacks import DYNAMO_VERSION, CommutatorStack, DynamoStack, Stack, ensure_dynamo
from commutator.cli.workloads import (
    ChatWorkload,
    ConversationWorkload,
    RequestSpec,
    SyntheticWorkload,
    TraceWorkload,
    generate_traces,
)
from commutator.engines.tiny_model import MODEL_NAME

__all__ = ["Measured", "add_parser", "main", "measure"]


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server, or Commutator against Dynamo")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    run = bsub.add_parser("run", help="send a workload and report latency and throughput")
    target = run.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (with /v1)")
    target.add_argument("--model", default=MODEL_NAME, help="model name in requests")
    target.add_argument("--launch", choices=("commutator", "dynamo"), help="start this stack first (mocker workers)")
    target.add_argument("--speedup-ratio", type=float, default=100.0, help="mocker speed of a launched stack")
    target.add_argument("--router-mode", default="kv", help="router mode of a launched stack")
    target.add_argument("--workers", type=int, default=2, help="decode workers of a launched stack")
    target.add_argument(
        "--prefill-workers", type=int, default=0, help="prefill workers of a launched Commutator stack (disaggregated)"
    )
    target.add_argument("--worker-args", default="", help="more flags for each decode worker of a launched stack")
    target.add_argument("--prefill-args", default="", help="more flags for each prefill worker of a launched stack")
    target.add_argument("--frontend-pid", type=int, help="a process to report CPU per request for")
    wl = run.add_argument_group("workload")
    wl.add_argument("--workload", choices=("chat", "synthetic", "conversation", "trace"), default="chat")
    wl.add_argument("--isl", type=int, default=1000, help="prompt tokens (mean)")
    wl.add_argument("--isl-std", type=int, default=0)
    wl.add_argument("--osl", type=int, default=64, help="output tokens (mean)")
    wl.add_argument("--osl-std", type=int, default=0)
    wl.add_argument("--prefix-groups", type=int, default=32, help="groups sharing a prompt prefix")
    wl.add_argument("--prefix-ratio", type=float, default=0.75, help="share of the prompt that is the group prefix")
    wl.add_argument("--users", type=int, default=16, help="conversation: parallel users")
    wl.add_argument("--turns", type=int, default=6, help="conversation: turns per user")
    wl.add_argument("--trace", type=Path, help="trace: Mooncake-format JSONL")
    wl.add_argument("--trace-speedup", type=float, default=1.0, help="trace: divide its clock by this")
    wl.add_argument("--length-scale", type=float, default=1.0, help="trace: divide its lengths by this")
    wl.add_argument("--block-tokens", type=int, default=512, help="trace: prompt tokens per hash id")
    load = run.add_argument_group("load")
    load.add_argument("--concurrency", type=int, help="closed loop: clients in parallel")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    load.add_argument("--requests", type=int, help="stop after this many requests")
    load.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (discarded)")
    load.add_argument("--ttft-slo-ms", type=float, help="goodput: TTFT target")
    load.add_argument("--itl-slo-ms", type=float, help="goodput: inter-token latency target")
    out = run.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("build/bench"), help="folder for results.json and plots")
    out.add_argument("--label", default="", help="name of this run in tables")

    cmp_ = bsub.add_parser("compare", help="Commutator vs NVIDIA Dynamo 1.6.1, same machine, same workloads")
    cmp_.add_argument("--reps", type=int, default=3, help="repetitions, each on freshly started stacks")
    cmp_.add_argument("--out", type=Path, default=Path("build/bench-compare"))
    cmp_.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"), help="results page to rewrite")
    cmp_.add_argument("--overhead-duration", type=float, default=6.0, help="seconds per concurrency level")
    cmp_.add_argument("--routing-duration", type=float, default=25.0, help="seconds of trace replayed")
    cmp_.add_argument("--only", choices=("overhead", "routing"), help="run one of the two comparisons")

    gen = bsub.add_parser("gen-traces", help="write the shipped workload set (Mooncake format)")
    gen.add_argument("out", nargs="?", type=Path, default=Path("benchmarks/traces"))


def main(args: argparse.Namespace) -> int:
    if args.bench_command == "gen-traces":
        for p in generate_traces(args.out):
            print(p)
        return 0
    import uvloop

    if args.bench_command == "run":
        return uvloop.run(_run(args))
    return uvloop.run(_compare(args))


# -- one run --------------------------------------------------------------------------------------
def _workload(args: argparse.Namespace) -> Iterator[RequestSpec] | ConversationWorkload | TraceWorkload:
    if args.workload == "chat":
        return ChatWorkload(
            isl=args.isl, osl=args.osl, prefix_groups=args.prefix_groups, prefix_ratio=args.prefix_ratio
        )
    if args.workload == "synthetic":
        return SyntheticWorkload(
            isl_mean=args.isl,
            isl_std=args.isl_std,
            osl_mean=args.osl,
            osl_std=args.osl_std,
            prefix_groups=args.prefix_groups,
            prefix_ratio=args.prefix_ratio,
        )
    if args.workload == "conversation":
        return ConversationWorkload(users=args.users, turns=args.turns)
    if args.trace is None:
        raise SystemExit("--workload trace needs --trace FILE")
    return TraceWorkload(
        args.trace,
        speedup=args.trace_speedup,
        block_tokens=args.block_tokens,
        length_scale=args.length_scale,
        max_duration_s=args.duration,
    )


async def _run(args: argparse.Namespace) -> int:
    stack: Stack | None = None
    url, frontend_pid, worker_pids = args.url, args.frontend_pid, None
    try:
        if args.launch:
            if args.launch == "dynamo":
                if args.prefill_workers:
                    raise SystemExit("--prefill-workers: only for --launch commutator")
                stack = DynamoStack(
                    ensure_dynamo(), speedup=args.speedup_ratio, router_mode=args.router_mode, workers=args.workers
                )
            else:
                stack = CommutatorStack(
                    speedup=args.speedup_ratio,
                    router_mode=args.router_mode,
                    workers=args.workers,
                    prefill_workers=args.prefill_workers,
                    worker_args=tuple(shlex.split(args.worker_args)),
                    prefill_args=tuple(shlex.split(args.prefill_args)),
                )
            await stack.start()
            url = stack.base_url
            frontend_pid = stack.frontend.pid if stack.frontend else None
            worker_pids = stack.worker_pids()
        m = await measure(
            url,
            args.model,
            _workload(args),
            concurrency=args.concurrency,
            rate=args.rate,
            duration_s=args.duration,
            max_requests=args.requests,
            warmup_s=args.warmup,
            frontend_pid=frontend_pid,
            worker_pids=worker_pids,
            ttft_slo_ms=args.ttft_slo_ms,
            itl_slo_ms=args.itl_slo_ms,
            desc=args.workload,
        )
    finally:
        if stack is not None:
            await stack.stop()
    label = args.label or f"{args.launch or url} {args.workload}"
    table = report.markdown_summary([(label, m.summary, {"frontend_cpu_ms_per_req": m.frontend_cpu_ms_per_req})])
    print(table)
    print(
        f"load generator CPU {m.loadgen_cpu_pct:.0f}%, other CPU on the machine {m.other_cpu_pct:.0f}%"
        + (f", workers {m.workers_cpu_pct:.0f}%" if m.workers_cpu_pct is not None else "")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(
        args.out / "results.json",
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": report.machine_info(), **m.as_dict()},
    )
    (args.out / "results.md").write_text(table)
    report.plot_latency_cdf(
        args.out / "ttft.png",
        {label: [r.ttft_s * 1000 for r in m.results if r.ok and r.ttft_s is not None]},
        "Time to first token",
        "ms",
    )
    report.plot_over_time(args.out / "throughput.png", {label: m.results}, "Throughput over time")
    print(f"results in {args.out}/ (results.json, results.md, ttft.png, throughput.png)")
    return 0 if m.summary.requests else 1


# -- the comparison ------------------------------------------------------------------------------
OVERHEAD_SPEEDUP = 100.0  # Dynamo's --speedup-ratio 0 behaves like 1, so "no delay" is compared at 100
OVERHEAD_CONCURRENCY = (1, 16, 64)
ROUTING_TRACE = "prefix_heavy.jsonl"
ROUTING_LENGTH_SCALE = 4.0  # 512-token blocks become 128 tokens: about 750-token prompts
ROUTING_NUM_BLOCKS = 1024  # a small KV cache per worker, so that where a prefix lands matters


async def _with_stack(stack: Stack, fn: Callable[[Stack], Any]) -> Any:
    await stack.start()
    try:
        return await fn(stack)
    finally:
        await stack.stop()


async def _compare(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    dyn_py = ensure_dynamo()
    root = Path.cwd()
    traces = root / "benchmarks" / "traces"
    if not (traces / ROUTING_TRACE).is_file():
        generate_traces(traces)
    machine = report.machine_info()
    out: dict[str, Any] = {
        "machine": machine,
        "dynamo_version": DYNAMO_VERSION,
        "started": dt.datetime.now().isoformat(),
        "overhead": {},
        "routing": {},
    }
    systems: list[tuple[str, Callable[..., Stack]]] = [
        ("commutator", lambda **kw: CommutatorStack(**kw)),
        ("dynamo", lambda **kw: DynamoStack(dyn_py, **kw)),
    ]
    samples: dict[str, list[RequestResult]] = {}

    if args.only in (None, "overhead"):
        for rep in range(args.reps):
            order = systems if rep % 2 == 0 else systems[::-1]  # alternate who goes first
            for name, make in order:

                async def overhead(stack: Stack, name: str = name, rep: int = rep) -> None:
                    for conc in OVERHEAD_CONCURRENCY:
                        wl = ChatWorkload(isl=1000, osl=64, prefix_groups=32, prefix_ratio=0.75, seed=rep)
                        m = await measure(
                            stack.base_url,
                            MODEL_NAME,
                            wl,
                            concurrency=conc,
                            duration_s=args.overhead_duration,
                            warmup_s=2.0,
                            frontend_pid=stack.frontend.pid if stack.frontend else None,
                            worker_pids=stack.worker_pids(),
                            desc=f"{name} c={conc}",
                        )
                        out["overhead"].setdefault(f"{name}/c{conc}", []).append(m.as_dict())
                        if conc == 16:
                            samples.setdefault(f"overhead {name} c=16", []).extend(m.results)
                        print(
                            f"  overhead rep {rep + 1} {name:<10} c={conc:<3} {m.summary.requests_per_s:7.1f} req/s "
                            f"TTFT p50 {m.summary.ttft_ms['p50']:6.1f} ms  FE CPU/req "
                            f"{m.frontend_cpu_ms_per_req or 0:5.2f} ms",
                            flush=True,
                        )

                await _with_stack(make(speedup=OVERHEAD_SPEEDUP, router_mode="kv"), overhead)

    if args.only in (None, "routing"):
        for rep in range(args.reps):
            for mode in ("kv", "round-robin"):
                order = systems if rep % 2 == 0 else systems[::-1]
                for name, make in order:

                    async def routing(stack: Stack, name: str = name, mode: str = mode, rep: int = rep) -> None:
                        wl = TraceWorkload(
                            traces / ROUTING_TRACE,
                            length_scale=ROUTING_LENGTH_SCALE,
                            max_duration_s=args.routing_duration,
                        )
                        m = await measure(
                            stack.base_url,
                            MODEL_NAME,
                            wl,
                            warmup_s=0,
                            frontend_pid=stack.frontend.pid if stack.frontend else None,
                            worker_pids=stack.worker_pids(),
                            desc=f"{name} {mode}",
                        )
                        out["routing"].setdefault(f"{name}/{mode}", []).append(m.as_dict())
                        if rep == 0:
                            samples.setdefault(f"routing {name} {mode}", []).extend(m.results)
                        print(
                            f"  routing  rep {rep + 1} {name:<10} {mode:<11} TTFT p50 "
                            f"{m.summary.ttft_ms['p50']:7.1f} ms p99 {m.summary.ttft_ms['p99']:7.1f} ms "
                            f"cached {m.summary.cached_share:5.1%}",
                            flush=True,
                        )

                    stack = make(speedup=1.0, router_mode=mode, num_blocks=ROUTING_NUM_BLOCKS)
                    await _with_stack(stack, routing)

    out["finished"] = dt.datetime.now().isoformat()
    out["wall_s"] = time.monotonic() - t_start
    machine["loadavg_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "compare.json", out)
    plots = _plots(args.out, samples)
    page = _page(out, plots, args)
    (args.out / "compare.md").write_text(page)
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(page)
    docs_plots = args.docs.parent / "benchmarks"
    docs_plots.mkdir(parents=True, exist_ok=True)
    for p in plots:
        (docs_plots / p.name).write_bytes(p.read_bytes())
    print(page)
    print(f"wrote {args.out}/compare.json, {args.out}/compare.md, {args.docs} ({out['wall_s'] / 60:.1f} min)")
    return 0


def _med(runs: list[dict[str, Any]], getter: Callable[[dict[str, Any]], float | None]) -> tuple[float, float, float]:
    return report.median_spread([getter(r) for r in runs])  # type: ignore[misc]


def _cell(m: tuple[float, float, float], digits: int = 1, unit: str = "") -> str:
    med, lo, hi = m
    if med != med:  # nan
        return "-"
    return f"{med:,.{digits}f}{unit} [{lo:,.{digits}f}-{hi:,.{digits}f}]"


def _ratio(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    if a[0] != a[0] or b[0] != b[0] or not b[0]:
        return "-"
    return f"{a[0] / b[0]:.2f}"


Getter = Callable[[dict[str, Any]], "float | None"]
_RPS: Getter = lambda r: r["summary"]["requests_per_s"]  # noqa: E731
_TTFT50: Getter = lambda r: r["summary"]["ttft_ms"]["p50"]  # noqa: E731
_TTFT99: Getter = lambda r: r["summary"]["ttft_ms"]["p99"]  # noqa: E731
_ITL50: Getter = lambda r: r["summary"]["itl_ms"]["p50"]  # noqa: E731
_FE_CPU: Getter = lambda r: r["frontend_cpu_ms_per_req"]  # noqa: E731
_CACHED: Getter = lambda r: r["summary"]["cached_share"]  # noqa: E731


def _ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], getter: Getter) -> str:
    """Median of ours over median of theirs."""
    return _ratio(_med(a, getter), _med(b, getter))


def _plots(out_dir: Path, samples: dict[str, list[RequestResult]]) -> list[Path]:
    paths = []
    over = {
        k.replace("overhead ", ""): [r.ttft_s * 1000 for r in v if r.ok and r.ttft_s is not None]
        for k, v in samples.items()
        if k.startswith("overhead")
    }
    if over:
        p = out_dir / "overhead_ttft_c16.png"
        report.plot_latency_cdf(p, over, "TTFT, overhead workload, concurrency 16 (all repetitions)", "ms")
        paths.append(p)
    rout = {
        k.replace("routing ", ""): [r.ttft_s * 1000 for r in v if r.ok and r.ttft_s is not None]
        for k, v in samples.items()
        if k.startswith("routing")
    }
    if rout:
        p = out_dir / "routing_ttft.png"
        report.plot_latency_cdf(p, rout, "TTFT, prefix-heavy trace at speed-up 1 (first repetition)", "ms")
        paths.append(p)
        p = out_dir / "routing_throughput.png"
        report.plot_over_time(
            p,
            {k.replace("routing ", ""): v for k, v in samples.items() if k.startswith("routing")},
            "Output tokens per second, prefix-heavy trace (first repetition)",
        )
        paths.append(p)
    return paths


def _page(out: dict[str, Any], plots: list[Path], args: argparse.Namespace) -> str:
    m = out["machine"]
    lines = [
        "# Benchmarks: Commutator vs NVIDIA Dynamo",
        "",
        f"Regenerated by `make bench-compare` (`commutator bench compare`) on {out['started'][:16].replace('T', ' ')}; "
        f"took {out['wall_s'] / 60:.1f} min. Medians of {args.reps} repetitions, each on freshly started stacks, "
        "with [min-max] across repetitions; ratios are ours / theirs from this same run.",
        "",
        "## Machine and versions",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}",
        f"- Commutator (this repository), NVIDIA Dynamo {out['dynamo_version']} (`ai-dynamo`, `ai-dynamo-runtime` "
        "from PyPI, in `build/dynamo-venv`)",
        f"- {m['nats_server']}; {m['etcd']}",
        f"- load average before {tuple(round(x, 2) for x in m['loadavg_before'])}, after "
        f"{tuple(round(x, 2) for x in m.get('loadavg_after', ()))}",
        "",
        "Both stacks: one frontend process and two mocker worker processes on this machine, the tiny model, "
        "block size 64, 256 sequences and 8192 batched tokens per pass, the same timing model. Commutator: "
        "etcd + nats-server, KV router embedded in the frontend. Dynamo: file discovery, its Rust frontend and "
        "mocker. The load generator runs on the same 2 cores; its CPU is reported.",
        "",
    ]
    if out["overhead"]:
        lines += [
            "## Overhead",
            "",
            f"Mocker speed-up {OVERHEAD_SPEEDUP:g} (Dynamo's speed-up 0 behaves like 1), streaming chat requests of "
            "about 1,000 prompt tokens (75% a prefix shared within 32 groups), 64 output tokens, closed loop, "
            f"keep-alive connections, {args.overhead_duration:g} s per level after a 2 s warm-up. Closed loop: the "
            "faster stack also loads its workers more, so TTFT at concurrency 16 and 64 is compared at different "
            "throughputs. Commutator's workers coalesce tokens made less than 2 ms apart into one message "
            '(`--stream-interval-ms`, its default); Dynamo sends a message per token. "Other CPU" is everything '
            "else on the machine (for Commutator: etcd and nats-server).",
            "",
            "| system | conc | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | frontend CPU ms/req "
            "| load-gen CPU % | other CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for conc in OVERHEAD_CONCURRENCY:
            for name in ("commutator", "dynamo"):
                runs = out["overhead"].get(f"{name}/c{conc}", [])
                if not runs:
                    continue
                lines.append(
                    f"| {name} | {conc} | {_cell(_med(runs, lambda r: r['summary']['requests_per_s']))} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['output_tokens_per_s']), 0)} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['ttft_ms']['p50']))} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['ttft_ms']['p99']))} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['itl_ms']['p50']), 2)} "
                    f"| {_cell(_med(runs, lambda r: r['frontend_cpu_ms_per_req']), 2)} "
                    f"| {_cell(_med(runs, lambda r: r['loadgen_cpu_pct']), 0)} "
                    f"| {_cell(_med(runs, lambda r: r['other_cpu_pct']), 0)} |"
                )
        lines += [
            "",
            "Ratios, Commutator / Dynamo (medians):",
            "",
            "| conc | req/s | TTFT p50 | TTFT p99 | ITL p50 | frontend CPU/req | cached share |",
            "|---|---|---|---|---|---|---|",
        ]
        for conc in OVERHEAD_CONCURRENCY:
            a, b = out["overhead"].get(f"commutator/c{conc}", []), out["overhead"].get(f"dynamo/c{conc}", [])
            if not a or not b:
                continue
            cells = [_ratios(a, b, g) for g in (_RPS, _TTFT50, _TTFT99, _ITL50, _FE_CPU, _CACHED)]
            lines.append(f"| {conc} | " + " | ".join(cells) + " |")
        lines.append("")
    if out["routing"]:
        lines += [
            "## Routing quality",
            "",
            f"The shipped prefix-heavy trace (`benchmarks/traces/{ROUTING_TRACE}`, Mooncake format, 120 shared "
            f"prefixes of 3-8 blocks with Zipf-like popularity, 20 requests/s) replayed open-loop for "
            f"{args.routing_duration:g} s at its "
            f"own pace, lengths divided by {ROUTING_LENGTH_SCALE:g} (about 750-token prompts), mocker speed-up 1, "
            f"a KV cache of {ROUTING_NUM_BLOCKS} blocks per worker so that placement matters; kv routing vs "
            "round-robin on both systems. Both start with empty caches (fresh stacks, no warm-up: the cold start "
            "is part of the workload).",
            "",
            "| system | router | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | cached share | frontend CPU ms/req |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode in ("kv", "round-robin"):
            for name in ("commutator", "dynamo"):
                runs = out["routing"].get(f"{name}/{mode}", [])
                if not runs:
                    continue
                lines.append(
                    f"| {name} | {mode} | {_cell(_med(runs, lambda r: r['summary']['requests_per_s']))} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['ttft_ms']['p50']))} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['ttft_ms']['p99']))} "
                    f"| {_cell(_med(runs, lambda r: r['summary']['itl_ms']['p50']), 2)} "
                    f"| {_cell(_med(runs, lambda r: 100 * r['summary']['cached_share']), 1, '%')} "
                    f"| {_cell(_med(runs, lambda r: r['frontend_cpu_ms_per_req']), 2)} |"
                )
        lines += [
            "",
            "Ratios, Commutator / Dynamo (medians):",
            "",
            "| router | req/s | TTFT p50 | TTFT p99 | ITL p50 | frontend CPU/req | cached share |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode in ("kv", "round-robin"):
            a, b = out["routing"].get(f"commutator/{mode}", []), out["routing"].get(f"dynamo/{mode}", [])
            if not a or not b:
                continue
            cells = [_ratios(a, b, g) for g in (_RPS, _TTFT50, _TTFT99, _ITL50, _FE_CPU, _CACHED)]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](benchmarks/{p.name})" for p in plots] + [""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make bench-compare          # both comparisons, 3 repetitions (about 8 minutes on 2 cores)",
        "commutator bench compare --only overhead --reps 5",
        "commutator bench run --launch commutator --workload trace --trace benchmarks/traces/prefix_heavy.jsonl",
        "```",
        "",
        "Raw per-repetition figures: `build/bench-compare/compare.json`.",
        "",
    ]
    return "\n".join(lines)
