"""etcd and NATS with authentication and TLS (docs/security.md), against real servers started here
with certificates made for the session: etcd 3.4 with client-certificate TLS and a root user, and
nats-server with TLS (client certificates verified) and a user and password."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aetcd.rpc
import grpc
import pytest
from commutator.common.discovery import (
    Discovery,
    DiscoveryConfig,
    DiscoveryError,
    EtcdBackend,
    InstanceInfo,
    connect_discovery,
    etcd_credentials,
)
from commutator.common.events import EventPlaneConfig, EventPlaneError, NatsEventPlane, connect_event_plane
from commutator.common.local_servers import EtcdProcess, NatsProcess

pytestmark = pytest.mark.integration

ETCD_PASSWORD = "etcd-pw-31"
NATS_PASSWORD = "nats-pw-17"


def _https_ok(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5, context=ctx) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class SecureEtcd(EtcdProcess):
    """etcd serving clients over TLS, client certificates required (``--client-cert-auth``)."""

    def __init__(self, pki: Any) -> None:
        super().__init__()
        self.pki = pki
        self._ctx = ssl.create_default_context(cafile=pki.ca)
        self._ctx.load_cert_chain(pki.client_cert, pki.client_key)

    def _command(self) -> list[str]:
        plain = f"http://{self.host}:{self.client_port}"
        cmd = [c.replace(plain, f"https://{self.host}:{self.client_port}") for c in super()._command()]
        p = self.pki
        tls = ["--cert-file", p.server_cert, "--key-file", p.server_key, "--trusted-ca-file", p.ca]
        return [*cmd, *tls, "--client-cert-auth"]

    def _ready(self) -> bool:
        return _https_ok(f"https://{self.host}:{self.client_port}/health", self._ctx)


async def _enable_auth(etcd: SecureEtcd) -> None:
    """``etcdctl user add root && etcdctl auth enable``, through etcd's gRPC API."""
    creds = etcd_credentials(
        DiscoveryConfig(etcd_ca=etcd.pki.ca, etcd_cert=etcd.pki.client_cert, etcd_key=etcd.pki.client_key)
    )
    assert creds is not None
    async with grpc.aio.secure_channel(etcd.endpoint, creds) as ch:
        auth = aetcd.rpc.AuthStub(ch)
        await auth.UserAdd(aetcd.rpc.AuthUserAddRequest(name="root", password=ETCD_PASSWORD), timeout=5)
        await auth.RoleAdd(aetcd.rpc.AuthRoleAddRequest(name="root"), timeout=5)
        await auth.UserGrantRole(aetcd.rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.AuthEnable(aetcd.rpc.AuthEnableRequest(), timeout=5)


@pytest.fixture
async def secure_etcd(pki: Any) -> AsyncIterator[SecureEtcd]:
    etcd = SecureEtcd(pki)
    etcd.start()
    try:
        await _enable_auth(etcd)
        yield etcd
    finally:
        etcd.close()


def _etcd_config(etcd: SecureEtcd, **changes: Any) -> DiscoveryConfig:
    p = etcd.pki
    base: dict[str, Any] = {
        "etcd_endpoints": (f"https://{etcd.endpoint}",),
        "etcd_username": "root",
        "etcd_password": ETCD_PASSWORD,
        "etcd_ca": p.ca,
        "etcd_cert": p.client_cert,
        "etcd_key": p.client_key,
        "lease_ttl_s": 3,
    }
    return DiscoveryConfig(**{**base, **changes})


async def test_etcd_over_tls_with_a_password_and_after_a_restart(
    secure_etcd: SecureEtcd, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="commutator.common.discovery.etcd")
    d = connect_discovery(_etcd_config(secure_etcd))
    watcher = connect_discovery(_etcd_config(secure_etcd))
    await d.start()
    await watcher.start()
    try:
        await d.register(unique, "decode", "generate", InstanceInfo(address="127.0.0.1:1", role="decode"))
        keys = await watcher.backend.get_prefix(f"/services/{unique}/")
        assert len(keys) == 1
        # etcd forgets its auth tokens when it restarts: the clients authenticate again and go on.
        secure_etcd.restart()
        deadline = time.monotonic() + 15
        while True:
            try:
                await d.register(unique, "decode", "again", InstanceInfo(address="127.0.0.1:2", role="decode"))
                break
            except DiscoveryError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert len(await watcher.backend.get_prefix(f"/services/{unique}/")) == 2
        assert any("authenticating again" in r.getMessage() for r in caplog.records)
    finally:
        await d.close()
        await watcher.close()


async def test_etcd_refuses_a_wrong_password_no_password_and_no_client_certificate(secure_etcd: SecureEtcd) -> None:
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"refused this client: .*authentication failed") as e:
        await connect_discovery(_etcd_config(secure_etcd, etcd_password="bad-pw-9f3")).start()
    assert "bad-pw-9f3" not in str(e.value) and time.monotonic() - t0 < 5  # at once, not after the connect timeout
    anonymous = connect_discovery(_etcd_config(secure_etcd, etcd_username="", etcd_password=""))
    await anonymous.start()  # etcd 3.4 grants leases to anyone; keys need a user
    try:
        # With --client-cert-auth, etcd takes the certificate's name for the user: it has no role here.
        with pytest.raises(DiscoveryError, match="permission denied"):
            await anonymous.register("x", "decode", "g", InstanceInfo(address="127.0.0.1:1", role="decode"))
    finally:
        await anonymous.close(deregister=False)
    p = secure_etcd.pki
    no_cert = _etcd_config(secure_etcd, etcd_cert="", etcd_key="")
    backend = EtcdBackend(
        no_cert.etcd_endpoints,
        lease_ttl_s=3,
        connect_timeout_s=2,
        username="root",
        password=ETCD_PASSWORD,
        credentials=etcd_credentials(no_cert),
    )
    with pytest.raises(DiscoveryError, match="cannot reach etcd"):
        await Discovery(backend).start()
    other_ca = _etcd_config(secure_etcd, etcd_cert=p.other_cert, etcd_key=p.other_key)
    backend = EtcdBackend(
        other_ca.etcd_endpoints,
        lease_ttl_s=3,
        connect_timeout_s=2,
        username="root",
        password=ETCD_PASSWORD,
        credentials=etcd_credentials(other_ca),
    )
    with pytest.raises(DiscoveryError, match="cannot reach etcd"):
        await Discovery(backend).start()


