"""The client side of the worker stream over plain TCP (docs/worker-stream.md, "Transports").

:class:`TcpCall` is what :class:`~commutator.router.mux.WorkerMux` uses of a gRPC bidirectional
call (``write``, ``read``, ``cancel``) over one TCP connection carrying length-prefixed frames
(:mod:`commutator.common.stream_frames`). It connects on its first ``write`` or ``read``; a
connection that cannot be made or fails raises ``Unavailable`` naming the address. ``read``
returns ``grpc.aio.EOF`` when the worker ends the stream cleanly; after ``cancel`` (which closes
the connection), ``read`` and ``write`` raise ``asyncio.CancelledError``, as a cancelled gRPC call's do.

:func:`open_worker_stream` picks the transport for one worker: TCP where the worker advertises a
stream port and ``transport`` is ``tcp``, its ``GenerateMany`` gRPC stream otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from commutator.common.errors import Unavailable
from commutator.common.grpc import EndpointClient
from commutator.common.stream_frames import PREAMBLE, FrameError, pack, read_frame
from commutator.common.tls import MutualTls
from commutator.v1 import worker_pb2

__all__ = ["TcpCall", "open_worker_stream"]

TLS_HANDSHAKE_TIMEOUT_S = 10.0

_WRITE_NOW_LIMIT = 64 * 1024
"""Bytes waiting in a connection's buffer beyond which a frame is not written at once."""


class TcpCall:
    """One worker-stream connection to ``address`` (``host:port``); ``where`` names it in errors.
    With ``tls`` the connection is mutual TLS (the worker's certificate checked for its host, or for
    ``--mtls-server-name``)."""

    def __init__(self, address: str, where: str, tls: MutualTls | None = None) -> None:
        self._host, _, port = address.rpartition(":")
        self._port = int(port)
        self._where = where
        self._tls = tls
        self._connecting: asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._cancelled = False

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._cancelled:
            raise asyncio.CancelledError
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        # Shielded: the reader and the writer both wait for it; either may be cancelled alone.
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self._tls is None:
                reader, writer = await asyncio.open_connection(self._host, self._port)
            else:
                reader, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._tls.client_ssl,
                    server_hostname=self._tls.server_hostname(self._host.strip("[]")),
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
                )
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"{self._where}: cannot connect: {exc or type(exc).__name__}") from None
        if self._cancelled:
            writer.close()
            raise asyncio.CancelledError
        self._writer = writer
        writer.write(PREAMBLE)
        return reader, writer

    async def write(self, frame: worker_pb2.MuxClientFrame) -> None:
        _, writer = await self._connection()
        try:
            writer.write(pack(frame))
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            if self._cancelled:
                raise asyncio.CancelledError from None
            raise Unavailable(f"{self._where}: connection lost: {exc or type(exc).__name__}") from None

    def try_write(self, frame: worker_pb2.MuxClientFrame) -> bool:
        """Send ``frame`` now, from the caller's turn of the event loop, if the connection is up and
        its buffer is not full; False (nothing sent) otherwise: then :meth:`write` it."""
        w = self._writer
        if w is None or self._cancelled or w.transport.is_closing():
            return False
        if w.transport.get_write_buffer_size() > _WRITE_NOW_LIMIT:
            return False  # the peer is slow to read: let write() wait for the drain
        w.write(pack(frame))
        return True

    async def read(self) -> Any:
        """The worker's next frame, or ``grpc.aio.EOF`` when it ended the stream."""
        reader, _ = await self._connection()
        try:
            frame = await read_frame(reader, worker_pb2.MuxServerFrame())
        except (OSError, FrameError) as exc:
            if self._cancelled:
                raise asyncio.CancelledError from None
            raise Unavailable(f"{self._where}: connection lost: {exc or type(exc).__name__}") from None
        if self._cancelled:
            raise asyncio.CancelledError
        return grpc.aio.EOF if frame is None else frame

    def cancel(self) -> bool:
        """Close the connection (the worker then cancels every request on it)."""
        if self._cancelled:
            return False
        self._cancelled = True
        if self._writer is not None:
            self._writer.close()
        elif self._connecting is not None:
            self._connecting.cancel()
        return True


def open_worker_stream(
    workers: EndpointClient[Any], worker_id: int, transport: str = "tcp"
) -> tuple[Any, Callable[[], None], str]:
    """The multiplexed stream to ``worker_id`` as ``WorkerMux`` opens it: (call, release, where).
    ``transport`` ``tcp``: over TCP where the worker advertises a stream port, else ``GenerateMany``."""
    if transport == "tcp":
        inst = workers.pick("direct", worker_id)
        address = inst.info.stream_address
        if address:
            where = f"{workers.target}/stream@{address}"
            return TcpCall(address, where, workers.tls), _nothing, where
    return workers.open_bidi("GenerateMany", worker_id)


def _nothing() -> None:
    pass
