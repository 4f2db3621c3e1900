"""The worker stream's hops, in process.

- A pass's frame leaves from the engine's pass itself when the transport can take it at once
  (``MuxSession._after_pass``, the TCP stream's ``_DirectWriter``); otherwise, and for a frame the
  stream interval holds back, the frames task sends it as before.
- The TCP stream hands each client frame to its session from ``data_received``, in the same turn of
  the event loop as the bytes (``tcp_stream._Connection``): a start reaches the engine (and a cancel
  aborts it) with no task in between.

Real mocker engine and servicer; the transports are recording stand-ins."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Literal

import pytest
from commutator.common.stream_frames import PREAMBLE, pack
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.engine import MockerEngine
from commutator.engines.mocker.tokens import token_at
from commutator.v1 import common_pb2, worker_pb2
from commutator.worker import mux
from commutator.worker.disagg import DisaggConfig, DisaggEngine
from commutator.worker.kv_transfer import KvTransferConfig, SimulatedTransfer
from commutator.worker.servicer import WorkerServicer
from commutator.worker.tcp_stream import _Connection

pytestmark = pytest.mark.unit

VOCAB = 1000


class Recorder:
    """A transport that takes frames synchronously while ``open``."""

    def __init__(self, open_: bool = True) -> None:
        self.open = open_
        self.frames: list[worker_pb2.MuxServerFrame] = []

    def can_send(self) -> bool:
        return self.open

    def send(self, frame: worker_pb2.MuxServerFrame) -> None:
        self.frames.append(frame)


def start(tag: int, prompt: list[int], max_tokens: int) -> worker_pb2.MuxClientFrame:
    f = worker_pb2.MuxClientFrame()
    s = f.starts.add()
    s.tag = tag
    s.request.CopyFrom(
        common_pb2.GenerateRequest(
            request_id=f"r{tag}",
            token_ids=prompt,
            sampling=common_pb2.SamplingOptions(seed=tag),
            stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
        )
    )
    return f


def as_decode_worker(engine: MockerEngine) -> DisaggEngine:
    """The mocker as a decode worker wraps it by default (remote prefill ``auto``); no prefill workers
    serve the model, so every prompt is prefilled here, on the push path."""
    wrapped = DisaggEngine(
        engine,
        DisaggConfig(),
        SimulatedTransfer(KvTransferConfig()),
        SimpleNamespace(namespace="ns"),  # type: ignore[arg-type]
        "m",
        "decode-1",
        lambda: "",
    )
    assert wrapped.prefill_workers() == 0
    return wrapped


async def drive(
    servicer: WorkerServicer,
    client: AsyncIterator[worker_pb2.MuxClientFrame],
    direct: Recorder | None,
    take: Callable[[worker_pb2.MuxServerFrame], None],
    done: asyncio.Event,
) -> list[worker_pb2.MuxServerFrame]:
    """Run one session: every frame, sent from a pass (``direct``) or by the frames task, goes to
    ``take``. Returns the frames the frames task sent, once ``done`` is set and the session ended."""
    via_task: list[worker_pb2.MuxServerFrame] = []
    if direct is not None:
        real_send = direct.send

        def send(frame: worker_pb2.MuxServerFrame) -> None:
            real_send(frame)
            take(frame)

        direct.send = send  # type: ignore[method-assign]

    async def consume() -> None:
        async for frame in servicer.mux_frames(client, direct=direct):
            via_task.append(frame)
            take(frame)

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(done.wait(), 20)
    await asyncio.wait_for(consumer, 20)
    return via_task


async def run_session(
    interval_s: float,
    direct: Recorder | None,
    n_requests: int = 3,
    max_tokens: int = 12,
    decode_worker: bool = False,
) -> tuple[dict[int, list[int]], list[worker_pb2.MuxServerFrame], MockerEngine]:
    engine = MockerEngine(MockerConfig(speedup_ratio=50.0, block_size=16, num_blocks=1024), vocab_size=VOCAB)
    await engine.start()
    servicer = WorkerServicer(as_decode_worker(engine) if decode_worker else engine, "w", lambda: 1, interval_s)
    done = asyncio.Event()

    async def client() -> AsyncIterator[worker_pb2.MuxClientFrame]:
        for tag in range(1, n_requests + 1):
            yield start(tag, [tag, 2, 3, 4, 5], max_tokens)
        await done.wait()

    tokens: dict[int, list[int]] = {}
    finished: set[int] = set()

    def take(frame: worker_pb2.MuxServerFrame) -> None:
        for u in frame.updates:
            tokens.setdefault(u.tag, []).extend(u.response.token_ids)
            if u.response.finish_reason:
                finished.add(u.tag)
        if len(finished) == n_requests:
            done.set()

    via_task = await drive(servicer, client(), direct, take, done)
    await engine.shutdown()
    return tokens, via_task, engine


def expected(tag: int, max_tokens: int = 12) -> list[int]:
    return [token_at(tag, 5 + i, VOCAB) for i in range(max_tokens)]  # a 5-token prompt


async def test_frames_leave_from_the_pass_when_the_transport_can_take_them() -> None:
    direct = Recorder()
    tokens, via_task, engine = await run_session(0.0, direct)
    assert {t: tokens[t] for t in (1, 2, 3)} == {t: expected(t) for t in (1, 2, 3)}
    assert len(direct.frames) >= 12 and via_task == []  # every token frame went out from the passes
    assert engine._pass_listeners == []  # the session unregistered itself when it ended


class CountingEvent(asyncio.Event):
    """The session's wake-up: counts the times its waiter (the frames task) was woken."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    async def wait(self) -> Literal[True]:
        r = await super().wait()
        self.woken += 1
        return r