class SecureNats(NatsProcess):
    """nats-server with TLS (client certificates verified) and a user and password."""

    def __init__(self, pki: Any) -> None:
        super().__init__()
        self.pki = pki

    def _command(self) -> list[str]:
        p = self.pki
        tls = ["--tls", "--tlscert", p.server_cert, "--tlskey", p.server_key, "--tlsverify", "--tlscacert", p.ca]
        return [*super()._command(), *tls, "--user", "commutator", "--pass", NATS_PASSWORD]


@pytest.fixture(scope="module")
def secure_nats(pki: Any) -> Iterator[SecureNats]:
    nats = SecureNats(pki)
    nats.start()
    yield nats
    nats.close()


def _nats_config(nats: SecureNats, **changes: Any) -> EventPlaneConfig:
    p = nats.pki
    base: dict[str, Any] = {
        "nats_url": f"tls://127.0.0.1:{nats.port}",
        "nats_user": "commutator",
        "nats_password": NATS_PASSWORD,
        "nats_ca": p.ca,
        "nats_cert": p.client_cert,
        "nats_key": p.client_key,
    }
    return EventPlaneConfig(**{**base, **changes})


async def test_nats_over_tls_with_a_password(secure_nats: SecureNats, unique: str) -> None:
    plane = await connect_event_plane(_nats_config(secure_nats))
    try:
        sub = await plane.subscribe_core(f"{unique}.x")
        await plane.publish_core(f"{unique}.x", b"hello")
        got = await asyncio.wait_for(anext(aiter(sub)), 5)
        assert got.data == b"hello"
        await sub.unsubscribe()
    finally:
        await plane.close()


# nats-server refuses a client without an acceptable certificate in the TLS handshake: the client sees
# the TLS alert (an SSL error) or, when the server's close overtakes it, the connection reset or, if
# it was writing its CONNECT then, a broken pipe. Each way the message says what to check.
TLS_REFUSED = (
    r"cannot reach NATS at tls://127\.0\.0\.1.*(SSL|Connection reset by peer|Broken pipe)"
    r".*the TLS handshake failed: .*certificate"
)


async def test_nats_refuses_a_wrong_password_and_no_client_certificate(secure_nats: SecureNats) -> None:
    from commutator.common.events import nats_ssl_context

    cases = [
        (_nats_config(secure_nats, nats_password="bad-pw-9f3"), r"refused this client: .*Authorization Violation"),
        (_nats_config(secure_nats, nats_user="", nats_password=""), r"refused this client: .*Authorization Violation"),
        (_nats_config(secure_nats, nats_cert="", nats_key=""), TLS_REFUSED),
        (
            _nats_config(secure_nats, nats_cert=secure_nats.pki.other_cert, nats_key=secure_nats.pki.other_key),
            TLS_REFUSED,
        ),
    ]
    for config, message in cases:
        plane = NatsEventPlane(
            config.nats_url,
            connect_timeout_s=3,
            user=config.nats_user,
            password=config.nats_password,
            tls=nats_ssl_context(config),
        )
        t0 = time.monotonic()
        with pytest.raises(EventPlaneError, match=message) as e:
            await plane.connect()
        assert "bad-pw-9f3" not in str(e.value)
        if "refused" in message:
            assert time.monotonic() - t0 < 2  # at once, not after the connect timeout
