"""CPU accounting of the benchmark harness from /proc text: parsing, who belongs to a role, the deltas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from commutator.cli.cpu import CpuMeter, ProcStat, Role, parse_stat, role_cpu_seconds, role_members
from commutator.cli.measure import cpu_figures

pytestmark = pytest.mark.unit

TICK = float(os.sysconf("SC_CLK_TCK"))


def stat_line(pid: int, comm: str, *, ppid: int, sid: int, utime: int, stime: int, cut: int = 0, cst: int = 0) -> str:
    """A /proc/<pid>/stat line (fields 1-24 of proc(5); the rest do not matter here)."""
    fields = [
        "S",  # 3 state
        ppid,  # 4
        pid,  # 5 pgrp
        sid,  # 6 session
        0,  # 7 tty_nr
        -1,  # 8 tpgid
        4194560,  # 9 flags
        100,  # 10 minflt
        0,  # 11 cminflt
        0,  # 12 majflt
        0,  # 13 cmajflt
        utime,  # 14
        stime,  # 15
        cut,  # 16 cutime
        cst,  # 17 cstime
        20,  # 18 priority
        0,  # 19 nice
        7,  # 20 num_threads
        0,  # 21 itrealvalue
        12345,  # 22 starttime
        1000,  # 23 vsize
        100,  # 24 rss
    ]
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n"


def test_parse_stat_reads_the_fields_past_a_comm_with_spaces_and_parentheses() -> None:
    st = parse_stat(stat_line(42, "python3 (x) y", ppid=7, sid=42, utime=250, stime=50, cut=10, cst=5), 100.0)
    assert st == ProcStat(pid=42, ppid=7, sid=42, comm="python3 (x) y", cpu_s=3.0, reaped_children_s=0.15, threads=7)


def procs(*rows: tuple[int, int, int, float]) -> dict[int, ProcStat]:
    """(pid, ppid, sid, cpu_s) -> the table ``read_processes`` returns."""
    return {pid: ProcStat(pid, ppid, sid, f"p{pid}", cpu, 0.0, 1) for pid, ppid, sid, cpu in rows}


def test_a_role_is_its_root_its_descendants_and_its_session() -> None:
    table = procs(
        (100, 1, 100, 1.0),  # frontend, a session leader
        (101, 100, 100, 2.0),  # its child
        (102, 101, 100, 4.0),  # a grandchild
        (103, 1, 100, 8.0),  # re-parented to init, still in the session
        (200, 1, 200, 16.0),  # another role
        (201, 200, 200, 32.0),
        (300, 1, 1, 64.0),  # not ours
    )
    assert role_members(table, 100) == {100, 101, 102, 103}
    assert role_members(table, 200) == {200, 201}
    assert role_members(table, 999) == set()  # gone
    assert role_cpu_seconds(table, {"frontend": 100, "worker 1": 200}) == {"frontend": 15.0, "worker 1": 48.0}
    # a process two roles would claim counts once, for the first
    assert role_cpu_seconds(table, {"a": 101, "b": 100}) == {"a": 6.0, "b": 9.0}


def write_proc(root: Path, lines: dict[int, str]) -> None:
    for pid, line in lines.items():
        (root / str(pid)).mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "stat").write_text(line)
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped


def test_the_meter_counts_the_window_only_and_children_reaped_inside_it(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    t = int(TICK)  # one second in ticks
    write_proc(
        proc,
        {
            10: stat_line(10, "frontend", ppid=1, sid=10, utime=5 * t, stime=t),
            11: stat_line(11, "helper", ppid=10, sid=10, utime=2 * t, stime=0),
            20: stat_line(20, "worker", ppid=1, sid=20, utime=t, stime=0),
        },
    )
    meter = CpuMeter([Role("frontend", "frontend", 10), Role("worker 1", "worker", 20)], proc=proc)
    meter.start()
    assert meter.processes == {"frontend": 2, "worker 1": 1} and meter.threads == {"frontend": 14, "worker 1": 7}
    # the helper ends and is reaped by the frontend (its 3 s land in cutime); the worker ends too
    (proc / "11" / "stat").unlink()
    (proc / "11").rmdir()
    write_proc(proc, {10: stat_line(10, "frontend", ppid=1, sid=10, utime=6 * t, stime=t, cut=3 * t)})
    (proc / "20" / "stat").unlink()
    (proc / "20").rmdir()
    assert meter.stop() == {"frontend": pytest.approx(2.0), "worker 1": 0.0}


def test_cpu_figures_per_request_per_core_by_kind_and_the_rest() -> None:
    roles = [
        Role("frontend", "frontend", 1),
        Role("worker 1", "worker", 2),
        Role("worker 2", "worker", 3),
        Role("etcd", "infra", 4),
    ]
    f = cpu_figures(
        {"frontend": 2.0, "worker 1": 1.0, "worker 2": 0.5, "etcd": 0.1},
        roles,
        client_cpu_s=1.0,
        machine_busy_s=5.0,
        wall_s=4.0,
        requests=1000,
    )
    assert f["roles"]["frontend"] == {
        "kind": "frontend",
        "cpu_s": 2.0,
        "ms_per_req": 2.0,
        "pct_core": 50.0,
        "processes": None,
        "threads": None,
    }
    assert f["kinds"]["worker"] == {"cpu_s": 1.5, "ms_per_req": 1.5, "pct_core": 37.5}
    assert f["stack"]["cpu_s"] == pytest.approx(3.6) and f["stack"]["ms_per_req"] == pytest.approx(3.6)
    assert f["client"] == {"cpu_s": 1.0, "ms_per_req": 1.0, "pct_core": 25.0}
    assert f["other"]["cpu_s"] == pytest.approx(0.4)
    assert f["machine"]["pct_core"] == 125.0
    none = cpu_figures({}, roles, client_cpu_s=0.0, machine_busy_s=0.0, wall_s=1.0, requests=0)
    assert none["stack"]["ms_per_req"] is None and none["other"]["cpu_s"] == 0.0
