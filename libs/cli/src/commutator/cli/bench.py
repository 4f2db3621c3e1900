"""``commutator bench``: load generation, trace replay, and a side-by-side with NVIDIA Dynamo.

commutator bench run --url http://host:8000/v1 --model M [workload] [--concurrency N | --rate R]
commutator bench run --launch commutator --speedup-ratio 100 ...      # starts a stack first
commutator bench compare                                              # Commutator vs Dynamo 1.6.1
commutator bench gen-traces [DIR]                                     # the shipped workload set
commutator bench bound --trace T [--workers 4 --num-blocks 1024 ...]  # the affinity bound of a trace (offline)
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from commutator.cli import bound, compare, report
from commutator.cli.measure import Measured, measure
from commutator.cli.stacks import CommutatorStack, DynamoStack, Stack, ensure_dynamo
from commutator.cli.workloads import (
    ChatWorkload,
    ConversationWorkload,
    RequestSpec,
    SyntheticWorkload,
    TraceWorkload,
    generate_traces,
)
from commutator.engines.tiny_model import CONTEXT_LENGTH, MODEL_NAME

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
    wl.add_argument("--max-prompt-tokens", type=int, help="trace: cut longer prompts to this many tokens")
    wl.add_argument("--max-output", type=int, help="trace: cap output tokens per request")
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
    compare.add_arguments(cmp_)

    gen = bsub.add_parser("gen-traces", help="write the shipped workload set (Mooncake format)")
    gen.add_argument("out", nargs="?", type=Path, default=Path("benchmarks/traces"))

    bnd = bsub.add_parser(
        "bound", help="offline: the cache hit share of perfect cache affinity on a trace, with the same capacity"
    )
    bnd.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL")
    bnd.add_argument("--workers", type=int, default=4, help="mocker workers")
    bnd.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per worker")
    bnd.add_argument("--block-size", type=int, default=64, help="tokens per KV block")
    bnd.add_argument("--length-scale", type=float, default=8.0, help="divide the trace's lengths by this")
    bnd.add_argument("--block-tokens", type=int, default=512, help="prompt tokens per hash id in the trace")
    bnd.add_argument("--speedup", type=float, default=1.0, help="divide the trace's clock by this")
    bnd.add_argument("--max-duration-s", type=float, help="keep the requests sent within this (after --speedup)")
    bnd.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="cut longer prompts to this many tokens, as the routing benchmark does (default: refuse them "
        "when over the context, as the frontend does)",
    )
    bnd.add_argument("--max-output", type=int, help="cap output tokens per request (the routing benchmark: 256)")
    bnd.add_argument("--context-length", type=int, default=CONTEXT_LENGTH, help="the model's context")
    bnd.add_argument("--window-s", type=float, default=5.0, help="width of the hit-share time series windows")
    bnd.add_argument("--seed", type=int, default=0, help="seed of the random placement")
    bnd.add_argument(
        "--measured",
        action="append",
        default=[],
        metavar="LABEL=SHARE",
        help="a router's measured cached share (0.24 or 24%%), reported as a share of the bound (repeatable)",
    )
    bnd.add_argument("--json", type=Path, help="write the result (time series included) here")


def main(args: argparse.Namespace) -> int:
    if args.bench_command == "gen-traces":
        for p in generate_traces(args.out):
            print(p)
        return 0
    if args.bench_command == "bound":
        return _bound(args)
    import uvloop

    if args.bench_command == "run":
        return uvloop.run(_run(args))
    return uvloop.run(compare.run_compare(args))


# -- the affinity bound ----------------------------------------------------------------------------
def _measured(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        label, sep, value = item.rpartition("=")
        try:
            share = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            share = -1.0
        if not sep or not label or share < 0:
            raise SystemExit(f"--measured {item!r}: expected LABEL=SHARE, e.g. kv=0.24 or kv=24%")
        out.append((label, share))
    return out


def _bound(args: argparse.Namespace) -> int:
    measured = _measured(args.measured)
    wl = TraceWorkload(
        args.trace,
        speedup=args.speedup,
        block_tokens=args.block_tokens,
        length_scale=args.length_scale,
        max_duration_s=args.max_duration_s,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output=args.max_output,
    )
    res = bound.affinity_bound(
        wl,
        workers=args.workers,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        context_length=args.context_length,
        window_s=args.window_s,
        seed=args.seed,
    )
    b = res.bound
    print(
        f"{args.trace.name}: {b.requests} requests ({res.refused} refused: prompt over the context),"
        f" {b.prompt_tokens} prompt tokens; {args.workers} workers x {args.num_blocks} blocks of {args.block_size}"
    )
    print(bound.format_table(res, measured))
    print("affinity placement, requests per worker: " + ", ".join(map(str, b.per_worker_requests)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"args": {k: str(v) for k, v in vars(args).items()}, **res.as_dict()}
        doc["measured"] = [{"label": k, "hit_share": v, "share_of_bound": res.share_of_bound(v)} for k, v in measured]
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


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
        max_prompt_tokens=args.max_prompt_tokens,
        max_output=args.max_output,
    )


async def _run(args: argparse.Namespace) -> int:
    stack: Stack | None = None
    url, frontend_pid, roles = args.url, args.frontend_pid, None
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
            await stack.launch()
            url = stack.base_url
            roles = stack.roles()
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
            roles=roles,
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
    if m.cpu:
        print(
            "CPU per request by process: "
            + ", ".join(
                f"{label} {v['ms_per_req'] or 0:.2f} ms ({v['pct_core'] or 0:.0f}% of a core)"
                for label, v in m.cpu["roles"].items()
            )
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
