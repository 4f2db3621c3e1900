"""etcd-only behaviour: recovery after the server restarts."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from commutator.common.discovery import Discovery, DiscoveryError, EtcdBackend, InstanceInfo, InstanceSet
from commutator.common.local_servers import EtcdProcess, free_port

pytestmark = pytest.mark.integration


async def eventually(pred, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_registrations_and_watches_recover_after_etcd_restart(etcd_private: EtcdProcess, unique: str) -> None:
    ep = [etcd_private.endpoint]
    worker = Discovery(EtcdBackend(ep, lease_ttl_s=3))
    watcher = Discovery(EtcdBackend(ep, lease_ttl_s=3))
    late = Discovery(EtcdBackend(ep, lease_ttl_s=3))
    await worker.start()
    await watcher.start()
    reg = await worker.register(unique, "decode", "generate", InstanceInfo(address="10.0.0.1:1"))
    iset = InstanceSet(watcher, unique, "decode")
    await iset.start()
    assert set(iset.instances) == {worker.instance_id}

    etcd_private.stop()
    await asyncio.sleep(2.0)  # keep-alives and the watch fail meanwhile
    etcd_private.start()

    # A call made at once, while the client's channel may still be between reconnect
    # attempts, waits for the reconnect instead of failing; the worker's registration
    # is there (its lease kept, or re-granted and re-put).
    listed = await watcher.list_instances(unique, "decode")
    assert [i.instance_id for i in listed] == [worker.instance_id]
    await eventually(lambda: set(iset.instances) == {worker.instance_id})

    # The watch is alive: it sees a newcomer and a departure after the restart.
    await late.start()
    await late.register(unique, "decode", "generate", InstanceInfo(address="10.0.0.2:2"))
    await eventually(lambda: set(iset.instances) == {worker.instance_id, late.instance_id})
    await worker.deregister(reg)
    await eventually(lambda: set(iset.instances) == {late.instance_id})

    # And leases still expire: a client that stops renewing vanishes.
    await late.close(deregister=False)
    await eventually(lambda: iset.instances == {}, timeout_s=3 + 2)
    await iset.close()
    for d in (worker, watcher):
        await d.close()


async def test_lease_revoked_after_restart_is_regranted(etcd_private: EtcdProcess, unique: str) -> None:
    """etcd restores leases on restart, so a lost lease is forced by revoking it right after."""
    ep = [etcd_private.endpoint]
    worker = Discovery(EtcdBackend(ep, lease_ttl_s=2))
    watcher = Discovery(EtcdBackend(ep, lease_ttl_s=2))
    await worker.start()
    await watcher.start()
    await worker.register(unique, "decode", "generate", InstanceInfo(address="10.0.0.1:1"))
    old = worker.instance_id
    iset = InstanceSet(watcher, unique, "decode")
    await iset.start()

    etcd_private.stop()
    await asyncio.sleep(1.0)
    etcd_private.start()
    await watcher.list_instances(unique, "decode")  # waits out the watcher's reconnect
    await watcher.backend.client.revoke_lease(old)  # type: ignore[attr-defined]

    await eventually(lambda: len(iset.instances) == 1 and old not in iset.instances)
    assert worker.instance_id != old
    assert set(iset.instances) == {worker.instance_id}
    await iset.close()
    await worker.close()
    await watcher.close()


async def test_start_fails_clearly_when_etcd_is_unreachable() -> None:
    backend = EtcdBackend([f"127.0.0.1:{free_port()}"], connect_timeout_s=1.0)
    with pytest.raises(DiscoveryError, match=r"cannot reach etcd at 127\.0\.0\.1:"):
        await backend.start()
    with contextlib.suppress(Exception):
        await backend.close()


async def test_calls_fail_clearly_when_etcd_stays_down(etcd_private: EtcdProcess, unique: str) -> None:
    d = Discovery(EtcdBackend([etcd_private.endpoint], lease_ttl_s=3, call_timeout_s=1.0))
    await d.start()
    etcd_private.stop()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DiscoveryError, match=r"etcd get /services/.* failed"):
            await d.list_instances(unique, "decode")
        assert loop.time() - t0 < 3.0  # bounded by the call timeout, not gRPC's reconnect backoff
    finally:
        etcd_private.start()
        await d.close()


async def test_fails_over_to_the_next_endpoint(etcd_server: EtcdProcess, unique: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    d = Discovery(EtcdBackend([dead, etcd_server.endpoint], connect_timeout_s=10.0))
    await d.start()
    await d.register(unique, "router", "route", InstanceInfo(address="x:1"))
    assert len(await d.list_instances(unique, "router")) == 1
    await d.close()
