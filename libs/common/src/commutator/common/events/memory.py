"""In-memory event plane: streams, consumers, pub/sub and objects inside one process.

A :class:`MemoryBroker` plays the server (shared by the roles of the embedded
mode); each :class:`MemoryEventPlane` is one client. Semantics follow
JetStream: stream sequences from 1, deduplication by message id, durable
consumers shared by name, redelivery after the ack wait, work-queue streams
that drop a message once it is acked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from commutator.common import metrics
from commutator.common.events.base import (
    ConsumerSpec,
    EventPlaneError,
    Message,
    StreamSpec,
    StreamState,
    subject_matches,
)

__all__ = ["MemoryBroker", "MemoryEventPlane"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stored:
    seq: int
    subject: str
    data: bytes
    at: float
    wall: float  # Unix time, for Message.stored_at


@dataclass(slots=True)
class _Consumer:
    spec: ConsumerSpec
    next_seq: int
    pending: dict[int, float] = field(default_factory=dict)  # seq -> redeliver at
    deliveries: dict[int, int] = field(default_factory=dict)
    ack_floor: int = 0


class _Stream:
    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.msgs: OrderedDict[int, _Stored] = OrderedDict()
        self.last_seq = 0
        self.bytes = 0
        self.dedup: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.consumers: dict[str, _Consumer] = {}
        self.new_data = asyncio.Condition()

    def accepts(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.spec.subjects)

    def store(self, subject: str, data: bytes, msg_id: str | None) -> int:
        now = time.monotonic()
        window = self.spec.duplicate_window_s
        while self.dedup and next(iter(self.dedup.values()))[1] < now - window:
            self.dedup.popitem(last=False)
        if msg_id is not None and msg_id in self.dedup:
            return self.dedup[msg_id][0]
        self.last_seq += 1
        self.msgs[self.last_seq] = _Stored(self.last_seq, subject, data, now, time.time())
        self.bytes += len(data)
        if msg_id is not None:
            self.dedup[msg_id] = (self.last_seq, now)
        self._enforce_limits(now)
        return self.last_seq

    def _enforce_limits(self, now: float) -> None:
        spec = self.spec
        while self.msgs and (
            (spec.max_msgs > 0 and len(self.msgs) > spec.max_msgs)
            or (spec.max_bytes > 0 and self.bytes > spec.max_bytes)
            or (spec.max_age_s > 0 and next(iter(self.msgs.values())).at < now - spec.max_age_s)
        ):
            _, old = self.msgs.popitem(last=False)
            self.bytes -= len(old.data)

    def remove(self, seq: int) -> None:
        old = self.msgs.pop(seq, None)
        if old is not None:
            self.bytes -= len(old.data)

    def first_seq(self) -> int:
        return next(iter(self.msgs)) if self.msgs else self.last_seq + 1


class MemoryBroker:
    """Shared state of the in-memory event plane."""

    _named: dict[str, MemoryBroker] = {}

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.subscribers: list[_MemorySubscription] = []
        self.objects: dict[str, dict[str, bytes]] = {}

    @classmethod
    def named(cls, name: str = "default") -> MemoryBroker:
        broker = cls._named.get(name)
        if broker is None:
            broker = cls._named[name] = MemoryBroker()
        return broker

    def stream(self, name: str) -> _Stream:
        s = self.streams.get(name)
        if s is None:
            raise EventPlaneError(f"stream {name!r} not found")
        return s

    def stream_for(self, subject: str) -> _Stream:
        for s in self.streams.values():
            if s.accepts(subject):
                return s
        raise EventPlaneError(f"no stream takes subject {subject!r}")

    async def store(self, subject: str, data: bytes, msg_id: str | None) -> int:
        s = self.stream_for(subject)
        seq = s.store(subject, data, msg_id)
        async with s.new_data:
            s.new_data.notify_all()
        return seq


class _MemoryMessage:
    __slots__ = ("_consumer", "_stream", "data", "delivered", "seq", "stored_at", "subject")

    def __init__(
        self,
        subject: str,
        data: bytes,
        seq: int = 0,
        delivered: int = 1,
        stream: _Stream | None = None,
        consumer: _Consumer | None = None,
        stored_at: float = 0.0,
    ) -> None:
        self.subject = subject
        self.data = data
        self.seq = seq
        self.delivered = delivered
        self.stored_at = stored_at
        self._stream = stream
        self._consumer = consumer

    async def ack(self) -> None:
        c, s = self._consumer, self._stream
        if c is None or s is None:
            return
        if c.spec.ack_all:
            for seq in [q for q in c.pending if q <= self.seq]:
                c.pending.pop(seq, None)
                c.deliveries.pop(seq, None)
        else:
            c.pending.pop(self.seq, None)
            c.deliveries.pop(self.seq, None)
        if s.spec.work_queue:
            s.remove(self.seq)
        c.ack_floor = max(c.ack_floor, self.seq if not c.pending else min(c.pending) - 1)

    async def nak(self, delay_s: float = 0.0) -> None:
        if self._consumer is not None and self.seq in self._consumer.pending:
            self._consumer.pending[self.seq] = time.monotonic() + delay_s

    async def in_progress(self) -> None:
        c = self._consumer
        if c is not None and self.seq in c.pending:
            c.pending[self.seq] = time.monotonic() + c.spec.ack_wait_s

    async def term(self) -> None:
        if self._consumer is not None:
            self._consumer.pending.pop(self.seq, None)
            self._consumer.deliveries.pop(self.seq, None)
            if self._stream is not None and self._stream.spec.work_queue:
                self._stream.remove(self.seq)


class _MemoryPublisher:
    def __init__(self, broker: MemoryBroker, stream: str) -> None:
        self._broker = broker
        self._stream = stream
        self._ids = itertools.count(1)
        self._prefix = f"{id(self):x}-"

    async def publish(self, subject: str, data: bytes) -> None:
        await self._broker.store(subject, data, self._prefix + str(next(self._ids)))
        metrics.EVENTS_PUBLISHED.labels(self._stream).inc()

    async def flush(self, timeout_s: float = 10.0) -> None:
        return None

    @property
    def pending(self) -> int:
        return 0

    async def close(self, timeout_s: float = 10.0) -> None:
        return None


class _MemoryPullConsumer:
    def __init__(self, broker: MemoryBroker, stream: _Stream, consumer: _Consumer) -> None:
        self._broker = broker
        self._stream = stream
        self._c = consumer
        self._closed = False

    def _take(self, batch: int) -> list[Message]:
        s, c = self._stream, self._c
        out: list[Message] = []
        now = time.monotonic()
        for seq in sorted(q for q, at in c.pending.items() if at <= now):
            if len(out) >= batch:
                return out
            m = s.msgs.get(seq)
            if m is None:
                c.pending.pop(seq, None)
                continue
            c.pending[seq] = now + c.spec.ack_wait_s
            c.deliveries[seq] = c.deliveries.get(seq, 1) + 1
            out.append(_MemoryMessage(m.subject, m.data, seq, c.deliveries[seq], s, c, m.wall))
        if c.next_seq < s.first_seq():
            c.next_seq = s.first_seq()
        while len(out) < batch and c.next_seq <= s.last_seq and len(c.pending) < c.spec.max_ack_pending:
            seq = c.next_seq
            c.next_seq += 1
            m = s.msgs.get(seq)
            if m is None or (c.spec.filter_subject and not subject_matches(c.spec.filter_subject, m.subject)):
                continue
            c.pending[seq] = now + c.spec.ack_wait_s
            c.deliveries[seq] = 1
            out.append(_MemoryMessage(m.subject, m.data, seq, 1, s, c, m.wall))
        return out

    async def fetch(self, batch: int = 256, timeout_s: float = 1.0) -> list[Message]:
        if self._closed:
            raise EventPlaneError("consumer closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            out = self._take(batch)
            if out:
                metrics.EVENTS_CONSUMED.labels(self._c.spec.stream, self._c.spec.durable).inc(len(out))
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            # Wake on new data, or in time for the next redelivery.
            if self._c.pending:
                remaining = min(remaining, max(0.0, min(self._c.pending.values()) - time.monotonic()) + 0.001)
            try:
                async with self._stream.new_data:
                    await asyncio.wait_for(self._stream.new_data.wait(), remaining)
            except TimeoutError:
                pass

    async def close(self) -> None:
        self._closed = True


class _MemorySubscription:
    def __init__(self, broker: MemoryBroker, subject: str, queue_group: str | None, max_pending: int) -> None:
        self._broker = broker
        self.subject = subject
        self.queue_group = queue_group
        self._queue: deque[_MemoryMessage] = deque()
        self._max = max_pending
        self._wake = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def deliver(self, msg: _MemoryMessage) -> None:
        if len(self._queue) >= self._max:
            self.dropped += 1
            metrics.EVENTS_DROPPED.labels("slow_subscriber").inc()
            return
        self._queue.append(msg)
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[Message]:
        while not self._closed:
            while self._queue:
                yield self._queue.popleft()
            self._wake.clear()
            if self._closed:
                return
            await self._wake.wait()

    async def unsubscribe(self) -> None:
        self._closed = True
        self._wake.set()
        if self in self._broker.subscribers:
            self._broker.subscribers.remove(self)


class MemoryEventPlane:
    """One client of a :class:`MemoryBroker`."""

    name = "memory"

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker.named()
        self._rr = itertools.count()

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ensure_stream(self, spec: StreamSpec, *, update: bool = True) -> None:
        existing = self.broker.streams.get(spec.name)
        if existing is None:
            self.broker.streams[spec.name] = _Stream(spec)
        elif update:
            existing.spec = spec
            existing._enforce_limits(time.monotonic())

    async def delete_stream(self, name: str) -> None:
        self.broker.streams.pop(name, None)

    async def stream_state(self, name: str) -> StreamState:
        s = self.broker.stream(name)
        return StreamState(
            messages=len(s.msgs),
            first_seq=s.first_seq(),
            last_seq=s.last_seq,
            bytes=s.bytes,
            max_bytes=s.spec.max_bytes,
        )

    async def purge(self, stream: str, before_seq: int) -> None:
        s = self.broker.stream(stream)
        for seq in [q for q in s.msgs if q < before_seq]:
            s.remove(seq)

    def publisher(self, stream: str, max_pending: int = 4096, ack_timeout_s: float = 5.0) -> _MemoryPublisher:
        return _MemoryPublisher(self.broker, stream)

    async def publish_core(self, subject: str, data: bytes) -> None:
        groups: dict[str, list[_MemorySubscription]] = {}
        for sub in list(self.broker.subscribers):
            if subject_matches(sub.subject, subject):
                if sub.queue_group is None:
                    sub.deliver(_MemoryMessage(subject, data))
                else:
                    groups.setdefault(sub.queue_group, []).append(sub)
        for members in groups.values():
            members[next(self._rr) % len(members)].deliver(_MemoryMessage(subject, data))

    async def subscribe_core(
        self, subject: str, queue_group: str | None = None, max_pending: int = 65_536
    ) -> _MemorySubscription:
        sub = _MemorySubscription(self.broker, subject, queue_group, max_pending)
        self.broker.subscribers.append(sub)
        return sub

    async def pull_consumer(self, spec: ConsumerSpec) -> _MemoryPullConsumer:
        s = self.broker.stream(spec.stream)
        c = s.consumers.get(spec.durable)
        if c is None:
            start = spec.start_seq if spec.start_seq is not None else s.first_seq()
            c = s.consumers[spec.durable] = _Consumer(spec, next_seq=start, ack_floor=start - 1)
        return _MemoryPullConsumer(self.broker, s, c)

    async def consumer_ack_floors(self, stream: str) -> dict[str, int]:
        s = self.broker.stream(stream)
        return {name: c.ack_floor for name, c in s.consumers.items()}

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        s = self.broker.streams.get(stream)
        return s is not None and s.consumers.pop(durable, None) is not None

    async def object_put(self, bucket: str, name: str, data: bytes) -> None:
        self.broker.objects.setdefault(bucket, {})[name] = bytes(data)

    async def object_get(self, bucket: str, name: str) -> bytes | None:
        return self.broker.objects.get(bucket, {}).get(name)

    async def object_delete(self, bucket: str, name: str) -> bool:
        return self.broker.objects.get(bucket, {}).pop(name, None) is not None

    async def object_list(self, bucket: str) -> list[str]:
        return sorted(self.broker.objects.get(bucket, {}))
