"""Start etcd and nats-server as child processes on free loopback ports.

Used by the test fixtures and by ``commutator up --distributed``: real
servers, temporary data directories, readiness checks, and restart on the same
ports and data (to test recovery).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["EtcdProcess", "NatsProcess", "ServerNotFound", "find_binary", "free_port"]

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin")


class ServerNotFound(RuntimeError):
    """etcd or nats-server is not installed."""


def find_binary(name: str) -> str:
    """Path of ``name`` on PATH or in the usual sbin folders."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise ServerNotFound(
        f"{name} not found. Run `make servers` (as root it installs the Debian packages "
        "etcd-server and nats-server), or put it on PATH."
    )


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (bind to port 0, outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, for a server started next.

    Chosen below the kernel's ephemeral range where there is room: a port the kernel picked for a bind
    to port 0 would be free again once this returns, and any process starting meanwhile (a worker
    binding its stream port to 0, a client connecting) could be handed it before its user binds it.
    """
    low = _ephemeral_low()
    if low > 11_000:
        for _ in range(200):
            port = random.randrange(10_000, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _ServerProcess:
    name = "server"

    def __init__(self, data_dir: str | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix=f"commutator-{self.name}-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.data_dir) / f"{self.name}.log"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail_log()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s; log:\n{self.tail_log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM; SIGKILL after ``timeout_s``). Data stays."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Kill the server without letting it shut down cleanly."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and delete the data directory (if it was a temporary one)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def tail_log(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def __enter__(self) -> _ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class EtcdProcess(_ServerProcess):
    """A single-member etcd on loopback. ``endpoint`` is ``127.0.0.1:PORT``."""

    name = "etcd"

    def __init__(self, data_dir: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir)
        self.binary = find_binary("etcd")
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def _command(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            self.binary,
            "--name",
            "commutator",
            "--data-dir",
            str(Path(self.data_dir) / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"commutator={peer}",
            "--log-level",
            "warn",
        ]

    def _ready(self) -> bool:
        return _http_ok(f"http://{self.host}:{self.client_port}/health")


class NatsProcess(_ServerProcess):
    """A nats-server with JetStream on loopback. ``url`` is ``nats://127.0.0.1:PORT``."""

    name = "nats"

    def __init__(self, data_dir: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir)
        self.binary = find_binary("nats-server")
        self.host = host
        self.port = free_port(host)
        self.monitor_port = free_port(host)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
            "--jetstream",
            "--store_dir",
            str(Path(self.data_dir) / "jetstream"),
        ]

    def _ready(self) -> bool:
        return _http_ok(f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true")
