"""Both ways a worker runs a multiplexed request, over a real loopback server: the engine's
push path (the mocker's ``start_request``: no task per request) and the generic one (a task per
request reading ``generate``, what every other engine gets; here the same mocker with its push
path hidden), each over both transports (plain TCP and gRPC ``GenerateMany``). The same checks
hold for all four."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from commutator.common.errors import InvalidRequest
from commutator.common.prompt import to_le_bytes
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.engine import MockerEngine
from commutator.engines.mocker.tokens import token_at
from commutator.router.mux import WorkerMux
from commutator.router.tcp_call import TcpCall
from commutator.v1 import common_pb2, worker_pb2_grpc
from commutator.worker.servicer import WorkerServicer
from commutator.worker.tcp_stream import StreamServer

pytestmark = pytest.mark.integration

VOCAB = 1000


class TaskPathOnly:
    """The mocker seen as an engine without ``start_request`` (everything else delegated)."""

    def __init__(self, inner: MockerEngine) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "start_request":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.fixture(params=["push", "task"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["tcp", "mux"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def served(
    path: str, transport: str
) -> AsyncIterator[tuple[MockerEngine, WorkerMux, WorkerServicer, StreamServer]]:
    engine = MockerEngine(MockerConfig(speedup_ratio=20.0, block_size=16, num_blocks=4096), vocab_size=VOCAB)
    await engine.start()
    servicer = WorkerServicer(engine if path == "push" else TaskPathOnly(engine), "w", lambda: 1, 0.002)  # type: ignore[arg-type]
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerStub(channel)
    tcp = StreamServer(servicer, "127.0.0.1", 0)
    await tcp.start()
    if transport == "tcp":
        where = f"worker stream at port {tcp.port}"
        mux = WorkerMux(lambda: (TcpCall(f"127.0.0.1:{tcp.port}", where), lambda: None, where))
    else:
        mux = WorkerMux(lambda: (stub.GenerateMany(), lambda: None, f"worker at port {port}"))
    yield engine, mux, servicer, tcp  # the TCP server runs beside gRPC whichever transport the mux uses
    await mux.close()
    await tcp.close()
    await channel.close()
    await server.stop(None)
    await engine.shutdown()


def request(
    rid: str, n_prompt: int, max_tokens: int, seed: int, bad: bool = False, packed: bool = False
) -> common_pb2.GenerateRequest:
    """``packed``: the prompt in ``token_bytes`` (as the frontend sends it), else in ``token_ids``."""
    rng = random.Random(seed)
    tokens = [rng.randrange(VOCAB) for _ in range(n_prompt)]
    if bad:
        tokens[3] = VOCAB + 5  # outside the vocabulary: the engine refuses it
    req = common_pb2.GenerateRequest(
        request_id=rid,
        sampling=common_pb2.SamplingOptions(seed=seed),
        stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )
    if packed:
        req.token_bytes = to_le_bytes(tokens)
    else:
        req.token_ids.extend(tokens)
    return req


async def test_exact_tokens_usage_cancels_and_a_bad_request_on_both_paths(served) -> None:  # type: ignore[no-untyped-def]
    engine, mux, servicer, _ = served
    rng = random.Random(7)

    async def one(k: int) -> tuple[str, Any]:
        max_tokens, n_prompt = rng.randrange(3, 40), rng.randrange(5, 200)
        cancel_after = rng.randrange(1, 4) if k % 4 == 0 else None
        # Odd ones carry their prompt in token_bytes (the bad one among them), even ones in token_ids.
        req = mux.open(
            request(f"r{k}", n_prompt, max_tokens, seed=500 + k, bad=k == 13, packed=k % 2 == 1), timeout_s=60
        )
        msgs = []
        try:
            async for m in req:
                msgs.append(m)
                if cancel_after is not None and len(msgs) >= cancel_after:
                    return "cancelled", None
            return "done", (k, n_prompt, max_tokens, msgs)
        except InvalidRequest as exc:
            return "invalid", (k, str(exc))
        finally:
            await req.aclose()

    results = await asyncio.gather(*(one(k) for k in range(60)))
    [(k, message)] = [r for kind, r in results if kind == "invalid"]  # that one only
    assert k == 13 and message.endswith("token id 1005 is outside the vocabulary [0, 1000)")
    done = [r for kind, r in results if kind == "done"]
    assert len(done) >= 40
    for k, n_prompt, max_tokens, msgs in done:
        assert [t for m in msgs for t in m.token_ids] == [
            token_at(500 + k, n_prompt + i, VOCAB) for i in range(max_tokens)
        ]
        assert msgs[0].prompt_tokens == n_prompt
        assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    # Cancelled requests were aborted on the engine and their blocks freed; nothing is in flight.
    assert await _idle(engine, servicer) == (0, 0, 0)
    assert engine.stats()[0].waiting_requests == 0


async def test_closing_the_stream_aborts_every_request_on_both_paths(served) -> None:  # type: ignore[no-untyped-def]
    engine, mux, servicer, _ = served
    reqs = [mux.open(request(f"long{k}", 50, 100_000, seed=k), timeout_s=60) for k in range(10)]
    for r in reqs:
        await r.__anext__()  # each is running on the engine
    assert engine.stats()[0].running_requests == 10
    [session] = servicer._sessions
    on_push = len(session._pushed), len(session._tasks)
    assert on_push == ((10, 0) if isinstance(servicer.engine, MockerEngine) else (0, 10))  # the path under test
    await mux.close()  # the stream ends: the worker aborts all of them
    assert await _idle(engine, servicer) == (0, 0, 0)


async def _idle(engine: MockerEngine, servicer: WorkerServicer) -> tuple[int, int, int]:
    for _ in range(200):
        s = engine.stats()[0]
        if servicer.in_flight == 0 and s.running_requests == 0 and s.kv_blocks_used == 0:
            break
        await asyncio.sleep(0.02)
    s = engine.stats()[0]
    return servicer.in_flight, s.running_requests, s.kv_blocks_used


async def test_push_hands_each_response_to_the_sink_and_an_early_stop_cancels(served) -> None:  # type: ignore[no-untyped-def]
    engine, mux, servicer, _ = served
    req = mux.open(request("whole", 30, 50, seed=1), timeout_s=60)
    first = await req.__anext__()
    got = list(first.token_ids)
    finishes = []

    def sink(resp: common_pb2.GenerateResponse) -> bool:
        got.extend(resp.token_ids)
        finishes.append(resp.finish_reason)
        return False

    await req.push(sink)  # returns once the request has finished
    assert got == [token_at(1, 30 + i, VOCAB) for i in range(50)]
    assert finishes[-1] == common_pb2.FINISH_REASON_LENGTH

    stopped = mux.open(request("stopped", 30, 100_000, seed=2), timeout_s=60)
    await stopped.__anext__()
    calls = 0

    def enough(resp: common_pb2.GenerateResponse) -> bool:
        nonlocal calls
        calls += 1
        return calls == 3  # a stop string, say: end it here

    await stopped.push(enough)
    assert calls == 3
    assert await _idle(engine, servicer) == (0, 0, 0)  # cancelled on the worker, its blocks freed


async def test_a_sink_that_fails_cancels_its_request_and_its_error_comes_back(served) -> None:  # type: ignore[no-untyped-def]
    from commutator.router.mux import SinkFailed

    engine, mux, servicer, _ = served
    others = [mux.open(request(f"other{k}", 30, 40, seed=10 + k), timeout_s=60) for k in range(5)]
    req = mux.open(request("doomed", 30, 100_000, seed=3), timeout_s=60)
    await req.__anext__()

    def broken(resp: common_pb2.GenerateResponse) -> bool:
        raise ConnectionResetError("the client went away")

    with pytest.raises(SinkFailed) as caught:
        await req.push(broken)
    assert isinstance(caught.value.original, ConnectionResetError)
    # The stream's reader went on: the other requests on it complete.
    for k, other in enumerate(others):
        assert [t async for m in other for t in m.token_ids] == [token_at(10 + k, 30 + i, VOCAB) for i in range(40)]
    assert await _idle(engine, servicer) == (0, 0, 0)


async def test_a_broken_tcp_connection_is_closed_and_the_worker_serves_on(served, caplog) -> None:  # type: ignore[no-untyped-def]
    import struct

    from commutator.common.stream_frames import MAX_FRAME_BYTES, PREAMBLE

    engine, mux, servicer, tcp = served
    port = tcp.port
    running = [mux.open(request(f"run{k}", 30, 200, seed=20 + k), timeout_s=60) for k in range(5)]
    first = list((await running[0].__anext__()).token_ids)

    async def closed_after(data: bytes) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 5) == b""  # the worker closed it, sending nothing
        finally:
            writer.close()

    caplog.set_level("WARNING", logger="commutator.worker.tcp_stream")
    assert await closed_after(b"HTTP/1.1\n")
    assert await closed_after(PREAMBLE + struct.pack("<I", MAX_FRAME_BYTES + 1))
    assert await closed_after(PREAMBLE + struct.pack("<I", 3) + b"\xff\xff\xff")  # does not parse
    messages = [r.getMessage() for r in caplog.records]
    assert any("bad preamble" in m for m in messages)
    assert any("over the 67108864-byte limit" in m for m in messages)
    assert any("does not parse" in m for m in messages)
    # The requests already on the worker's streams go on, and new ones are served.
    for k, r in enumerate(running):
        got = (first if k == 0 else []) + [t async for m in r for t in m.token_ids]
        assert got == [token_at(20 + k, 30 + i, VOCAB) for i in range(200)]
    fresh = mux.open(request("fresh", 30, 20, seed=9), timeout_s=60)
    assert [t async for m in fresh for t in m.token_ids] == [token_at(9, 30 + i, VOCAB) for i in range(20)]
    assert await _idle(engine, servicer) == (0, 0, 0)


async def test_a_draining_worker_refuses_new_requests_finishes_running_ones_then_ends_the_stream(
    served, transport
) -> None:  # type: ignore[no-untyped-def]
    from commutator.common.errors import Unavailable

    engine, mux, servicer, tcp = served
    running = mux.open(request("running", 30, 100, seed=4), timeout_s=60)
    got = list((await running.__anext__()).token_ids)
    servicer.start_drain()
    tcp_drain = None
    if transport == "tcp":
        tcp_drain = asyncio.ensure_future(tcp.drain(10.0))
    refused = mux.open(request("refused", 30, 10, seed=5), timeout_s=60)
    with pytest.raises(Unavailable, match="draining"):
        await refused.__anext__()
    got += [t async for m in running for t in m.token_ids]
    assert got == [token_at(4, 30 + i, VOCAB) for i in range(100)]
    for _ in range(100):  # the worker ends the stream once its requests are done
        if mux._call is None:
            break
        await asyncio.sleep(0.02)
    assert mux._call is None and not servicer._sessions
    if tcp_drain is not None:
        await asyncio.wait_for(tcp_drain, 5)  # every session ended: the drain returns before its grace
        late = mux.open(request("late", 30, 10, seed=6), timeout_s=60)  # no longer accepting
        with pytest.raises(Unavailable, match="cannot connect"):
            await late.__anext__()
    assert await _idle(engine, servicer) == (0, 0, 0)
