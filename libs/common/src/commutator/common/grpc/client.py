"""A gRPC client for an endpoint found through discovery.

:class:`EndpointClient` keeps one channel per live instance of
``namespace/component/endpoint`` (opened on first use, closed when the instance
leaves discovery), picks an instance per call (round-robin, random, or a direct
instance id), puts a deadline on every call, carries the trace context in the
metadata, and turns gRPC failures into the typed errors of
:mod:`commutator.common.errors` in one place (:func:`map_rpc_error`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import grpc
from commutator.common import metrics, tracing
from commutator.common.discovery import Discovery, Instance, InstanceEvent, InstanceSet, WatchKind
from commutator.common.errors import (
    ERROR_TRAILER,
    Cancelled,
    CommutatorError,
    DeadlineExceeded,
    InstanceNotFound,
    InvalidRequest,
    NoInstances,
    NotFound,
    Overloaded,
    RemoteError,
    Unavailable,
    Unsupported,
)
from commutator.common.tls import MutualTls, open_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["EndpointClient", "PickMode", "error_from_status", "map_rpc_error"]

log = logging.getLogger(__name__)

PickMode = Literal["round_robin", "random", "direct"]
StubT = TypeVar("StubT")

_CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A peer that stops answering (frozen, cut off) fails its calls with UNAVAILABLE within ~15 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_BY_CODE: dict[grpc.StatusCode, type[CommutatorError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unsupported,
}


_STATUS_BY_NAME = {c.name: c for c in grpc.StatusCode}


def map_rpc_error(err: grpc.RpcError, where: str) -> CommutatorError:
    """The typed error for a failed call (the client side of the mapping)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or code.name
    typed = error_from_status(code, details, where)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    typed.unanswered = not any(k == ERROR_TRAILER for k, _ in trailers or ())
    return typed


def error_from_status(code: grpc.StatusCode | str, details: str, where: str) -> CommutatorError:
    """The typed error for a status (a StatusCode, or its name as a multiplexed stream carries it)."""
    if isinstance(code, str):
        code = _STATUS_BY_NAME.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code)
    message = f"{where}: {details or code.name}"
    if cls is None:
        return RemoteError(message, code.name)
    return cls(message)


