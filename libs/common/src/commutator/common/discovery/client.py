"""The discovery API every role uses, over either backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from commutator.common import metrics
from commutator.common.discovery.base import DiscoveryBackend, DiscoveryError
from commutator.common.discovery.types import (
    Instance,
    InstanceEvent,
    InstanceInfo,
    ModelCard,
    ModelCardError,
    ModelCardEvent,
    WatchKind,
    instance_key,
    instance_prefix,
    model_card_key,
    model_card_prefix,
    unescape_model,
)
from commutator.common.logging import fields

__all__ = ["Discovery", "Registration"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Registration:
    """An endpoint this process registered; its key follows the lease id."""

    namespace: str
    component: str
    endpoint: str
    info: InstanceInfo
    key: str = ""


@dataclass(slots=True)
class _CardRegistration:
    namespace: str
    card: ModelCard
    key: str = ""


class Discovery:
    """Registration, model cards and watches on top of a :class:`DiscoveryBackend`.

    The process's instance id is its lease id. If the lease is lost and
    re-granted, every registration and model card is put again under the new
    id (the old keys went with the old lease) and instance-id listeners are told.
    """

    def __init__(self, backend: DiscoveryBackend) -> None:
        self.backend = backend
        self._registrations: list[Registration] = []
        self._cards: list[_CardRegistration] = []
        self._id_listeners: list[Callable[[int, int], Awaitable[None] | None]] = []
        self._started = False
        backend.set_lease_listener(self._on_new_lease)

    @property
    def instance_id(self) -> int:
        return self.backend.lease_id

    async def start(self) -> None:
        await self.backend.start()
        self._started = True

    async def close(self, *, deregister: bool = True) -> None:
        """Stop. ``deregister`` (a drain) removes every key now; otherwise they expire with the lease."""
        if not self._started:
            return
        self._started = False
        await self.backend.close(revoke=deregister)
        metrics.DISCOVERY_REGISTRATIONS.labels(self.backend.name).set(0)

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on_instance_id_change(self, listener: Callable[[int, int], Awaitable[None] | None]) -> None:
        """Call ``listener(old_id, new_id)`` when the lease (instance id) changes."""
        self._id_listeners.append(listener)

    # -- registration ---------------------------------------------------------
    async def register(self, namespace: str, component: str, endpoint: str, info: InstanceInfo) -> Registration:
        """Publish an endpoint at ``/services/{namespace}/{component}/{endpoint}-{id:x}``."""
        reg = Registration(namespace, component, endpoint, info)
        reg.key = instance_key(namespace, component, endpoint, self.instance_id)
        await self.backend.put(reg.key, info.to_json())
        self._registrations.append(reg)
        self._update_gauge()
        log.info("registered", extra=fields(key=reg.key, address=info.address, role=info.role, model=info.model))
        return reg

    async def deregister(self, reg: Registration) -> None:
        """Remove an endpoint (first step of a drain)."""
        if reg in self._registrations:
            self._registrations.remove(reg)
        await self.backend.delete(reg.key)
        self._update_gauge()
        log.info("deregistered", extra=fields(key=reg.key))

    async def publish_model_card(self, namespace: str, card: ModelCard) -> str:
        """Publish ``card`` under ``/models/{namespace}/{model}/{id:x}``, attached to the lease."""
        reg = _CardRegistration(namespace, card, model_card_key(namespace, card.name, self.instance_id))
        await self.backend.put(reg.key, card.to_json())
        self._cards.append(reg)
        self._update_gauge()
        return reg.key

    def _update_gauge(self) -> None:
        metrics.DISCOVERY_REGISTRATIONS.labels(self.backend.name).set(len(self._registrations) + len(self._cards))

    async def _on_new_lease(self, old_id: int, new_id: int) -> None:
        while True:
            try:
                for reg in self._registrations:
                    reg.key = instance_key(reg.namespace, reg.component, reg.endpoint, new_id)
                    await self.backend.put(reg.key, reg.info.to_json())
                for card in self._cards:
                    card.key = model_card_key(card.namespace, card.card.name, new_id)
                    await self.backend.put(card.key, card.card.to_json())
                break
            except DiscoveryError as exc:
                log.warning("re-registering under the new lease failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
        log.warning(
            "re-registered under a new instance id",
            extra=fields(old=f"{old_id:x}", new=f"{new_id:x}", keys=len(self._registrations) + len(self._cards)),
        )
        for listener in self._id_listeners:
            result = listener(old_id, new_id)
            if result is not None:
                await result

    # -- reading ----------------------------------------------------------------
    async def list_instances(self, namespace: str, component: str, endpoint: str | None = None) -> list[Instance]:
        data = await self.backend.get_prefix(instance_prefix(namespace, component, endpoint))
        out = []
        for key, value in data.items():
            inst = _parse_instance(key, value)
            if inst is not None:
                out.append(inst)
        return out

    async def watch_instances(
        self, namespace: str, component: str, endpoint: str | None = None
    ) -> AsyncGenerator[list[InstanceEvent], None]:
        """Batches of instance additions and removals; the first batch is the current set.

        Values that cannot be read are logged and skipped, never fatal.
        """
        async with contextlib.aclosing(
            self.backend.watch_prefix(instance_prefix(namespace, component, endpoint))
        ) as it:
            known: dict[str, Instance] = {}
            async for batch in it:
                out: list[InstanceEvent] = []
                for ev in batch:
                    if ev.kind is WatchKind.PUT:
                        inst = _parse_instance(ev.key, ev.value)
                        if inst is not None:
                            known[ev.key] = inst
                            out.append(InstanceEvent(WatchKind.PUT, inst))
                    else:
                        gone = known.pop(ev.key, None)
                        if gone is not None:
                            out.append(InstanceEvent(WatchKind.DELETE, gone))
                yield out

    async def watch_model_cards(self, namespace: str) -> AsyncGenerator[list[ModelCardEvent], None]:
        """Batches of model-card changes; the first batch is every card published now.

        A card that cannot be read or fails :meth:`ModelCard.validate` (cards are
        untrusted: anything that can write etcd can publish one) is logged and
        comes as a put with ``card=None`` and ``error`` saying why, so that the
        consumer can tell a client why the model cannot be served. Never fatal.
        """
        prefix = model_card_prefix(namespace)
        async with contextlib.aclosing(self.backend.watch_prefix(prefix)) as it:
            async for batch in it:
                out: list[ModelCardEvent] = []
                for ev in batch:
                    model_part, _, id_part = ev.key[len(prefix) :].rpartition("/")
                    try:
                        instance_id = int(id_part, 16)
                    except ValueError:
                        log.warning("ignoring a model card under an unexpected key %s", ev.key)
                        continue
                    model = unescape_model(model_part)
                    if ev.kind is not WatchKind.PUT:
                        out.append(ModelCardEvent(ev.kind, model, instance_id, None))
                        continue
                    try:
                        card = ModelCard.from_json(ev.value)
                        if card.name != model:
                            raise ModelCardError(f"the card names model {card.name!r}")
                    except ValueError as exc:
                        log.warning("rejected the model card of %s: %s", model, exc, extra=fields(key=ev.key))
                        out.append(ModelCardEvent(WatchKind.PUT, model, instance_id, None, error=str(exc)))
                        continue
                    out.append(ModelCardEvent(WatchKind.PUT, model, instance_id, card))
                yield out


def _parse_instance(key: str, value: bytes) -> Instance | None:
    try:
        return Instance.from_kv(key, value)
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable instance at %s: %s", key, exc)
        return None
