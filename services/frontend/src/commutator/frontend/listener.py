"""The HTTP port: bound sockets, and a site for aiohttp's runner that accepts every waiting connection.

Why not aiohttp's ``TCPSite``: it serves the port with ``loop.create_server``, and under uvloop (this
process's default loop) that is libuv's server, which since libuv 1.45 (libuv pull request 3696)
accepts one connection each time the event loop polls. A frontend under load polls seldom, since one
turn of its loop runs every callback that became ready (frames from workers, SSE writes, request
handlers), so new connections waited in the kernel's accept queue. Measured on the 2-core development
machine, uvloop 0.23 (libuv 1.52), an open loop at 430 requests/s over new connections: 10-40
connections accepted a second, 870 waiting in the queue, and a quarter of the requests served 3.5-7.5 s
after they were sent while the frontend's own time to first token stayed under 0.5 s for all of them.

:class:`AcceptingSite` listens on its own sockets and, each time one is readable, accepts up to
:data:`ACCEPT_BATCH` connections, handing each to aiohttp with ``loop.connect_accepted_socket`` (TLS
included). asyncio's own loop gets the same site.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

__all__ = ["ACCEPT_BATCH", "AcceptingSite", "PortUnavailable", "bind_sockets"]

log = logging.getLogger(__name__)

ACCEPT_BATCH = 256
"""Connections accepted each time a listening socket is readable; more wait for the next turn of the loop."""

ACCEPT_RETRY_S = 1.0
"""How long accepting pauses when the process is out of file descriptors (the connections wait in the queue)."""

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class PortUnavailable(OSError):
    """The HTTP port cannot be had (in use, a host that is not here): one line for the log."""


def bind_sockets(host: str, port: int, *, reuse_port: bool, reuse_address: bool = True) -> list[socket.socket]:
    """Bind ``host:port``, every address ``host`` stands for (as asyncio's server does; all interfaces for
    an empty host), without listening. Port 0 becomes one free port for every address. Raises
    :class:`PortUnavailable`."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(f"cannot resolve --http-host {host!r}: {exc.strerror or exc}") from None
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            s = socket.socket(family, kind, proto)
            held.append(s)
            if reuse_address:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(held) > 1:
                address = (address[0], held[0].getsockname()[1], *address[2:])
            try:
                s.bind(address)
            except OSError as exc:
                where = f"{host or '*'}:{port or held[0].getsockname()[1]}"
                if exc.errno == errno.EADDRINUSE:
                    raise PortUnavailable(
                        f"{where} is in use by another program (a socket without SO_REUSEPORT, or another user's):"
                        " stop it or choose another --http-port"
                    ) from None
                raise PortUnavailable(f"cannot bind {where}: {exc.strerror or exc}") from None
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


class _Listener(asyncio.AbstractServer):
    """Accepts on ``socks`` (listening, non-blocking) for aiohttp's protocol factory until :meth:`close`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socks: list[socket.socket],
        factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: ssl.SSLContext | None,
        batch: int,
        retry_s: float = ACCEPT_RETRY_S,
    ) -> None:
        self._loop = loop
        self._socks = socks
        self._factory = factory
        self._ssl = ssl_context
        self._batch = batch
        self._retry_s = retry_s
        self._connecting: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._serving = True
        self.accepted = 0
        for s in socks:
            loop.add_reader(s.fileno(), self._accept, s)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._socks)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while it waited in the queue
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # The socket stays readable: without a pause this callback would spin.
                    log.warning(
                        "cannot accept HTTP connections (%s); pausing %.1f s (they wait in the listen queue)",
                        exc.strerror or exc,
                        self._retry_s,
                    )
                    self._pause()
                else:
                    log.error("accepting an HTTP connection failed: %s", exc)
                return
            conn.setblocking(False)
            self.accepted += 1
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:  # a TLS handshake that failed, a client that reset: its connection only
            conn.close()
            log.debug("HTTP connection dropped before it was served: %r", exc)

    def _pause(self) -> None:
        if self._retry is not None or not self._serving:
            return
        for s in self._socks:
            self._loop.remove_reader(s.fileno())

        def resume() -> None:
            self._retry = None
            if self._serving:
                for s in self._socks:
                    self._loop.add_reader(s.fileno(), self._accept, s)

        self._retry = self._loop.call_later(self._retry_s, resume)

    # -- asyncio.AbstractServer ----------------------------------------------------------
    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections already accepted carry on)."""
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for s in self._socks:
            self._loop.remove_reader(s.fileno())
            s.close()
        for task in list(self._connecting):  # handshakes not finished: those clients never got served
            task.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Serving starts when the listener is made."""

    async def serve_forever(self) -> None:
        raise NotImplementedError("the frontend's runner owns the listener's lifetime")

    async def wait_closed(self) -> None:
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)


class AcceptingSite(web.BaseSite):
    """aiohttp's ``TCPSite``, accepting every waiting connection per turn of the loop (module docstring)."""

    __slots__ = ("_batch", "_bound_port", "_host", "_listener", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
        batch: int = ACCEPT_BATCH,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._batch = batch
        self._listener: _Listener | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The bound port once started (``port`` 0 asks for a free one), else the one asked for."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._listener.accepted if self._listener is not None else 0

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host or '0.0.0.0'}:{self.port}"

    async def start(self) -> None:
        await super().start()
        factory = self._runner.server
        assert factory is not None
        socks = bind_sockets(self._host, self._port, reuse_port=self._reuse_port)
        try:
            for s in socks:
                s.listen(self._backlog)
                s.setblocking(False)
            self._bound_port = int(socks[0].getsockname()[1])
        except BaseException:
            for s in socks:
                s.close()
            raise
        self._server = self._listener = _Listener(
            asyncio.get_running_loop(), socks, factory, self._ssl_context, self._batch
        )
