"""The multiplexed worker stream (Worker.GenerateMany, docs/worker-stream.md): mocker workers as
separate processes on real etcd and NATS, the client side (WorkerMux, and the router and frontend
that use it) in this process or as processes of their own; every check over both transports (plain
TCP and gRPC GenerateMany)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import urllib.request
from typing import Any

import pytest
from commutator.common import metrics
from commutator.common.errors import Cancelled, Unavailable
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import free_port
from commutator.engines.mocker.tokens import token_at
from commutator.router.mux import WorkerMux
from commutator.router.tcp_call import TcpCall, open_worker_stream
from commutator.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.integration

VOCAB = 4096
BS = 16


@pytest.fixture
def workers(decode_workers: EndpointClient) -> EndpointClient:
    return decode_workers


@pytest.fixture(params=["tcp", "mux"])
def transport(request: pytest.FixtureRequest) -> str:
    """How the stream travels: plain TCP (the worker's advertised stream port) or gRPC GenerateMany."""
    return str(request.param)


def start_worker(spawn, *extra: str):  # type: ignore[no-untyped-def]
    return spawn(
        "commutator.decode", "--vocab-size", str(VOCAB), "--block-size", str(BS), "--num-blocks", "8192", *extra
    )


class Opener:
    """Opens the worker's stream over ``transport`` (as the router does) and counts how often."""

    def __init__(self, workers: EndpointClient, worker_id: int, transport: str) -> None:
        self.workers, self.worker_id, self.transport, self.opened = workers, worker_id, transport, 0

    def __call__(self) -> Any:
        self.opened += 1
        opened = open_worker_stream(self.workers, self.worker_id, self.transport)
        assert isinstance(opened[0], TcpCall) == (self.transport == "tcp")  # the transport under test
        return opened


def request(rid: str, n_prompt: int, max_tokens: int, seed: int) -> common_pb2.GenerateRequest:
    rng = random.Random(seed)
    return common_pb2.GenerateRequest(
        request_id=rid,
        token_ids=[rng.randrange(VOCAB) for _ in range(n_prompt)],
        sampling=common_pb2.SamplingOptions(seed=seed),
        stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


def expected(seed: int, n_prompt: int, n: int) -> list[int]:
    """The mocker's tokens: a function of the seed and the position in the whole sequence."""
    return [token_at(seed, n_prompt + i, VOCAB) for i in range(n)]


async def stats(workers: EndpointClient, worker_id: int) -> common_pb2.WorkerStats:
    return (await workers.call("Stats", worker_pb2.StatsRequest(), instance_id=worker_id)).ranks[0]


async def until(pred, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await pred():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout_s} s")
        await asyncio.sleep(0.05)


async def idle(workers: EndpointClient, worker_id: int, timeout_s: float = 20.0) -> None:
    """Until the worker runs nothing and holds no KV blocks for running requests."""

    async def check() -> bool:
        s = await stats(workers, worker_id)
        return s.running_requests == 0 and s.waiting_requests == 0 and s.kv_blocks_used == 0

    await until(check, timeout_s)


async def test_200_requests_with_random_cancels_over_one_stream(spawn, workers, transport) -> None:  # type: ignore[no-untyped-def]
    start_worker(spawn, "--speedup-ratio", "10")
    await workers.wait_for_instances(1, timeout_s=60)
    [wid] = workers.instances
    opener = Opener(workers, wid, transport)
    mux = WorkerMux(opener)
    rng = random.Random(5)

    async def one(k: int) -> tuple[str, Any]:
        max_tokens, n_prompt = rng.randrange(5, 60), rng.randrange(20, 400)
        cancel_after = rng.randrange(0, 8) if k % 3 == 0 else None  # a third are cancelled midway
        req = mux.open(request(f"r{k}", n_prompt, max_tokens, seed=1000 + k), timeout_s=120)
        got: list[int] = []
        msgs = []
        try:
            if cancel_after == 0:
                return "cancelled", None
            async for m in req:
                msgs.append(m)
                got.extend(m.token_ids)
                if cancel_after is not None and len(msgs) >= cancel_after:
                    return "cancelled", None
            return "done", (k, n_prompt, max_tokens, got, msgs)
        finally:
            await req.aclose()

    results = await asyncio.gather(*(one(k) for k in range(200)))
    done = [r for kind, r in results if kind == "done"]
    assert len(done) >= 120
    for k, n_prompt, max_tokens, got, msgs in done:
        assert got == expected(1000 + k, n_prompt, max_tokens), f"request {k}: wrong tokens or order"
        assert msgs[0].prompt_tokens == n_prompt, f"request {k}: wrong usage"
        assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    await idle(workers, wid)  # every cancelled request was aborted on the worker, its blocks freed
    assert opener.opened == 1  # all of it over one stream
    assert mux.open_requests == 0
    await mux.close()


async def test_a_client_that_stops_reading_is_cancelled_past_its_buffer_and_delays_no_one(
    spawn, workers, transport
) -> None:  # type: ignore[no-untyped-def]
    # Fast, but one engine pass (one frame, one update per request) at a time: the stalled request's
    # updates pile up far past the bound long before its 50,000 tokens are done.
    start_worker(spawn, "--speedup-ratio", "100", "--context-length", "100000")
    await workers.wait_for_instances(1, timeout_s=60)
    [wid] = workers.instances
    mux = WorkerMux(Opener(workers, wid, transport), buffer=64)
    before = metrics.WORKER_STREAM_OVERFLOWS._value.get()
    stalled = mux.open(request("stalled", 50, 50_000, seed=1), timeout_s=120)  # never read below

    async def reader(k: int) -> list[int]:
        req = mux.open(request(f"ok{k}", 50, 300, seed=10 + k), timeout_s=120)
        try:
            return [t async for m in req for t in m.token_ids]
        finally:
            await req.aclose()

    got = await asyncio.wait_for(asyncio.gather(*(reader(k) for k in range(20))), 60)
    assert got == [expected(10 + k, 50, 300) for k in range(20)]
    # The stalled request is cancelled once 64 updates wait unread; reading it then says so.

    async def overflowed() -> bool:
        return metrics.WORKER_STREAM_OVERFLOWS._value.get() == before + 1

    await until(overflowed, 30)
    with pytest.raises(Cancelled, match="64 updates were waiting unread"):
        async for _ in stalled:
            pass
    assert metrics.WORKER_STREAM_OVERFLOWS._value.get() == before + 1
    await idle(workers, wid)
    await mux.close()


async def test_a_killed_worker_ends_exactly_its_requests(spawn, workers, transport) -> None:  # type: ignore[no-untyped-def]
    doomed_proc = start_worker(spawn, "--speedup-ratio", "1")
    await workers.wait_for_instances(1, timeout_s=60)
    [doomed] = workers.instances
    start_worker(spawn, "--speedup-ratio", "1")
    await workers.wait_for_instances(2, timeout_s=60)
    [survivor] = [w for w in workers.instances if w != doomed]
    muxes = {w: WorkerMux(Opener(workers, w, transport)) for w in (doomed, survivor)}

    async def run(w: int, k: int) -> Any:
        req = muxes[w].open(request(f"{w:x}-{k}", 100, 60, seed=k), timeout_s=120)
        got: list[int] = []
        try:
            async for m in req:
                got.extend(m.token_ids)
            return got
        except Unavailable as exc:
            return exc
        finally:
            await req.aclose()

    tasks = [asyncio.ensure_future(run(w, k)) for w in (doomed, survivor) for k in range(10)]
    await until(lambda: _running(workers, doomed, 10), 30)
    doomed_proc.signal(signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert all(isinstance(r, Unavailable) for r in results[:10])  # every request on the dead worker
    if transport == "tcp":  # the kernel closed its connection: a clean end, or a reset, never "draining"
        assert all("exited or was killed" in str(r) or "connection lost" in str(r) for r in results[:10])
    assert results[10:] == [expected(k, 100, 60) for k in range(10)]  # and nothing else
    for m in muxes.values():
        await m.close()


async def _running(workers: EndpointClient, w: int, n: int) -> bool:
    return (await stats(workers, w)).running_requests >= n


async def test_a_frontend_that_goes_away_frees_all_its_requests_on_the_worker(spawn, workers, transport) -> None:  # type: ignore[no-untyped-def]
    start_worker(spawn, "--speedup-ratio", "1")
    await workers.wait_for_instances(1, timeout_s=60)
    [wid] = workers.instances
    port = free_port()
    frontend = spawn(
        "commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1", "--worker-stream", transport
    )
    base = f"http://127.0.0.1:{port}/v1"

    def models() -> list[str]:
        with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]

    async def listed() -> bool:
        try:
            return bool(await asyncio.to_thread(models))
        except OSError:
            return False

    await until(listed, 60)
    body = json.dumps(
        {"model": "commutator/tiny-llama", "prompt": [1, 2, 3], "max_tokens": 5000, "ignore_eos": True, "stream": True}
    ).encode()

    def open_stream() -> Any:
        req = urllib.request.Request(f"{base}/completions", data=body, headers={"Content-Type": "application/json"})
        r = urllib.request.urlopen(req, timeout=30)
        r.readline()  # the first event: the request runs on the worker now
        return r

    streams = [await asyncio.to_thread(open_stream) for _ in range(12)]
    assert (await stats(workers, wid)).running_requests == 12
    frontend.signal(signal.SIGKILL)  # its process (and its one stream to the worker) is gone
    await idle(workers, wid)
    for r in streams:
        r.close()
