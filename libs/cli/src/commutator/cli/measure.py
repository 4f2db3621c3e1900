"""One measured load level: the harness's client against a running stack, with CPU by process.

``measure`` warms up (discarded), then runs the load and reads, over exactly the measured window,
the CPU time of every process of the stack (``cpu.CpuMeter``), of this client (its own process
time) and of the whole machine. ``cpu_figures`` turns those seconds into what the tables show:
milliseconds per completed request and percent of one core, per process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from commutator.cli import report
from commutator.cli.cpu import CpuMeter, Role
from commutator.cli.loadgen import (
    ClientCounters,
    RequestResult,
    Summary,
    run_closed_loop,
    run_conversations,
    run_open_loop,
    summarize,
)
from commutator.cli.workloads import ConversationWorkload, RequestSpec, TraceWorkload

__all__ = ["Measured", "cpu_figures", "measure"]


def cpu_figures(
    role_cpu_s: Mapping[str, float],
    roles: list[Role],
    *,
    client_cpu_s: float,
    machine_busy_s: float,
    wall_s: float,
    requests: int,
    processes: Mapping[str, int] | None = None,
    threads: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Per process: CPU seconds, ms per completed request, % of one core; then sums by kind, the client,
    and the rest of the machine (``other``: busy time nobody here accounts for: other users, the kernel)."""

    def per(cpu_s: float) -> dict[str, float | None]:
        return {
            "cpu_s": cpu_s,
            "ms_per_req": cpu_s * 1000 / requests if requests else None,
            "pct_core": 100 * cpu_s / wall_s if wall_s > 0 else None,
        }

    by_role: dict[str, dict[str, Any]] = {}
    by_kind: dict[str, float] = {}
    for r in roles:
        s = role_cpu_s.get(r.label, 0.0)
        by_role[r.label] = {
            "kind": r.kind,
            **per(s),
            "processes": (processes or {}).get(r.label),
            "threads": (threads or {}).get(r.label),
        }
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + s
    stack_s = sum(by_kind.values())
    return {
        "roles": by_role,
        "kinds": {k: per(v) for k, v in by_kind.items()},
        "stack": per(stack_s),
        "client": per(client_cpu_s),
        "machine": per(machine_busy_s),
        "other": per(max(0.0, machine_busy_s - stack_s - client_cpu_s)),
        "wall_s": wall_s,
        "requests": requests,
    }


@dataclass
class Measured:
    summary: Summary
    results: list[RequestResult]
    frontend_cpu_ms_per_req: float | None
    workers_cpu_pct: float | None
    loadgen_cpu_pct: float
    other_cpu_pct: float
    cpu: dict[str, Any] | None = None
    counters: ClientCounters | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary.as_dict(),
            "frontend_cpu_ms_per_req": self.frontend_cpu_ms_per_req,
            "workers_cpu_pct": self.workers_cpu_pct,
            "loadgen_cpu_pct": self.loadgen_cpu_pct,
            "other_cpu_pct": self.other_cpu_pct,
            "cpu": self.cpu,
            "client": {"name": "loadgen", **(self.counters.as_dict() if self.counters else {})},
            **self.extra,
        }


def _progress(total: int | None, desc: str) -> Callable[[RequestResult], None]:
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=desc,
        unit="req",
        mininterval=0.5,
        file=sys.stderr,
        leave=False,
        disable=not sys.stderr.isatty(),
    )

    def update(r: RequestResult) -> None:
        bar.update(1)
        if not r.ok:
            bar.set_postfix_str(f"last error: {r.error}")

    return update


async def measure(
    url: str,
    model: str,
    workload: Iterator[RequestSpec] | ConversationWorkload | TraceWorkload,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float = 30.0,
    max_requests: int | None = None,
    warmup_s: float = 3.0,
    frontend_pid: int | None = None,
    worker_pids: list[int] | None = None,
    roles: list[Role] | None = None,
    ttft_slo_ms: float | None = None,
    itl_slo_ms: float | None = None,
    desc: str = "",
    seed: int = 0,
    settle_s: float = 0.0,
) -> Measured:
    """Warm up (discarded), then measure one load level, with the CPU of every process over its window.

    ``settle_s`` (closed loop only): the measured loop itself runs that long before its window opens (see
    :func:`run_closed_loop`), so the window sees its steady state; its CPU then also counts what the requests
    in flight at that moment still cost, about half of ``concurrency`` requests' worth on both stacks alike.

    ``roles`` (a stack's ``roles()``) names the processes to account for; without it, ``frontend_pid`` and
    ``worker_pids`` do. Open loop (``rate``): Poisson arrivals seeded by ``seed``, so two stacks measured
    with the same seed and workload get the same requests at the same offsets.
    """
    if roles is None:
        roles = [Role("frontend", "frontend", frontend_pid)] if frontend_pid else []
        roles += [Role(f"worker {i + 1}", "worker", p) for i, p in enumerate(worker_pids or [])]
    if settle_s > 0 and (rate or isinstance(workload, ConversationWorkload | TraceWorkload)):
        raise ValueError("settle_s applies to a closed loop only")
    if warmup_s > 0 and not isinstance(workload, ConversationWorkload | TraceWorkload):
        await run_closed_loop(url, model, workload, concurrency=concurrency or 4, duration_s=warmup_s)
    meter = CpuMeter(roles)
    counters = ClientCounters()
    progress = _progress(max_requests, desc)
    marks: list[float] = []

    def open_window() -> None:
        meter.start()
        marks[:] = [report.machine_busy_seconds(), time.process_time()]

    if settle_s <= 0:
        open_window()
    if isinstance(workload, ConversationWorkload):
        results, wall = await run_conversations(url, model, workload, on_result=progress)
    elif isinstance(workload, TraceWorkload):
        results, wall = await run_open_loop(url, model, workload, on_result=progress, counters=counters)
    elif rate:
        results, wall = await run_open_loop(
            url, model, workload, rate=rate, duration_s=duration_s, seed=seed, on_result=progress, counters=counters
        )
    else:
        results, wall = await run_closed_loop(
            url,
            model,
            workload,
            concurrency=concurrency or 1,
            duration_s=duration_s,
            max_requests=max_requests,
            on_result=progress,
            counters=counters,
            settle_s=settle_s,
            on_settled=open_window,
        )
    m0, c0 = marks
    m1, c1 = report.machine_busy_seconds(), time.process_time()
    role_cpu = meter.stop()
    s = summarize(results, wall, ttft_slo_ms=ttft_slo_ms, itl_slo_ms=itl_slo_ms)
    cpu = cpu_figures(
        role_cpu,
        roles,
        client_cpu_s=c1 - c0,
        machine_busy_s=m1 - m0,
        wall_s=wall,
        requests=s.requests,
        processes=meter.processes,
        threads=meter.threads,
    )
    kinds = cpu["kinds"]
    return Measured(
        summary=s,
        results=results,
        frontend_cpu_ms_per_req=kinds["frontend"]["ms_per_req"] if "frontend" in kinds else None,
        workers_cpu_pct=kinds["worker"]["pct_core"] if "worker" in kinds else None,
        loadgen_cpu_pct=cpu["client"]["pct_core"] or 0.0,
        other_cpu_pct=cpu["other"]["pct_core"] or 0.0,
        cpu=cpu,
        counters=counters,
    )
