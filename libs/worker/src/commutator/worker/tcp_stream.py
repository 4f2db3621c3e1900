"""The worker stream over plain TCP (docs/worker-stream.md, "Transports").

The same multiplexed session as ``Worker.GenerateMany`` (:meth:`WorkerServicer.mux_frames`), carried
as length-prefixed protobuf frames (:mod:`commutator.common.stream_frames`) on a connection of its
own: one session per connection. The connection ending, from either side, ends the session, which
aborts every request still on it. A bad preamble, a frame over the limit or one that does not parse
closes that connection only, with a log line.

Lifecycle: :meth:`StreamServer.start` binds; :meth:`StreamServer.drain` stops accepting and waits
(within the grace period) for the sessions to end, which they do once their requests are done
(``WorkerServicer.start_drain``); :meth:`StreamServer.close` closes the server and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from ssl import SSLContext

from commutator.common.stream_frames import PREAMBLE, FrameError, pack, read_frame
from commutator.v1 import worker_pb2
from commutator.worker.servicer import WorkerServicer

__all__ = ["StreamServer"]

log = logging.getLogger(__name__)

PREAMBLE_TIMEOUT_S = 10.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0
_DIRECT_LIMIT = 64 * 1024
"""Bytes waiting on a connection above which a pass's frame is left to the frames task (which drains)."""


class StreamServer:
    """Accepts worker-stream connections on ``host:port`` (port 0: a free one, see :attr:`port`).

    With ``ssl`` (a server context that requires client certificates) each connection is TLS; a
    client whose handshake fails (no certificate, one from another CA) is closed with a log line."""

    def __init__(self, servicer: WorkerServicer, host: str, port: int = 0, ssl: SSLContext | None = None) -> None:
        self._servicer = servicer
        self._ssl = ssl
        self._host = host
        self._want_port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._want_port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("worker stream listening on %s:%d (TCP%s)", self._host, self.port, ", mutual TLS" if self._ssl else "")

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; wait up to ``grace_s`` for the sessions to end, then close the rest."""
        if self._server is not None:
            self._server.close()
        pending = list(self._connections)
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own (not asyncio's handler task): close() cancels it, and nothing logs that.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer), name="mux-tcp-conn")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        try:
            if self._ssl is not None:
                try:
                    # On the connection (not the listener), so that a refused client gets a log line.
                    await writer.start_tls(self._ssl, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
                except (OSError, TimeoutError) as exc:
                    log.warning("worker stream: TLS handshake from %s failed: %s", peer, exc or type(exc).__name__)
                    return
            try:
                preamble = await asyncio.wait_for(reader.readexactly(len(PREAMBLE)), PREAMBLE_TIMEOUT_S)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                log.warning("worker stream: connection from %s closed: no preamble", peer)
                return
            if preamble != PREAMBLE:
                log.warning("worker stream: connection from %s closed: bad preamble %r", peer, preamble)
                return
            sender = asyncio.get_running_loop().create_task(self._send(reader, writer, peer), name="mux-tcp-send")
            try:
                await sender
            except asyncio.CancelledError:
                if not sender.cancelled() or task.cancelling():
                    raise
                # The client's side ended (closed, broke the framing): the session is over.
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object) -> None:
        sender = asyncio.current_task()
        assert sender is not None
        frames = self._servicer.mux_frames(
            self._client_frames(reader, peer, sender.cancel), direct=_DirectWriter(writer)
        )
        async with contextlib.aclosing(frames):
            try:
                async for frame in frames:
                    writer.write(pack(frame))
                    await writer.drain()
            except ConnectionError as exc:
                log.debug("worker stream: connection from %s lost: %s", peer, exc)

    async def _client_frames(
        self, reader: asyncio.StreamReader, peer: object, end_session: Callable[[], object]
    ) -> AsyncIterator[worker_pb2.MuxClientFrame]:
        """The client's frames. When the client's side ends on its own (closed, failed, broke the
        framing) the session ends at once (``end_session``): on this transport that is the client gone."""
        try:
            while True:
                frame = await read_frame(reader, worker_pb2.MuxClientFrame())
                if frame is None:
                    break
                yield frame
        except FrameError as exc:
            log.warning("worker stream: connection from %s closed: %s", peer, exc)
        except ConnectionError as exc:
            log.debug("worker stream: connection from %s lost: %s", peer, exc)
        end_session()


class _DirectWriter:
    """Frames written from the engine's pass (:class:`~commutator.worker.mux.DirectSend`) while the
    connection has less than ``_DIRECT_LIMIT`` bytes waiting; beyond that the frames task writes and
    waits for the buffer to drain, as for every other frame."""

    __slots__ = ("_transport", "_writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._transport = writer.transport

    def can_send(self) -> bool:
        t = self._transport
        return not t.is_closing() and t.get_write_buffer_size() < _DIRECT_LIMIT

    def send(self, frame: worker_pb2.MuxServerFrame) -> None:
        self._writer.write(pack(frame))
