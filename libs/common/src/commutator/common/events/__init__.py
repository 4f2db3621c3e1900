"""The event plane (DESIGN.md 4.2): persistent streams, durable and work-queue
consumers, core pub/sub and an object store.

Two backends behind one contract: NATS JetStream (:class:`NatsEventPlane`) and
in-memory (:class:`MemoryEventPlane`, the embedded mode and unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import option
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
    nats_url: str = option("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated", metavar="URL")


async def connect_event_plane(
    config: EventPlaneConfig, broker: MemoryBroker | None = None, client_name: str = "commutator"
) -> EventPlane:
    """A connected event plane on the configured backend."""
    plane: EventPlane
    if config.event_plane == "memory":
        plane = MemoryEventPlane(broker)
    elif config.event_plane == "nats":
        plane = NatsEventPlane(config.nats_url, client_name=client_name)
    else:
        raise ValueError(f"unknown event plane {config.event_plane!r}")
    await plane.connect()
    return plane
