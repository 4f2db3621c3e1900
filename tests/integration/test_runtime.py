"""A Runtime on real etcd and NATS: status endpoints, metrics, ordered shutdown."""

from __future__ import annotations

import aiohttp
import pytest
from commutator.common.config import load
from commutator.common.discovery import InstanceInfo
from commutator.common.local_servers import EtcdProcess, NatsProcess
from commutator.common.runtime import Runtime, RuntimeConfig

pytestmark = pytest.mark.integration


async def test_runtime_serves_status_and_deregisters_on_close(
    etcd_server: EtcdProcess, nats_server: NatsProcess, unique: str
) -> None:
    config = load(
        RuntimeConfig,
        [
            "--etcd-endpoints",
            etcd_server.endpoint,
            "--nats-url",
            nats_server.url,
            "--namespace",
            unique,
            "--lease-ttl-s",
            "3",
        ],
        env={},
    )
    ready = {"ok": True}
    rt = Runtime(config, "test", ready=lambda: ready["ok"])
    await rt.start()
    assert rt.discovery is not None and rt.events is not None and rt.status is not None
    await rt.discovery.register(unique, "decode", "generate", InstanceInfo(address="h:1"))
    base = f"http://127.0.0.1:{rt.status.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/live") as r:
            assert r.status == 200
        async with http.get(base + "/health") as r:
            assert r.status == 200
        ready["ok"] = False
        async with http.get(base + "/health") as r:
            assert r.status == 503
        async with http.get(base + "/metrics") as r:
            text = await r.text()
    assert r.status == 200
    assert 'commutator_build_info{role="test",version="0.1.0"} 1.0' in text
    assert 'commutator_discovery_registrations{backend="etcd"} 1.0' in text
    assert "process_cpu_seconds_total" in text

    order: list[str] = []
    rt.on_close(lambda: _note(order, "role"))
    await rt.close()
    assert order == ["role"]
    # Discovery closed with a drain: the registration is gone at once.
    check = Runtime(config, "check")
    await check.start(with_events=False)
    assert check.discovery is not None
    assert await check.discovery.list_instances(unique, "decode") == []
    await check.close()


async def _note(order: list[str], what: str) -> None:
    order.append(what)
