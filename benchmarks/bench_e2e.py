"""The whole stack on this machine (issue 5): frontend (router embedded) and 2 mocker
workers at speedup 100, each its own process, on real etcd and nats-server.

Streaming chat requests of about 1,000 prompt tokens (75% a prefix shared within
32 groups, the rest random per request), 64 output tokens, keep-alive
connections, concurrency 1, 16 and 64. Prints requests/s, output tokens/s,
TTFT and inter-chunk latency p50/p99, and the frontend's CPU per request.

Reference measured on this 2-core machine in the same set-up: NVIDIA Dynamo 1.6.1
(Rust frontend + its mocker) saturates at about 190-200 requests/s with 4-5.5 ms
of frontend CPU per request; its TTFT at concurrency 1 is 47 ms.
(`make bench-compare` measures both side by side.)
"""

from __future__ import annotations

import argparse

import uvloop
from commutator.cli.bench import measure
from commutator.cli.stacks import CommutatorStack
from commutator.cli.workloads import ChatWorkload
from commutator.engines.tiny_model import MODEL_NAME


async def main_async(args: argparse.Namespace) -> None:
    stack = CommutatorStack(speedup=args.speedup, router_mode="kv")
    await stack.start()
    try:
        print(
            f"whole stack: frontend (kv router embedded) + 2 mocker workers at speedup {args.speedup:g}, "
            "~1000-token prompts (75% shared in 32 groups), 64 output tokens, streaming, keep-alive"
        )
        print(
            f"{'conc':>4} {'req/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'chunk p50':>10} "
            f"{'chunk p99':>10} {'FE CPU/req':>11} {'workers CPU':>11} {'loadgen CPU':>11} {'other CPU':>9} "
            f"{'errors':>6}"
        )
        for conc in args.concurrency:
            wl = ChatWorkload(isl=1000, osl=64, prefix_groups=32, prefix_ratio=0.75, seed=conc)
            m = await measure(
                stack.base_url,
                MODEL_NAME,
                wl,
                concurrency=conc,
                duration_s=args.duration,
                warmup_s=2.0,
                frontend_pid=stack.frontend.pid if stack.frontend else None,
                worker_pids=stack.worker_pids(),
            )
            s = m.summary
            print(
                f"{conc:>4} {s.requests_per_s:>8.1f} {s.output_tokens_per_s:>8.0f} {s.ttft_ms['p50']:>7.1f}ms "
                f"{s.ttft_ms['p99']:>7.1f}ms {s.chunk_ms['p50']:>8.2f}ms {s.chunk_ms['p99']:>8.2f}ms "
                f"{m.frontend_cpu_ms_per_req or 0:>9.2f}ms {m.workers_cpu_pct or 0:>10.0f}% "
                f"{m.loadgen_cpu_pct:>10.0f}% {m.other_cpu_pct:>8.0f}% {sum(s.errors.values()):>6}"
            )
    finally:
        await stack.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--speedup", type=float, default=100.0)
    uvloop.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
