"""``--processes N``: N frontend processes sharing one HTTP port (SO_REUSEPORT).

One frontend process saturates one core (HTTP parsing, chat templates,
tokenizing, detokenizing, SSE). With ``--processes N`` the process started by
the user becomes a parent that serves nothing itself and runs no event loop:

- it reserves the port: a socket bound with SO_REUSEPORT but not listening, so it
  receives no connections, yet a program binding the port without SO_REUSEPORT
  fails (and ``--http-port 0`` becomes one free port for all);
- it starts N children, each ``python -m commutator.frontend`` with the parent's
  flags plus ``--processes 1``, the reserved port, ``--router-replica-sync`` (each
  child embeds its own router, with its own etcd lease and NATS connection: the
  routers share their load picture) and, with ``--metrics-port P`` > 0,
  ``--metrics-port P+i`` for child i (0-based; 0 leaves each a free port, which
  its "frontend ready" log line names). The kernel spreads new connections over
  the children;
- it forwards SIGTERM and SIGINT to them (as SIGTERM: each drains as a single
  frontend does), and SIGHUP as SIGHUP (each reads ``--api-keys-file`` again),
  and exits 0 once all exited 0 (or were stopped before they
  could drain). A child that exits on its own ends the group: the others are
  drained and the parent exits 1, so that whatever supervises the parent starts
  it again;
- each child asks the kernel for SIGTERM when its parent dies, even by SIGKILL
  (Linux ``PR_SET_PDEATHSIG``; elsewhere a thread polls the parent's pid), so
  none is left behind. Children run in their own process group: a Ctrl-C in a
  terminal reaches the parent only, which forwards it once.

:func:`plan_children` is the pure part (what each child is told); :class:`ProcessGroup`
the shell.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from commutator.common.logging import fields
from commutator.frontend.config import FrontendConfig
from commutator.frontend.listener import PortUnavailable, bind_sockets

__all__ = [
    "CHILD_ENV",
    "PARENT_ENV",
    "ChildPlan",
    "PortUnavailable",
    "ProcessGroup",
    "die_with_parent",
    "plan_children",
    "reserve_port",
]

log = logging.getLogger(__name__)

CHILD_ENV = "COMMUTATOR_FRONTEND_PROCESS"
"""Set in a child: ``"i/N"`` (1-based), what the child is."""
PARENT_ENV = "COMMUTATOR_FRONTEND_PARENT"
"""Set in a child: the parent's pid, which the child dies with."""

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class ChildPlan:
    """One child: its place in the group, the flags it runs with, its metrics port (0: free; -1: none)."""

    index: int
    count: int
    argv: tuple[str, ...]
    metrics_port: int

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"


