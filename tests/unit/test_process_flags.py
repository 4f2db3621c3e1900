"""Flags of the process: ``--processes N`` of the frontend (what each child is told, the port
reservation) and ``--no-uvloop`` of every role."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from commutator.common.config import load
from commutator.common.runtime import run
from commutator.decode.config import DecodeConfig
from commutator.frontend.config import FrontendConfig
from commutator.frontend.processes import PortUnavailable, plan_children, reserve_port
from commutator.prefill.config import PrefillConfig
from commutator.router.config import RouterServiceConfig

pytestmark = pytest.mark.unit

ROLE_CONFIGS = [FrontendConfig, DecodeConfig, PrefillConfig, RouterServiceConfig]


def test_processes_flag_env_and_default() -> None:
    assert load(FrontendConfig, [], env={}).processes == 1
    assert load(FrontendConfig, [], env={"COMMUTATOR_PROCESSES": "4"}).processes == 4
    assert load(FrontendConfig, ["--processes", "2"], env={"COMMUTATOR_PROCESSES": "4"}).processes == 2


@pytest.mark.parametrize("config_cls", ROLE_CONFIGS)
def test_every_role_takes_no_uvloop(config_cls: type[Any]) -> None:
    assert load(config_cls, [], env={}).runtime.no_uvloop is False
    assert load(config_cls, ["--no-uvloop"], env={}).runtime.no_uvloop is True
    assert load(config_cls, [], env={"COMMUTATOR_NO_UVLOOP": "1"}).runtime.no_uvloop is True


def _in_thread(fn: Callable[[], int]) -> int:
    """Run ``fn`` (which runs its own event loop) away from this test session's loop."""
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    return out[0]


def test_run_uses_uvloop_unless_told_not_to() -> None:
    async def on_uvloop() -> int:
        return 1 if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else 0

    assert _in_thread(lambda: run(on_uvloop)) == 1
    assert _in_thread(lambda: run(on_uvloop, uvloop=False)) == 0


def _child_config(argv: tuple[str, ...]) -> FrontendConfig:
    return load(FrontendConfig, list(argv), env={})


def test_each_child_runs_the_parents_flags_as_one_process_with_replica_sync() -> None:
    argv = ["--http-host", "127.0.0.1", "--processes", "3", "--metrics-port", "9100", "--no-router-replica-sync"]
    parent = load(FrontendConfig, argv, env={})
    plans = plan_children(parent, argv, port=8123)
    assert [(p.index, p.label, p.metrics_port) for p in plans] == [(0, "1/3", 9100), (1, "2/3", 9101), (2, "3/3", 9102)]
    for plan in plans:
        child = _child_config(plan.argv)
        assert child.processes == 1 and child.http_port == 8123 and child.http_host == "127.0.0.1"
        assert child.router.router_replica_sync is True
        assert child.runtime.metrics_port == plan.metrics_port


def test_children_metrics_ports_free_or_none_and_remote_router_needs_no_sync() -> None:
    for metrics_port in (0, -1):
        argv = ["--processes", "2", "--metrics-port", str(metrics_port), "--router-endpoint", "router"]
        plans = plan_children(load(FrontendConfig, argv, env={}), argv, port=8000)
        for plan in plans:
            child = _child_config(plan.argv)
            assert child.runtime.metrics_port == metrics_port == plan.metrics_port
            assert child.router.router_replica_sync is False and child.router_endpoint == "router"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--processes", "2", "--discovery-backend", "memory"], "needs etcd discovery"),
        (["--processes", "2", "--event-plane", "memory"], "needs etcd discovery"),
        (["--processes", "3", "--metrics-port", "65534"], "ports 65534..65536"),
        (["--processes", "1"], "at least 2"),
    ],
)
def test_settings_processes_cannot_share_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_children(load(FrontendConfig, argv, env={}), argv, port=8000)


def test_reserving_the_port_shares_it_with_reuseport_sockets_only() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        port = held[0].getsockname()[1]
        assert port > 0
        # A child binds and listens beside the reservation; a program without SO_REUSEPORT cannot.
        child = socket.socket()
        child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        child.bind(("127.0.0.1", port))
        child.close()
        plain = socket.socket()
        with pytest.raises(OSError) as e:
            plain.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE
        plain.close()
    finally:
        for s in held:
            s.close()


def test_a_port_held_without_reuseport_is_one_clear_error() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(PortUnavailable) as e:
            reserve_port("127.0.0.1", port)
        assert str(e.value).startswith(f"127.0.0.1:{port} is in use by another program")
        assert "\n" not in str(e.value)
    with pytest.raises(PortUnavailable, match="cannot resolve --http-host"):
        reserve_port("no-such-host.invalid", 8000)
