"""One contract, two backends: every test runs on the in-memory event plane (unit)
and on a real nats-server with JetStream (integration)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest
from commutator.common.events import (
    ConsumerSpec,
    EventPlane,
    EventPlaneError,
    MemoryBroker,
    MemoryEventPlane,
    NatsEventPlane,
    StreamSpec,
)


@pytest.fixture(
    params=[pytest.param("memory", marks=pytest.mark.unit), pytest.param("nats", marks=pytest.mark.integration)]
)
async def make_plane(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    planes: list[EventPlane] = []
    broker = MemoryBroker()
    url = request.getfixturevalue("nats_server").url if request.param == "nats" else None

    async def make() -> EventPlane:
        plane: EventPlane = NatsEventPlane(url) if url else MemoryEventPlane(broker)
        await plane.connect()
        planes.append(plane)
        return plane

    yield make
    for p in planes:
        await p.close()


async def stream(plane: EventPlane, name: str, **kw: object) -> StreamSpec:
    spec = StreamSpec(name=name, subjects=(f"{name}.>",), **kw)  # type: ignore[arg-type]
    await plane.ensure_stream(spec)
    await plane.ensure_stream(spec)  # idempotent
    return spec


async def publish_n(plane: EventPlane, stream_name: str, n: int, subject: str | None = None, start: int = 0) -> None:
    pub = plane.publisher(stream_name, max_pending=64)
    for i in range(start, start + n):
        await pub.publish(subject or f"{stream_name}.ev", str(i).encode())
    await pub.flush(10)
    await pub.close()


async def drain(consumer: object, want: int, timeout_s: float = 10.0, ack: bool = True) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(got) < want and loop.time() < deadline:
        for m in await consumer.fetch(min(64, want - len(got)), 0.5):  # type: ignore[attr-defined]
            got.append((m.seq, m.data))
            if ack:
                await m.ack()
    return got


@pytest.mark.parametrize("standing", [0, 16], ids=["fetch", "standing"])
async def test_publish_and_consume_in_order(make_plane, unique: str, standing: int) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    await publish_n(plane, unique, 300)
    state = await plane.stream_state(unique)
    assert (state.messages, state.first_seq, state.last_seq) == (300, 1, 300)
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="router-0", standing=standing))
    got = await drain(c, 300)
    assert got == [(i + 1, str(i).encode()) for i in range(300)]
    assert await c.fetch(10, 0.2) == []
    await c.close()


async def test_a_consumed_message_says_when_the_stream_stored_it(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    before = time.time()
    await publish_n(plane, unique, 3)
    after = time.time()
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="router-0"))
    msgs = await c.fetch(3, 2.0)
    assert len(msgs) == 3
    for m in msgs:  # the router's KV-event lag metric is measured from it
        assert before - 0.05 <= m.stored_at <= after + 0.05
    await c.close()


async def test_durable_consumer_resumes_after_rebind(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    await publish_n(plane, unique, 10)
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="d1"))
    first = await drain(c, 4)
    assert [s for s, _ in first[:4]] == [1, 2, 3, 4]
    # Not acked past what drain returned: re-fetching continues, no redelivery of acked ones.
    await c.close()
    other = await make_plane()  # another client (a restarted process) binds the same durable
    c2 = await other.pull_consumer(ConsumerSpec(stream=unique, durable="d1"))
    rest = await drain(c2, 10 - len(first))
    assert [s for s, _ in first + rest] == list(range(1, 11))
    await c2.close()


async def test_unacked_messages_are_delivered_again(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    await publish_n(plane, unique, 2)
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="d", ack_wait_s=1.0))
    msgs = await c.fetch(2, 2.0)
    assert [m.delivered for m in msgs] == [1, 1]
    await msgs[0].ack()
    again = []
    # Pulls of 0.3 s, so that none expires at the 1 s ack wait: nats-server 2.9.10 gives a redelivery
    # that meets a pull request as it expires a delivery count of 1 (its ack subject reads consumer
    # sequence 3, delivery count 1; 4 of 15 tries with 0.5 s pulls, none of 50 with 0.3 and 0.4 s).
    for _ in range(30):
        again = await c.fetch(2, 0.3)
        if again:
            break
    assert [(m.seq, m.delivered) for m in again] == [(2, 2)]
    await again[0].ack()
    await c.close()


async def test_work_queue_group_delivers_each_message_once(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_plane(), await make_plane()
    await stream(a, unique, work_queue=True)
    await publish_n(a, unique, 100)
    ca = await a.pull_consumer(ConsumerSpec(stream=unique, durable="prefill"))
    cb = await b.pull_consumer(ConsumerSpec(stream=unique, durable="prefill"))
    seen: list[int] = []
    per_worker = {"a": 0, "b": 0}
    for _ in range(50):
        for name, c in (("a", ca), ("b", cb)):
            for m in await c.fetch(7, 0.2):
                seen.append(int(m.data))
                per_worker[name] += 1
                await m.ack()
        if len(seen) >= 100:
            break
    assert sorted(seen) == list(range(100))
    assert per_worker["a"] > 0 and per_worker["b"] > 0
    for _ in range(20):  # acked work leaves the stream (the server applies acks asynchronously)
        if (await a.stream_state(unique)).messages == 0:
            break
        await asyncio.sleep(0.1)
    assert (await a.stream_state(unique)).messages == 0
    await ca.close()
    await cb.close()


async def test_consumer_start_sequence_and_filter(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    pub = plane.publisher(unique)
    for i in range(10):
        await pub.publish(f"{unique}.{'even' if i % 2 == 0 else 'odd'}", str(i).encode())
    await pub.close()
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="late", start_seq=7))
    assert [s for s, _ in await drain(c, 4)] == [7, 8, 9, 10]
    f = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="odd", filter_subject=f"{unique}.odd"))
    assert [d for _, d in await drain(f, 5)] == [b"1", b"3", b"5", b"7", b"9"]


async def test_ack_all_acks_everything_before(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    await publish_n(plane, unique, 20)
    spec = ConsumerSpec(stream=unique, durable="all", ack_all=True, ack_wait_s=1.0)
    c = await plane.pull_consumer(spec)
    got = []
    while len(got) < 20:
        got += await c.fetch(20, 1.0)
    await got[-1].ack()  # one ack for the batch
    await c.close()
    await asyncio.sleep(1.3)  # past the ack wait: nothing may come back
    c2 = await plane.pull_consumer(spec)
    assert await c2.fetch(20, 0.5) == []
    await c2.close()


async def test_purge_drops_older_messages(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique)
    await publish_n(plane, unique, 10)
    await plane.purge(unique, before_seq=8)
    state = await plane.stream_state(unique)
    assert (state.messages, state.first_seq, state.last_seq) == (3, 8, 10)
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="after-purge"))
    assert [s for s, _ in await drain(c, 3)] == [8, 9, 10]


async def test_core_pubsub_wildcards_and_queue_groups(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    star = await plane.subscribe_core(f"{unique}.load.*")
    tail = await plane.subscribe_core(f"{unique}.>")
    q1 = await plane.subscribe_core(f"{unique}.work", queue_group="g")
    q2 = await plane.subscribe_core(f"{unique}.work", queue_group="g")
    await asyncio.sleep(0.1)  # subscriptions reach the server
    await plane.publish_core(f"{unique}.load.w1", b"a")
    await plane.publish_core(f"{unique}.load.w1.x", b"b")
    for i in range(20):
        await plane.publish_core(f"{unique}.work", str(i).encode())

    async def take(sub: object, n: int) -> list[bytes]:
        out: list[bytes] = []
        it = sub.__aiter__()  # type: ignore[attr-defined]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while len(out) < n:
                    out.append((await it.__anext__()).data)
        return out

    assert await take(star, 2) == [b"a"]
    assert len(await take(tail, 23)) == 22
    got1, got2 = await take(q1, 20), await take(q2, 20)
    assert sorted(int(x) for x in got1 + got2) == list(range(20))
    assert got1 and got2
    for s in (star, tail, q1, q2):
        assert s.dropped == 0
        await s.unsubscribe()


async def test_object_store_roundtrip(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    assert await plane.object_get(unique, "missing") is None
    assert await plane.object_list(unique) == []
    big = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    await plane.object_put(unique, "snapshot-42", big)
    await plane.object_put(unique, "tokenizer.json", b"{}")
    assert await plane.object_get(unique, "snapshot-42") == big
    assert await plane.object_list(unique) == ["snapshot-42", "tokenizer.json"]
    await plane.object_put(unique, "tokenizer.json", b'{"v":2}')  # replace
    assert await plane.object_get(unique, "tokenizer.json") == b'{"v":2}'
    assert await plane.object_delete(unique, "snapshot-42") is True
    assert await plane.object_get(unique, "snapshot-42") is None
    assert await plane.object_delete(unique, "snapshot-42") is False


async def test_unknown_stream_is_a_clear_error(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    with pytest.raises(EventPlaneError, match="not found"):
        await plane.stream_state(unique + "nope")
    with pytest.raises(EventPlaneError):
        await plane.pull_consumer(ConsumerSpec(stream=unique + "nope", durable="x"))


async def test_in_progress_holds_back_redelivery_until_the_worker_stops(make_plane, unique: str) -> None:  # type: ignore[no-untyped-def]
    plane = await make_plane()
    await stream(plane, unique, work_queue=True)
    await publish_n(plane, unique, 1)
    c = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="w", ack_wait_s=1.0))
    [m] = await c.fetch(1, 2.0)
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.5  # well past the ack wait: heartbeats keep it ours
    while loop.time() < until:
        await m.in_progress()
        assert await c.fetch(1, 0.3) == []
    # No more heartbeats (the worker "died"): delivered again within about one ack wait.
    again = []
    for _ in range(10):
        again = await c.fetch(1, 0.5)
        if again:
            break
    assert [(x.seq, x.delivered) for x in again] == [(m.seq, 2)]
    await again[0].ack()
    await c.close()
