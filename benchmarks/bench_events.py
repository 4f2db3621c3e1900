"""Event-plane publish and object-store throughput against a real nats-server.

Starts its own nats-server (JetStream, file storage) on a free port. Compares
awaiting each JetStream ack with Commutator's publisher (publish_async with
asynchronous acks, retries and ordering), and object reads with and without
``writeinto``.
"""

from __future__ import annotations

import asyncio
import io
import os
import time

import uvloop
from commutator.common.events import NatsEventPlane, StreamSpec
from commutator.common.local_servers import NatsProcess

N = 20_000
PAYLOAD = os.urandom(200)  # about one KvEventBatch of a few blocks


async def main() -> None:
    with NatsProcess() as server:
        plane = NatsEventPlane(server.url)
        await plane.connect()
        await plane.ensure_stream(StreamSpec(name="bench", subjects=("bench.>",)))

        t0 = time.perf_counter()
        for _ in range(N // 4):
            await plane.js.publish("bench.sync", PAYLOAD)
        sync_rate = (N // 4) / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        futures = [await plane.js.publish_async("bench.raw", PAYLOAD) for _ in range(N)]
        await asyncio.gather(*futures)
        raw_rate = N / (time.perf_counter() - t0)

        pub = plane.publisher("bench")
        t0 = time.perf_counter()
        for _ in range(N):
            await pub.publish("bench.async", PAYLOAD)
        await pub.flush(60)
        async_rate = N / (time.perf_counter() - t0)
        await pub.close()

        print(f"JetStream publish, {len(PAYLOAD)}-byte messages, file storage, this machine")
        print(f"  await each ack (js.publish)         {sync_rate:10,.0f} msg/s")
        print(f"  bare js.publish_async + gather      {raw_rate:10,.0f} msg/s   ({raw_rate / sync_rate:.1f}x)")
        print(f"  Commutator publisher (async acks,   {async_rate:10,.0f} msg/s   ({async_rate / sync_rate:.1f}x)")
        print("    msg ids, retries, ordering)")

        blob = os.urandom(16 * 1024 * 1024)
        await plane.object_put("benchobj", "blob", blob)
        obs = await plane.js.object_store("benchobj")
        t0 = time.perf_counter()
        res = await obs.get("blob")
        plain = time.perf_counter() - t0
        assert res.data == blob
        t0 = time.perf_counter()
        buf = io.BytesIO()
        await obs.get("blob", writeinto=buf)
        into = time.perf_counter() - t0
        assert buf.getvalue() == blob
        t0 = time.perf_counter()
        ours_data = await plane.object_get("benchobj", "blob")
        ours = time.perf_counter() - t0
        assert ours_data == blob
        print("Object store read of 16 MiB")
        print(f"  nats-py get() (bytes concatenation)  {plain * 1000:9,.0f} ms")
        print(f"  nats-py get(writeinto=BytesIO)       {into * 1000:9,.0f} ms")
        print(f"  ours: chunks through a pull consumer {ours * 1000:9,.0f} ms   ({plain / ours:.1f}x)")
        await plane.close()


if __name__ == "__main__":
    uvloop.run(main())
