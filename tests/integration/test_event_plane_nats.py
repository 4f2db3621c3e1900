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


async def publish_range(pub, subject: str, values: range, flush_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Each value of ``values`` as one message, then wait for every ack."""
    for i in values:
        await pub.publish(subject, str(i).encode())
    await pub.flush(flush_s)


@pytest.mark.parametrize("standing", [0, 64], ids=["fetch", "standing"])
@pytest.mark.parametrize("how", ["graceful", "kill"])
async def test_durable_consumer_resumes_after_server_restart(
    nats_private: NatsProcess, unique: str, how: str, standing: int
) -> None:
    publisher_plane = NatsEventPlane(nats_private.url)
    consumer_plane = NatsEventPlane(nats_private.url)
    await publisher_plane.connect()
    await consumer_plane.connect()
    await publisher_plane.ensure_stream(StreamSpec(name=unique, subjects=(f"{unique}.>",)))
    pub = publisher_plane.publisher(unique, ack_timeout_s=1.0)
    await publish_range(pub, f"{unique}.kv", range(200))

    consumer = await consumer_plane.pull_consumer(
        ConsumerSpec(stream=unique, durable="router-a", ack_all=True, standing=standing)
    )
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
    await publish_range(pub, f"{unique}.kv", range(300, 350))

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


async def _count_pull_requests(plane: NatsEventPlane, stream: str, counted: list[bytes]) -> None:
    async def seen(msg) -> None:  # type: ignore[no-untyped-def]
        counted.append(msg.data)

    await plane.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>", cb=seen)
    await plane.nc.flush()


@pytest.mark.parametrize("standing", [0, 64], ids=["fetch", "standing"])
async def test_a_standing_pull_asks_once_per_window(nats_server: NatsProcess, unique: str, standing: int) -> None:
    """A reader keeping up with a stream that gets one message at a time: nats-py's fetch asks the
    server at least once per message (twice when nothing waits); a standing pull once per window,
    with each message still handed over as it is stored."""
    spy, pub_plane, reader_plane = (NatsEventPlane(nats_server.url) for _ in range(3))
    for p in (spy, pub_plane, reader_plane):
        await p.connect()
    await pub_plane.ensure_stream(StreamSpec(name=unique, subjects=(f"{unique}.>",)))
    asks: list[bytes] = []
    await _count_pull_requests(spy, unique, asks)
    consumer = await reader_plane.pull_consumer(
        ConsumerSpec(stream=unique, durable="router-b", ack_all=True, standing=standing)
    )
    got: list[int] = []
    lags: list[float] = []
    stamps: dict[int, float] = {}
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while len(got) < 150:
            for m in await consumer.fetch(512, 1.0):
                got.append(int(m.data))
                lags.append(loop.time() - stamps[int(m.data)])
                await m.ack()

    reader = asyncio.create_task(read())
    pub = pub_plane.publisher(unique)
    for i in range(150):
        stamps[i] = loop.time()
        await pub.publish(f"{unique}.kv", str(i).encode())
        await asyncio.sleep(0.004)
    await asyncio.wait_for(reader, 20)
    await spy.nc.flush()
    assert got == list(range(150))
    assert sorted(lags)[len(lags) // 2] < 0.05  # handed over as stored, not when a window fills
    if standing:
        assert len(asks) <= 150 // standing + 2, asks
    else:
        assert len(asks) >= 150, len(asks)  # the cost a standing pull saves
    await pub.close()
    await consumer.close()
    for p in (spy, pub_plane, reader_plane):
        await p.close()


async def test_a_standing_pull_goes_on_after_its_request_expires(
    nats_server: NatsProcess, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from commutator.common.events import nats as nats_plane

    monkeypatch.setattr(nats_plane._NatsStandingPull, "_EXPIRES_S", 0.3)
    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    await plane.ensure_stream(StreamSpec(name=unique, subjects=(f"{unique}.>",)))
    consumer = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="router-c", ack_all=True, standing=8))
    pub = plane.publisher(unique)
    got: list[int] = []
    for round_ in range(3):
        assert await consumer.fetch(100, 0.8) == []  # idle past the request's expiry
        await publish_range(pub, f"{unique}.kv", range(round_ * 5, round_ * 5 + 5))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(got) < 5 * (round_ + 1) and loop.time() < deadline:
            for m in await consumer.fetch(100, 0.5):
                got.append(int(m.data))
                await m.ack()
    assert got == list(range(15))
    assert consumer.requests >= 3  # type: ignore[attr-defined]  # asked again after each expiry
    await pub.close()
    await consumer.close()
    await plane.close()


async def test_a_standing_pull_recreates_a_deleted_consumer(nats_server: NatsProcess, unique: str) -> None:
    plane, admin = NatsEventPlane(nats_server.url), NatsEventPlane(nats_server.url)
    await plane.connect()
    await admin.connect()
    await plane.ensure_stream(StreamSpec(name=unique, subjects=(f"{unique}.>",)))
    spec = ConsumerSpec(stream=unique, durable="router-d", ack_all=True, standing=16)
    consumer = await plane.pull_consumer(spec)
    pub = plane.publisher(unique)
    await publish_range(pub, f"{unique}.kv", range(10))
    first = await consume(consumer, 10)
    assert [v for _, v in first] == list(range(10))
    subscriptions = len(plane.nc._subs)
    assert await admin.delete_consumer(unique, "router-d")
    await publish_range(pub, f"{unique}.kv", range(10, 20))
    # Re-created from the spec (from the first message): what was handed out already is not again.
    after = await consume(consumer, 10)
    assert [v for _, v in after] == list(range(10, 20))
    assert [s for s, _ in after] == list(range(11, 21))
    assert len(plane.nc._subs) == subscriptions  # the old inbox was unsubscribed, not left behind
    await pub.close()
    await consumer.close()
    await plane.close()
    await admin.close()


async def test_a_refused_standing_pull_is_asked_again_after_a_pause(
    nats_server: NatsProcess, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that refuses the request (here: a consumer made elsewhere with a smaller batch
    limit than the window) gets it again with a growing pause, not in a loop."""
    import json

    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    await plane.ensure_stream(StreamSpec(name=unique, subjects=(f"{unique}.>",)))
    config = {"durable_name": "router-e", "ack_policy": "all", "max_batch": 4}  # not in nats-py's ConsumerConfig
    reply = await plane.nc.request(
        f"$JS.API.CONSUMER.DURABLE.CREATE.{unique}.router-e",
        json.dumps({"stream_name": unique, "config": config}).encode(),
        timeout=5,
    )
    assert json.loads(reply.data)["config"]["max_batch"] == 4
    consumer = await plane.pull_consumer(ConsumerSpec(stream=unique, durable="router-e", ack_all=True, standing=8))
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.5
    while loop.time() < end:
        assert await consumer.fetch(10, 0.2) == []
    assert 2 <= consumer.requests <= 6  # type: ignore[attr-defined]
    assert "MaxRequestBatch" in caplog.text
    await consumer.close()
    await plane.close()
