"""The whole stack on this machine (issue 5): frontend (router embedded) and 2 mocker
workers at speedup 100, each its own process, on real etcd and nats-server.

Streaming chat requests of about 1,000 prompt tokens (75% a prefix shared within
32 groups, the rest random per request), 64 output tokens, keep-alive
connections, concurrency 1, 16 and 64. Prints requests/s, output tokens/s,
TTFT and inter-chunk latency p50/p99, and the frontend's CPU per request.

Reference measured on this 2-core machine in the same set-up: NVIDIA Dynamo 1.6.1
(Rust frontend + its mocker) saturates at about 190-200 requests/s with 4-5.5 ms
of frontend CPU per request; its TTFT at concurrency 1 is 47 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import uvloop
from commutator.cli.loadgen import run_closed_loop, summarize
from commutator.common.local_servers import EtcdProcess, NatsProcess, free_port
from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model
from commutator.frontend.preprocess import Preprocessor

GROUPS = 32
PROMPT_TOKENS = 1000
OUTPUT_TOKENS = 64


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def word_text(rng: random.Random, pre: Preprocessor, tokens: int) -> str:
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "import",
        "return",
        "value",
        "self",
        "data",
        "list",
        "print",
        "for",
        "while",
        "class",
        "def",
        "yield",
        "async",
        "await",
        "lambda",
        "none",
        "true",
        "false",
    ]
    text = ""
    while len(pre.encode(text)) < tokens:
        text += " ".join(rng.choice(words) for _ in range(40)) + "\n"
    ids = pre.encode(text)[:tokens]
    return pre.tokenizer.decode(ids)


def bodies(seed: int) -> Iterator[dict[str, Any]]:
    pre = Preprocessor.load(ensure_tiny_model())
    rng = random.Random(seed)
    shared = [word_text(random.Random(1000 + g), pre, int(PROMPT_TOKENS * 0.75)) for g in range(GROUPS)]
    while True:
        g = rng.randrange(GROUPS)
        suffix = word_text(rng, pre, PROMPT_TOKENS - int(PROMPT_TOKENS * 0.75) - 8)
        yield {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": shared[g] + suffix}],
            "max_tokens": OUTPUT_TOKENS,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


async def wait_ready(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            try:
                async with http.get(f"{base}/models") as r:
                    if r.status == 200 and (await r.json())["data"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("stack not ready")


async def main_async(args: argparse.Namespace) -> None:
    ensure_tiny_model()
    with EtcdProcess() as etcd, NatsProcess() as nats:
        env = dict(
            os.environ,
            COMMUTATOR_ETCD_ENDPOINTS=etcd.endpoint,
            COMMUTATOR_NATS_URL=nats.url,
            COMMUTATOR_NAMESPACE="bench",
            COMMUTATOR_LOG="warning",
        )
        port = free_port()
        workers = [
            subprocess.Popen([sys.executable, "-m", "commutator.decode", "--speedup-ratio", str(args.speedup)], env=env)
            for _ in range(2)
        ]
        prof = os.environ.get("BENCH_PROFILE_FRONTEND")
        cmd = [sys.executable, *(["-m", "cProfile", "-o", prof] if prof else []), "-m", "commutator.frontend"]
        frontend = subprocess.Popen([*cmd, "--http-port", str(port), "--http-host", "127.0.0.1"], env=env)
        base = f"http://127.0.0.1:{port}/v1"
        try:
            await wait_ready(base)
            gen = bodies(seed=1)
            print(
                f"whole stack: frontend (kv router embedded) + 2 mocker workers at speedup {args.speedup}, "
                f"~{PROMPT_TOKENS}-token prompts (75% shared in {GROUPS} groups), {OUTPUT_TOKENS} output tokens, "
                f"streaming, keep-alive"
            )
            print(
                f"{'conc':>4} {'req/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'chunk p50':>10} "
                f"{'chunk p99':>10} {'FE CPU/req':>11} {'FE CPU':>7} {'workers CPU':>11} "
                f"{'loadgen CPU':>11} {'errors':>6}"
            )
            for conc in args.concurrency:
                await run_closed_loop(base, gen, concurrency=conc, duration_s=2.0)  # warm-up, not counted
                f0, w0, l0 = cpu_s(frontend.pid), sum(cpu_s(w.pid) for w in workers), time.process_time()
                results, wall = await run_closed_loop(base, gen, concurrency=conc, duration_s=args.duration)
                f1, w1, l1 = cpu_s(frontend.pid), sum(cpu_s(w.pid) for w in workers), time.process_time()
                s = summarize(results, wall)
                fe_ms = (f1 - f0) * 1000 / max(s.requests, 1)
                print(
                    f"{conc:>4} {s.requests_per_s:>8.1f} {s.output_tokens_per_s:>8.0f} {s.ttft_ms['p50']:>8.1f}ms "
                    f"{s.ttft_ms['p99']:>8.1f}ms {s.chunk_ms['p50']:>9.2f}ms {s.chunk_ms['p99']:>9.2f}ms "
                    f"{fe_ms:>9.2f}ms {100 * (f1 - f0) / wall:>6.0f}% {100 * (w1 - w0) / wall:>10.0f}% "
                    f"{100 * (l1 - l0) / wall:>10.0f}% {sum(s.errors.values()):>6}"
                )
        finally:
            for p in [frontend, *workers]:
                p.send_signal(signal.SIGTERM)
            for p in [frontend, *workers]:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--speedup", type=float, default=100.0)
    args = p.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
