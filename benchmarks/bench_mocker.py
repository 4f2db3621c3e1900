"""Mocker benchmarks (issue 3).

1. CPU cost of one scheduler pass with 256 running sequences (decode passes),
   target <= 1 ms on the 2-core dev machine.
2. Tokens/s that one decode worker (its own process, speedup 0) streams over
   gRPC to one local client running 64 concurrent requests.
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

from commutator.engines.base import EngineRequest, StopParams
from commutator.engines.mocker import MockerConfig, Scheduler


def bench_pass(running: int = 256, passes: int = 2000) -> None:
    s = Scheduler(MockerConfig(speedup_ratio=0.0), vocab_size=32000, context_length=32768, engine_salt=1)
    for i in range(running):
        s.add(
            EngineRequest(
                f"r{i}",
                [(i * 131 + k) % 32000 for k in range(256)],
                stop=StopParams(max_tokens=100_000, ignore_eos=True),
            )
        )
    while len(s.running) < running or s.waiting or any(q.num_computed < q.prefill_end for q in s.running):
        s.step()
    for _ in range(200):  # warm-up
        s.step()
    samples = []
    for _ in range(passes):
        t0 = time.perf_counter()
        r = s.step()
        samples.append((time.perf_counter() - t0) * 1e6)
        assert r.decode_seqs == running
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]
    print(
        f"scheduler pass, {running} running sequences (decode)   p50 {p50:7.1f} us   p99 {p99:7.1f} us"
        f"   mean {statistics.fmean(samples):7.1f} us   [target <= 1000 us]"
    )


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def bench_stream(concurrency: int, duration_s: float, max_tokens: int) -> None:
    from commutator.common.discovery import Discovery, EtcdBackend
    from commutator.common.grpc import EndpointClient
    from commutator.common.local_servers import EtcdProcess, NatsProcess
    from commutator.v1 import common_pb2, worker_pb2_grpc

    with EtcdProcess() as etcd, NatsProcess() as nats:
        env = dict(
            os.environ,
            COMMUTATOR_ETCD_ENDPOINTS=etcd.endpoint,
            COMMUTATOR_NATS_URL=nats.url,
            COMMUTATOR_NAMESPACE="bench",
            COMMUTATOR_LOG="warning",
        )
        prof = os.environ.get("BENCH_PROFILE_WORKER")  # a path: cProfile the worker into it
        cmd = [sys.executable, *(["-m", "cProfile", "-o", prof] if prof else []), "-m", "commutator.decode"]
        worker = subprocess.Popen([*cmd, "--speedup-ratio", "0"], env=env)
        d = Discovery(EtcdBackend([etcd.endpoint]))
        await d.start()
        client = EndpointClient(d, "bench", "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=600)
        await client.start()
        await client.wait_for_instances(1, 60)
        tokens = 0
        messages = 0
        requests = 0
        stop_at = 0.0

        async def one_client(c: int) -> None:
            nonlocal tokens, messages, requests
            i = 0
            while time.perf_counter() < stop_at:
                req = common_pb2.GenerateRequest(
                    request_id=f"c{c}-{i}",
                    token_ids=[(c * 97 + i * 13 + k) % 4000 for k in range(256)],
                    stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
                )
                async for m in client.stream("Generate", req):
                    tokens += len(m.token_ids)
                    messages += 1
                requests += 1
                i += 1

        stop_at = time.perf_counter() + 2.0  # warm-up
        await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        tokens = messages = requests = 0
        w0, c0 = _cpu_seconds(worker.pid), time.process_time()
        t0 = time.perf_counter()
        stop_at = t0 + duration_s
        await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
        w1, c1 = _cpu_seconds(worker.pid), time.process_time()
        print(f"worker -> 1 client, speedup 0, concurrency {concurrency}, {max_tokens} tokens/request, {wall:.1f} s:")
        print(
            f"  {tokens / wall:10,.0f} tokens/s   {messages / wall:9,.0f} messages/s   "
            f"{tokens / max(messages, 1):.2f} tokens/message   {requests / wall:7,.1f} requests/s"
        )
        print(f"  worker CPU {100 * (w1 - w0) / wall:5.1f}%   client CPU {100 * (c1 - c0) / wall:5.1f}%   (2 cores)")
        await client.close()
        await d.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args()
    bench_pass()
    if not args.skip_stream:
        import uvloop

        uvloop.run(bench_stream(64, args.duration, 256))


if __name__ == "__main__":
    main()
