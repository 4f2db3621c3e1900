"""The event plane (DESIGN.md 4.2): persistent streams, durable and work-queue
consumers, core pub/sub and an object store.

Two backends behind one contract: NATS JetStream (:class:`NatsEventPlane`) and
in-memory (:class:`MemoryEventPlane`, the embedded mode and unit tests).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from commutator.common.config import ConfigError, masked_repr, option
from commutator.common.events.base import (
    ConsumerSpec,
    EventPlane,
    EventPlaneError,
    Message,
    Publisher,
    PublishError,
    PullConsumer,
    StreamSpec,
    StreamState,
    Subscription,
    subject_matches,
)
from commutator.common.events.memory import MemoryBroker, MemoryEventPlane
from commutator.common.events.nats import NatsEventPlane
from commutator.common.tls import client_ssl_context

__all__ = [
    "ConsumerSpec",
    "EventPlane",
    "EventPlaneConfig",
    "EventPlaneError",
    "MemoryBroker",
    "MemoryEventPlane",
    "Message",
    "NatsEventPlane",
    "PublishError",
    "Publisher",
    "PullConsumer",
    "StreamSpec",
    "StreamState",
    "Subscription",
    "connect_event_plane",
    "nats_ssl_context",
    "subject_matches",
]


@dataclass(frozen=True, slots=True)
class EventPlaneConfig:
    """Where KV events, load statistics and snapshots travel."""

    event_plane: str = option(
        "nats",
        "Event plane: nats (JetStream), or memory (one process only: the embedded mode)",
        choices=("nats", "memory"),
    )
    nats_url: str = option(
        "nats://127.0.0.1:4222",
        "NATS server URL(s), comma-separated (tls://host:port for TLS with the system's CAs; a password in a "
        "URL is masked in logs, but --nats-password is the better place)",
        metavar="URL",
    )
    nats_user: str = option("", "NATS user, when nats-server has authorization on (with --nats-password)")
    nats_password: str = option(
        "", "Password of --nats-user (prefer the environment variable: flags show in ps)", secret=True
    )
    nats_token: str = option("", "NATS authorization token (instead of a user and password)", secret=True)
    nats_ca: str = option(
        "", "PEM CA certificate(s) the NATS server's certificate must chain to; turns TLS to NATS on", metavar="PATH"
    )
    nats_cert: str = option(
        "", "PEM client certificate to present to NATS (tls verify); with --nats-key", metavar="PATH"
    )
    nats_key: str = option("", "PEM private key of --nats-cert", metavar="PATH")

    __repr__ = masked_repr  # nats_url may carry a password

    def __post_init__(self) -> None:
        if bool(self.nats_user) != bool(self.nats_password):
            raise ConfigError("--nats-user and --nats-password (COMMUTATOR_NATS_PASSWORD) go together: one is not set")
        if self.nats_user and self.nats_token:
            raise ConfigError("--nats-token and --nats-user are two ways to authenticate: give one")
        if bool(self.nats_cert) != bool(self.nats_key):
            raise ConfigError("--nats-cert and --nats-key go together: one is not set")


def nats_ssl_context(config: EventPlaneConfig) -> ssl.SSLContext | None:
    """The client context for TLS to NATS, or None (plaintext, or ``tls://`` URLs with the system's CAs);
    :class:`StartupError` on bad files."""
    if not (config.nats_ca or config.nats_cert):
        return None
    return client_ssl_context(
        config.nats_ca,
        config.nats_cert,
        config.nats_key,
        what="TLS to NATS",
        flags=("--nats-ca", "--nats-cert", "--nats-key"),
    )


async def connect_event_plane(
    config: EventPlaneConfig, broker: MemoryBroker | None = None, client_name: str = "commutator"
) -> EventPlane:
    """A connected event plane on the configured backend."""
    plane: EventPlane
    if config.event_plane == "memory":
        plane = MemoryEventPlane(broker)
    elif config.event_plane == "nats":
        plane = NatsEventPlane(
            config.nats_url,
            client_name=client_name,
            user=config.nats_user,
            password=config.nats_password,
            token=config.nats_token,
            tls=nats_ssl_context(config),
        )
    else:
        raise ValueError(f"unknown event plane {config.event_plane!r}")
    await plane.connect()
    return plane