def count_wakes(monkeypatch: pytest.MonkeyPatch) -> list[CountingEvent]:
    events: list[CountingEvent] = []
    init = mux.MuxSession.__init__

    def counting_init(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
        init(self, *a, **k)
        self._wake = CountingEvent()
        events.append(self._wake)

    monkeypatch.setattr(mux.MuxSession, "__init__", counting_init)
    return events


async def test_passes_whose_frame_left_do_not_wake_the_frames_task(monkeypatch: pytest.MonkeyPatch) -> None:
    events = count_wakes(monkeypatch)
    direct = Recorder()
    tokens, via_task, engine = await run_session(0.0, direct, max_tokens=30)
    assert {t: tokens[t] for t in (1, 2, 3)} == {t: expected(t, 30) for t in (1, 2, 3)}
    assert engine.passes >= 30 and via_task == []
    # Woken to look at the session's end (its requests done, the client gone), not once per pass as
    # when each output pushed by a pass set the event.
    assert len(events) == 1 and events[0].woken <= 3, events[0].woken


async def test_a_decode_workers_engine_wrapper_passes_the_pass_listeners_on() -> None:
    # Remote prefill is on by default: the decode worker's engine is the DisaggEngine wrapper, and
    # its passes must send their frames as the bare mocker's do.
    direct = Recorder()
    tokens, via_task, engine = await run_session(0.0, direct, decode_worker=True)
    assert {t: tokens[t] for t in (1, 2, 3)} == {t: expected(t) for t in (1, 2, 3)}
    assert len(direct.frames) >= 12 and via_task == []
    assert engine._pass_listeners == []


async def test_news_from_outside_a_pass_still_wakes_the_frames_task() -> None:
    # A request whose deadline passes between passes: its error frame has no pass to leave from.
    engine = MockerEngine(MockerConfig(speedup_ratio=0.5, block_size=16, num_blocks=1024), vocab_size=VOCAB)
    await engine.start()
    servicer = WorkerServicer(engine, "w", lambda: 1, 0.0)
    direct = Recorder()
    done = asyncio.Event()

    async def client() -> AsyncIterator[worker_pb2.MuxClientFrame]:
        f = start(1, [1, 2, 3, 4, 5], 1000)
        f.starts[0].timeout_s = 0.2
        yield f
        await done.wait()

    frames: list[worker_pb2.MuxServerFrame] = []

    async def consume() -> None:
        async for frame in servicer.mux_frames(client(), direct=direct):
            frames.append(frame)
            if frame.errors:
                done.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.wait_for(consumer, 10)
    await engine.shutdown()
    errors = [e for f in frames + direct.frames for e in f.errors]
    assert [(e.tag, e.code) for e in errors] == [(1, "DEADLINE_EXCEEDED")]
    assert engine.stats()[0].running_requests == 0  # aborted, its blocks freed


async def test_a_session_open_across_an_engine_restart_gets_the_new_engines_tokens() -> None:
    # The session listens to the passes of the engine it started with; after the worker switches
    # engines, the new engine's outputs reach the frames task (a turn later) and leave from there.
    old = MockerEngine(MockerConfig(speedup_ratio=50.0, block_size=16, num_blocks=1024), vocab_size=VOCAB)
    new = MockerEngine(MockerConfig(speedup_ratio=50.0, block_size=16, num_blocks=1024), vocab_size=VOCAB)
    await old.start()
    await new.start()
    servicer = WorkerServicer(old, "w", lambda: 1, 0.0)
    direct = Recorder()
    switched, done = asyncio.Event(), asyncio.Event()

    async def client() -> AsyncIterator[worker_pb2.MuxClientFrame]:
        yield start(1, [1, 2, 3, 4, 5], 12)
        await switched.wait()
        yield start(2, [2, 2, 3, 4, 5], 12)
        await done.wait()

    tokens: dict[int, list[int]] = {}

    def take(frame: worker_pb2.MuxServerFrame) -> None:
        for u in frame.updates:
            tokens.setdefault(u.tag, []).extend(u.response.token_ids)
            if u.response.finish_reason and u.tag == 1:
                servicer.switch_engine(new, 2)
                switched.set()
            elif u.response.finish_reason and u.tag == 2:
                done.set()

    via_task = await drive(servicer, client(), direct, take, done)
    await old.shutdown()
    await new.shutdown()
    assert tokens == {1: expected(1), 2: expected(2)}
    assert via_task  # the new engine's frames went by the frames task
    assert old._pass_listeners == [] and new._pass_listeners == []


async def test_the_frames_task_sends_when_the_transport_cannot_take_a_frame_at_once() -> None:
    direct = Recorder(open_=False)
    tokens, via_task, _ = await run_session(0.0, direct)
    assert {t: tokens[t] for t in (1, 2, 3)} == {t: expected(t) for t in (1, 2, 3)}
    # Every token went by the frames task (woken a turn after the pass: a later pass's tokens may share
    # its frame, as they would while the connection drains).
    assert direct.frames == [] and len(via_task) >= 6


async def test_without_a_direct_transport_nothing_changes() -> None:
    tokens, via_task, engine = await run_session(0.0, None)
    assert {t: tokens[t] for t in (1, 2, 3)} == {t: expected(t) for t in (1, 2, 3)}
    assert len(via_task) >= 12 and engine._pass_listeners == []


async def test_the_stream_interval_still_holds_frames_back_and_the_task_sends_them() -> None:
    # Passes of about 0.45 ms (speed-up 50) against a 20 ms interval: after a request's first
    # tokens (sent at once) most passes' news waits for the interval, which the frames task honours.
    direct = Recorder()
    tokens, via_task, _ = await run_session(0.02, direct, max_tokens=40)
    assert {t: tokens[t] for t in (1, 2, 3)} == {t: expected(t, 40) for t in (1, 2, 3)}
    assert len(direct.frames) + len(via_task) < 40  # merged: far fewer frames than passes


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


def connect(servicer: WorkerServicer) -> tuple[_Connection, Transport, set[_Connection]]:
    """A TCP worker-stream connection (no TLS) made on a recording transport."""
    registry: set[_Connection] = set()
    conn = _Connection(servicer, None, registry)
    transport = Transport()
    transport.protocol = conn
    conn.connection_made(transport)
    return conn, transport, registry


async def test_starts_and_cancels_reach_the_engine_in_the_turn_their_bytes_arrive() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=1.0, block_size=16, num_blocks=1024), vocab_size=1000)
    await engine.start()
    servicer = WorkerServicer(engine, "w", lambda: 1, 0.0)
    conn, transport, registry = connect(servicer)
    try:
        data = PREAMBLE + pack(start(1, [1, 2, 3, 4, 5], 10_000)) + pack(start(2, [2, 2, 3, 4, 5], 10_000))
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
    conn, transport, registry = connect(servicer)
    conn.data_received(b"GET / HTTP/1.1\r\n")
    assert transport.closing and conn.session is None
    await asyncio.wait_for(conn.closed, 5)
    assert registry == set()
