"""The worker stream over plain TCP (docs/worker-stream.md, "Transports").

The same multiplexed session as ``Worker.GenerateMany`` (:meth:`WorkerServicer.mux_frames`), carried
as length-prefixed protobuf frames (:mod:`commutator.common.stream_frames`) on a connection of its
own: one session per connection. The connection ending, from either side, ends the session, which
aborts every request still on it. A bad preamble, a frame over the limit or one that does not parse
closes that connection only, with a log line.

The client's frames are cut from the connection's bytes as they arrive and handed to the session in
the same turn of the event loop (``data_received``; no reader task between, so a request's start does
not wait behind the loop's other work); the session's frames leave from its frames task, or straight
from an engine pass (:class:`_DirectWriter`).

Lifecycle: :meth:`StreamServer.start` binds; :meth:`StreamServer.drain` stops accepting and waits
(within the grace period) for the sessions to end, which they do once their requests are done
(``WorkerServicer.start_drain``); :meth:`StreamServer.close` closes the server and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from ssl import SSLContext

from commutator.common.stream_frames import PREAMBLE, FrameError, cut_frames, pack
from commutator.v1 import worker_pb2
from commutator.worker.mux import MuxSession
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
        self._connections: set[_Connection] = set()
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self._servicer, self._ssl, self._connections), self._host, self._want_port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("worker stream listening on %s:%d (TCP%s)", self._host, self.port, ", mutual TLS" if self._ssl else "")

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; wait up to ``grace_s`` for the sessions to end, then close the rest."""
        if self._server is not None:
            self._server.close()
        pending = [c.closed for c in self._connections]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for c in conns:
            c.abort()
        await asyncio.gather(*(c.closed for c in conns), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class _Connection(asyncio.Protocol):
    """One client connection: the TLS handshake (with ``ssl``), the preamble, then a session whose
    client frames are handed over from ``data_received``. :attr:`closed` is done when the connection
    and its session have ended."""

    def __init__(self, servicer: WorkerServicer, ssl: SSLContext | None, registry: set[_Connection]) -> None:
        self._servicer = servicer
        self._ssl = ssl
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._peer: object = None
        self._buf = bytearray()
        self._preamble = True  # still waiting for it
        self._timer: asyncio.TimerHandle | None = None
        self._tls: asyncio.Task[None] | None = None
        self.session: MuxSession | None = None
        self._sender: asyncio.Task[None] | None = None
        self._lost = False
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._registry.add(self)
        self.transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")
        if self._ssl is not None:
            # The handshake on the connection (not the listener), so that a refused client gets a log line.
            transport.pause_reading()  # type: ignore[attr-defined]  # start_tls takes the bytes from here
            self._tls = self._loop.create_task(self._start_tls(), name="mux-tcp-tls")
        else:
            self._wait_preamble()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        buf = self._buf
        buf += data
        if self._preamble:
            if len(buf) < len(PREAMBLE):
                return
            if buf[: len(PREAMBLE)] != PREAMBLE:
                log.warning(
                    "worker stream: connection from %s closed: bad preamble %r", self._peer, bytes(buf[: len(PREAMBLE)])
                )
                self._close()
                return
            del buf[: len(PREAMBLE)]
            self._preamble = False
            if self._timer is not None:
                self._timer.cancel()
            self._open_session()
        session = self.session
        assert session is not None
        try:
            cut_frames(buf, worker_pb2.MuxClientFrame.FromString, session.client_frame)
        except FrameError as exc:
            log.warning("worker stream: connection from %s closed: %s", self._peer, exc)
            self._close()
        except Exception:  # our bug, not the client's: this connection only
            log.exception("worker stream: connection from %s failed", self._peer)
            self._close()

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours too (connection_lost ends the session)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            log.debug("worker stream: connection from %s lost: %s", self._peer, exc)
        if self._timer is not None:
            self._timer.cancel()
        if self._tls is not None:
            self._tls.cancel()
        self._release_drain(exc or ConnectionResetError("the connection was closed"))
        if self._sender is not None and not self._sender.done():
            # The client is gone: the session ends at once, aborting its requests.
            self._sender.cancel()
        else:
            self._done()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release_drain(None)

    # -- the connection's steps ----------------------------------------------------------------
    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self._ssl is not None
        tls = None
        try:
            tls = await self._loop.start_tls(
                transport, self, self._ssl, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            log.warning("worker stream: TLS handshake from %s failed: %s", self._peer, exc or type(exc).__name__)
        finally:
            if tls is None or self._lost:  # failed, cancelled (the server closes) or lost meanwhile
                self._lost = True
                transport.close()
                self._done()  # whether or not the TLS layer tells this protocol the connection was lost
        if tls is not None and not self._lost:
            self.transport = tls
            self._wait_preamble()

    def _wait_preamble(self) -> None:
        self._timer = self._loop.call_later(PREAMBLE_TIMEOUT_S, self._no_preamble)

    def _no_preamble(self) -> None:
        if self._preamble and not self._lost:
            log.warning("worker stream: connection from %s closed: no preamble", self._peer)
            self._close()

    def _open_session(self) -> None:
        self.session = self._servicer.open_session(_DirectWriter(self))
        self._sender = self._loop.create_task(self._send(self.session), name="mux-tcp-send")

    async def _send(self, session: MuxSession) -> None:
        try:
            async with contextlib.aclosing(self._servicer.mux_frames(None, session=session)) as frames:
                async for frame in frames:
                    t = self.transport
                    if t is None or self._lost:
                        break
                    t.write(pack(frame))
                    await self._drained()
        except ConnectionError as exc:
            log.debug("worker stream: connection from %s lost: %s", self._peer, exc)
        except asyncio.CancelledError:
            pass  # the connection was lost (or the server closes): the session aborted its requests
        except Exception:
            log.exception("worker stream: session with %s failed", self._peer)
        finally:
            self._servicer.close_session(session)
            self._close()  # the session is over (the worker drains, say): so is the connection
            if self._lost:
                self._done()

    async def _drained(self) -> None:
        if self._lost:
            raise ConnectionResetError("the connection was closed")
        if self._paused:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain

    def _release_drain(self, exc: BaseException | None) -> None:
        d = self._drain
        self._drain = None
        if d is not None and not d.done():
            if exc is None:
                d.set_result(None)
            else:
                d.set_exception(exc)

    def _close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def abort(self) -> None:
        """Close the connection now (the server closes): the session aborts its requests."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        t = self.transport
        if t is not None:
            t.abort()
        if self._tls is not None:
            self._tls.cancel()

    def _done(self) -> None:
        self._registry.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


class _DirectWriter:
    """Frames written from the engine's pass (:class:`~commutator.worker.mux.DirectSend`) while the
    connection has less than ``_DIRECT_LIMIT`` bytes waiting; beyond that the frames task writes and
    waits for the buffer to drain, as for every other frame."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def can_send(self) -> bool:
        t = self._conn.transport
        return t is not None and not t.is_closing() and t.get_write_buffer_size() < _DIRECT_LIMIT

    def send(self, frame: worker_pb2.MuxServerFrame) -> None:
        t = self._conn.transport
        assert t is not None
        t.write(pack(frame))
