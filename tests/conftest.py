"""Session fixtures: a real etcd and a real nats-server (JetStream on) on free loopback ports.

Tests that need servers take ``etcd_server`` / ``nats_server`` (shared by the
session; each test uses its own unique names) or the ``*_private`` variants,
which give a test its own server to stop and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from commutator.common.local_servers import EtcdProcess, NatsProcess


@pytest.fixture(scope="session")
async def _session_loop() -> asyncio.AbstractEventLoop:
    """The event loop every async test and fixture runs on (loop scope "session", pyproject.toml)."""
    return asyncio.get_running_loop()


def _await_chain(coro: Any) -> list[str]:
    """Where a suspended coroutine waits: its frame, then each coroutine or async generator it awaits."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        if nxt is None or not isinstance(nxt, (types.CoroutineType, types.AsyncGeneratorType, types.GeneratorType)):
            if nxt is not None:
                lines.append(f"  awaiting {nxt!r}"[:300])
            break
        coro = nxt
    return lines


def _dump_tasks(loop: asyncio.AbstractEventLoop, test: str) -> None:
    out = [f"--- asyncio tasks of {test}, just before its timeout ---"]
    for task in asyncio.all_tasks(loop):
        out.append(f"{task.get_name()}:")
        out.extend(_await_chain(task.get_coro()))
    print("\n".join(out), file=sys.stderr, flush=True)


@pytest.fixture(autouse=True)
def _dump_tasks_before_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """For an async test: a few seconds before pytest-timeout fires, print where every asyncio task waits
    (pytest-timeout shows the threads only, and a hung test's main thread is just the loop's select)."""
    if not inspect.iscoroutinefunction(getattr(request, "function", None)):
        yield
        return
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)
    if limit <= 10:
        yield
        return
    loop = request.getfixturevalue("_session_loop")
    timer = threading.Timer(limit - 5, lambda: loop.call_soon_threadsafe(_dump_tasks, loop, request.node.nodeid))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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


class Pki:
    """Certificates made for one test session (docs/security.md): a CA with a server and a client
    certificate (both with IP SAN 127.0.0.1 and DNS SANs localhost and ``commutator.test``), and a
    second, unrelated CA with a client certificate of its own. Each ``*_cert``/``*_key`` is a PEM path."""

    def __init__(self, folder: Path) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.folder = folder
        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
            cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            return str(cert_path), str(key_path)

        def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(name(cn))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .sign(key, hashes.SHA256())
            )
            return cert, key

        def make_leaf(
            cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
        ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
            key = ec.generate_private_key(ec.SECP256R1())
            sans = [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
                x509.DNSName("commutator.test"),
            ]
            cert = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(ca[0].subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
                .sign(ca[1], hashes.SHA256())
            )
            return cert, key

        ca = make_ca("commutator test CA")
        self.ca, _ = write("ca", *ca)
        self.server_cert, self.server_key = write("server", *make_leaf("commutator server", ca))
        self.client_cert, self.client_key = write("client", *make_leaf("commutator client", ca))
        other = make_ca("another CA")
        self.other_ca, _ = write("other-ca", *other)
        self.other_cert, self.other_key = write("other", *make_leaf("stranger", other))

    def tls_config(self, role: str = "server", server_name: str = "") -> Any:
        """A :class:`MtlsConfig` presenting the ``role`` certificate (server, client or other)."""
        from commutator.common.tls import MtlsConfig

        cert, key = getattr(self, f"{role}_cert"), getattr(self, f"{role}_key")
        return MtlsConfig(mtls_cert=cert, mtls_key=key, mtls_ca=self.ca, mtls_server_name=server_name)

    def tls_env(self, role: str = "server") -> dict[str, str]:
        """The ``COMMUTATOR_TLS_*`` variables of :meth:`tls_config`."""
        return {
            "COMMUTATOR_MTLS_CERT": getattr(self, f"{role}_cert"),
            "COMMUTATOR_MTLS_KEY": getattr(self, f"{role}_key"),
            "COMMUTATOR_MTLS_CA": self.ca,
        }


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made for this session (:class:`Pki`)."""
    return Pki(tmp_path_factory.mktemp("pki"))
