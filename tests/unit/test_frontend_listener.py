"""The frontend's HTTP listener (commutator.frontend.listener): every waiting connection accepted per turn
of the event loop, under uvloop as under asyncio, served by aiohttp; accepting pauses, not spins, when
the process is out of file descriptors; a stopped site accepts nothing more."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web
from commutator.frontend.listener import AcceptingSite, _Listener

pytestmark = pytest.mark.unit

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def _run(loop_name: str, coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(coro)


async def _hello_runner() -> web.AppRunner:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    return runner


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_waiting_connections_are_accepted_in_a_few_turns_and_served(loop_name: str) -> None:
    """libuv's own server (uvloop's create_server, aiohttp's TCPSite) takes one connection per turn: 40
    connections would need 40 turns. The site takes up to ``batch`` per turn."""
    n, batch = 40, 16

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        runner = await _hello_runner()
        site = AcceptingSite(runner, "127.0.0.1", 0, batch=batch)
        await site.start()
        clients: list[socket.socket] = []
        try:
            for _ in range(n):  # the kernel completes each handshake into the listen queue
                clients.append(socket.create_connection(("127.0.0.1", site.port)))
            turns = 0
            while site.accepted < n and turns < 10 * n:
                await asyncio.sleep(0)
                turns += 1
            assert site.accepted == n
            assert turns <= math.ceil(n / batch) + 2
            for c in clients:
                c.setblocking(False)
                await loop.sock_sendall(c, b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            for c in clients:
                data = b""
                while b"hello" not in data:
                    chunk = await asyncio.wait_for(loop.sock_recv(c, 4096), 10)
                    assert chunk, f"connection closed after {data!r}"
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 OK")
        finally:
            for c in clients:
                c.close()
            await runner.cleanup()

    _run(loop_name, scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_stopped_site_accepts_nothing_more(loop_name: str) -> None:
    async def scenario() -> None:
        runner = await _hello_runner()
        site = AcceptingSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site.port
        assert port > 0 and site.name == f"http://127.0.0.1:{port}"
        await runner.cleanup()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert site.port == port  # still says where it was

    _run(loop_name, scenario())


class _OutOfDescriptors:
    """A listening socket whose accept() fails as a process out of file descriptors does (readable all along)."""

    def __init__(self, readable: socket.socket) -> None:
        self._readable = readable
        self.accepts = 0

    def fileno(self) -> int:
        return self._readable.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self._readable.close()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_out_of_descriptors_pauses_accepting_instead_of_spinning(
    loop_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        b.send(b"x")  # a stays readable: a listener that did not pause would be called every turn
        fake = _OutOfDescriptors(a)
        listener = _Listener(loop, [fake], asyncio.Protocol, None, batch=8, retry_s=0.2)  # type: ignore[list-item]
        try:
            for _ in range(20):
                await asyncio.sleep(0)
            assert fake.accepts == 1
            assert listener.is_serving()
            # Resumed after retry_s (0.2 s), failed again, paused again. Half-way to the next resume
            # (0.4 s): sleeping exactly 0.4 s raced with it (3 accepts, once, in a fresh-clone run).
            await asyncio.sleep(0.3)
            assert fake.accepts == 2
        finally:
            listener.close()
            b.close()
        assert not listener.is_serving()
        await asyncio.sleep(0.3)
        assert fake.accepts == 2  # closed: the pending resume was cancelled

    with caplog.at_level(logging.WARNING, logger="commutator.frontend.listener"):
        _run(loop_name, scenario())
    assert "cannot accept HTTP connections (Too many open files); pausing 0.2 s" in caplog.text
