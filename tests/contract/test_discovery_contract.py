"""One contract, two backends: every test here runs on in-memory discovery (unit,
virtual time) and on a real etcd (integration, real time)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aetcd
import pytest
from commutator.common.clock import VirtualClock
from commutator.common.discovery import (
    Discovery,
    EtcdBackend,
    InstanceEvent,
    InstanceInfo,
    InstanceSet,
    MemoryBackend,
    MemoryStore,
    ModelCard,
    WatchKind,
)
from commutator.common.local_servers import EtcdProcess

TTL_S = 2


@dataclass
class Env:
    """How a contract test makes clients, lets time pass and plays the operator."""

    kind: str
    store: MemoryStore | None = None
    clock: VirtualClock | None = None
    etcd: EtcdProcess | None = None

    def client(self) -> Discovery:
        if self.kind == "memory":
            return Discovery(MemoryBackend(self.store, lease_ttl_s=TTL_S))
        assert self.etcd is not None
        return Discovery(EtcdBackend([self.etcd.endpoint], lease_ttl_s=TTL_S))

    async def elapse(self, seconds: float) -> None:
        if self.clock is not None:
            await self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def revoke(self, lease_id: int) -> None:
        """An operator revokes a lease behind the client's back."""
        if self.store is not None:
            self.store.revoke(lease_id)
            return
        assert self.etcd is not None
        host, port = self.etcd.endpoint.split(":")
        async with aetcd.Client(host=host, port=int(port)) as c:
            await c.revoke_lease(lease_id)


@pytest.fixture(
    params=[pytest.param("memory", marks=pytest.mark.unit), pytest.param("etcd", marks=pytest.mark.integration)]
)
def env(request: pytest.FixtureRequest) -> Env:
    if request.param == "memory":
        clock = VirtualClock()
        return Env("memory", store=MemoryStore(clock), clock=clock)
    return Env("etcd", etcd=request.getfixturevalue("etcd_server"))


@contextlib.asynccontextmanager
async def started(d: Discovery) -> AsyncIterator[Discovery]:
    await d.start()
    try:
        yield d
    finally:
        await d.close()


