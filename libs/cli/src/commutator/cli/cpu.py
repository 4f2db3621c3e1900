"""CPU time of a stack's processes, role by role, from ``/proc``.

A role (a frontend, a worker, etcd) is one process we started and everything it starts: its
descendants, and any process in its session (each role is started as a session leader, so a child
that daemonizes and is re-parented stays counted). A role's CPU is the user plus system time of
those processes, plus the time of their children already reaped (``cutime``/``cstime``), so a
child that ends between two snapshots is counted through its parent. Every thread of a process is
in its process's figures. A child re-parented to init and reaped there is lost (none of the stacks
measured here does that).

``parse_stat`` and ``role_cpu_seconds`` are pure (tested on canned ``/proc`` text); ``read_processes``
and ``CpuMeter`` read the live system.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuMeter", "ProcStat", "Role", "parse_stat", "read_processes", "role_cpu_seconds", "role_members"]


@dataclass(frozen=True, slots=True)
class Role:
    """A process of a stack under test: ``label`` names it in tables, ``kind`` pairs it across stacks."""

    label: str
    kind: str  # "frontend", "worker", "infra" (discovery and events), "client"
    pid: int


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    sid: int
    comm: str
    cpu_s: float  # utime + stime, all threads
    reaped_children_s: float  # cutime + cstime
    threads: int


def parse_stat(text: str, tick: float) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. ``comm`` may hold spaces and parentheses: split at the last ')'."""
    head, rest = text.rsplit(")", 1)
    pid_s, comm = head.split(" (", 1)
    f = rest.split()
    # f[0] is field 3 (state): ppid 4, session 6, utime 14, stime 15, cutime 16, cstime 17, num_threads 20
    return ProcStat(
        pid=int(pid_s),
        ppid=int(f[1]),
        sid=int(f[3]),
        comm=comm,
        cpu_s=(int(f[11]) + int(f[12])) / tick,
        reaped_children_s=(int(f[13]) + int(f[14])) / tick,
        threads=int(f[17]),
    )


def read_processes(proc: Path = Path("/proc")) -> dict[int, ProcStat]:
    """Every process now (those that end while being read are skipped)."""
    tick = float(os.sysconf("SC_CLK_TCK"))
    out: dict[int, ProcStat] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = parse_stat((d / "stat").read_text(), tick)
        except (OSError, ValueError, IndexError):
            continue
        out[st.pid] = st
    return out


def role_members(procs: Mapping[int, ProcStat], root: int) -> set[int]:
    """``root``, its descendants, and the processes in its session (when ``root`` leads one)."""
    kids: dict[int, list[int]] = {}
    for p in procs.values():
        kids.setdefault(p.ppid, []).append(p.pid)
    seen: set[int] = set()
    todo = [root] if root in procs else []
    todo += [p.pid for p in procs.values() if p.sid == root and p.pid != root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += kids.get(pid, [])
    return seen


def role_cpu_seconds(procs: Mapping[int, ProcStat], roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each role; a process claimed by two roles counts for the first."""
    claimed: set[int] = set()
    out: dict[str, float] = {}
    for label, root in roots.items():
        members = role_members(procs, root) - claimed
        claimed |= members
        out[label] = sum(procs[p].cpu_s + procs[p].reaped_children_s for p in members)
    return out


class CpuMeter:
    """CPU seconds each role spent between ``start()`` and ``stop()``, and how many processes it had."""

    def __init__(self, roles: list[Role], proc: Path = Path("/proc")) -> None:
        self.roles = roles
        self.proc = proc
        self._before: dict[str, float] = {}
        self.processes: dict[str, int] = {}
        self.threads: dict[str, int] = {}

    def _snapshot(self) -> dict[str, float]:
        procs = read_processes(self.proc)
        roots = {r.label: r.pid for r in self.roles}
        for label, root in roots.items():
            members = role_members(procs, root)
            self.processes[label] = len(members)
            self.threads[label] = sum(procs[p].threads for p in members)
        return role_cpu_seconds(procs, roots)

    def start(self) -> None:
        self._before = self._snapshot()

    def stop(self) -> dict[str, float]:
        after = self._snapshot()
        return {label: max(0.0, after[label] - self._before.get(label, 0.0)) for label in after}
