"""A Runtime on real etcd and NATS: status endpoints, metrics, ordered shutdown, the event loop a role runs on."""

from __future__ import annotations

import asyncio

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


async def test_a_role_runs_on_uvloop_unless_no_uvloop(spawn) -> None:  # type: ignore[no-untyped-def]
    by_flag = spawn("commutator.decode", "--no-uvloop")
    by_env = spawn("commutator.decode", env={"COMMUTATOR_NO_UVLOOP": "1"})
    default = spawn("commutator.decode")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    expected = {by_flag: "loop=asyncio", by_env: "loop=asyncio", default: "loop=uvloop"}
    while not all("runtime started" in p.log() for p in expected):
        assert loop.time() < deadline, "a worker never started"
        await asyncio.sleep(0.05)
    for p, loop_field in expected.items():
        started = next(line for line in p.log().splitlines() if "runtime started" in line)
        assert loop_field in started, started
