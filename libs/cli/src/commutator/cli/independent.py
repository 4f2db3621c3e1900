"""Run ``benchmarks/independent_client.py`` (a client sharing no code with ``loadgen``) against a stack.

The client runs as its own process. It prints ``measuring`` when its measured window opens and
``done`` when its last request ended; the CPU of the stack's processes, of the client process and
of the machine is read at those two lines, so its figures cover the same window as the client's.
The result has the shape of ``Measured.as_dict()`` (``summary``, ``cpu``, ``client``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from commutator.cli import report
from commutator.cli.cpu import CpuMeter, Role
from commutator.cli.measure import cpu_figures

__all__ = ["client_script", "measure_independent", "summary_from_report"]


def client_script() -> Path:
    from commutator.cli.stacks import repo_root

    return repo_root() / "benchmarks" / "independent_client.py"


def summary_from_report(rep: dict[str, Any]) -> dict[str, Any]:
    """The client's JSON report in the keys of ``loadgen.Summary`` that the comparison reads."""
    n, wall = rep["requests"], rep["wall_s"]
    return {
        "requests": n,
        "errors": rep["errors"],
        "wall_s": wall,
        "requests_per_s": rep["requests_per_s"],
        "output_tokens_per_s": rep["output_tokens_per_req"] * n / wall if wall > 0 else 0.0,
        "ttft_ms": rep["ttft_ms"],
        "itl_ms": rep["itl_ms"],
        "chunk_ms": rep["chunk_gap_ms"],
        "prompt_tokens_per_req": rep["prompt_tokens_per_req"],
    }


async def measure_independent(
    url: str,
    model: str,
    *,
    roles: list[Role],
    api: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    tokenizer: Path | None = None,
    seed: int = 0,
    uvloop: bool = False,
    lines: int = 0,
) -> dict[str, Any]:
    """Run the client against ``url`` (closed loop, ``concurrency``), reading the CPU of ``roles``, of the
    client and of the machine over the client's measured window. ``lines``: chat prompts in lines of that
    many words (0: one line)."""
    with tempfile.TemporaryDirectory(prefix="independent-client-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            str(client_script()),
            "--url",
            url,
            "--model",
            model,
            "--api",
            api,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration_s),
            "--warmup",
            str(warmup_s),
            "--seed",
            str(seed),
            "--out",
            str(out),
        ]
        if tokenizer is not None:
            cmd += ["--tokenizer", str(tokenizer)]
        if uvloop:
            cmd.append("--uvloop")
        if lines:
            cmd += ["--lines", str(lines)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert proc.stdout is not None
        other: list[str] = []  # anything but the two marks: warnings, a traceback
        client = Role("client", "client", proc.pid)
        meter = CpuMeter([*roles, client])
        m0 = m1 = 0.0
        role_cpu: dict[str, float] | None = None
        async for line in proc.stdout:
            word = line.decode(errors="replace").rstrip()
            if word == "measuring":
                meter.start()
                m0 = report.machine_busy_seconds()
            elif word == "done":
                m1 = report.machine_busy_seconds()
                role_cpu = meter.stop()
            else:
                other = [*other[-40:], word]
        if await proc.wait() not in (0, 1) or not out.is_file() or role_cpu is None:
            err = "\n".join(other)[-2000:]
            raise RuntimeError(f"the independent client failed (exit {proc.returncode}): {err}")
        rep = json.loads(out.read_text())
    cpu = cpu_figures(
        role_cpu,
        roles,
        client_cpu_s=role_cpu["client"],
        machine_busy_s=m1 - m0,
        wall_s=rep["wall_s"],
        requests=rep["requests"],
        processes=meter.processes,
        threads=meter.threads,
    )
    n = max(1, rep["requests"])
    client_info = {
        "name": "independent",
        "lines": lines,
        "loop": rep["loop"],
        "connections_opened": rep["connections_opened"],
        "connections_reused": rep["connections_reused"],
        "sse_events": rep["sse_events_per_req"] * n,
        "bytes_read": rep["bytes_per_req"] * n,
        "parse_ms_per_req": rep["parse_ms_per_req"],
        "self_cpu_ms_per_req": rep["cpu_ms_per_req"],
    }
    return {"summary": summary_from_report(rep), "cpu": cpu, "client": client_info}
