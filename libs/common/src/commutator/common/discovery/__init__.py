"""Discovery (DESIGN.md 3): leases, registrations, model cards and prefix watches.

Two backends behind one contract: etcd (:class:`EtcdBackend`, through aetcd)
and in-memory (:class:`MemoryBackend`, the embedded mode and unit tests).
Roles use :class:`Discovery`, built from config by :func:`connect_discovery`.
"""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import option
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


def connect_discovery(config: DiscoveryConfig, store: MemoryStore | None = None) -> Discovery:
    """A (not yet started) :class:`Discovery` on the configured backend."""
    if config.discovery_backend == "memory":
        return Discovery(MemoryBackend(store, lease_ttl_s=config.lease_ttl_s))
    if config.discovery_backend == "etcd":
        return Discovery(EtcdBackend(config.etcd_endpoints, lease_ttl_s=config.lease_ttl_s))
    raise ValueError(f"unknown discovery backend {config.discovery_backend!r}")
