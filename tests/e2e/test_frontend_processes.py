"""``python -m commutator.frontend --processes 2`` as a user runs it: two frontend processes on one
port in front of mocker workers, on real etcd and NATS. Each child serves part of the traffic and
sees the other's load (replica sync); SIGTERM drains both; SIGKILL of the parent takes both down;
a child that dies takes the group down; a port held without SO_REUSEPORT is one error line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import Callable

import aiohttp
import pytest
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.local_servers import EtcdProcess, free_port

pytestmark = pytest.mark.e2e

MODEL = "commutator/tiny-llama"


def free_port_pair() -> int:
    """A port P with P and P+1 both free (each child's metrics port)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


async def until(pred: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``pred`` (sync or async) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def series(metrics_port: int, prefix: str) -> float:
    """Sum of the series on a child's ``/metrics`` whose line starts with ``prefix`` (0 when absent)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def fresh_connection_completion(base: str) -> int:
    """One request over a connection of its own (the kernel picks the child per connection)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        try:
            async with http.post(f"{base}/completions", json=body) as r:
                await r.read()
                return r.status
        except aiohttp.ClientError:
            return 0


def child_pids(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"started frontend process \d/\d pid=(\d+)", log)]


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


OK_COMPLETIONS = 'commutator_frontend_requests_total{endpoint="completions",status="200"}'
ROUTED_REQUESTS = "commutator_router_worker_load{"


async def test_two_processes_share_the_port_and_their_load_and_drain_on_sigterm(
    spawn, etcd_server: EtcdProcess, unique: str
) -> None:  # type: ignore[no-untyped-def]
    # Real-time passes (5.7 ms a token): the stream below lasts seconds, long enough to watch and drain.
    for _ in range(2):
        spawn("commutator.decode", "--speedup-ratio", "1")
    port, metrics = free_port(), free_port_pair()
    parent = spawn(
        "commutator.frontend",
        *("--processes", "2", "--http-host", "127.0.0.1", "--http-port", str(port)),
        *("--metrics-port", str(metrics), "--drain-grace-s", "60"),
    )
    base = f"http://127.0.0.1:{port}/v1"
    children = (metrics, metrics + 1)

    async def both_served() -> bool:
        await fresh_connection_completion(base)
        try:
            return all([await series(p, OK_COMPLETIONS) >= 1 for p in children])
        except aiohttp.ClientError:
            return False

    await until(both_served, "both processes to serve a request")
    assert "router replica sync on" in parent.log()
    assert len(child_pids(parent.log())) == 2

    # Each child is a frontend of its own in discovery (its own lease), with its own router replica.
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    try:
        frontends = await d.list_instances(unique, "frontend", "http")
        routers = await d.list_instances(unique, "router", "replica")
    finally:
        await d.close()
    assert len(frontends) == 2 and len({f.instance_id for f in frontends}) == 2
    assert {f.info.address for f in frontends} == {f"127.0.0.1:{port}"}
    assert len(routers) == 2

    # Many requests over fresh connections: all served, and by both processes.
    before = [await series(p, OK_COMPLETIONS) for p in children]
    statuses = await asyncio.gather(*(fresh_connection_completion(base) for _ in range(40)))
    assert statuses == [200] * 40
    served = [await series(p, OK_COMPLETIONS) - b for p, b in zip(children, before, strict=True)]
    assert sum(served) == 40 and min(served) > 0, served

    # A long stream through one child shows in both children's routers: the load picture is shared.
    async with aiohttp.ClientSession() as http:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "a long answer"}],
            "max_tokens": 800,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post(f"{base}/chat/completions", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # the stream has started
            for p in children:
                await until(
                    lambda p=p: _loads(p), f"the stream in the router load of the child on metrics port {p}", 20
                )
            assert sum([await series(p, "commutator_router_replica_events_total") for p in children]) > 0

            # SIGTERM to the parent: both children drain; the stream in flight still ends in full.
            parent.signal(signal.SIGTERM)
            rest = (await r.read()).decode()
    assert '"finish_reason":"length"' in rest.replace(" ", "") and "data: [DONE]" in rest
    assert re.search(r'"completion_tokens":\s*800', rest)
    assert await parent.wait(90) == 0
    log = parent.log()
    assert len(re.findall(r"frontend process \d/2 exited pid=\d+ status=0", log)) == 2, log
    assert not any(alive(pid) for pid in child_pids(log))


async def _loads(metrics_port: int) -> bool:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = await r.text()
    return any(
        line.startswith(ROUTED_REQUESTS) and 'kind="requests"' in line and float(line.rsplit(" ", 1)[1]) >= 1
        for line in text.splitlines()
    )


async def _started_group(spawn, metrics: int):  # type: ignore[no-untyped-def]
    parent = spawn(
        "commutator.frontend",
        *("--processes", "2", "--http-host", "127.0.0.1", "--http-port", str(free_port())),
        *("--metrics-port", str(metrics)),
    )

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as http:
                for p in (metrics, metrics + 1):
                    async with http.get(f"http://127.0.0.1:{p}/health") as r:
                        if r.status != 200:
                            return False
            return True
        except aiohttp.ClientError:
            return False

    await until(ready, "both processes to be up")
    pids = child_pids(parent.log())
    assert len(pids) == 2 and all(alive(p) for p in pids)
    return parent, pids


async def test_killing_the_parent_takes_the_children_down(spawn) -> None:  # type: ignore[no-untyped-def]
    parent, pids = await _started_group(spawn, free_port_pair())
    parent.signal(signal.SIGKILL)
    await until(lambda: not any(alive(p) for p in pids), "the children to exit after their parent was killed", 30)


async def test_a_child_that_dies_takes_the_group_down_with_status_1(spawn) -> None:  # type: ignore[no-untyped-def]
    parent, pids = await _started_group(spawn, free_port_pair())
    os.kill(pids[0], signal.SIGKILL)
    assert await parent.wait(60) == 1
    log = parent.log()
    assert "frontend process 1/2 exited on its own: stopping the others" in log
    assert re.search(rf"frontend process 2/2 exited pid={pids[1]} status=0", log), log
    assert not alive(pids[1])


async def test_a_port_held_without_reuseport_is_one_line_and_status_1(spawn) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        parent = spawn("commutator.frontend", "--processes", "2", "--http-host", "127.0.0.1", "--http-port", str(port))
        assert await parent.wait(30) == 1
    errors = [line for line in parent.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot start: 127.0.0.1:{port} is in use by another program" in errors[0]
    assert "started frontend process" not in parent.log()


async def test_every_process_reads_the_api_keys_file_and_sighup_reaches_each(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key, later = "sk-e2e-0123456789abcdefgh", "sk-later-0123456789abcdef"
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"e2e {key}\n")
    spawn("commutator.decode", "--speedup-ratio", "0")
    port, metrics = free_port(), free_port_pair()
    parent = spawn(
        "commutator.frontend",
        *("--processes", "2", "--http-host", "127.0.0.1", "--http-port", str(port)),
        *("--metrics-port", str(metrics), "--api-keys-file", str(keys_file)),
    )
    base = f"http://127.0.0.1:{port}/v1"
    children = (metrics, metrics + 1)

    async def status(with_key: str | None) -> int:
        headers = {"Authorization": f"Bearer {with_key}"} if with_key else {}
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            try:
                async with http.post(f"{base}/completions", json=body, headers=headers) as r:
                    return r.status
            except aiohttp.ClientError:
                return 0

    async def both_served_with_the_key() -> bool:
        await status(key)
        try:
            return all([await series(p, OK_COMPLETIONS) >= 1 for p in children])
        except aiohttp.ClientError:
            return False

    await until(both_served_with_the_key, "both processes to serve a request with the key")
    assert [await status(None) for _ in range(8)] == [401] * 8
    unauthenticated = 'commutator_frontend_rejected_requests_total{key="",reason="unauthenticated"}'
    refused = [await series(p, unauthenticated) for p in children]
    assert sum(refused) == 8 and all(r >= 1 for r in refused), refused  # both processes refuse

    keys_file.write_text(f"later {later}\n")
    parent.signal(signal.SIGHUP)  # the parent forwards it to each child, which reads the file again

    async def reloaded() -> bool:
        return [await status(later) for _ in range(6)] == [200] * 6

    await until(reloaded, "every process to take the reloaded keys", 30)
    assert [await status(key) for _ in range(6)] == [401] * 6
    assert key not in parent.log() and later not in parent.log()
    parent.signal(signal.SIGTERM)
    assert await parent.wait(60) == 0


async def test_an_invalid_api_keys_file_stops_the_start_with_one_line(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("alice sk-short\n")
    parent = spawn("commutator.frontend", "--processes", "2", "--api-keys-file", str(keys_file))
    assert await parent.wait(30) == 2
    log = parent.log()
    assert f"--api-keys-file: {keys_file}:1: the key of 'alice' must be 16 to 256" in log
    assert "sk-short" not in log and "started frontend process" not in log
