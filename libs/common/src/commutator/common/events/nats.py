"""NATS JetStream event plane (nats-py), with the recovery JetStream leaves to clients.

- Publishing uses ``publish_async`` (acks arrive asynchronously: several times
  the rate of awaiting each ack). Each message carries a ``Nats-Msg-Id`` so
  that a retry after a lost ack is stored once. Acks that never come (the
  server died) are detected by timeout; unacknowledged messages are then sent
  again in their original order, and nothing new is sent while disconnected,
  so a stream keeps each publisher's order across a server restart.
- Pull consumers survive a server restart (durable state is on disk) and are
  re-created if the server lost them; fetch errors become empty fetches.
- Messages a consumer already processed (delivered again because an ack was
  lost in the restart) are dropped by stream sequence for in-order consumers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import itertools
import logging
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from commutator.common import metrics
from commutator.common.config import redact_urls
from commutator.common.events.base import (
    ConsumerSpec,
    EventPlaneError,
    Message,
    PublishError,
    StreamSpec,
    StreamState,
)
from commutator.common.logging import fields
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

__all__ = ["NatsEventPlane"]

log = logging.getLogger(__name__)

_TLS_HINT = (
    "; the TLS handshake failed: nats-server refuses a client certificate (--nats-cert, --nats-key) that its "
    "CA did not sign, or none when it verifies clients, and this client refuses a server certificate that "
    "--nats-ca did not sign or that does not name the URL's host"
)

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
    OSError,
)


class _NatsMessage:
    """A JetStream (or core) message as the contract's :class:`Message`."""

    __slots__ = ("_msg", "delivered", "seq", "stored_at")

    def __init__(self, msg: Msg, seq: int = 0, delivered: int = 1, stored_at: float = 0.0) -> None:
        self._msg = msg
        self.seq = seq
        self.delivered = delivered
        self.stored_at = stored_at

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    async def ack(self) -> None:
        if self._msg.reply:
            with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
                await self._msg.ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        if self._msg.reply:
            with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
                await self._msg.nak(delay=delay_s or None)

    async def term(self) -> None:
        if self._msg.reply:
            with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
                await self._msg.term()

    async def in_progress(self) -> None:
        if self._msg.reply:
            with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
                await self._msg.in_progress()


@dataclass(slots=True)
class _Pending:
    subject: str
    data: bytes
    msg_id: str
    first_sent: float
    sent_at: float = 0.0
    future: asyncio.Future[Any] | None = None
    failed: bool = False
    attempts: int = 0


