"""The TCP worker stream's client cuts frames out of the bytes as they arrive (``_FrameProtocol``):
against a hand-written fake transport, with the bytes split at every point."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest
from commutator.common.errors import Unavailable
from commutator.common.stream_frames import FrameError, cut_frames, pack
from commutator.router.tcp_call import TcpCall, _FrameProtocol
from commutator.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.unit


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return 0


def frame(tag: int, tokens: list[int], finish: bool = False) -> worker_pb2.MuxServerFrame:
    resp = common_pb2.GenerateResponse(token_ids=tokens)
    if finish:
        resp.finish_reason = common_pb2.FINISH_REASON_LENGTH
    return worker_pb2.MuxServerFrame(updates=[worker_pb2.MuxUpdate(tag=tag, response=resp)])


def proto_with(handler: Any = None) -> tuple[_FrameProtocol, FakeTransport]:
    p = _FrameProtocol()
    t = FakeTransport()
    p.connection_made(t)  # type: ignore[arg-type]
    p.handler = handler
    return p, t


def test_frames_split_at_every_byte_come_out_whole_and_in_order() -> None:
    frames = [frame(i, list(range(i % 7)), finish=i % 5 == 0) for i in range(1, 40)]
    data = b"".join(pack(f) for f in frames)
    rng = random.Random(7)
    for _ in range(50):
        got: list[worker_pb2.MuxServerFrame] = []
        p, t = proto_with(got.append)
        cuts = sorted(rng.sample(range(1, len(data)), 12))
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            p.data_received(data[a:b])
        assert got == frames
        assert not p.ended and not t.closed
    p, _ = proto_with(None)  # no handler: queued for read()
    for i in range(len(data)):
        p.data_received(data[i : i + 1])
    assert list(p.frames) == frames


def test_a_frame_over_the_limit_or_that_does_not_parse_ends_the_connection() -> None:
    p, t = proto_with(lambda f: None)
    p.data_received((70 * 1024 * 1024).to_bytes(4, "little"))
    assert p.ended and t.closed and isinstance(p.error, FrameError) and "over the" in str(p.error)
    p, t = proto_with(lambda f: None)
    p.data_received(pack(frame(1, [1])) + (3).to_bytes(4, "little") + b"\xff\xff\xff")
    assert p.ended and t.closed and isinstance(p.error, FrameError) and "does not parse" in str(p.error)


def test_a_handler_that_raises_ends_the_connection_instead_of_escaping() -> None:
    def boom(f: worker_pb2.MuxServerFrame) -> None:
        raise RuntimeError("bad handler")

    p, t = proto_with(boom)
    p.data_received(pack(frame(1, [1])))
    assert p.ended and t.closed and isinstance(p.error, RuntimeError)


def test_how_the_connection_ended_between_frames_or_inside_one() -> None:
    p, _ = proto_with(lambda f: None)
    p.data_received(pack(frame(1, [1])))
    p.connection_lost(None)
    assert p.ended and p.error is None  # clean: between frames
    p, _ = proto_with(lambda f: None)
    p.data_received(pack(frame(1, [1]))[:-1])
    p.connection_lost(None)
    assert p.ended and isinstance(p.error, ConnectionResetError)
    p, _ = proto_with(lambda f: None)
    p.connection_lost(OSError("reset by peer"))
    assert p.ended and isinstance(p.error, OSError)


def connected_call() -> tuple[TcpCall, _FrameProtocol, FakeTransport]:
    """A TcpCall whose connection is already made, over a fake transport."""
    call = TcpCall("127.0.0.1:1", "fake")
    p, t = proto_with(None)
    call._proto = p
    done: asyncio.Future[_FrameProtocol] = asyncio.get_running_loop().create_future()
    done.set_result(p)
    call._connecting = done  # type: ignore[assignment]
    return call, p, t


async def test_pump_hands_over_queued_frames_first_then_returns_at_a_clean_end() -> None:
    call, p, _ = connected_call()
    p.data_received(pack(frame(1, [1])) + pack(frame(2, [2])))
    got: list[int] = []
    task = asyncio.create_task(call.pump(lambda f: got.append(f.updates[0].tag)))
    await asyncio.sleep(0)
    assert got == [1, 2]
    p.data_received(pack(frame(3, [3])))
    assert got == [1, 2, 3]  # from data_received itself, before the pump task runs again
    p.connection_lost(None)
    await task  # returns: the worker ended the stream between frames
    assert await TcpCall.read(call) is grpc.aio.EOF


async def test_pump_raises_unavailable_when_the_connection_fails_and_cancelled_after_cancel() -> None:
    call, p, _ = connected_call()
    task = asyncio.create_task(call.pump(lambda f: None))
    await asyncio.sleep(0)
    p.connection_lost(OSError("reset by peer"))
    with pytest.raises(Unavailable, match="fake: connection lost: reset by peer"):
        await task
    call2, _, t2 = connected_call()
    task2 = asyncio.create_task(call2.pump(lambda f: None))
    await asyncio.sleep(0)
    assert call2.cancel() and t2.closed
    with pytest.raises(asyncio.CancelledError):
        await task2


def test_cut_frames_keeps_an_incomplete_frame_and_consumes_what_it_delivered() -> None:
    """``cut_frames``, which both ends use: whole frames in order, the rest of the bytes kept, and the
    bytes of delivered frames gone even when the receiver fails on the next one."""
    frames = [frame(t, [t, t + 1]) for t in range(1, 4)]
    data = b"".join(pack(f) for f in frames)
    got: list[worker_pb2.MuxServerFrame] = []
    buf = bytearray(data[:-3])
    cut_frames(buf, worker_pb2.MuxServerFrame.FromString, got.append)
    assert got == frames[:2] and bytes(buf) == data[len(pack(frames[0])) * 2 : -3]
    buf += data[-3:]
    cut_frames(buf, worker_pb2.MuxServerFrame.FromString, got.append)
    assert got == frames and not buf

    def fail_on_second(f: worker_pb2.MuxServerFrame) -> None:
        if got:
            raise RuntimeError("receiver failed")
        got.append(f)

    got = []
    buf = bytearray(data)
    with pytest.raises(RuntimeError):
        cut_frames(buf, worker_pb2.MuxServerFrame.FromString, fail_on_second)
    assert got == frames[:1] and bytes(buf) == data[2 * len(pack(frames[0])) :]  # the failed one is consumed
    with pytest.raises(FrameError, match="over the"):
        cut_frames(bytearray(b"\xff\xff\xff\xff"), worker_pb2.MuxServerFrame.FromString, got.append)
    with pytest.raises(FrameError, match="does not parse"):
        cut_frames(bytearray(b"\x02\x00\x00\x00\xff\xff"), worker_pb2.MuxServerFrame.FromString, got.append)
