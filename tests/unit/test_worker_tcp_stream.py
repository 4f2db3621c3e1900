"""The TCP worker stream hands each client frame to its session from ``data_received``, in the same
turn of the event loop as the bytes: a start reaches the engine (and a cancel aborts it) with no task
in between. Real mocker engine and servicer; the transport is a recording stand-in."""

from __future__ import annotations

import asyncio

import pytest
from commutator.common.stream_frames import PREAMBLE, pack
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.engine import MockerEngine
from commutator.v1 import common_pb2, worker_pb2
from commutator.worker.servicer import WorkerServicer
from commutator.worker.tcp_stream import _Connection

pytestmark = pytest.mark.unit


class Transport(asyncio.Transport):
    """Records what the worker writes; closing it tells the protocol, as a real one does."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            assert self.protocol is not None
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default


def start_frame(tag: int) -> worker_pb2.MuxClientFrame:
    f = worker_pb2.MuxClientFrame()
    s = f.starts.add()
    s.tag = tag
    s.request.CopyFrom(
        common_pb2.GenerateRequest(
            request_id=f"r{tag}",
            token_ids=[tag, 2, 3, 4, 5],
            stop=common_pb2.StopConditions(max_tokens=10_000, ignore_eos=True),
        )
    )
    return f


async def test_starts_and_cancels_reach_the_engine_in_the_turn_their_bytes_arrive() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=1.0, block_size=16, num_blocks=1024), vocab_size=1000)
    await engine.start()
    servicer = WorkerServicer(engine, "w", lambda: 1, 0.0)
    registry: set[_Connection] = set()
    conn = _Connection(servicer, None, registry)
    transport = Transport()
    transport.protocol = conn
    conn.connection_made(transport)
    try:
        data = PREAMBLE + pack(start_frame(1)) + pack(start_frame(2))
        cut = len(PREAMBLE) + 7  # inside the first frame
        conn.data_received(data[:cut])
        assert servicer.in_flight == 0  # half a frame starts nothing
        conn.data_received(data[cut:])
        assert servicer.in_flight == 2  # both started before this coroutine gave the loop a turn
        cancel = worker_pb2.MuxClientFrame(cancels=[1])
        conn.data_received(pack(cancel))
        assert servicer.in_flight == 1  # aborted at once, its blocks freed by the engine
        # The frames leave over the transport: the second request's first tokens.
        for _ in range(200):
            if transport.written:
                break
            await asyncio.sleep(0.01)
        assert transport.written
        # The client goes away: the session ends, aborting what is left, and the connection is done.
        transport.close()
        await asyncio.wait_for(conn.closed, 5)
        assert servicer.in_flight == 0 and registry == set()
    finally:
        await engine.shutdown()


async def test_a_bad_preamble_closes_the_connection_without_a_session() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=0.0, block_size=16, num_blocks=64), vocab_size=1000)
    servicer = WorkerServicer(engine, "w", lambda: 1, 0.0)
    registry: set[_Connection] = set()
    conn = _Connection(servicer, None, registry)
    transport = Transport()
    transport.protocol = conn
    conn.connection_made(transport)
    conn.data_received(b"GET / HTTP/1.1\r\n")
    assert transport.closing and conn.session is None
    await asyncio.wait_for(conn.closed, 5)
    assert registry == set()
