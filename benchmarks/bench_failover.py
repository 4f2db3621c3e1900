"""A worker dies under load: how many requests fail (issue 9, item 1).

The review's reproduction, as a benchmark: ``commutator up --distributed
--workers 2`` plus a third worker started by hand; closed-loop load (16
clients, 200-token prompts, 256 tokens out, speed-up 1) for 20 s; the third
worker is killed with SIGKILL after 8 s. Its registration outlives it (lease
TTL 5 s), so a router that only follows discovery keeps sending it requests.
Prints the requests completed and failed (by kind), and what the frontend's
router did (requests routed again, workers inhibited). Only the requests in
flight on the killed worker should fail (none, once migration exists).

``python benchmarks/bench_failover.py [--duration 20] [--kill-after 8] [--reps 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from commutator.cli.loadgen import run_closed_loop
from commutator.cli.workloads import SyntheticWorkload
from commutator.common.local_servers import free_port

MODEL = "commutator/tiny-llama"


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def series(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def worker_count(port: int) -> int:
    text = metrics_text(port)
    return len(
        {m.group(1) for m in re.finditer(r'commutator_router_worker_load\{kind="requests",worker="([^"]+)"', text)}
    )


async def one_run(duration_s: float, kill_after_s: float, log_dir: Path) -> dict[str, object]:
    port = free_port()
    up_log = open(log_dir / "up.log", "wb")
    cmd = [sys.executable, "-m", "commutator.cli", "up", "--distributed", "--workers", "2"]
    up = subprocess.Popen(
        [*cmd, "--speedup-ratio", "1", "--http-port", str(port), "--http-host", "127.0.0.1"],
        stdout=up_log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    extra = None
    try:
        deadline = time.monotonic() + 120
        while b"Commutator is up" not in (log_dir / "up.log").read_bytes():
            if up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the stack did not start:\n" + (log_dir / "up.log").read_text())
            await asyncio.sleep(0.2)
        m = re.search(r"etcd at (\S+), nats-server at (\S+) ", (log_dir / "up.log").read_text())
        assert m is not None
        env = dict(os.environ, COMMUTATOR_ETCD_ENDPOINTS=m.group(1), COMMUTATOR_NATS_URL=m.group(2).rstrip(","))
        extra_log = open(log_dir / "worker3.log", "wb")
        extra = subprocess.Popen(
            [sys.executable, "-m", "commutator.decode", "--speedup-ratio", "1"],
            stdout=extra_log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        while worker_count(port) < 3:
            if time.monotonic() > deadline:
                raise SystemExit("the third worker never reached the router")
            await asyncio.sleep(0.2)
        before = metrics_text(port)

        async def kill_later() -> None:
            await asyncio.sleep(kill_after_s)
            assert extra is not None
            extra.send_signal(signal.SIGKILL)

        killer = asyncio.create_task(kill_later())
        wl = SyntheticWorkload(isl_mean=200, osl_mean=256, seed=int(time.time()))
        results, wall = await run_closed_loop(
            f"http://127.0.0.1:{port}/v1", MODEL, iter(wl), concurrency=16, duration_s=duration_s
        )
        await killer
        after = metrics_text(port)
        ok = [r for r in results if r.ok]
        errors = Counter(r.error or "unknown" for r in results if not r.ok)
        return {
            "completed": len(ok),
            "failed": sum(errors.values()),
            "errors": dict(errors),
            "wall_s": wall,
            "retries": series(after, "commutator_router_retries_total")
            - series(before, "commutator_router_retries_total"),
            "inhibited": series(after, 'commutator_router_worker_inhibitions_total{event="inhibited"}'),
        }
    finally:
        if extra is not None and extra.poll() is None:
            extra.kill()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        up_log.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--kill-after", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--logs", type=Path, default=Path("build/bench-failover"))
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    print(
        f"3 workers (speed-up 1), 16 clients, 200-token prompts, 256 out, {args.duration:.0f} s; "
        f"the third worker SIGKILLed after {args.kill_after:.0f} s (its lease lasts 5 s more)"
    )
    for rep in range(args.reps):
        r = await one_run(args.duration, args.kill_after, args.logs)
        print(
            f"  run {rep + 1}: {r['completed']} completed, {r['failed']} failed {r['errors'] or ''}; "
            f"the router routed {r['retries']:.0f} requests again and inhibited {r['inhibited']:.0f} worker(s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
