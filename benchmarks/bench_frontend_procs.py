"""Frontend processes (issue 12): one frontend process vs ``--processes 2``, same machine, same run.

Each run starts a fresh stack (etcd, nats-server, 2 mocker workers at speed-up 100, the frontend
with ``--processes N``), warms it up, then sends streaming chat requests of about 1,000 prompt tokens
(75% a prefix shared within 32 groups), 64 output tokens, closed loop at concurrency 64 over
keep-alive connections (the kernel spreads the connections over the processes). Runs alternate
N = 1, 2, 1, 2, ... so that drift in the machine's load hits both alike. Prints requests/s, TTFT,
the frontend's CPU per request and in cores (the parent and its children together, from /proc), the
CPU of the workers, of etcd + NATS and of the load generator, which share the machine, and what the
rest of the machine used (other work); writes results.json.

    make bench-frontend-procs [BENCH_ARGS="--reps 3 --duration 20"]
    python benchmarks/bench_frontend_procs.py [--processes 1 2] [--reps 2] [--duration 10]

About 70 s with the defaults. On a machine with fewer free cores than N plus the workers and the
load generator, the processes compete with them: read the CPU columns beside the requests/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import uvloop
from commutator.cli.bench import measure
from commutator.cli.loadgen import run_closed_loop
from commutator.cli.report import machine_info
from commutator.cli.stacks import CommutatorStack, cpu_seconds
from commutator.cli.workloads import ChatWorkload
from commutator.engines.tiny_model import MODEL_NAME


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def tree_cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


async def one_run(processes: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    stack = CommutatorStack(speedup=args.speedup, router_mode="kv", frontend_args=("--processes", str(processes)))
    await stack.start()
    try:
        assert stack.frontend is not None
        workload = ChatWorkload(isl=1000, osl=64, prefix_groups=32, prefix_ratio=0.75, seed=seed)
        # Warm-up at full concurrency: every process has served (tokenizer loaded, connections open).
        await run_closed_loop(stack.base_url, MODEL_NAME, workload, concurrency=args.concurrency, duration_s=3.0)
        pids = process_tree(stack.frontend.pid)
        assert len(pids) == (processes + 1 if processes > 1 else 1), pids
        servers = [p.pid for p in (stack.etcd.proc, stack.nats.proc) if p is not None]
        f0, e0 = tree_cpu_seconds(pids), tree_cpu_seconds(servers)
        m = await measure(
            stack.base_url,
            MODEL_NAME,
            workload,
            concurrency=args.concurrency,
            duration_s=args.duration,
            warmup_s=0,
            worker_pids=stack.worker_pids(),
        )
        f1, e1 = tree_cpu_seconds(pids), tree_cpu_seconds(servers)
    finally:
        await stack.stop()
    s = m.summary
    frontend_pct, servers_pct = 100 * (f1 - f0) / s.wall_s, 100 * (e1 - e0) / s.wall_s
    return {
        "processes": processes,
        "requests_per_s": s.requests_per_s,
        "requests": s.requests,
        "errors": sum(s.errors.values()),
        "ttft_p50_ms": s.ttft_ms["p50"],
        "ttft_p99_ms": s.ttft_ms["p99"],
        "chunk_p50_ms": s.chunk_ms["p50"],
        "frontend_cpu_ms_per_req": (f1 - f0) * 1000 / max(s.requests, 1),
        "frontend_cpu_cores": frontend_pct / 100,
        "workers_cpu_pct": m.workers_cpu_pct,
        "servers_cpu_pct": servers_pct,
        "loadgen_cpu_pct": m.loadgen_cpu_pct,
        # measure() counts the frontend and etcd + NATS as "other" (it was not given their pids).
        "other_cpu_pct": max(0.0, m.other_cpu_pct - frontend_pct - servers_pct),
    }


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['processes']} | {r['requests_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
        f"| {r['chunk_p50_ms']:.2f} | {r['frontend_cpu_ms_per_req']:.2f} | {r['frontend_cpu_cores']:.2f} "
        f"| {r['workers_cpu_pct']:.0f}% | {r['servers_cpu_pct']:.0f}% | {r['loadgen_cpu_pct']:.0f}% "
        f"| {r['other_cpu_pct']:.0f}% | {r['errors']:.0f} |"
    )


HEADER = (
    "| processes | req/s | TTFT p50 ms | TTFT p99 ms | chunk p50 ms | frontend CPU ms/req | frontend cores "
    "| workers CPU | etcd+NATS CPU | loadgen CPU | rest of machine | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


async def main_async(args: argparse.Namespace) -> None:
    print(
        f"frontend --processes {args.processes}: 2 mocker workers at speed-up {args.speedup:g}, ~1000-token chat "
        f"prompts, 64 output tokens, concurrency {args.concurrency}, {args.duration:g} s per run, "
        f"{os.cpu_count()} cores (load generator on the same machine)"
    )
    runs = []
    print(HEADER)
    for rep in range(args.reps):
        for n in args.processes:
            r = await one_run(n, args, seed=rep)
            runs.append(r)
            print(_row(r), flush=True)
    print("\nmedians:\n" + HEADER)
    medians = []
    for n in args.processes:
        mine = [r for r in runs if r["processes"] == n]
        med = {k: statistics.median(r[k] for r in mine) if k != "processes" else n for k in mine[0]}
        medians.append(med)
        print(_row(med))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "runs": runs}, indent=1)
    )
    print(f"\nresults in {args.out}/results.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--speedup", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=Path("build/bench-frontend-procs"))
    uvloop.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