class _NatsPublisher:
    """See :class:`commutator.common.events.base.Publisher`."""

    _instances = itertools.count()

    def __init__(
        self, plane: NatsEventPlane, stream: str, max_pending: int, ack_timeout_s: float, give_up_after_s: float = 120.0
    ) -> None:
        self._plane = plane
        self._stream = stream
        self._max_pending = max_pending
        self._ack_timeout = ack_timeout_s
        self._give_up_after = give_up_after_s
        self._unacked: OrderedDict[int, _Pending] = OrderedDict()
        self._seq = itertools.count(1)
        nc = plane.nc
        self._id_prefix = f"{nc._nuid.next().decode()}-{next(self._instances)}-"
        self._changed = asyncio.Condition()
        self._resend_needed = False
        self._failures = 0
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name=f"publisher:{stream}")
        self._closed = False
        self._send_lock = asyncio.Lock()
        self._gauge = metrics.EVENTS_PUBLISH_PENDING.labels(stream)
        self._published = metrics.EVENTS_PUBLISHED.labels(stream)
        self._acked = 0
        plane._publishers.add(self)

    @property
    def pending(self) -> int:
        return len(self._unacked)

    async def publish(self, subject: str, data: bytes) -> None:
        if self._closed:
            raise PublishError(f"publisher for {self._stream} is closed")
        if len(self._unacked) >= self._max_pending:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self._unacked) < self._max_pending or self._closed)
        seq = next(self._seq)
        now = time.monotonic()
        p = _Pending(subject, data, self._id_prefix + str(seq), now)
        self._unacked[seq] = p
        # Nothing new goes out while older messages wait to be sent again (order).
        if self._plane.nc.is_connected and not self._resend_needed:
            await self._send(seq, p)
        else:
            self._resend_needed = True  # held: goes out with the next in-order resend

    async def _send(self, seq: int, p: _Pending) -> None:
        if p.future is not None and not p.future.done():
            p.future.cancel()  # frees nats-py's pending slot of the lost ack
        p.attempts += 1
        p.failed = False
        p.sent_at = time.monotonic()
        try:
            fut = await self._plane.js.publish_async(p.subject, p.data, headers={"Nats-Msg-Id": p.msg_id})
        except (*_TRANSIENT, nats.js.errors.TooManyStalledMsgsError) as exc:
            log.debug("publish to %s deferred: %s", self._stream, exc)
            p.failed = True
            self._resend_needed = True
            return
        p.future = fut
        fut.add_done_callback(lambda f, seq=seq: self._on_ack(seq, f))

    def _on_ack(self, seq: int, fut: asyncio.Future[Any]) -> None:
        p = self._unacked.get(seq)
        if p is None or fut.cancelled() or p.future is not fut:
            return
        exc = fut.exception()
        if exc is not None:
            log.warning("publish to %s not acknowledged (%s); will retry", self._stream, exc)
            p.failed = True
            self._resend_needed = True
            return
        del self._unacked[seq]
        self._acked += 1  # exported by the sweeper: metrics off the per-message path
        if not self._unacked or len(self._unacked) == self._max_pending - 1:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _sweep(self) -> None:
        """Find lost acks and send what is unacknowledged again, oldest first."""
        while True:
            await asyncio.sleep(0.1)
            self._export_metrics()
            now = time.monotonic()
            if not self._unacked:
                self._resend_needed = False
                continue
            oldest = next(iter(self._unacked.values()))
            # Acks come back in order, so the oldest message is the first to time out.
            if now - oldest.sent_at > self._ack_timeout:
                self._resend_needed = True
            if not self._resend_needed:
                continue
            if now - oldest.first_sent > self._give_up_after:
                self._drop_expired(now)
                continue
            if not self._plane.nc.is_connected:
                continue
            await self.resend_all()

    async def resend_all(self) -> None:
        async with self._send_lock:
            if not self._unacked:
                self._resend_needed = False
                return
            retries = metrics.EVENTS_PUBLISH_RETRIES.labels(self._stream)
            log.info("re-sending unacknowledged messages", extra=fields(stream=self._stream, count=len(self._unacked)))
            self._resend_needed = False
            for seq, p in list(self._unacked.items()):
                if seq not in self._unacked:
                    continue
                if p.attempts:
                    retries.inc()
                await self._send(seq, p)
                if self._resend_needed:  # the connection went again; the sweeper retries later
                    return

    def _export_metrics(self) -> None:
        if self._acked:
            self._published.inc(self._acked)
            self._acked = 0
        self._gauge.set(len(self._unacked))

    def _drop_expired(self, now: float) -> None:
        dropped = 0
        for seq, p in list(self._unacked.items()):
            if now - p.first_sent <= self._give_up_after:
                break
            if p.future is not None and not p.future.done():
                p.future.cancel()
            del self._unacked[seq]
            dropped += 1
        if dropped:
            self._failures += dropped
            metrics.EVENTS_PUBLISH_FAILURES.labels(self._stream).inc(dropped)
            log.error(
                "gave up on messages after %.0f s without an ack",
                self._give_up_after,
                extra=fields(stream=self._stream, dropped=dropped),
            )
            asyncio.get_running_loop().create_task(self._notify())

    async def flush(self, timeout_s: float = 10.0) -> None:
        failures_before = self._failures
        try:
            async with asyncio.timeout(timeout_s):
                async with self._changed:
                    await self._changed.wait_for(lambda: not self._unacked)
        except TimeoutError:
            raise PublishError(
                f"{len(self._unacked)} messages to {self._stream} unacknowledged after {timeout_s} s"
            ) from None
        if self._failures > failures_before:
            raise PublishError(f"{self._failures - failures_before} messages to {self._stream} were given up")

    async def close(self, timeout_s: float = 10.0) -> None:
        try:
            if self._unacked:
                await self.flush(timeout_s)
        finally:
            self._closed = True
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._plane._publishers.discard(self)
            self._export_metrics()
            async with self._changed:
                self._changed.notify_all()


