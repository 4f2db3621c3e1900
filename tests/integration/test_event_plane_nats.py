"""NATS-only behaviour: recovery after nats-server restarts."""

from __future__ import annotations

import asyncio

import pytest
from commutator.common.events import ConsumerSpec, EventPlaneError, NatsEventPlane, StreamSpec
from commutator.common.local_servers import NatsProcess, free_port

pytestmark = pytest.mark.integration


async def consume(consumer, want: int, timeout_s: float = 20.0) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    got: list[tuple[int, int]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(got) < want and loop.time() < deadline:
        msgs = await consumer.fetch(min(100, want - len(got)), 0.5)
        for m in msgs:
            got.append((m.seq, int(m.data)))
        if msgs:
            await msgs[-1].ack()
    return got


@pytest.mark.parametrize("how", ["graceful", "kill"])
async def test_durable_consumer_resumes_after_server_restart(nats_private: NatsProcess, unique: str, how: str) -> None:
    publisher_plane = NatsEventPlane(nats_private.url)
    consumer_plane = NatsEventPlane(nats_private.url)
    await publisher_plane.connect()
    await consumer_plane.connect()
    await publisher_plane.ensure_stream(StreamSpec(name=unique, subjects=(f"{unique}.>",)))
    pub = publisher_plane.publisher(unique, ack_timeout_s=1.0)
    for i in range(200):
        await pub.publish(f"{unique}.kv", str(i).encode())
    await pub.flush(10)

    consumer = await consumer_plane.pull_consumer(ConsumerSpec(stream=unique, durable="router-a", ack_all=True))
    before = await consume(consumer, 120)
    assert before == [(i + 1, i) for i in range(120)]
    await consumer_plane.nc.flush()  # the ack reaches the server before it goes down

    if how == "kill":
        nats_private.kill()
    else:
        nats_private.stop()
    # Published while the server is down: held, then sent in order after the reconnect.
    for i in range(200, 300):
        await pub.publish(f"{unique}.kv", str(i).encode())
    await asyncio.sleep(1.0)
    nats_private.start()
    await pub.flush(30)
    for i in range(300, 350):
        await pub.publish(f"{unique}.kv", str(i).encode())
    await pub.flush(10)

    after = await consume(consumer, 230)
    # Every message published before (and during) the restart arrives once, in order, none skipped.
    assert [v for _, v in after] == list(range(120, 350))
    assert [s for s, _ in after] == list(range(121, 351))
    state = await publisher_plane.stream_state(unique)
    assert state.last_seq == 350  # retries after lost acks were deduplicated

    await pub.close()
    await consumer.close()
    await publisher_plane.close()
    await consumer_plane.close()


async def test_object_store_survives_restart(nats_private: NatsProcess, unique: str) -> None:
    plane = NatsEventPlane(nats_private.url)
    await plane.connect()
    await plane.object_put(unique, "snap", b"x" * 300_000)
    nats_private.restart()
    for _ in range(100):
        if plane.nc.is_connected:
            break
        await asyncio.sleep(0.1)
    for _ in range(50):  # JetStream may take a moment to come back after the restart
        try:
            assert await plane.object_get(unique, "snap") == b"x" * 300_000
            break
        except Exception:
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("object not readable after restart")
    await plane.close()


async def test_connect_fails_clearly_without_a_server() -> None:
    plane = NatsEventPlane(f"nats://127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    with pytest.raises(EventPlaneError, match="cannot reach NATS"):
        await plane.connect()
