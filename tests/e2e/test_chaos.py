"""The chaos suite's short form (``make chaos`` runs the long one): streaming load on the distributed
stack (3 mocker workers, a router service, a frontend with its embedded router and one using the
router service, real etcd and nats-server) while a worker, the router service, etcd and nats-server
are SIGKILLed in turn and restarted."""

from __future__ import annotations

from pathlib import Path

import pytest
from commutator.cli.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.e2e


async def test_no_request_is_lost_or_garbled_and_worker_kills_fail_none(tmp_path: Path) -> None:
    # About 12 requests/s here; the four faults (kill, 1 s down, restart, recovery, 1 s calm) take about
    # 25 s, so that they all fall under load.
    cfg = ChaosConfig(
        requests=420,
        concurrency=8,
        max_tokens=32,
        fault_every_s=1.0,
        down_s=1.0,
        first_fault_s=2.0,
        logs=tmp_path,
    )
    report = await run_chaos(cfg)
    print("\n".join(report.lines()))
    assert len(report.results) == cfg.requests
    kinds = [f.kind for f in report.faults]
    assert {"worker", "router", "etcd", "nats"} <= set(kinds), kinds  # every fault happened under load
    assert report.count("lost") == 0, report.lines()
    assert report.count("wrong") == 0, report.lines()
    failed = report.failures_by_fault()
    assert failed.get("worker", 0) == 0 and failed.get("none", 0) == 0, report.lines()
    assert report.migrations >= 1  # a worker was killed with requests on it, and they moved
    assert all(f.recovered is not None for f in report.faults), report.lines()
    assert not report.index_mismatches and report.workers_compared == 3, report.lines()
    assert report.count("ok") >= cfg.requests * 0.8, report.lines()