class EndpointClient(Generic[StubT]):
    """Calls to the instances of one endpoint.

    ``stub_factory`` is the generated stub class (e.g. ``WorkerStub``).
    ``default_timeout_s`` applies to calls that give no ``timeout_s``: every
    call has a deadline. With ``tls`` every channel is mutual TLS (:attr:`tls` is
    also what other transports to these instances use, e.g. the worker stream).
    """

    def __init__(
        self,
        discovery: Discovery,
        namespace: str,
        component: str,
        endpoint: str,
        stub_factory: Callable[[grpc.aio.Channel], StubT],
        *,
        default_timeout_s: float = 10.0,
        tls: MutualTls | None = None,
    ) -> None:
        self._target = f"{namespace}/{component}/{endpoint}"
        self.tls = tls
        self.instance_set = InstanceSet(discovery, namespace, component, endpoint)
        self.instance_set.add_listener(self._on_instance_event)
        self._stub_factory = stub_factory
        self._default_timeout = default_timeout_s
        self._channels: dict[int, tuple[str, grpc.aio.Channel, StubT]] = {}
        self._rr = itertools.count()
        self._closing: set[asyncio.Task[None]] = set()
        self._active: dict[int, int] = {}  # id(channel) -> calls in flight
        self._retired: dict[int, grpc.aio.Channel] = {}  # left discovery, closed when idle

    @property
    def target(self) -> str:
        """``namespace/component/endpoint``: how errors name this endpoint."""
        return self._target

    @property
    def instances(self) -> dict[int, Instance]:
        return self.instance_set.instances

    async def start(self) -> None:
        await self.instance_set.start()

    async def wait_for_instances(self, count: int = 1, timeout_s: float = 30.0) -> None:
        """Wait until at least ``count`` instances are registered."""
        try:
            await self.instance_set.wait_for(lambda m: len(m) >= count, timeout_s)
        except TimeoutError:
            raise NoInstances(f"{self._target}: fewer than {count} instances after {timeout_s} s") from None

    async def close(self) -> None:
        await self.instance_set.close()
        for _, channel, _ in self._channels.values():
            await channel.close()
        for channel in self._retired.values():
            await channel.close()
        self._channels.clear()
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_instance_event(self, ev: InstanceEvent) -> None:
        iid = ev.instance.instance_id
        entry = self._channels.get(iid)
        if entry is None:
            return
        if ev.kind is WatchKind.DELETE or entry[0] != ev.instance.info.address:
            # A draining instance finishes its in-flight calls: close its channel only once they are done.
            del self._channels[iid]
            channel = entry[1]
            if self._active.get(id(channel), 0) == 0:
                self._close_channel(channel)
            else:
                self._retired[id(channel)] = channel

    def _close_channel(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _acquire(self, channel: grpc.aio.Channel) -> None:
        self._active[id(channel)] = self._active.get(id(channel), 0) + 1

    def _release(self, channel: grpc.aio.Channel) -> None:
        key = id(channel)
        n = self._active.get(key, 0) - 1
        if n > 0:
            self._active[key] = n
            return
        self._active.pop(key, None)
        retired = self._retired.pop(key, None)
        if retired is not None:
            self._close_channel(retired)

    def pick(self, mode: PickMode = "round_robin", instance_id: int | None = None) -> Instance:
        """Choose an instance; ``NoInstances`` when none, ``InstanceNotFound`` for an unknown direct id."""
        instances = self.instance_set.instances
        if mode == "direct":
            if instance_id is None:
                raise ValueError("direct mode needs an instance_id")
            inst = instances.get(instance_id)
            if inst is None:
                raise InstanceNotFound(f"{self._target}: no instance {instance_id:x}")
            return inst
        if not instances:
            raise NoInstances(f"{self._target}: no instances registered")
        ids = sorted(instances)
        if mode == "random":
            return instances[random.choice(ids)]
        return instances[ids[next(self._rr) % len(ids)]]

    def stub(self, instance: Instance) -> StubT:
        """The stub for ``instance`` (one channel per instance, reused)."""
        entry = self._channels.get(instance.instance_id)
        if entry is None or entry[0] != instance.info.address:
            channel = open_channel(instance.info.address, self.tls, _CHANNEL_OPTIONS)
            entry = (instance.info.address, channel, self._stub_factory(channel))
            self._channels[instance.instance_id] = entry
        return entry[2]

    async def health_check(self, instance_id: int, timeout_s: float = 1.0) -> bool:
        """Whether the instance answers the standard gRPC health check with SERVING (never raises)."""
        inst = self.instance_set.instances.get(instance_id)
        if inst is None:
            return False
        self.stub(inst)
        channel = self._channels[instance_id][1]
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def _resolve(self, mode: PickMode, instance_id: int | None) -> tuple[Instance, StubT, grpc.aio.Channel]:
        inst = self.pick("direct" if instance_id is not None else mode, instance_id)
        stub = self.stub(inst)
        return inst, stub, self._channels[inst.instance_id][1]

    def open_bidi(self, method: str, instance_id: int) -> tuple[Any, Callable[[], None], str]:
        """A bidirectional stream to one instance, with no deadline (it is long-lived: its messages carry
        their own). Returns the call, a ``release`` to call once it has ended (the instance's channel stays
        open until then, even after the instance leaves discovery), and a description for errors."""
        inst, stub, channel = self._resolve("direct", instance_id)
        call = getattr(stub, method)()
        self._acquire(channel)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(channel)

        return call, release, f"{self._target}/{method}@{inst.info.address}"

    async def call(
        self,
        method: str,
        request: Any,
        *,
        mode: PickMode = "round_robin",
        instance_id: int | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Any:
        """A unary call to ``method`` on a picked instance; typed errors on failure."""
        inst, stub, channel = self._resolve(mode, instance_id)
        where = f"{self._target}/{method}@{inst.info.address}"
        t0 = time.perf_counter()
        self._acquire(channel)
        try:
            response = await getattr(stub, method)(
                request, timeout=timeout_s or self._default_timeout, metadata=tracing.inject_metadata(metadata)
            )
        except grpc.RpcError as err:
            typed = map_rpc_error(err, where)
            metrics.GRPC_CLIENT_ERRORS.labels(self._target, method, type(typed).__name__).inc()
            raise typed from None
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise Unavailable(f"{where}: the call was cancelled under us (channel closed)") from None
        finally:
            self._release(channel)
        metrics.GRPC_CLIENT_LATENCY.labels(self._target, method).observe(time.perf_counter() - t0)
        return response

    async def stream(
        self,
        method: str,
        request: Any,
        *,
        mode: PickMode = "round_robin",
        instance_id: int | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncIterator[Any]:
        """A server-streaming call. Closing the iterator (or cancelling its reader) cancels the call."""
        inst, stub, channel = self._resolve(mode, instance_id)
        where = f"{self._target}/{method}@{inst.info.address}"
        call = getattr(stub, method)(
            request, timeout=timeout_s or self._default_timeout, metadata=tracing.inject_metadata(metadata)
        )
        self._acquire(channel)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as err:
            typed = map_rpc_error(err, where)
            metrics.GRPC_CLIENT_ERRORS.labels(self._target, method, type(typed).__name__).inc()
            raise typed from None
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise Unavailable(f"{where}: the stream was cancelled under us (channel closed)") from None
        finally:
            if not call.done():
                call.cancel()
            self._release(channel)


def _cancelled_by_caller() -> bool:
    """Whether the current task is being cancelled (rather than the gRPC call alone)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
