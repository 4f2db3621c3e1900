"""What the SGLang adapter takes from the ``sglang`` package, behind one injectable object.

:class:`SglangApi` is the seam: :class:`RealSglangApi` (the default) imports
``sglang`` only when called; tests pass a hand-written fake of the same few
calls. Everything else the adapter does goes through the engine object the API
creates, exactly as it would through ``sglang.Engine``.

Facts relied on (``sgl-project/sglang``, ``python/sglang/srt/server_args.py``
``prepare_server_args``; ``python/sglang/srt/entrypoints/engine.py`` at 001067f;
``python/sglang/srt/disaggregation/kv_events.py`` ``ZmqEventPublisher``):

- ``prepare_server_args(argv)`` parses the same flags as ``sglang serve`` with
  argparse (unknown flags: ``SystemExit`` and a message on stderr);
  ``sglang.Engine(server_args=...)`` loads the model in subprocesses and returns
  once it is ready (it must run on the main thread: it installs signal handlers);
- the KV-event publisher of data-parallel rank ``r`` binds ``endpoint`` with its
  port moved up by ``r`` (``inproc`` endpoints get ``_dp{r}`` instead; ``ipc`` ones
  cannot be offset) and sends multipart ``(topic, seq 8-byte big-endian, msgpack)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

__all__ = ["KvEventSource", "RealSglangApi", "SglangApi", "ZmqKvEventSource", "subscriber_endpoint"]


class KvEventSource(Protocol):
    """One data-parallel rank's KV-event stream."""

    async def recv(self) -> tuple[int | None, Any]:
        """The next ``(sequence number, decoded EventBatch)``."""
        ...

    def close(self) -> None: ...


class SglangApi(Protocol):
    def parse_server_args(self, argv: list[str]) -> Any:
        """``ServerArgs`` from ``sglang serve``-style flags; raises (``SystemExit`` included) when refused."""
        ...

    def create_engine(self, server_args: Any) -> Any:
        """A started ``sglang.Engine`` (blocks until the model is loaded)."""
        ...

    def sampling_param_names(self) -> frozenset[str]:
        """The keys the installed version's ``SamplingParams`` accepts."""
        ...

    def open_kv_events(self, endpoint: str, topic: str) -> KvEventSource:
        """Subscribe to one rank's publisher at ``endpoint`` (already offset and connectable)."""
        ...


def subscriber_endpoint(endpoint: str, dp_rank: int) -> str:
    """Where rank ``dp_rank``'s publisher of ``endpoint`` can be reached from this host.

    The same offset rule as SGLang's ``ZmqEventPublisher.offset_endpoint_port``, then
    a wildcard bind address (``*``, ``0.0.0.0``, ``[::]``) becomes loopback.
    """
    ep = endpoint
    if dp_rank:
        if "inproc" in ep:
            ep = f"{ep}_dp{dp_rank}"
        elif "tcp" in ep and ":" in ep:
            base, _, port = ep.rpartition(":")
            ep = f"{base}:{int(port) + dp_rank}"
        else:
            raise ValueError(f"SGLang cannot offset the KV-event endpoint {endpoint!r} for rank {dp_rank}")
    for wildcard in ("//*:", "//0.0.0.0:", "//[::]:"):
        ep = ep.replace(wildcard, "//127.0.0.1:")
    return ep


class ZmqKvEventSource:
    """A ZMQ SUB socket on one publisher; payloads decoded with msgspec (an SGLang dependency)."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        from msgspec.msgpack import decode  # msgspec comes with sglang

        self._decode = decode

    async def recv(self) -> tuple[int | None, Any]:
        frames = await self._sock.recv_multipart()
        if len(frames) >= 3:
            seq = int.from_bytes(frames[-2], "big", signed=True)
            return seq, self._decode(frames[-1])
        return None, self._decode(frames[-1])

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class RealSglangApi:
    """The installed ``sglang`` package (imported on first use)."""

    def parse_server_args(self, argv: list[str]) -> Any:
        from sglang.srt.server_args import prepare_server_args

        return prepare_server_args(argv)

    def create_engine(self, server_args: Any) -> Any:
        import sglang

        return sglang.Engine(server_args=server_args)

    def sampling_param_names(self) -> frozenset[str]:
        from sglang.srt.sampling.sampling_params import SamplingParams

        return frozenset(p for p in inspect.signature(SamplingParams.__init__).parameters if p != "self")

    def open_kv_events(self, endpoint: str, topic: str) -> KvEventSource:
        return ZmqKvEventSource(endpoint, topic)
