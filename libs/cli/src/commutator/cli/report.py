"""Benchmark results: JSON, markdown tables and PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from commutator.cli.loadgen import RequestResult, Summary

__all__ = [
    "machine_busy_seconds",
    "machine_info",
    "markdown_summary",
    "median_spread",
    "plot_latency_cdf",
    "plot_over_time",
    "write_json",
]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_default) + "\n")


def _default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if hasattr(o, "as_dict"):
        return o.as_dict()
    raise TypeError(type(o).__name__)


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def markdown_summary(rows: Sequence[tuple[str, Summary, dict[str, float | None]]]) -> str:
    """One row per (label, summary, extras) with the figures a reader compares."""
    head = (
        "| run | req/s | output tok/s | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | cached share "
        "| goodput/s | errors | frontend CPU/req |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, s, extra in rows:
        lines.append(
            f"| {label} | {_fmt(s.requests_per_s)} | {_fmt(s.output_tokens_per_s, 0)} | {_fmt(s.ttft_ms['p50'])} ms "
            f"| {_fmt(s.ttft_ms['p90'])} ms | {_fmt(s.ttft_ms['p99'])} ms | {_fmt(s.itl_ms['p50'], 2)} ms "
            f"| {_fmt(s.itl_ms['p99'], 2)} ms | {s.cached_share:.1%} | {_fmt(s.goodput_per_s)} "
            f"| {sum(s.errors.values())} | {_fmt(extra.get('frontend_cpu_ms_per_req'), 2)} ms |"
        )
    return "\n".join(lines) + "\n"


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the finite values."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(vals), min(vals), max(vals)


def plot_latency_cdf(path: Path, series: dict[str, list[float]], title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, values in series.items():
        vals = sorted(v for v in values if v is not None)
        if not vals:
            continue
        ys = [(i + 1) / len(vals) for i in range(len(vals))]
        ax.plot(vals, ys, label=f"{label} (n={len(vals)})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_over_time(path: Path, series: dict[str, list[RequestResult]], title: str, bucket_s: float = 1.0) -> None:
    """Output tokens per second over the run, by completion time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, results in series.items():
        ok = [r for r in results if r.ok]
        if not ok:
            continue
        t0 = min(r.start for r in results)
        buckets: dict[int, int] = {}
        for r in ok:
            b = int((r.end - t0) / bucket_s)
            buckets[b] = buckets.get(b, 0) + r.output_tokens
        xs = sorted(buckets)
        ax.plot([x * bucket_s for x in xs], [buckets[x] / bucket_s for x in xs], label=label)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def hit_share_windows(results: Sequence[RequestResult], window_s: float) -> list[dict[str, float]]:
    """Cached share of the prompt tokens of the requests sent in each ``window_s`` of the run (by
    send time, from the first request), the answered ones only: ``[{start_s, requests, hit_share}]``."""
    if not results:
        return []
    t0 = min(r.start for r in results)
    sums: dict[int, list[int]] = {}
    for r in results:
        if r.ok and r.prompt_tokens:
            w = sums.setdefault(int((r.start - t0) / window_s), [0, 0, 0])
            w[0] += 1
            w[1] += r.prompt_tokens
            w[2] += r.cached_tokens
    return [
        {"start_s": k * window_s, "requests": n, "hit_share": cached / prompt}
        for k, (n, prompt, cached) in sorted(sums.items())
    ]


def plot_hit_share(path: Path, series: dict[str, list[dict[str, float]]], title: str) -> None:
    """Hit share over time: one line per series of :func:`hit_share_windows`-style windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, windows in series.items():
        if windows:
            dashed = label.startswith("bound") or label.startswith("pooled")
            ax.plot(
                [w["start_s"] for w in windows],
                [100 * w["hit_share"] for w in windows],
                label=label,
                linestyle="--" if dashed else "-",
            )
    ax.set_xlabel("seconds into the replay (send time)")
    ax.set_ylabel("cached share of prompt tokens, %")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from commutator.common.local_servers import find_binary

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": _version([find_binary("nats-server"), "--version"]),
        "etcd": _version([find_binary("etcd"), "--version"]),
        "loadavg_before": os.getloadavg(),
    }