class _NatsPullConsumer:
    def __init__(self, plane: NatsEventPlane, spec: ConsumerSpec) -> None:
        self._plane = plane
        self.spec = spec
        self._sub: Any = None
        self._last_seq = 0
        self._dedupe = spec.ack_all
        self._closed = False
        self._backoff = 0.1
        self._consumed = metrics.EVENTS_CONSUMED.labels(spec.stream, spec.durable)

    def _config(self) -> api.ConsumerConfig:
        s = self.spec
        cfg = api.ConsumerConfig(
            durable_name=s.durable,
            name=s.durable,
            ack_policy=api.AckPolicy.ALL if s.ack_all else api.AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait_s,
            max_ack_pending=s.max_ack_pending,
            filter_subject=s.filter_subject,
            inactive_threshold=s.inactive_threshold_s,
        )
        if s.start_seq is not None:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = s.start_seq
        return cfg

    async def _ensure_consumer(self) -> None:
        js = self._plane.js
        s = self.spec
        try:
            await js._jsm.consumer_info(s.stream, s.durable)
        except nats.js.errors.NotFoundError:
            try:
                await js._jsm.add_consumer(s.stream, config=self._config())
            except nats.js.errors.NotFoundError as exc:
                raise EventPlaneError(f"stream {s.stream!r} not found") from exc
            log.info(
                "created durable consumer", extra=fields(stream=s.stream, durable=s.durable, start_seq=s.start_seq)
            )

    async def bind(self) -> None:
        await self._ensure_consumer()
        await self._drop_sub()
        s = self.spec
        self._sub = await self._plane.js.pull_subscribe_bind(durable=s.durable, stream=s.stream)

    async def fetch(self, batch: int = 256, timeout_s: float = 1.0) -> list[Message]:
        if self._closed:
            raise EventPlaneError("consumer closed")
        try:
            if self._sub is None:
                await self.bind()
            return await self._fetch(batch, timeout_s)
        except nats.js.errors.NotFoundError:
            await self._consumer_gone()
            return []
        except (*_TRANSIENT, nats.js.errors.APIError) as exc:
            await self._trouble(exc)
            return []

    async def _fetch(self, batch: int, timeout_s: float) -> list[Message]:
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError):
            return []
        self._backoff = 0.1
        return self._messages(msgs)

    async def _consumer_gone(self) -> None:
        log.warning("consumer %s/%s is gone; re-creating it", self.spec.stream, self.spec.durable)
        await self._drop_sub()
        await asyncio.sleep(self._backoff)

    async def _trouble(self, exc: BaseException) -> None:
        log.warning("fetch from %s/%s failed (%s); retrying", self.spec.stream, self.spec.durable, exc)
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 2.0)
        if self._plane.nc.is_connected:
            await self._drop_sub()  # re-check the consumer on the next fetch

    async def _drop_sub(self) -> None:
        """Unsubscribe the inbox, so that a re-bind does not leave one more subscription behind."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _messages(self, msgs: list[Msg]) -> list[Message]:
        out: list[Message] = []
        for m in msgs:
            meta = m.metadata
            seq = meta.sequence.stream
            if self._dedupe:
                if seq <= self._last_seq:
                    continue  # already processed; its ack was lost
                self._last_seq = seq
            stamp = meta.timestamp
            out.append(_NatsMessage(m, seq, meta.num_delivered, stamp.timestamp() if stamp is not None else 0.0))
        if out:
            self._consumed.inc(len(out))
        return out

    async def close(self) -> None:
        self._closed = True
        await self._drop_sub()


class _NatsStandingPull(_NatsPullConsumer):
    """A pull consumer that keeps one pull request for ``spec.standing`` messages open on the
    server (``ConsumerSpec.standing``).

    nats-py's ``fetch`` asks the server for every batch, and when nothing is waiting it asks twice
    (a ``no_wait`` probe, answered "no messages", then a lingering request): for a reader that
    takes each message as it is stored, that is two JetStream requests and a status reply for
    every message or two. Here one request serves up to ``standing`` messages: the server pushes
    each to this process's inbox as it is stored, and a new request goes out when that one is used
    up, expires (``_EXPIRES_S``), or may have been lost (a reconnect). The consumer on the server is
    the same durable pull consumer, with the same acks and redelivery.
    """

    _EXPIRES_S = 30.0

    def __init__(self, plane: NatsEventPlane, spec: ConsumerSpec) -> None:
        super().__init__(plane, spec)
        self._window = spec.standing
        self._inbox = ""
        self._arrived: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._left = 0  # messages the open requests may still deliver
        self._asked_at = 0.0
        self._reconnects = -1
        self._gone = False
        self._refused = False
        self.requests = 0
        """Pull requests sent (for tests and probes)."""

    async def bind(self) -> None:
        await self._ensure_consumer()
        await self._drop_sub()
        nc = self._plane.nc
        self._inbox = nc.new_inbox()
        self._left = 0
        self._gone = self._refused = False
        self._sub = await nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=4 * self._window + 64)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(api.Header.STATUS) if msg.headers else None
        if not status:
            self._left -= 1
            self._arrived.append(msg)
        elif status == "100":
            return  # an idle heartbeat (not asked for)
        elif status in ("404", "408"):
            # A request ended (expired) with this many of its messages undelivered.
            try:
                unused = int(msg.headers.get("Nats-Pending-Messages", ""))  # type: ignore[union-attr]
            except ValueError:
                unused = self._left
            self._left -= unused
        else:
            # 409: the consumer was deleted, or the server refused the request.
            desc = msg.headers.get(api.Header.DESCRIPTION, "") if msg.headers else ""
            log.warning("pull request on %s/%s ended: %s %s", self.spec.stream, self.spec.durable, status, desc)
            self._left = 0
            self._gone = "deleted" in desc.lower()
            self._refused = not self._gone
        self._wake.set()

    async def _ask(self) -> None:
        nc = self._plane.nc
        s = self.spec
        body = b'{"batch":%d,"expires":%d}' % (self._window, int(self._EXPIRES_S * 1e9))
        await nc.publish(f"{self._plane.js._prefix}.CONSUMER.MSG.NEXT.{s.stream}.{s.durable}", body, reply=self._inbox)
        self.requests += 1
        self._left = self._window
        self._asked_at = time.monotonic()
        self._reconnects = nc.stats["reconnects"]

    async def _fetch(self, batch: int, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._wake.clear()  # before looking: whatever arrives from here on wakes the wait below
            if self._arrived:
                out = self._messages(self._take(batch))
                if out:
                    self._backoff = 0.1
                    return out
                continue  # only repeats of messages already handed out
            if self._gone:
                await self._consumer_gone()
                return []
            if self._refused:  # asked again after a pause, not in a loop
                self._refused = False
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 2.0)
                return []
            now = time.monotonic()
            if (
                self._left <= 0
                or now - self._asked_at > self._EXPIRES_S + 5.0  # its expiry never came back
                or self._plane.nc.stats["reconnects"] != self._reconnects  # the request may be lost
            ):
                await self._ask()
            wait = deadline - now
            if wait <= 0:
                return []
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                if not self._arrived:
                    return []

    def _take(self, batch: int) -> list[Msg]:
        arrived = self._arrived
        if len(arrived) <= batch:
            msgs = list(arrived)
            arrived.clear()
            return msgs
        return [arrived.popleft() for _ in range(batch)]


class _NatsSubscription:
    def __init__(self, plane: NatsEventPlane, sub: Any) -> None:
        self._plane = plane
        self._sub = sub

    @property
    def dropped(self) -> int:
        return self._plane._dropped.get(self._sub._id, 0)

    async def __aiter__(self) -> AsyncIterator[Message]:
        async for m in self._sub.messages:
            yield _NatsMessage(m)

    async def unsubscribe(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


class NatsEventPlane:
    """The event plane on a NATS server with JetStream (nats-server 2.9+)."""

    name = "nats"

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        connect_timeout_s: float = 10.0,
        client_name: str = "commutator",
        *,
        user: str = "",
        password: str = "",
        token: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``user``/``password`` or ``token``: NATS authentication (a URL's own ``user:password@`` works too).
        ``tls``: TLS to every server (the server's certificate and host checked by the context)."""
        self._servers = [u.strip() for u in url.split(",") if u.strip()]
        self._auth: dict[str, Any] = {}
        if user:
            self._auth.update(user=user, password=password)
        if token:
            self._auth["token"] = token
        if tls is not None:
            self._auth["tls"] = tls
        self._last_error: Exception | None = None  # what a connect that timed out kept failing on
        self._connecting: asyncio.Task[Any] | None = None  # the task running the first connect
        self._refused: Exception | None = None  # the server's refusal of the credentials, during the first connect
        self._connect_timeout = connect_timeout_s
        self._client_name = client_name
        self._nc: NatsClient | None = None
        self._js: Any = None
        self._publishers: set[_NatsPublisher] = set()
        self._dropped: dict[int, int] = {}
        self._closing = False

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise EventPlaneError("event plane not connected")
        return self._nc

    @property
    def js(self) -> Any:
        if self._js is None:
            raise EventPlaneError("event plane not connected")
        return self._js

    async def connect(self) -> None:
        nc = NatsClient()
        where = redact_urls(", ".join(self._servers))
        self._connecting = asyncio.current_task()
        try:
            # With unlimited reconnects nats-py would retry a first connect forever: bound it.
            async with asyncio.timeout(self._connect_timeout):
                await nc.connect(
                    servers=self._servers,
                    name=self._client_name,
                    connect_timeout=min(2.0, self._connect_timeout),  # type: ignore[arg-type]
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    error_cb=self._on_error,
                    **self._auth,
                )
        except asyncio.CancelledError:
            if self._refused is None or self._connecting is None:
                raise
            self._connecting.uncancel()  # cancelled by _on_error: the server refused the credentials
            with contextlib.suppress(Exception):
                await nc.close()
            raise EventPlaneError(f"NATS at {where} refused this client: {self._refused}") from None
        except (TimeoutError, nats.errors.NoServersError, *_TRANSIENT) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            why = str(exc) or "timed out" + (f" (last error: {self._last_error!r})" if self._last_error else "")
            if "tls" in self._auth and isinstance(self._last_error, ssl.SSLError | ConnectionError):
                why += _TLS_HINT
            raise EventPlaneError(f"cannot reach NATS at {where}: {why}") from exc
        finally:
            self._connecting = None
        self._nc = nc
        self._js = self._nc.jetstream()
        try:
            await self._js.account_info()
        except nats.js.errors.APIError as exc:
            raise EventPlaneError(f"NATS at {where} has no JetStream (start nats-server with -js)") from exc
        except _TRANSIENT as exc:
            raise EventPlaneError(f"NATS at {where} did not answer the JetStream API: {exc}") from exc

    async def _on_disconnect(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnect(self) -> None:
        metrics.EVENT_PLANE_RECONNECTS.labels("nats").inc()
        log.info(
            "reconnected to NATS",
            extra=fields(server=f"{u.hostname}:{u.port}" if (u := self.nc.connected_url) else ""),
        )
        # Acks of messages in flight during the outage are lost: send them again now.
        for p in list(self._publishers):
            p._resend_needed = True

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            sid = getattr(exc, "sid", 0)
            self._dropped[sid] = self._dropped.get(sid, 0) + 1
            metrics.EVENTS_DROPPED.labels("slow_subscriber").inc()
            if self._dropped[sid] == 1 or self._dropped[sid] % 1000 == 0:
                log.warning(
                    "NATS subscriber fell behind; messages dropped",
                    extra=fields(subject=getattr(exc, "subject", "?"), dropped=self._dropped[sid]),
                )
        else:
            self._last_error = exc
            log.debug("NATS client error: %s", exc)
            if self._connecting is not None and self._refused is None and "authorization violation" in str(exc).lower():
                # Wrong credentials do not get better with retries: fail the first connect now.
                self._refused = exc
                self._connecting.cancel()

    async def close(self) -> None:
        self._closing = True
        for p in list(self._publishers):
            with contextlib.suppress(PublishError):
                await p.close(timeout_s=5.0)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
            self._js = None

    # -- streams ------------------------------------------------------------------
    async def ensure_stream(self, spec: StreamSpec, *, update: bool = True) -> None:
        cfg = api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=api.RetentionPolicy.WORK_QUEUE if spec.work_queue else api.RetentionPolicy.LIMITS,
            max_age=spec.max_age_s or None,
            max_msgs=spec.max_msgs,
            max_bytes=spec.max_bytes,
            duplicate_window=spec.duplicate_window_s,
            storage=api.StorageType.FILE if spec.storage == "file" else api.StorageType.MEMORY,
        )
        try:
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # "stream name already in use with a different configuration"
                    raise
                if update:
                    await self.js.update_stream(cfg)
        except nats.js.errors.APIError as exc:
            raise EventPlaneError(f"cannot create stream {spec.name}: {exc}") from exc

    async def delete_stream(self, name: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(name)

    async def stream_state(self, name: str) -> StreamState:
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError as exc:
            raise EventPlaneError(f"stream {name!r} not found") from exc
        st = info.state
        return StreamState(
            messages=st.messages,
            first_seq=st.first_seq,
            last_seq=st.last_seq,
            bytes=st.bytes,
            max_bytes=info.config.max_bytes if info.config.max_bytes is not None else -1,
        )

    async def purge(self, stream: str, before_seq: int) -> None:
        if before_seq > 1:
            await self.js.purge_stream(stream, seq=before_seq)

    def publisher(self, stream: str, max_pending: int = 4096, ack_timeout_s: float = 5.0) -> _NatsPublisher:
        return _NatsPublisher(self, stream, max_pending, ack_timeout_s)

    # -- core pub/sub ---------------------------------------------------------------
    async def publish_core(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def subscribe_core(
        self, subject: str, queue_group: str | None = None, max_pending: int = 65_536
    ) -> _NatsSubscription:
        sub = await self.nc.subscribe(subject, queue=queue_group or "", pending_msgs_limit=max_pending)
        return _NatsSubscription(self, sub)

    # -- consumers ------------------------------------------------------------------
    async def pull_consumer(self, spec: ConsumerSpec) -> _NatsPullConsumer:
        c = _NatsStandingPull(self, spec) if spec.standing > 0 else _NatsPullConsumer(self, spec)
        await c.bind()
        return c

    async def consumer_ack_floors(self, stream: str) -> dict[str, int]:
        try:
            infos = await self.js._jsm.consumers_info(stream)
        except nats.js.errors.NotFoundError as exc:
            raise EventPlaneError(f"stream {stream!r} not found") from exc
        return {i.name: i.ack_floor.stream_seq if i.ack_floor else 0 for i in infos}

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        try:
            return bool(await self.js.delete_consumer(stream, durable))
        except nats.js.errors.NotFoundError:
            return False

    # -- objects --------------------------------------------------------------------
    async def _bucket(self, bucket: str, create: bool) -> Any:
        try:
            return await self.js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                return None
            return await self.js.create_object_store(bucket)

    async def object_put(self, bucket: str, name: str, data: bytes) -> None:
        obs = await self._bucket(bucket, create=True)
        await obs.put(name, data)

    async def object_get(self, bucket: str, name: str) -> bytes | None:
        obs = await self._bucket(bucket, create=False)
        if obs is None:
            return None
        try:
            info = await obs.get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        if info.is_link():
            # Links are rare; the client's own reader follows them.
            buf = io.BytesIO()
            await obs.get(name, writeinto=buf)
            return buf.getvalue()
        return await self._read_chunks(bucket, info)

    async def _read_chunks(self, bucket: str, info: Any) -> bytes:
        """An object's chunks through a pull consumer, checked against its SHA-256.

        nats-py's ``ObjectStore.get`` reads chunks through an ordered push
        consumer at about 16 MB/s here; pulling them in batches is about 15x
        faster (``make bench-events``). Layout: chunks on ``$O.{bucket}.C.{nuid}``.
        """
        if not info.size:
            return b""
        sub = await self.js.pull_subscribe(
            f"$O.{bucket}.C.{info.nuid}",
            stream=f"OBJ_{bucket}",
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0),
        )
        parts: list[bytes] = []
        try:
            while len(parts) < info.chunks:
                msgs = await sub.fetch(min(256, info.chunks - len(parts)), timeout=10)
                parts.extend(m.data for m in msgs)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        data = b"".join(parts)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        expected = info.digest.split("=", 1)[1] if "=" in info.digest else info.digest
        if digest.rstrip("=") != expected.rstrip("="):
            raise EventPlaneError(f"object {info.name} in {bucket}: digest mismatch (corrupt or changed while read)")
        return data

    async def object_delete(self, bucket: str, name: str) -> bool:
        obs = await self._bucket(bucket, create=False)
        if obs is None:
            return False
        try:
            await obs.delete(name)
        except nats.js.errors.ObjectNotFoundError:
            return False
        return True

    async def object_list(self, bucket: str) -> list[str]:
        obs = await self._bucket(bucket, create=False)
        if obs is None:
            return []
        try:
            return sorted(info.name for info in await obs.list())
        except nats.js.errors.NotFoundError:
            return []
