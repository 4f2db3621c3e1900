"""The order in which WorkerMux hands out a frame's updates, against a hand-written fake of the call it
drives (TcpCall's interface: frames handed to a handler from the connection's ``data_received``).

A request's first response wakes the task that writes it; the other requests' responses mostly go to
their sinks, each a write of its own. A frame with a few first responses lets their tasks run before
those sinks; a wave of them goes behind, and nothing is reordered within one request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from commutator.common.errors import Unavailable
from commutator.router.mux import FIRSTS_AHEAD, MuxRequest, WorkerMux
from commutator.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.unit

Handler = Callable[[worker_pb2.MuxServerFrame], None]


class PumpCall:
    """try_write/write/cancel, and ``pump``: the frames a test hands to :meth:`frame` go to the mux's
    handler in the test's own turn of the event loop, as TcpCall's ``data_received`` hands them."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.tags: dict[str, int] = {}  # request id -> the tag its start carried
        self._end: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def try_write(self, frame: worker_pb2.MuxClientFrame) -> bool:
        for st in frame.starts:
            self.tags[st.request.request_id] = st.tag
        return True

    async def write(self, frame: worker_pb2.MuxClientFrame) -> None:
        self.try_write(frame)

    async def pump(self, handler: Handler) -> None:
        self.handler = handler
        await self._end

    def frame(self, *updates: tuple[str, list[int], bool]) -> None:
        """One frame: per update (request id, its tokens, whether it is the request's first)."""
        f = worker_pb2.MuxServerFrame()
        for rid, tokens, first in updates:
            u = f.updates.add(tag=self.tags[rid])
            u.response.token_ids.extend(tokens)
            if first:
                u.response.prompt_tokens = 3
        assert self.handler is not None
        self.handler(f)

    def fail(self, error: Exception) -> None:
        self._end.set_exception(error)

    def cancel(self) -> bool:
        if not self._end.done():
            self._end.set_result(None)
        return True


def req(rid: str) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(request_id=rid, token_ids=[1, 2, 3])


async def started(mux: WorkerMux, call: PumpCall, rid: str) -> MuxRequest:
    r = mux.open(req(rid), 0)
    for _ in range(3):
        if call.handler is not None:
            break
        await asyncio.sleep(0)  # the reader task starts the pump
    return r


class Log:
    """What the consumers saw, in the order they saw it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[int]]] = []

    async def first(self, rid: str, r: MuxRequest) -> None:
        resp = await r.__anext__()
        self.seen.append((rid, list(resp.token_ids)))

    def sink(self, rid: str) -> Callable[[common_pb2.GenerateResponse], bool]:
        def take(resp: common_pb2.GenerateResponse) -> bool:
            self.seen.append((rid, list(resp.token_ids)))
            return False

        return take


async def pushing(mux: WorkerMux, call: PumpCall, log: Log, rid: str) -> tuple[MuxRequest, asyncio.Task[None]]:
    """A request past its first response, its further responses going to a sink (as the frontend's are)."""
    r = await started(mux, call, rid)
    call.frame((rid, [10], True))
    await r.__anext__()
    task = asyncio.get_running_loop().create_task(r.push(log.sink(rid)))
    await asyncio.sleep(0)
    return r, task


@contextlib.asynccontextmanager
async def with_b_pushing() -> AsyncIterator[tuple[PumpCall, WorkerMux, Log, asyncio.Task[None]]]:
    """A mux on a fake call, with request "b" past its first response and pushing to a sink."""
    call = PumpCall()
    mux = WorkerMux(lambda: (call, lambda: None, "fake"))
    log = Log()
    _, pushed = await pushing(mux, call, log, "b")
    try:
        yield call, mux, log, pushed
    finally:
        await mux.close()
        pushed.cancel()


async def test_a_first_response_is_taken_before_the_other_streams_responses_are_pushed() -> None:
    async with with_b_pushing() as (call, mux, log, _):
        a = await started(mux, call, "a")
        reader = asyncio.get_running_loop().create_task(log.first("a", a))
        await asyncio.sleep(0)  # waiting for its first response
        call.frame(("b", [11], False), ("a", [20], True), ("b", [12], False))
        call.frame(("b", [13], False))  # a later frame, in the same turn: behind the held ones
        assert log.seen == []  # b's responses wait one turn
        await reader
        await asyncio.sleep(0)
        assert log.seen == [("a", [20]), ("b", [11]), ("b", [12]), ("b", [13])]


async def test_a_wave_of_first_responses_goes_behind_the_pushed_ones() -> None:
    async with with_b_pushing() as (call, mux, log, _):
        wave = [f"w{i}" for i in range(FIRSTS_AHEAD + 1)]
        readers = []
        for rid in wave:
            readers.append(asyncio.get_running_loop().create_task(log.first(rid, await started(mux, call, rid))))
        await asyncio.sleep(0)
        call.frame(*[(rid, [1], True) for rid in wave], ("b", [11], False))
        assert log.seen == [("b", [11])]  # pushed in the frame's own turn, as every frame's used to be
        await asyncio.gather(*readers)
        assert sorted(log.seen[1:]) == sorted((rid, [1]) for rid in wave)


async def test_a_frame_of_first_responses_only_holds_nothing_back() -> None:
    async with with_b_pushing() as (call, mux, log, _):
        a = await started(mux, call, "a")
        call.frame(("a", [5], True))  # nothing in it to let the first response ahead of
        call.frame(("b", [11], False))
        assert log.seen == [("b", [11])]  # pushed in this turn: no earlier frame is held
        assert list((await a.__anext__()).token_ids) == [5]


async def test_updates_held_behind_a_first_response_reach_their_requests_before_the_stream_fails() -> None:
    async with with_b_pushing() as (call, mux, log, pushed):
        a = await started(mux, call, "a")
        call.frame(("a", [20], True), ("b", [11], False))
        call.fail(Unavailable("the worker went away"))
        with pytest.raises(Unavailable):
            await pushed
        assert ("b", [11]) in log.seen  # delivered, then the failure
        assert list((await a.__anext__()).token_ids) == [20]
        with pytest.raises(Unavailable):
            await a.__anext__()
