"""Session fixtures: a real etcd and a real nats-server (JetStream on) on free loopback ports.

Tests that need servers take ``etcd_server`` / ``nats_server`` (shared by the
session; each test uses its own unique names) or the ``*_private`` variants,
which give a test its own server to stop and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from commutator.common.local_servers import EtcdProcess, NatsProcess


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdProcess]:
    server = EtcdProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsProcess]:
    server = NatsProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def etcd_private() -> Iterator[EtcdProcess]:
    server = EtcdProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def nats_private() -> Iterator[NatsProcess]:
    server = NatsProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def unique() -> str:
    """A short unique name for this test's namespaces, streams and buckets."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def decode_workers(etcd_server: EtcdProcess, unique: str) -> AsyncIterator[Any]:
    """An ``EndpointClient`` of this test's decode workers (``unique`` namespace), found on the real etcd."""
    from commutator.common.discovery import Discovery, EtcdBackend
    from commutator.common.grpc import EndpointClient
    from commutator.v1 import worker_pb2_grpc

    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    c = EndpointClient(d, unique, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=30)
    await c.start()
    yield c
    await c.close()
    await d.close()


class RoleProcess:
    """A role (``python -m commutator.<role>``) running as its own process, logging to a file."""

    def __init__(self, module: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise TimeoutError(f"process still running after {timeout_s} s; log:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        # Whatever the role started (an engine's own processes) is in its process group: gone too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def role_process() -> type[RoleProcess]:
    """The :class:`RoleProcess` class, for fixtures wider than a test that start roles themselves."""
    return RoleProcess


@pytest.fixture
def spawn(etcd_server: EtcdProcess, nats_server: NatsProcess, tmp_path: Path, unique: str) -> Iterator[object]:
    """``spawn(module, *args)`` starts a role wired to the session's etcd and NATS, in namespace ``unique``."""
    procs: list[RoleProcess] = []

    def start(module: str, *args: str, env: dict[str, str] | None = None) -> RoleProcess:
        full_env = dict(os.environ)
        full_env.update(
            {
                "COMMUTATOR_ETCD_ENDPOINTS": etcd_server.endpoint,
                "COMMUTATOR_NATS_URL": nats_server.url,
                "COMMUTATOR_NAMESPACE": unique,
                "COMMUTATOR_LOG": "info",
                "PYTHONUNBUFFERED": "1",
            }
        )
        full_env.update(env or {})
        p = RoleProcess(module, list(args), full_env, tmp_path / f"{module}-{len(procs)}.log")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