class Collector:
    """Reads a watch in the background; tests wait for what they expect to see."""

    def __init__(self, it: AsyncIterator[list[Any]]) -> None:
        self.batches: list[list[Any]] = []
        self._it = it
        self._cond = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for batch in self._it:
            async with self._cond:
                self.batches.append(batch)
                self._cond.notify_all()

    @property
    def events(self) -> list[Any]:
        return [e for b in self.batches for e in b]

    async def wait(self, pred: Any, env: Env, timeout_s: float = 10.0, step_s: float = 0.05) -> None:
        """Wait (moving virtual time along in memory mode) until ``pred(self)``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not pred(self):
            if loop.time() > deadline:
                raise AssertionError(f"condition not met; saw {self.batches}")
            await env.elapse(step_s)
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._it.aclose()  # type: ignore[attr-defined]


def info(address: str = "127.0.0.1:5000") -> InstanceInfo:
    return InstanceInfo(address=address, role="decode", model="tiny", block_size=64, kv_capacity_blocks=1024)


def kinds(events: list[InstanceEvent]) -> list[tuple[str, int]]:
    return [(e.kind.value, e.instance.instance_id) for e in events]


async def test_register_is_listed_under_the_documented_key(env: Env, unique: str) -> None:
    async with started(env.client()) as d:
        reg = await d.register(unique, "decode", "generate", info())
        assert reg.key == f"/services/{unique}/decode/generate-{d.instance_id:x}"
        [inst] = await d.list_instances(unique, "decode", "generate")
        assert inst.instance_id == d.instance_id
        assert inst.info == info()
        assert await d.list_instances(unique, "prefill") == []


async def test_clients_have_distinct_instance_ids(env: Env) -> None:
    async with started(env.client()) as a, started(env.client()) as b:
        assert a.instance_id != b.instance_id


async def test_watch_sees_snapshot_add_and_remove(env: Env, unique: str) -> None:
    async with started(env.client()) as a, started(env.client()) as b, started(env.client()) as watcher:
        await a.register(unique, "decode", "generate", info("10.0.0.1:1"))
        col = Collector(watcher.watch_instances(unique, "decode", "generate"))
        await col.wait(lambda c: len(c.batches) >= 1, env)
        assert kinds(col.batches[0]) == [("put", a.instance_id)]

        reg_b = await b.register(unique, "decode", "generate", info("10.0.0.2:2"))
        await col.wait(lambda c: ("put", b.instance_id) in kinds(c.events), env)
        await b.deregister(reg_b)
        await col.wait(lambda c: ("delete", b.instance_id) in kinds(c.events), env)
        assert kinds(col.events) == [("put", a.instance_id), ("put", b.instance_id), ("delete", b.instance_id)]
        removed = col.events[-1].instance
        assert removed.info.address == "10.0.0.2:2"  # a removal names what went away
        await col.close()


async def test_lease_expiry_removes_registration_within_ttl(env: Env, unique: str) -> None:
    async with started(env.client()) as watcher:
        crashed = env.client()
        await crashed.start()
        await crashed.register(unique, "decode", "generate", info())
        col = Collector(watcher.watch_instances(unique, "decode"))
        await col.wait(lambda c: ("put", crashed.instance_id) in kinds(c.events), env)

        await crashed.close(deregister=False)  # as if the process died: no revoke, no keep-alive
        loop = asyncio.get_running_loop()
        t0, v0 = loop.time(), env.clock.monotonic() if env.clock else 0.0
        await col.wait(lambda c: ("delete", crashed.instance_id) in kinds(c.events), env, timeout_s=TTL_S + 3)
        elapsed = (env.clock.monotonic() - v0) if env.clock else (loop.time() - t0)
        # etcd checks expiry on its own schedule (about every 500 ms): allow that much.
        assert elapsed <= TTL_S + 1.0, f"registration outlived its {TTL_S} s lease by {elapsed - TTL_S:.2f} s"
        assert await watcher.list_instances(unique, "decode") == []
        await col.close()


async def test_live_lease_is_kept_past_its_ttl(env: Env, unique: str) -> None:
    async with started(env.client()) as d:
        await d.register(unique, "decode", "generate", info())
        await env.elapse(TTL_S * 2)
        assert [i.instance_id for i in await d.list_instances(unique, "decode")] == [d.instance_id]


async def test_close_deregisters_at_once(env: Env, unique: str) -> None:
    async with started(env.client()) as watcher:
        d = env.client()
        await d.start()
        await d.register(unique, "router", "route", info())
        await d.close()  # a drain: revokes the lease now
        assert await watcher.list_instances(unique, "router") == []


async def test_lost_lease_is_regranted_and_registrations_return(env: Env, unique: str) -> None:
    async with started(env.client()) as d, started(env.client()) as watcher:
        changes: list[tuple[int, int]] = []
        d.on_instance_id_change(lambda old, new: changes.append((old, new)))
        await d.register(unique, "decode", "generate", info())
        await d.publish_model_card(unique, ModelCard(name="org/tiny", block_size=64, context_length=2048))
        old_id = d.instance_id
        col = Collector(watcher.watch_instances(unique, "decode"))
        await col.wait(lambda c: ("put", old_id) in kinds(c.events), env)

        await env.revoke(old_id)
        await col.wait(
            lambda c: changes and any(k == "put" and i != old_id for k, i in kinds(c.events)), env, timeout_s=TTL_S + 5
        )
        assert ("delete", old_id) in kinds(col.events)
        assert d.instance_id != old_id
        assert changes == [(old_id, d.instance_id)]
        [inst] = await watcher.list_instances(unique, "decode")
        assert inst.instance_id == d.instance_id
        cards = await watcher.backend.get_prefix(f"/models/{unique}/")
        assert list(cards) == [f"/models/{unique}/org%2Ftiny/{d.instance_id:x}"]
        await col.close()


async def test_model_cards_are_watched_and_leave_with_the_lease(env: Env, unique: str) -> None:
    card = ModelCard(
        name="org/tiny-llama",
        block_size=64,
        context_length=4096,
        chat_template="{{ x }}",
        eos_token_ids=(2,),
        artifact_bucket="models",
        artifacts={"tokenizer.json": "tok-abc"},
    )
    async with started(env.client()) as watcher:
        worker = env.client()
        await worker.start()
        col = Collector(watcher.watch_model_cards(unique))
        await col.wait(lambda c: len(c.batches) >= 1, env)
        assert col.batches[0] == []
        await worker.publish_model_card(unique, card)
        await col.wait(lambda c: len(c.events) == 1, env)
        ev = col.events[0]
        assert (ev.kind, ev.model, ev.instance_id, ev.card) == (
            WatchKind.PUT,
            "org/tiny-llama",
            worker.instance_id,
            card,
        )
        await worker.close()
        await col.wait(lambda c: len(c.events) == 2, env)
        assert (col.events[1].kind, col.events[1].model, col.events[1].card) == (
            WatchKind.DELETE,
            "org/tiny-llama",
            None,
        )
        await col.close()


async def test_unreadable_values_are_skipped_not_fatal(env: Env, unique: str) -> None:
    async with started(env.client()) as d, started(env.client()) as other:
        col = Collector(d.watch_instances(unique, "decode"))
        await col.wait(lambda c: len(c.batches) >= 1, env)
        await other.backend.put(f"/services/{unique}/decode/generate-{other.instance_id:x}", b"{not json")
        await other.backend.put(f"/services/{unique}/decode/no-id-here", b"{}")
        reg = await other.register(unique, "decode", "stats", info())
        await col.wait(lambda c: any(e.instance.endpoint == "stats" for e in c.events), env)
        assert [e.instance.key for e in col.events] == [reg.key]
        assert [i.key for i in await d.list_instances(unique, "decode")] == [reg.key]
        await col.close()


async def test_unleased_keys_outlive_the_client(env: Env, unique: str) -> None:
    key = f"/config/{unique}/planner"
    async with started(env.client()) as d:
        await d.backend.put(key, b"v1", leased=False)
    async with started(env.client()) as d2:
        assert await d2.backend.get_prefix(key) == {key: b"v1"}
        assert await d2.backend.delete(key) is True
        assert await d2.backend.delete(key) is False


async def test_instance_set_follows_the_watch(env: Env, unique: str) -> None:
    async with started(env.client()) as a, started(env.client()) as watcher:
        await a.register(unique, "decode", "generate", info())
        seen: list[InstanceEvent] = []
        iset = InstanceSet(watcher, unique, "decode", "generate")
        iset.add_listener(seen.append)
        await iset.start()
        assert list(iset.instances) == [a.instance_id]
        b = env.client()
        await b.start()
        await b.register(unique, "decode", "generate", info("10.1.1.1:9"))

        async def settle(pred: Any) -> None:
            for _ in range(400):
                if pred(iset.instances):
                    return
                await env.elapse(0.05)
                await asyncio.sleep(0.01)
            raise AssertionError(iset.instances)

        await settle(lambda m: set(m) == {a.instance_id, b.instance_id})
        await b.close()
        await settle(lambda m: set(m) == {a.instance_id})
        assert kinds(seen) == [("put", a.instance_id), ("put", b.instance_id), ("delete", b.instance_id)]
        await iset.close()
