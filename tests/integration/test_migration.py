"""Request migration (issue 14): a worker SIGKILLed while it streams tokens, on real etcd, NATS and
worker processes. Every request it was serving goes on from another worker; the client sees one
stream with exactly the tokens an uninterrupted run gives (the mocker's output is a function of the
seed and the position in the sequence, as a model's is), the original prompt's usage, and one end.

Both paths: the router service (gRPC ``Router.Generate``, a generator its handler iterates) and a
frontend with its embedded router (HTTP streaming, where the worker stream pushes to the response).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal

import aiohttp
import pytest
from commutator.common.errors import Unavailable
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import free_port
from commutator.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.integration

MODEL = "commutator/tiny-llama"
N_REQ = 9
MAX_TOKENS = 120
# Slow enough that every request is mid-stream when the victim dies (about 2-4 s per request).
WORKER_ARGS = ("--speedup-ratio", "0.5", "--block-size", "16")


def prompt(k: int, n: int = 64) -> list[int]:
    return [10 + (k * 7919 + i * 31) % 4000 for i in range(n)]


async def until(pred, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def running(workers: EndpointClient) -> dict[int, int]:
    out = {}
    for wid in list(workers.instances):
        resp = await workers.call("Stats", worker_pb2.StatsRequest(), instance_id=wid)
        out[wid] = sum(r.running_requests for r in resp.ranks)
    return out


async def kill_busiest(procs: dict[int, object], workers: EndpointClient) -> tuple[int, int]:
    """SIGKILL the worker running the most requests; its id and how many it ran."""
    now = await running(workers)
    victim = max(now, key=lambda w: now[w])
    assert now[victim] >= 2, now
    proc = procs[victim]
    proc.signal(signal.SIGKILL)  # type: ignore[attr-defined]
    await asyncio.to_thread(proc.proc.wait)  # type: ignore[attr-defined]
    return victim, now[victim]


async def start_workers(spawn, workers: EndpointClient, n: int) -> dict[int, object]:  # type: ignore[no-untyped-def]
    procs = []
    for _ in range(n):
        procs.append(spawn("commutator.decode", *WORKER_ARGS))
    await workers.wait_for_instances(n, 60)
    by_id = {}
    for p in procs:
        await until(lambda p=p: asyncio.sleep(0, result="worker ready" in p.log()), 60)
        m = re.search(r"worker ready .*?instance_id=([0-9a-f]+)", p.log())
        assert m is not None, p.log()[-2000:]
        by_id[int(m.group(1), 16)] = p
    assert set(by_id) == set(workers.instances), (by_id, workers.instances)
    return by_id


def grpc_request(rid: str, k: int) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=rid,
        model=MODEL,
        token_ids=prompt(k),
        sampling=common_pb2.SamplingOptions(seed=1000 + k),
        stop=common_pb2.StopConditions(max_tokens=MAX_TOKENS, ignore_eos=True),
    )


async def via_router(
    routers: EndpointClient, rid: str, k: int, first: asyncio.Event
) -> list[common_pb2.GenerateResponse]:
    msgs = []
    async for m in routers.stream("Generate", grpc_request(rid, k)):  # type: ignore[arg-type]
        msgs.append(m)
        first.set()
    return msgs


@pytest.mark.parametrize("stream", ["tcp", "mux", "unary"])  # how the router reaches its workers
async def test_the_router_service_migrates_every_request_of_a_killed_worker(spawn, clients, stream: str) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    procs = await start_workers(spawn, workers, 3)
    router = spawn("commutator.router", "--worker-stream", stream)
    await routers.wait_for_instances(1, 60)
    await until(lambda: asyncio.sleep(0, result="router ready" in router.log()), 60)

    # The uninterrupted run of every request: its tokens are the reference.
    reference = await asyncio.gather(*(via_router(routers, f"ref{k}", k, asyncio.Event()) for k in range(N_REQ)))
    firsts = [asyncio.Event() for _ in range(N_REQ)]
    runs = [asyncio.create_task(via_router(routers, f"run{k}", k, firsts[k])) for k in range(N_REQ)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
    victim, on_victim = await kill_busiest(procs, workers)
    results = await asyncio.wait_for(asyncio.gather(*runs), 120)

    for k, (ref, got) in enumerate(zip(reference, results, strict=True)):
        want = [t for m in ref for t in m.token_ids]
        assert len(want) == MAX_TOKENS
        assert [t for m in got for t in m.token_ids] == want, f"request {k}: tokens lost, repeated or different"
        assert [m.prompt_tokens for m in got if m.prompt_tokens] == [len(prompt(k))], f"request {k}: usage"
        ends = [m.finish_reason for m in got if m.finish_reason]
        assert ends == [common_pb2.FINISH_REASON_LENGTH], f"request {k}: {ends}"
    log = router.log()
    assert log.count("migrating it to another worker") == on_victim, log[-3000:]
    assert f"worker {victim:x} failed after" in log


async def test_migration_limit_zero_fails_the_requests_of_a_killed_worker_with_unavailable(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    procs = await start_workers(spawn, workers, 2)
    spawn("commutator.router", "--migration-limit", "0")
    await routers.wait_for_instances(1, 60)
    firsts = [asyncio.Event() for _ in range(6)]
    runs = [asyncio.create_task(via_router(routers, f"r{k}", k, firsts[k])) for k in range(6)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
    _, on_victim = await kill_busiest(procs, workers)
    results = await asyncio.gather(*runs, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == on_victim, results
    for exc in failed:
        # The router's UNAVAILABLE, typed by the client, naming the worker's failure.
        assert isinstance(exc, Unavailable) and "exited or was killed" in str(exc), exc
    for r in results:
        if not isinstance(r, BaseException):
            assert sum(len(m.token_ids) for m in r) == MAX_TOKENS


async def sse(http: aiohttp.ClientSession, base: str, k: int, first: asyncio.Event) -> tuple[str, dict, list[str]]:  # type: ignore[type-arg]
    """A streamed completion: its text, its usage, and its finish reasons."""
    body = {
        "model": MODEL,
        "prompt": prompt(k),
        "max_tokens": MAX_TOKENS,
        "seed": 1000 + k,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    text, usage, ends = [], {}, []
    async with http.post(f"{base}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk.get("choices", []):
                text.append(c["text"])
                if c.get("finish_reason"):
                    ends.append(c["finish_reason"])
                first.set()
            if chunk.get("usage"):
                usage = chunk["usage"]
    return "".join(text), usage, ends


async def serves(http: aiohttp.ClientSession, base: str, frontend) -> bool:  # type: ignore[no-untyped-def]
    """The frontend lists a model (it knows a worker)."""
    assert frontend.proc.poll() is None, frontend.log()[-3000:]
    try:
        async with http.get(f"{base}/v1/models") as r:
            return r.status == 200 and bool((await r.json())["data"])
    except aiohttp.ClientError:
        return False


async def test_the_frontends_embedded_router_migrates_pushed_streams(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    _, workers = clients
    procs = await start_workers(spawn, workers, 3)
    port, metrics_port = free_port(), free_port()
    frontend = spawn(
        "commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1", "--metrics-port", str(metrics_port)
    )
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await until(lambda: serves(http, base, frontend), 60)
        reference = await asyncio.gather(*(sse(http, base, k, asyncio.Event()) for k in range(N_REQ)))
        firsts = [asyncio.Event() for _ in range(N_REQ)]
        runs = [asyncio.create_task(sse(http, base, k, firsts[k])) for k in range(N_REQ)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
        _, on_victim = await kill_busiest(procs, workers)
        results = await asyncio.wait_for(asyncio.gather(*runs), 120)
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            metrics = await r.text()

    for k, ((ref_text, ref_usage, _), (text, usage, ends)) in enumerate(zip(reference, results, strict=True)):
        assert ref_usage["completion_tokens"] == MAX_TOKENS
        assert text == ref_text, f"request {k}: text differs from the uninterrupted run"
        # The same counts (the cached share differs: the reference run warmed the caches).
        usage.pop("prompt_tokens_details")
        ref_usage.pop("prompt_tokens_details")
        assert usage == ref_usage, f"request {k}: usage {usage} != {ref_usage}"
        assert ends == ["length"], f"request {k}: {ends}"
    migrated = re.search(r'^commutator_router_migrations_total\{outcome="migrated"\} (\S+)', metrics, re.M)
    assert migrated is not None and float(migrated.group(1)) == on_victim, metrics


async def test_a_frontend_migrates_its_streams_when_its_router_service_dies(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    await start_workers(spawn, workers, 2)
    router = spawn("commutator.router")
    await routers.wait_for_instances(1, 60)
    port, metrics_port = free_port(), free_port()
    frontend = spawn(
        "commutator.frontend",
        *("--http-port", str(port), "--http-host", "127.0.0.1", "--metrics-port", str(metrics_port)),
        *("--router-endpoint", "router"),
    )
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await until(lambda: serves(http, base, frontend), 60)
        reference = await asyncio.gather(*(sse(http, base, k, asyncio.Event()) for k in range(6)))
        firsts = [asyncio.Event() for _ in range(6)]
        runs = [asyncio.create_task(sse(http, base, k, firsts[k])) for k in range(6)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
        router.signal(signal.SIGKILL)  # every stream in flight goes through it
        await asyncio.to_thread(router.proc.wait)
        await asyncio.sleep(1.0)
        spawn("commutator.router")  # back after a while: the streams wait for it (--router-wait-s)
        results = await asyncio.wait_for(asyncio.gather(*runs), 120)
        # Requests after the restart are served by the new router service, exactly.
        after = await asyncio.gather(*(sse(http, base, k, asyncio.Event()) for k in range(6, 9)))
        again = await asyncio.gather(*(sse(http, base, k, asyncio.Event()) for k in range(6, 9)))
        assert [a[0] for a in after] == [a[0] for a in again] and all(a[2] == ["length"] for a in after)
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            metrics = await r.text()

    for k, ((ref_text, ref_usage, _), (text, usage, ends)) in enumerate(zip(reference, results, strict=True)):
        assert text == ref_text, f"request {k}: text differs from the uninterrupted run"
        usage.pop("prompt_tokens_details")
        ref_usage.pop("prompt_tokens_details")
        assert usage == ref_usage and ends == ["length"], (k, usage, ends)
    migrated = re.search(r'^commutator_frontend_router_migrations_total\{outcome="migrated"\} (\S+)', metrics, re.M)
    assert migrated is not None and float(migrated.group(1)) == 6, metrics
