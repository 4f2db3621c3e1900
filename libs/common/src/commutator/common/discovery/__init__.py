"""Discovery (DESIGN.md 3): leases, registrations, model cards and prefix watches.

Two backends behind one contract: etcd (:class:`EtcdBackend`, through aetcd)
and in-memory (:class:`MemoryBackend`, the embedded mode and unit tests).
Roles use :class:`Discovery`, built from config by :func:`connect_discovery`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from commutator.common.config import ConfigError, option
from commutator.common.discovery.base import DiscoveryBackend, DiscoveryError
from commutator.common.discovery.client import Discovery, Registration
from commutator.common.discovery.etcd import EtcdBackend
from commutator.common.discovery.instances import InstanceSet
from commutator.common.discovery.memory import MemoryBackend, MemoryStore
from commutator.common.discovery.types import (
    Instance,
    InstanceEvent,
    InstanceInfo,
    KeyEvent,
    ModelCard,
    ModelCardError,
    ModelCardEvent,
    WatchKind,
    check_artifact_name,
)
from commutator.common.tls import client_ssl_context, read_file

__all__ = [
    "Discovery",
    "DiscoveryBackend",
    "DiscoveryConfig",
    "DiscoveryError",
    "EtcdBackend",
    "Instance",
    "InstanceEvent",
    "InstanceInfo",
    "InstanceSet",
    "KeyEvent",
    "MemoryBackend",
    "MemoryStore",
    "ModelCard",
    "ModelCardError",
    "ModelCardEvent",
    "Registration",
    "WatchKind",
    "check_artifact_name",
    "connect_discovery",
    "etcd_credentials",
]


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Where peers are found."""

    discovery_backend: str = option(
        "etcd", "Discovery store: etcd, or memory (one process only: the embedded mode)", choices=("etcd", "memory")
    )
    etcd_endpoints: tuple[str, ...] = option(
        ("127.0.0.1:2379",),
        "etcd endpoints, comma-separated host:port; tried in order on failure",
        metavar="HOST:PORT,...",
    )
    lease_ttl_s: int = option(5, "Lease TTL in seconds: a process that stops renewing vanishes after this long")
    namespace: str = option("commutator", "Namespace of every key this deployment uses (several can share etcd)")
    etcd_username: str = option("", "etcd user, when etcd has authentication on (with --etcd-password)")
    etcd_password: str = option(
        "", "Password of --etcd-username (prefer the environment variable: flags show in ps)", secret=True
    )
    etcd_ca: str = option(
        "", "PEM CA certificate(s) etcd's server certificate must chain to; turns TLS to etcd on", metavar="PATH"
    )
    etcd_cert: str = option(
        "", "PEM client certificate to present to etcd (--client-cert-auth); with --etcd-key", metavar="PATH"
    )
    etcd_key: str = option("", "PEM private key of --etcd-cert", metavar="PATH")

    def __post_init__(self) -> None:
        if bool(self.etcd_username) != bool(self.etcd_password):
            raise ConfigError(
                "--etcd-username and --etcd-password (COMMUTATOR_ETCD_PASSWORD) go together: one is not set"
            )
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ConfigError("--etcd-cert and --etcd-key go together: one is not set")

    @property
    def etcd_tls(self) -> bool:
        """Whether etcd is reached over TLS: a CA or client certificate given, or https:// endpoints."""
        return bool(self.etcd_ca or self.etcd_cert) or any(
            e.strip().startswith("https://") for e in self.etcd_endpoints
        )


def etcd_credentials(config: DiscoveryConfig) -> grpc.ChannelCredentials | None:
    """gRPC channel credentials for TLS to etcd, or None for plaintext; :class:`StartupError` on bad files."""
    if not config.etcd_tls:
        return None
    flags = ("--etcd-ca", "--etcd-cert", "--etcd-key")
    # The stdlib checks the files first: gRPC would report a bad file only as failed handshakes.
    client_ssl_context(config.etcd_ca, config.etcd_cert, config.etcd_key, what="TLS to etcd", flags=flags)
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(config.etcd_ca, flags[0]) if config.etcd_ca else None,
        private_key=read_file(config.etcd_key, flags[2]) if config.etcd_key else None,
        certificate_chain=read_file(config.etcd_cert, flags[1]) if config.etcd_cert else None,
    )


def connect_discovery(config: DiscoveryConfig, store: MemoryStore | None = None) -> Discovery:
    """A (not yet started) :class:`Discovery` on the configured backend (:class:`StartupError` when the
    etcd TLS files cannot be used)."""
    if config.discovery_backend == "memory":
        return Discovery(MemoryBackend(store, lease_ttl_s=config.lease_ttl_s))
    if config.discovery_backend == "etcd":
        return Discovery(
            EtcdBackend(
                config.etcd_endpoints,
                lease_ttl_s=config.lease_ttl_s,
                username=config.etcd_username,
                password=config.etcd_password,
                credentials=etcd_credentials(config),
            )
        )
    raise ValueError(f"unknown discovery backend {config.discovery_backend!r}")
