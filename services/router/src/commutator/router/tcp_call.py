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
import collections
from collections.abc import Callable
from typing import Any

import grpc
from commutator.common.errors import Unavailable
from commutator.common.grpc import EndpointClient
from commutator.common.stream_frames import PREAMBLE, cut_frames, pack
from commutator.common.tls import MutualTls
from commutator.v1 import worker_pb2

__all__ = ["TcpCall", "open_worker_stream"]

TLS_HANDSHAKE_TIMEOUT_S = 10.0

_WRITE_NOW_LIMIT = 64 * 1024
"""Bytes waiting in a connection's buffer beyond which a frame is not written at once."""

FrameHandler = Callable[[worker_pb2.MuxServerFrame], None]


class _FrameProtocol(asyncio.Protocol):
    """The connection's bytes cut into frames as they arrive (in ``data_received``, no task between).

    A frame goes to the handler of :meth:`TcpCall.pump` when one is set, else into a queue that
    :meth:`TcpCall.read` takes from. The end of the connection is recorded once: clean (between
    frames), or the error that ended it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self.frames: collections.deque[worker_pb2.MuxServerFrame] = collections.deque()
        self.handler: FrameHandler | None = None
        self.ended = False
        self.error: BaseException | None = None  # why it ended (None: cleanly, between frames)
        self._waiter: asyncio.Future[None] | None = None  # a reader (read or pump) waiting for news
        self._drain: asyncio.Future[None] | None = None  # a writer waiting for the buffer to empty
        self._paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self._buf += data
        try:
            cut_frames(self._buf, worker_pb2.MuxServerFrame.FromString, self._deliver)
        except Exception as exc:  # a bad frame, or a handler that failed: the stream cannot go on
            self._end(exc)
            if self.transport is not None:
                self.transport.close()

    def _deliver(self, frame: worker_pb2.MuxServerFrame) -> None:
        handler = self.handler
        if handler is not None:
            handler(frame)
        else:
            self.frames.append(frame)
            self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self._buf:
            exc = ConnectionResetError("the connection ended inside a frame")
        self._end(exc)
        self._release_drain(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release_drain(None)

    # -- for TcpCall ---------------------------------------------------------------------------
    def _end(self, exc: BaseException | None) -> None:
        if not self.ended:
            self.ended = True
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _release_drain(self, exc: BaseException | None) -> None:
        d = self._drain
        if d is not None and not d.done():
            if exc is None:
                d.set_result(None)
            else:
                d.set_exception(exc)
        self._drain = None

    async def wait(self) -> None:
        """Until a frame is queued or the connection ends."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def drain(self) -> None:
        if self.ended:
            raise ConnectionResetError(str(self.error or "the connection was closed"))
        if self._paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain


class TcpCall:
    """One worker-stream connection to ``address`` (``host:port``); ``where`` names it in errors.
    With ``tls`` the connection is mutual TLS (the worker's certificate checked for its host, or for
    ``--mtls-server-name``).

    The worker's frames are cut from the connection's bytes as they arrive. :meth:`pump` hands each
    to a handler from there, in the same turn of the event loop as the bytes (no reader task to wait
    for behind the loop's other work); :meth:`read` returns them one by one instead."""

    def __init__(self, address: str, where: str, tls: MutualTls | None = None) -> None:
        self._host, _, port = address.rpartition(":")
        self._port = int(port)
        self._where = where
        self._tls = tls
        self._connecting: asyncio.Task[_FrameProtocol] | None = None
        self._proto: _FrameProtocol | None = None
        self._cancelled = False

    async def _connection(self) -> _FrameProtocol:
        if self._cancelled:
            raise asyncio.CancelledError
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        # Shielded: the reader and the writer both wait for it; either may be cancelled alone.
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _FrameProtocol:
        loop = asyncio.get_running_loop()
        try:
            if self._tls is None:
                transport, proto = await loop.create_connection(_FrameProtocol, self._host, self._port)
            else:
                transport, proto = await loop.create_connection(
                    _FrameProtocol,
                    self._host,
                    self._port,
                    ssl=self._tls.client_ssl,
                    server_hostname=self._tls.server_hostname(self._host.strip("[]")),
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
                )
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"{self._where}: cannot connect: {exc or type(exc).__name__}") from None
        if self._cancelled:
            transport.close()
            raise asyncio.CancelledError
        self._proto = proto
        transport.write(PREAMBLE)
        return proto

    def _lost(self, exc: BaseException | None) -> BaseException:
        if self._cancelled:
            return asyncio.CancelledError()
        return Unavailable(f"{self._where}: connection lost: {exc or type(exc).__name__}")

    async def write(self, frame: worker_pb2.MuxClientFrame) -> None:
        proto = await self._connection()
        transport = proto.transport
        if proto.ended or transport is None or transport.is_closing():
            raise self._lost(proto.error or ConnectionResetError("the connection was closed"))
        try:
            transport.write(pack(frame))
            await proto.drain()
        except (OSError, RuntimeError) as exc:
            raise self._lost(exc) from None

    def try_write(self, frame: worker_pb2.MuxClientFrame) -> bool:
        """Send ``frame`` now, from the caller's turn of the event loop, if the connection is up and
        its buffer is not full; False (nothing sent) otherwise: then :meth:`write` it."""
        proto = self._proto
        if proto is None or self._cancelled or proto.ended:
            return False
        t = proto.transport
        if t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > _WRITE_NOW_LIMIT:
            return False  # the peer is slow to read: let write() wait for the drain
        t.write(pack(frame))
        return True

    async def read(self) -> Any:
        """The worker's next frame, or ``grpc.aio.EOF`` when it ended the stream."""
        proto = await self._connection()
        while not proto.frames:
            if self._cancelled:
                raise asyncio.CancelledError
            if proto.ended:
                return self._end_of(proto)
            await proto.wait()
        if self._cancelled:
            raise asyncio.CancelledError
        return proto.frames.popleft()

    async def pump(self, handler: FrameHandler) -> None:
        """Hand every frame of the worker's to ``handler`` as it arrives (frames already read first),
        until the worker ends the stream (returns) or the connection fails (raises, as :meth:`read`).
        ``handler`` runs in the connection's ``data_received``: it must not block; if it raises, the
        connection is closed and this raises ``Unavailable``."""
        proto = await self._connection()
        while proto.frames:
            handler(proto.frames.popleft())
        proto.handler = handler
        try:
            while not proto.ended:
                if self._cancelled:
                    raise asyncio.CancelledError
                await proto.wait()
        finally:
            proto.handler = None
        self._end_of(proto)  # EOF, or raises why the stream ended

    def _end_of(self, proto: _FrameProtocol) -> Any:
        if self._cancelled:
            raise asyncio.CancelledError
        if proto.error is None:
            return grpc.aio.EOF
        raise self._lost(proto.error)

    def cancel(self) -> bool:
        """Close the connection (the worker then cancels every request on it)."""
        if self._cancelled:
            return False
        self._cancelled = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            proto._wake()
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
