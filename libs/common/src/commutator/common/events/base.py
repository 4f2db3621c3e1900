"""The contract both event planes (NATS JetStream, in-memory) fulfil."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "ConsumerSpec",
    "EventPlane",
    "EventPlaneError",
    "Message",
    "PublishError",
    "Publisher",
    "PullConsumer",
    "StreamSpec",
    "StreamState",
    "Subscription",
    "subject_matches",
]


class EventPlaneError(RuntimeError):
    """The event plane refused an operation or could not be reached."""


class PublishError(EventPlaneError):
    """Messages could not be stored, even after retries."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A persistent stream.

    ``work_queue`` streams keep a message only until one consumer acks it (a
    consumer group shares the work); others keep messages until ``max_age_s``,
    ``max_msgs`` or ``max_bytes`` (0 or -1: no limit) or an explicit purge.
    Publishes carry a message id; repeats within ``duplicate_window_s`` are
    stored once, which makes retries after a lost ack safe.
    """

    name: str
    subjects: tuple[str, ...]
    work_queue: bool = False
    max_age_s: float = 0.0
    max_msgs: int = -1
    max_bytes: int = -1
    duplicate_window_s: float = 120.0
    storage: Literal["file", "memory"] = "file"


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable pull consumer; processes that use the same name share its messages."""

    stream: str
    durable: str
    filter_subject: str | None = None
    start_seq: int | None = None
    """Where a newly created consumer starts (stream sequence); ``None``: the first message."""
    ack_wait_s: float = 30.0
    """Unacked messages are delivered again after this long."""
    max_ack_pending: int = 20_000
    ack_all: bool = False
    """Acking a message acks every earlier one (one ack per batch; for in-order readers)."""
    inactive_threshold_s: float | None = None
    """Delete the consumer after this long without a reader (a process that died); ``None``: keep."""
    standing: int = 0
    """For a reader that takes every message in order (the router's KV events): keep one pull
    request for up to this many messages open on the server, so that each message is pushed as it
    is stored, instead of asking for each fetch; messages wait in the process until fetched. 0: ask
    per fetch, for exactly the batch asked (a work queue's readers take only what they can run)."""


@dataclass(frozen=True, slots=True)
class StreamState:
    messages: int
    first_seq: int
    last_seq: int
    bytes: int
    max_bytes: int = -1
    """The stream's byte limit (-1: none)."""


class Message(Protocol):
    """A message delivered by a consumer or a core subscription."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def seq(self) -> int:
        """Stream sequence (0 for core, non-persistent messages)."""
        ...

    @property
    def delivered(self) -> int:
        """How many times this message has been delivered (1 the first time)."""
        ...

    @property
    def stored_at(self) -> float:
        """Unix time at which the stream stored it (0: not known, e.g. a core message)."""
        ...

    async def ack(self) -> None: ...

    async def nak(self, delay_s: float = 0.0) -> None:
        """Ask for redelivery (after ``delay_s``)."""
        ...

    async def in_progress(self) -> None:
        """Still working on it: the ack wait starts again (a worker that dies stops sending these,
        and the message is delivered again one ack wait later)."""
        ...

    async def term(self) -> None:
        """Never deliver this message again (it cannot be processed)."""
        ...


class Publisher(Protocol):
    """Publishes to one stream with asynchronous acks.

    ``publish`` returns once the message is accepted into a bounded window of
    unacknowledged messages (it waits when the window is full: backpressure).
    Messages whose ack times out or fails are sent again, in their original
    order, with their original message id. ``flush`` waits until everything
    published so far is acknowledged.
    """

    async def publish(self, subject: str, data: bytes) -> None: ...

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait for every ack; ``PublishError`` if some could not be stored in time."""
        ...

    @property
    def pending(self) -> int: ...

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush, then stop retrying."""
        ...


class PullConsumer(Protocol):
    async def fetch(self, batch: int = 256, timeout_s: float = 1.0) -> list[Message]:
        """Up to ``batch`` messages, waiting at most ``timeout_s`` for the first.

        Returns ``[]`` when none came; recovers from a lost connection or a
        lost consumer by itself (transient trouble also returns ``[]``).
        """
        ...

    async def close(self) -> None: ...


class Subscription(Protocol):
    """A core (non-persistent) subscription: an async iterator of messages."""

    def __aiter__(self) -> AsyncIterator[Message]: ...

    @property
    def dropped(self) -> int:
        """Messages dropped because this subscriber fell behind its bounded queue."""
        ...

    async def unsubscribe(self) -> None: ...


class EventPlane(Protocol):
    """Streams, consumers, core pub/sub and an object store."""

    name: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ensure_stream(self, spec: StreamSpec, *, update: bool = True) -> None:
        """Create the stream, or (``update``) change an existing one to ``spec``; without
        ``update`` an existing stream keeps its configuration."""
        ...

    async def delete_stream(self, name: str) -> None: ...

    async def stream_state(self, name: str) -> StreamState: ...

    async def purge(self, stream: str, before_seq: int) -> None:
        """Delete every message with a sequence below ``before_seq``."""
        ...

    def publisher(self, stream: str, max_pending: int = 4096, ack_timeout_s: float = 5.0) -> Publisher: ...

    async def publish_core(self, subject: str, data: bytes) -> None:
        """Fire-and-forget to current subscribers (not stored)."""
        ...

    async def subscribe_core(
        self, subject: str, queue_group: str | None = None, max_pending: int = 65_536
    ) -> Subscription: ...

    async def pull_consumer(self, spec: ConsumerSpec) -> PullConsumer:
        """Bind to the durable consumer, creating it from ``spec`` if it does not exist."""
        ...

    async def delete_consumer(self, stream: str, durable: str) -> bool: ...

    async def consumer_ack_floors(self, stream: str) -> dict[str, int]:
        """Every consumer of ``stream`` with the sequence below which it has acked everything."""
        ...

    async def object_put(self, bucket: str, name: str, data: bytes) -> None: ...

    async def object_get(self, bucket: str, name: str) -> bytes | None:
        """The object, or ``None`` if the bucket or the object does not exist."""
        ...

    async def object_delete(self, bucket: str, name: str) -> bool: ...

    async def object_list(self, bucket: str) -> list[str]: ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)
