"""KV-event batches from an engine's ZMQ publisher (vLLM, SGLang), in order, none lost silently.

The publisher sends multipart messages ``(topic, seq, payload)``: ``seq`` an
8-byte big-endian counter from 0, ``payload`` one msgpack-encoded batch. It
keeps recent batches for replay on a ROUTER socket: a request carrying a start
sequence is answered with every kept batch from there, then an end marker
(sequence -1). :class:`ZmqEventSource` yields decoded batches in sequence
order; when sequences jump (the subscriber fell behind, or connected late) it
asks for the missed batches, and when even the replay cannot fill the hole it
yields :data:`LOST`, after which the consumer must treat its view of the
engine's cache as gone (the vLLM adapter then publishes a Cleared event).

Needs ``pyzmq`` and ``msgspec``, which the engines that publish this way bring.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["LOST", "ZmqEventSource"]

log = logging.getLogger(__name__)

LOST: Any = object()
"""Yielded where batches were lost for good."""

_END = -1


class ZmqEventSource:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        decode: Callable[[bytes], Any] | None = None,
        replay_timeout_s: float = 2.0,
    ) -> None:
        import msgspec
        import zmq
        import zmq.asyncio

        self._zmq = zmq
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._decode = decode or msgspec.msgpack.decode
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: batches are small
        self._sub.connect(endpoint)
        self._last: int | None = None
        self.replayed = 0
        self.lost = 0

    async def batches(self) -> AsyncIterator[Any]:
        """Decoded batches in order (or :data:`LOST`), until cancelled."""
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) != 3:
                log.warning("ignoring a KV-event message of %d frames from %s", len(frames), self._endpoint)
                continue
            _, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            expected = 0 if self._last is None else self._last + 1
            if seq < expected:
                continue  # a duplicate (after a replay)
            if seq > expected:
                async for item in self._fill(expected, seq):
                    yield item
            self._last = seq
            yield self._decode(payload)

    async def _fill(self, start: int, upto: int) -> AsyncIterator[Any]:
        """The batches ``start .. upto-1`` from the replay socket, or :data:`LOST`."""
        got: dict[int, bytes] = {}
        if self._replay_endpoint is not None:
            got = await self._replay(start)
        missing = [s for s in range(start, upto) if s not in got]
        if missing:
            self.lost += len(missing)
            log.error(
                "lost %d KV-event batches from %s (seq %d..%d) that the engine could not replay",
                len(missing),
                self._endpoint,
                missing[0],
                missing[-1],
            )
            yield LOST
            return
        for s in range(start, upto):
            self.replayed += 1
            yield self._decode(got[s])

    async def _replay(self, start: int) -> dict[int, bytes]:
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: dict[int, bytes] = {}
        try:
            assert self._replay_endpoint is not None
            sock.connect(self._replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(self._replay_timeout_ms):
                    log.warning("no replay answer from %s", self._replay_endpoint)
                    break
                frames = await sock.recv_multipart()
                if len(frames) != 4:
                    continue
                _, _, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == _END:
                    break
                out[seq] = payload
        finally:
            sock.close()
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ctx.destroy(linger=0)
