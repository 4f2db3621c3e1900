"""The statistics of ``bench compare``, on the run records of ``compare.json`` (pure: no I/O).

A run record is what one measurement left: ``summary`` (``loadgen.Summary.as_dict()``), ``cpu``
(``measure.cpu_figures``) and ``client``. A cell is the median over repetitions with [min-max]; a
ratio is ours / theirs within each repetition (the two stacks ran back to back under the same
conditions), then the median of those ratios with [min-max]. ``cpu_budget`` splits a run's CPU into
the stack's, the client's and the rest of the machine's per completed request: on a saturated
machine, requests/s is the busy cores over that sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from commutator.cli import report

__all__ = [
    "Getter",
    "RunRecord",
    "cell",
    "cpu_budget",
    "cpu_getter",
    "errors",
    "get",
    "latency",
    "med",
    "num",
    "paired_ratio",
    "ratio_cell",
    "rps",
    "sse_events_per_req",
]

RunRecord = dict[str, Any]
Getter = Callable[[RunRecord], "float | None"]


def get(r: RunRecord, *path: str) -> float | None:
    """The number at ``path`` in a record, or None when any key is missing or null."""
    v: Any = r
    for k in path:
        if not isinstance(v, dict) or v.get(k) is None:
            return None
        v = v[k]
    return float(v)


def _finite(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def med(runs: Sequence[RunRecord], g: Getter) -> tuple[float, float, float]:
    """(median, min, max) of ``g`` over the runs where it is defined; NaNs when none is."""
    return report.median_spread([v for r in runs if _finite(v := g(r))])  # type: ignore[misc]


def paired_ratio(ours: Sequence[RunRecord], theirs: Sequence[RunRecord], g: Getter) -> tuple[float, float, float]:
    """ours / theirs within each repetition (the two ran back to back), then (median, min, max)."""
    ratios = []
    for a, b in zip(ours, theirs, strict=False):
        x, y = g(a), g(b)
        if _finite(x) and _finite(y) and y:
            ratios.append(x / y)  # type: ignore[operator]
    return report.median_spread(ratios)


def num(v: Any, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def cell(m: tuple[float, float, float], digits: int = 1, unit: str = "") -> str:
    """``median [min-max]``; just the median when the spread is nil (one repetition); ``-`` when none."""
    mid, lo, hi = m
    if math.isnan(mid):
        return "-"
    if lo == hi:
        return f"{mid:,.{digits}f}{unit}"
    return f"{mid:,.{digits}f}{unit} [{lo:,.{digits}f}-{hi:,.{digits}f}]"


def ratio_cell(ours: Sequence[RunRecord], theirs: Sequence[RunRecord], g: Getter) -> str:
    return cell(paired_ratio(ours, theirs, g), 2)


# -- getters --------------------------------------------------------------------------------------
def rps(r: RunRecord) -> float | None:
    return get(r, "summary", "requests_per_s")


def latency(kind: str, q: str) -> Getter:
    """``kind``: ``ttft_ms``, ``itl_ms`` (each request's mean time per token), ``chunk_ms`` (every gap)."""
    return lambda r: get(r, "summary", kind, q)


def errors(r: RunRecord) -> float:
    return float(sum((r.get("summary") or {}).get("errors", {}).values()))


def cpu_getter(*path: str) -> Getter:
    """A figure of ``cpu``: ``("kinds", "frontend", "ms_per_req")``, ``("client", "pct_core")``..."""
    return lambda r: get(r, "cpu", *path)


def sse_events_per_req(r: RunRecord) -> float | None:
    n, events = get(r, "summary", "requests"), get(r, "client", "sse_events")
    return events / n if n and events is not None else None


def cpu_budget(r: RunRecord) -> dict[str, float | None]:
    """Where a run's CPU went, per completed request (ms): the stack, the client, the rest of the machine;
    and the machine's busy cores over the window.

    The identity behind the two-client analysis: requests/s = 1000 * cores_busy / total_ms. On a
    saturated machine ``cores_busy`` is pinned at the core count, so a client that costs more per
    request leaves fewer requests/s to the stack it measures.
    """
    n = get(r, "summary", "requests")
    wall = get(r, "cpu", "wall_s")
    parts = {k: get(r, "cpu", k, "cpu_s") for k in ("stack", "client", "other", "machine")}
    if not n or not wall or any(v is None for v in parts.values()):
        return {k: None for k in ("stack_ms", "client_ms", "other_ms", "total_ms", "cores_busy")}
    ms = {k: 1000 * v / n for k, v in parts.items() if v is not None}
    return {
        "stack_ms": ms["stack"],
        "client_ms": ms["client"],
        "other_ms": ms["other"],
        "total_ms": ms["stack"] + ms["client"] + ms["other"],
        "cores_busy": (parts["machine"] or 0.0) / wall,
    }