def plan_children(config: FrontendConfig, argv: Sequence[str], port: int) -> list[ChildPlan]:
    """What each of ``config.processes`` children runs: ``argv`` (the parent's flags) plus the overrides.

    Flags given later win, so the overrides are appended. Raises ``ValueError`` (with the flag to
    fix) for settings N processes cannot share."""
    n = config.processes
    if n < 2:
        raise ValueError("--processes: a process group needs at least 2 processes")
    rt = config.runtime
    if rt.discovery.discovery_backend == "memory" or rt.events.event_plane == "memory":
        raise ValueError(
            "--processes > 1 needs etcd discovery and the NATS event plane: with the memory backends each"
            " process would see only itself (no workers)"
        )
    first_metrics = rt.metrics_port
    if first_metrics > 0 and first_metrics + n - 1 > 65535:
        raise ValueError(
            f"--metrics-port {first_metrics}: processes take ports {first_metrics}..{first_metrics + n - 1}"
        )
    common = ["--processes", "1", "--http-port", str(port)]
    if not config.router_endpoint:
        common.append("--router-replica-sync")
    plans = []
    for i in range(n):
        extra = list(common)
        metrics_port = first_metrics
        if first_metrics > 0:
            metrics_port = first_metrics + i
            extra += ["--metrics-port", str(metrics_port)]
        plans.append(ChildPlan(index=i, count=n, argv=(*argv, *extra), metrics_port=metrics_port))
    return plans


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` (every address ``host`` stands for, as asyncio's server does) with SO_REUSEPORT,
    without listening. Port 0 becomes one free port for every address. Raises :class:`PortUnavailable`."""
    return bind_sockets(host, port, reuse_port=True, reuse_address=False)


def die_with_parent(parent_pid: int) -> None:
    """From now on this process gets SIGTERM (a drain) when ``parent_pid``, its parent, dies, however it dies.

    Linux: the kernel sends it (``PR_SET_PDEATHSIG``); elsewhere a daemon thread polls the parent's pid.
    A parent already gone means exiting now."""
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # died before the kernel was asked: nothing would tell us
        raise SystemExit(f"frontend process: parent {parent_pid} is gone")
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="commutator-parent-watch", daemon=True).start()


@dataclass(slots=True)
class _Child:
    plan: ChildPlan
    proc: subprocess.Popen[bytes]


class ProcessGroup:
    """The parent of ``--processes N``: reserves the port, starts and watches the children, forwards signals.

    :meth:`run` blocks (no event loop) until every child has exited and returns the exit status. Signal
    handlers are installed by :meth:`run` and run in the main thread."""

    def __init__(
        self,
        config: FrontendConfig,
        argv: Sequence[str],
        *,
        module: str = "commutator.frontend",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._argv = tuple(argv)
        self._module = module
        self._env = dict(os.environ if env is None else env)
        self._live: dict[int, _Child] = {}
        self._stopping = False
        self._failed = False

    def run(self) -> int:
        cfg = self.config
        try:
            held = reserve_port(cfg.http_host, cfg.http_port)
        except PortUnavailable as exc:
            log.error("cannot start: %s", exc)
            return 1
        try:
            port = held[0].getsockname()[1]
            try:
                plans = plan_children(cfg, self._argv, port)
            except ValueError as exc:
                log.error("cannot start: %s", exc)
                return 1
            sync = (
                f"through the router service {cfg.router_endpoint!r}"
                if cfg.router_endpoint
                else "router replica sync on: each process embeds a router, and they share their load"
            )
            log.info(
                "starting %d frontend processes on %s:%d (%s)",
                len(plans),
                cfg.http_host,
                port,
                sync,
                extra=fields(metrics_ports=", ".join(str(p.metrics_port) for p in plans)),
            )
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
            try:
                try:
                    for plan in plans:
                        if self._stopping:
                            break
                        self._start(plan)
                except BaseException:
                    self._stopping = True
                    self._stop()
                    self._wait()
                    raise
                return self._wait()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            for s in held:
                s.close()

    def _start(self, plan: ChildPlan) -> None:
        env = dict(self._env)
        env[CHILD_ENV] = plan.label
        env[PARENT_ENV] = str(os.getpid())
        proc = subprocess.Popen(
            [sys.executable, "-m", self._module, *plan.argv],
            env=env,
            process_group=0,  # a terminal's Ctrl-C reaches the parent only; it forwards the signal once
        )
        self._live[proc.pid] = _Child(plan, proc)
        if self._stopping:  # a signal came while it was being started
            proc.send_signal(signal.SIGTERM)
        log.info(
            "started frontend process %s",
            plan.label,
            extra=fields(pid=proc.pid, metrics_port=plan.metrics_port if plan.metrics_port else "free"),
        )

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("%s received: draining %d frontend processes", signal.Signals(signum).name, len(self._live))
        self._stopping = True
        self._stop()

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        """SIGHUP goes on to every child (each reloads its --api-keys-file); the parent itself goes on."""
        for child in self._live.values():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGHUP)

    def _stop(self) -> None:
        """SIGTERM to every live child (again on a second signal: a child then exits at once)."""
        for child in self._live.values():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)

    def _wait(self) -> int:
        while self._live:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            child = self._live.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.proc.returncode = code
            label = child.plan.label
            if self._stopping:
                # Killed by the forwarded SIGTERM before it could install its handler: nothing was in flight.
                clean = code in (0, -signal.SIGTERM)
                (log.info if clean else log.error)(
                    "frontend process %s exited", label, extra=fields(pid=pid, status=code)
                )
                self._failed |= not clean
            else:
                log.error(
                    "frontend process %s exited on its own: stopping the others",
                    label,
                    extra=fields(pid=pid, status=code),
                )
                self._failed = True
                self._stopping = True
                self._stop()
        return 1 if self._failed else 0
