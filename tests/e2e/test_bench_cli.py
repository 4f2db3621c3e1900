"""`commutator bench run` against a stack it launches: results, tables and plots come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_bench_run_launches_a_stack_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "commutator.cli",
            "bench",
            "run",
            "--launch",
            "commutator",
            "--speedup-ratio",
            "50",
            "--workload",
            "synthetic",
            "--isl",
            "300",
            "--osl",
            "16",
            "--prefix-groups",
            "4",
            "--prefix-ratio",
            "0.5",
            "--concurrency",
            "4",
            "--requests",
            "40",
            "--warmup",
            "1",
            "--ttft-slo-ms",
            "1000",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| run | req/s |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    s = data["summary"]
    assert s["requests"] == 40 and s["errors"] == {} and s["ttft_ms"]["p50"] > 0
    assert s["cached_share"] > 0  # shared prefixes were served from cache
    assert s["goodput_per_s"] > 0 and data["frontend_cpu_ms_per_req"] > 0
    for png in ("ttft.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
