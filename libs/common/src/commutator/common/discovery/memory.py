"""In-memory discovery: one process, many clients (the embedded mode and unit tests).

A :class:`MemoryStore` plays the server; each :class:`MemoryBackend` is one
client with its own lease, exactly as each process holds one etcd lease. Time
comes from an injected clock, so lease expiry is testable on virtual time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from commutator.common import metrics
from commutator.common.clock import Clock, SystemClock
from commutator.common.discovery.base import DiscoveryError, LeaseListener, apply_events, diff_snapshots
from commutator.common.discovery.types import KeyEvent, WatchKind

__all__ = ["MemoryBackend", "MemoryStore"]

log = logging.getLogger(__name__)

WATCH_QUEUE_LIMIT = 10_000
"""Pending batches per watcher; past it the watcher re-syncs from a snapshot."""


class LeaseNotFound(DiscoveryError):
    pass


@dataclass(slots=True)
class _Lease:
    ttl_s: float
    deadline: float
    keys: set[str] = field(default_factory=set)


class _StoreWatcher:
    __slots__ = ("overflowed", "prefix", "queue", "wake")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue: list[KeyEvent] = []
        self.wake = asyncio.Event()
        self.overflowed = False

    def push(self, event: KeyEvent) -> None:
        if self.overflowed:
            return
        if len(self.queue) >= WATCH_QUEUE_LIMIT:
            # The consumer fell behind: drop the backlog; it re-reads the prefix.
            self.queue.clear()
            self.overflowed = True
        else:
            self.queue.append(event)
        self.wake.set()


class MemoryStore:
    """The shared state of in-memory discovery: keys, leases and watchers."""

    _named: dict[str, MemoryStore] = {}

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self._data: dict[str, tuple[bytes, int]] = {}
        self._leases: dict[int, _Lease] = {}
        self._watchers: set[_StoreWatcher] = set()
        self._ids = itertools.count(random.getrandbits(40) << 16 | 1)
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    def named(cls, name: str = "default") -> MemoryStore:
        """The process-wide store of that name (roles of the embedded mode share one)."""
        store = cls._named.get(name)
        if store is None:
            store = cls._named[name] = MemoryStore()
        return store

    # -- leases ---------------------------------------------------------------
    def grant(self, ttl_s: float) -> int:
        self.expire_due()
        lease_id = next(self._ids)
        self._leases[lease_id] = _Lease(ttl_s, self.clock.monotonic() + ttl_s)
        self._ensure_reaper()
        return lease_id

    def keepalive(self, lease_id: int) -> float:
        """Refresh a lease; its TTL, or 0 when the lease no longer exists."""
        self.expire_due()
        lease = self._leases.get(lease_id)
        if lease is None:
            return 0.0
        lease.deadline = self.clock.monotonic() + lease.ttl_s
        return lease.ttl_s

    def revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            for key in sorted(lease.keys):
                self._delete(key)

    def lease_exists(self, lease_id: int) -> bool:
        self.expire_due()
        return lease_id in self._leases

    def expire_due(self) -> None:
        now = self.clock.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
            log.debug("lease %x expired", lease_id)
            self.revoke(lease_id)

    def _ensure_reaper(self) -> None:
        if self._reaper is not None and not self._reaper.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # synchronous use: expiry happens on the next operation
        self._reaper = loop.create_task(self._reap(), name="memory-discovery-reaper")

    async def _reap(self) -> None:
        while self._leases:
            next_deadline = min(lease.deadline for lease in self._leases.values())
            await self.clock.sleep(max(0.0, min(next_deadline - self.clock.monotonic(), 0.25)))
            self.expire_due()

    # -- keys -----------------------------------------------------------------
    def put(self, key: str, value: bytes, lease_id: int = 0) -> None:
        self.expire_due()
        if lease_id:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise LeaseNotFound(f"lease {lease_id:x} not found")
            lease.keys.add(key)
        old = self._data.get(key)
        if old is not None and old[1] and old[1] != lease_id and old[1] in self._leases:
            self._leases[old[1]].keys.discard(key)
        self._data[key] = (value, lease_id)
        self._notify(KeyEvent(WatchKind.PUT, key, value))

    def delete(self, key: str) -> bool:
        self.expire_due()
        return self._delete(key)

    def _delete(self, key: str) -> bool:
        entry = self._data.pop(key, None)
        if entry is None:
            return False
        if entry[1] and entry[1] in self._leases:
            self._leases[entry[1]].keys.discard(key)
        self._notify(KeyEvent(WatchKind.DELETE, key))
        return True

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self.expire_due()
        return {k: v for k, (v, _) in sorted(self._data.items()) if k.startswith(prefix)}

    def _notify(self, event: KeyEvent) -> None:
        for w in self._watchers:
            if event.key.startswith(w.prefix):
                w.push(event)

    def add_watcher(self, prefix: str) -> _StoreWatcher:
        w = _StoreWatcher(prefix)
        self._watchers.add(w)
        return w

    def remove_watcher(self, w: _StoreWatcher) -> None:
        self._watchers.discard(w)


class MemoryBackend:
    """One client of a :class:`MemoryStore`, with its own kept-alive lease."""

    name = "memory"

    def __init__(self, store: MemoryStore | None = None, lease_ttl_s: int = 5) -> None:
        self.store = store or MemoryStore.named()
        self._ttl = lease_ttl_s
        self._lease_id = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._listener: LeaseListener | None = None

    @property
    def lease_id(self) -> int:
        if not self._lease_id:
            raise DiscoveryError("discovery backend not started")
        return self._lease_id

    @property
    def lease_ttl_s(self) -> int:
        return self._ttl

    def set_lease_listener(self, listener: LeaseListener) -> None:
        self._listener = listener

    async def start(self) -> None:
        self._lease_id = self.store.grant(self._ttl)
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive(), name="memory-lease-keepalive")

    async def _keep_alive(self) -> None:
        clock = self.store.clock
        while True:
            await clock.sleep(self._ttl / 3)
            if self.store.keepalive(self._lease_id) > 0:
                metrics.DISCOVERY_LEASE_KEEPALIVES.labels("memory", "ok").inc()
                continue
            metrics.DISCOVERY_LEASE_KEEPALIVES.labels("memory", "lost").inc()
            old = self._lease_id
            self._lease_id = self.store.grant(self._ttl)
            metrics.DISCOVERY_LEASE_REGRANTS.labels("memory").inc()
            log.warning("discovery lease %x was lost; granted %x", old, self._lease_id)
            if self._listener is not None:
                await self._listener(old, self._lease_id)

    async def close(self, *, revoke: bool = True) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            try:
                await self._keepalive
            except asyncio.CancelledError:
                pass
            self._keepalive = None
        if revoke and self._lease_id:
            self.store.revoke(self._lease_id)

    async def put(self, key: str, value: bytes, *, leased: bool = True) -> None:
        self.store.put(key, value, self.lease_id if leased else 0)

    async def delete(self, key: str) -> bool:
        return self.store.delete(key)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return self.store.get_prefix(prefix)

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[list[KeyEvent], None]:
        store = self.store
        watcher = store.add_watcher(prefix)
        try:
            known = store.get_prefix(prefix)
            yield [KeyEvent(WatchKind.PUT, k, v) for k, v in known.items()]
            while True:
                await watcher.wake.wait()
                watcher.wake.clear()
                if watcher.overflowed:
                    watcher.overflowed = False
                    metrics.DISCOVERY_WATCH_RESTARTS.labels("memory").inc()
                    current = store.get_prefix(prefix)
                    batch = diff_snapshots(known, current)
                    known = current
                else:
                    batch, watcher.queue = watcher.queue, []
                    apply_events(known, batch)
                if batch:
                    yield batch
        finally:
            store.remove_watcher(watcher)
