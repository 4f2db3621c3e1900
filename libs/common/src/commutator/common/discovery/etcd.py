"""etcd discovery through aetcd, with the recovery aetcd leaves to its users.

aetcd has no lease keep-alive helper, and its watch iterators die when the
connection breaks (an etcd restart, a network cut). This backend keeps its
lease alive itself, grants a new lease (and has the registrations put again)
when the old one is gone, and turns each prefix watch into a list-then-watch
loop that re-reads the prefix after any break, so consumers see one unbroken
stream of changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
from commutator.common import metrics
from commutator.common.discovery.base import DiscoveryError, LeaseListener, apply_events, diff_snapshots
from commutator.common.discovery.types import KeyEvent, WatchKind
from commutator.common.logging import fields
from commutator.common.tasks import run_bounded

__all__ = ["EtcdBackend"]

log = logging.getLogger(__name__)

# Reconnect quickly after an etcd restart instead of gRPC's default backoff (up to 120 s).
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}

_CLIENT_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, OSError, asyncio.TimeoutError)
# A wrong user or password, or none given to an etcd with auth on (INVALID_ARGUMENT), a token etcd no
# longer knows (UNAUTHENTICATED): at start-up the first fails at once, the second is renewed.
_AUTH_ERRORS = (aetcd.exceptions.InvalidArgumentError, aetcd.exceptions.UnauthenticatedError)


_T = TypeVar("_T")


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.strip()
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme) :]
    if "@" in endpoint:  # never echo it: what precedes the @ may be a password
        raise ValueError("etcd endpoints take no user or password: use --etcd-username and --etcd-password")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host.strip("[]"), int(port)


class _EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over a TLS channel (aetcd 1.0 opens only plaintext ones); otherwise the same
    connect: authenticate when a user is given, then the stubs and the watcher."""

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    @aetcd.client._handle_errors
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            rpc = aetcd.rpc
            if self.channel is None:  # type: ignore[has-type]
                target = f"{self._host}:{self._port}"
                self.channel = grpc.aio.secure_channel(target, self._credentials, options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class EtcdBackend:
    """Discovery on etcd (3.4+). See :class:`~commutator.common.discovery.base.DiscoveryBackend`."""

    name = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str] = ("127.0.0.1:2379",),
        lease_ttl_s: int = 5,
        call_timeout_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        retry_interval_s: float = 0.25,
        *,
        username: str = "",
        password: str = "",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``username``/``password``: etcd authentication (both or neither). ``credentials``: TLS to etcd
        (its server certificate checked; a client certificate when they carry one)."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if lease_ttl_s < 2:
            raise ValueError("etcd leases shorter than 2 s are not kept reliably; use lease_ttl_s >= 2")
        if bool(username) != bool(password):
            raise ValueError("etcd authentication needs both a user and a password")
        self._endpoints = [_split_endpoint(e) for e in endpoints]
        self._username = username or None
        self._password = password or None
        self._credentials = credentials
        self._endpoint_index = 0
        self._ttl = lease_ttl_s
        self._call_timeout = call_timeout_s
        self._connect_timeout = connect_timeout_s
        self._retry = retry_interval_s
        self._client: aetcd.Client | None = None
        self._lease_id = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._listener: LeaseListener | None = None
        self._closed = False

    # -- connection -----------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._endpoint_index]
        return f"{host}:{port}"

    def _new_client(self) -> aetcd.Client:
        host, port = self._endpoints[self._endpoint_index]
        kw: dict[str, Any] = {
            "host": host,
            "port": port,
            "username": self._username,
            "password": self._password,
            "timeout": self._call_timeout,
            "options": dict(_CHANNEL_OPTIONS),
        }
        if self._credentials is not None:
            return _EtcdClient(credentials=self._credentials, **kw)
        return aetcd.Client(**kw)

    async def _reauthenticate(self, exc: Exception, failed: aetcd.Client) -> bool:
        """After an auth-token error of the ``failed`` client (etcd restarted, or the token expired unused):
        a new client, which authenticates again on its first call (one for all the calls that failed on
        the same client). False when no user is configured (nothing to renew)."""
        if self._username is None or not isinstance(exc, aetcd.exceptions.UnauthenticatedError):
            return False
        if self._client is not failed:
            return True  # another call has replaced it already
        old, self._client = self._client, None
        log.info("etcd auth token rejected (%s); authenticating again", exc)
        if old is not None:
            try:
                await old.close()
            except _CLIENT_ERRORS:
                pass
        return True

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    async def _next_endpoint(self) -> None:
        """Fail over to the next configured endpoint (when there is more than one)."""
        if len(self._endpoints) < 2:
            return
        old, self._client = self._client, None
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
        log.warning("switching to etcd endpoint %s", self.endpoint)
        if old is not None:
            try:
                await old.close()
            except _CLIENT_ERRORS:
                pass

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        while True:
            try:
                client = self.client
                lease = await client.lease(self._ttl)
                break
            except _AUTH_ERRORS as exc:
                if not await self._reauthenticate(exc, client) or loop.time() >= deadline:
                    raise DiscoveryError(f"etcd at {self.endpoint} refused this client: {exc}") from exc
                continue
            except _CLIENT_ERRORS as exc:
                if loop.time() >= deadline:
                    raise DiscoveryError(
                        f"cannot reach etcd at {', '.join(f'{h}:{p}' for h, p in self._endpoints)}: {exc}"
                    ) from exc
                await self._next_endpoint()
                await asyncio.sleep(self._retry)
        self._lease_id = lease.id
        log.info("etcd lease granted", extra=fields(lease=f"{lease.id:x}", ttl_s=lease.ttl, endpoint=self.endpoint))
        self._keepalive = loop.create_task(self._keep_alive(), name="etcd-lease-keepalive")

    async def close(self, *, revoke: bool = True) -> None:
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            try:
                await self._keepalive
            except asyncio.CancelledError:
                pass
            self._keepalive = None
        if self._client is not None:
            if revoke and self._lease_id:
                try:
                    await self._client.revoke_lease(self._lease_id)
                except _CLIENT_ERRORS as exc:
                    log.warning("could not revoke lease %x (it expires in %d s): %s", self._lease_id, self._ttl, exc)
            try:
                # Bounded: the client's close shuts its watch stream down behind locks of the library's
                # own, and a stop must not hang on them.
                await run_bounded(
                    self._client.close(), self._call_timeout, f"closing the etcd client of {self.endpoint}"
                )
            except _CLIENT_ERRORS:
                pass
            self._client = None

    # -- lease ----------------------------------------------------------------
    async def _keep_alive(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                client = self.client
                reply = await client.refresh_lease(self._lease_id)
            except _CLIENT_ERRORS as exc:
                metrics.DISCOVERY_LEASE_KEEPALIVES.labels("etcd", "failed").inc()
                log.warning("etcd lease keep-alive failed: %s", exc)
                if not await self._reauthenticate(exc, client):
                    await self._next_endpoint()
                interval = self._retry
                continue
            interval = self._ttl / 3
            if reply is not None and reply.TTL > 0:
                metrics.DISCOVERY_LEASE_KEEPALIVES.labels("etcd", "ok").inc()
                continue
            metrics.DISCOVERY_LEASE_KEEPALIVES.labels("etcd", "lost").inc()
            await self._regrant()

    async def _regrant(self) -> None:
        old = self._lease_id
        while True:
            try:
                client = self.client
                lease = await client.lease(self._ttl)
                break
            except _CLIENT_ERRORS as exc:
                log.warning("etcd lease grant failed, retrying: %s", exc)
                await self._reauthenticate(exc, client)
                await asyncio.sleep(self._retry)
        self._lease_id = lease.id
        metrics.DISCOVERY_LEASE_REGRANTS.labels("etcd").inc()
        log.warning(
            "etcd lease was lost; registrations move to a new lease",
            extra=fields(old_lease=f"{old:x}", new_lease=f"{lease.id:x}"),
        )
        if self._listener is not None:
            await self._listener(old, lease.id)

    # -- keys -----------------------------------------------------------------
    async def _call(self, what: str, op: Callable[[aetcd.Client], Awaitable[_T]]) -> _T:
        """Run one idempotent key operation, riding out a reconnect.

        Right after etcd comes back, the channel may still be between reconnect
        attempts and fail calls at once with UNAVAILABLE; such calls are retried
        until the call timeout, so a short etcd outage is not an error for callers.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._call_timeout
        delay = min(self._retry, 0.1)
        reauthenticated = False
        while True:
            try:
                client = self.client
                return await op(client)
            except aetcd.exceptions.UnauthenticatedError as exc:
                if reauthenticated or not await self._reauthenticate(exc, client):
                    raise DiscoveryError(f"etcd {what} failed: {exc}") from exc
                reauthenticated = True
            except aetcd.exceptions.ConnectionFailedError as exc:
                if self._closed or loop.time() + delay >= deadline:
                    raise DiscoveryError(f"etcd {what} failed: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except _CLIENT_ERRORS as exc:
                raise DiscoveryError(f"etcd {what} failed: {exc}") from exc

    async def put(self, key: str, value: bytes, *, leased: bool = True) -> None:
        lease = self.lease_id if leased else None
        await self._call(f"put {key}", lambda c: c.put(key.encode(), value, lease=lease))

    async def delete(self, key: str) -> bool:
        result = await self._call(f"delete {key}", lambda c: c.delete(key.encode()))
        return bool(result and result.deleted)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return (await self._get_prefix_rev(prefix))[0]

    async def _get_prefix_rev(self, prefix: str) -> tuple[dict[str, bytes], int]:
        rng = await self._call(f"get {prefix}*", lambda c: c.get_prefix(prefix.encode(), sort_order="ascend"))
        return {kv.key.decode(): kv.value for kv in rng.kvs}, rng.header.revision

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[list[KeyEvent], None]:
        known: dict[str, bytes] = {}
        first = True
        backoff = self._retry
        while not self._closed:
            watch = None
            try:
                current, revision = await self._get_prefix_rev(prefix)
                batch = (
                    [KeyEvent(WatchKind.PUT, k, v) for k, v in current.items()]
                    if first
                    else diff_snapshots(known, current)
                )
                known = current
                if first or batch:
                    first = False
                    yield batch
                watch = await self.client.watch_prefix(prefix.encode(), start_revision=revision + 1)
                backoff = self._retry
                async for ev in watch:
                    key = ev.kv.key.decode()
                    event = (
                        KeyEvent(WatchKind.PUT, key, ev.kv.value)
                        if ev.kind == "PUT"
                        else KeyEvent(WatchKind.DELETE, key)
                    )
                    apply_events(known, [event])
                    yield [event]
                # The iterator ended without an error: the watcher was shut down.
                log.info("etcd watch on %s ended; re-creating it", prefix)
            except (DiscoveryError, *_CLIENT_ERRORS) as exc:
                if self._closed:
                    return
                log.warning("etcd watch on %s broke (%s); re-reading and watching again", prefix, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if watch is not None:
                    try:
                        await asyncio.wait_for(watch.cancel(), 1.0)
                    except _CLIENT_ERRORS:
                        pass
            metrics.DISCOVERY_WATCH_RESTARTS.labels("etcd").inc()
