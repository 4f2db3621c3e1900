"""The contract both discovery backends (etcd, in-memory) fulfil."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from commutator.common.discovery.types import KeyEvent, WatchKind

__all__ = ["DiscoveryBackend", "DiscoveryError", "LeaseListener", "apply_events", "diff_snapshots"]

LeaseListener = Callable[[int, int], Awaitable[None]]
"""Called with ``(old_lease_id, new_lease_id)`` after a lost lease was replaced."""


class DiscoveryError(RuntimeError):
    """The discovery store could not be reached or refused an operation."""


class DiscoveryBackend(Protocol):
    """A key-value store with one lease per client and prefix watches.

    Lifecycle: :meth:`start` connects and grants the lease (its id is the
    process's instance id) and keeps it alive in the background; :meth:`close`
    stops, revoking the lease by default (which deletes every leased key) or,
    with ``revoke=False``, leaving it to expire as if the process had died.

    When the lease is lost (expired during an outage, revoked by an operator),
    the backend grants a new one and calls the lease listener, which puts the
    process's keys again under the new id.
    """

    name: str

    @property
    def lease_id(self) -> int: ...

    @property
    def lease_ttl_s(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self, *, revoke: bool = True) -> None: ...

    def set_lease_listener(self, listener: LeaseListener) -> None: ...

    async def put(self, key: str, value: bytes, *, leased: bool = True) -> None:
        """Store ``value`` at ``key``, attached to the lease unless ``leased=False``."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete ``key``; False when it did not exist."""
        ...

    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    def watch_prefix(self, prefix: str) -> AsyncGenerator[list[KeyEvent], None]:
        """Changes under ``prefix`` as batches.

        The first batch is the state when the watch starts (one PUT per key,
        possibly none). Each later batch holds changes in order. After an outage
        the backend re-reads the prefix and yields the difference, so a consumer
        that applies every batch always holds the store's state; the iterator
        itself never fails on a lost connection. Close it with ``aclose()``.
        """
        ...


def apply_events(state: dict[str, bytes], events: list[KeyEvent]) -> None:
    """Apply a batch of watch events to a ``{key: value}`` snapshot."""
    for ev in events:
        if ev.kind is WatchKind.PUT:
            state[ev.key] = ev.value
        else:
            state.pop(ev.key, None)


def diff_snapshots(old: dict[str, bytes], new: dict[str, bytes]) -> list[KeyEvent]:
    """The events that turn snapshot ``old`` into ``new``: deletions first, then puts."""
    out = [KeyEvent(WatchKind.DELETE, k) for k in old if k not in new]
    out += [KeyEvent(WatchKind.PUT, k, v) for k, v in new.items() if old.get(k) != v]
    return out
