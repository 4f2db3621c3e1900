"""WorkerMux's writes, against a hand-written fake of the call it drives (TcpCall's interface):
on a connection that can take it, a start leaves in the caller's turn of the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from commutator.router.mux import WorkerMux
from commutator.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.unit


class FakeCall:
    """write/read/cancel as TcpCall has them, plus try_write answering ``ready``."""

    def __init__(self) -> None:
        self.ready = True
        self.now: list[worker_pb2.MuxClientFrame] = []  # written by try_write, in the caller's turn
        self.later: list[worker_pb2.MuxClientFrame] = []  # written by write(), from a task
        self.order: list[str] = []  # request ids of the starts, in the order they went out
        self.block = asyncio.Event()
        self.block.set()
        self._eof: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def try_write(self, frame: worker_pb2.MuxClientFrame) -> bool:
        if not self.ready:
            return False
        self.now.append(worker_pb2.MuxClientFrame.FromString(frame.SerializeToString()))
        self.order += [st.request.request_id for st in frame.starts]
        return True

    async def write(self, frame: worker_pb2.MuxClientFrame) -> None:
        await self.block.wait()
        self.later.append(worker_pb2.MuxClientFrame.FromString(frame.SerializeToString()))
        self.order += [st.request.request_id for st in frame.starts]

    async def read(self) -> Any:
        await self._eof
        return grpc.aio.EOF

    def cancel(self) -> bool:
        if not self._eof.done():
            self._eof.set_result(None)
        return True


def req(rid: str) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(request_id=rid, token_ids=[1, 2, 3])


async def test_a_start_is_written_before_open_returns_when_the_connection_can_take_it() -> None:
    call = FakeCall()
    mux = WorkerMux(lambda: (call, lambda: None, "fake"))
    r = mux.open(req("a"), 0)
    assert [s.request.request_id for f in call.now for s in f.starts] == ["a"]  # no await in between
    await r.aclose()  # the cancel leaves at once too
    assert [list(f.cancels) for f in call.now] == [[], [r.tag]]
    assert call.later == []
    await mux.close()


async def test_when_it_cannot_the_starts_of_one_turn_leave_together_from_a_task() -> None:
    call = FakeCall()
    call.ready = False  # e.g. not connected yet, or its buffer is full
    mux = WorkerMux(lambda: (call, lambda: None, "fake"))
    mux.open(req("a"), 0)
    mux.open(req("b"), 0)
    assert call.now == [] and call.later == []
    await asyncio.sleep(0.01)
    assert [[s.request.request_id for s in f.starts] for f in call.later] == [["a", "b"]]
    await mux.close()


async def test_no_frame_overtakes_one_still_being_written() -> None:
    call = FakeCall()
    call.ready = False
    call.block.clear()  # the first frame's write does not finish yet
    mux = WorkerMux(lambda: (call, lambda: None, "fake"))
    mux.open(req("a"), 0)
    await asyncio.sleep(0.01)  # its write is in progress
    call.ready = True
    mux.open(req("b"), 0)  # the connection could take it now, but "a" is not out: it waits its turn
    assert call.now == []
    call.block.set()
    await asyncio.sleep(0.01)
    assert call.order == ["a", "b"]
    await mux.close()
