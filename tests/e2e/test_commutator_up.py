"""`make run` / `commutator up`: the whole stack from one command, and a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from commutator.common.local_servers import free_port

pytestmark = pytest.mark.e2e


def _chat(port: int) -> dict[str, object]:
    body = json.dumps(
        {
            "model": "commutator/tiny-llama",
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 5,
            "ignore_eos": True,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["embedded", "distributed"])
def test_up_serves_and_stops_cleanly_on_ctrl_c(mode: str, tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "commutator.cli", "up", "--http-port", str(port), "--speedup-ratio", "10"]
    if mode == "distributed":
        args.append("--distributed")
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 90
        while b"Commutator is up" not in (tmp_path / "up.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "not up in time"
            time.sleep(0.2)
        out = (tmp_path / "up.log").read_text()
        assert f"curl http://localhost:{port}/v1/chat/completions" in out
        reply = _chat(port)
        assert reply["usage"]["completion_tokens"] == 5  # type: ignore[index]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopping" in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_distributed_up_restarts_a_crashed_worker_and_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "commutator.cli", "up", "--distributed", "--workers", "2"]
    args += ["--http-port", str(port), "--speedup-ratio", "10"]
    log_path = tmp_path / "up.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_for(pattern: str, timeout_s: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while (m := re.search(pattern, log_path.read_text())) is None:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"{pattern!r} never logged:\n{log_path.read_text()}"
            time.sleep(0.2)
        return m

    try:
        wait_for("Commutator is up")
        pid = int(wait_for(r"started worker 1 \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        wait_for(rf"worker 1 \(pid {pid}\) exited with status -9; restarting it in 1 s")
        new_pid = int(wait_for(r"started worker 1 \(pid (\d+)\)\n(?:.|\n)*started worker 1 \(pid (\d+)\)").group(2))
        assert new_pid != pid and proc.poll() is None  # the stack kept running
        reply = _chat(port)
        assert reply["usage"]["completion_tokens"] == 5  # type: ignore[index]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.mark.parametrize("mode", ["embedded", "distributed"])
def test_up_with_prefill_workers_serves_long_prompts_remotely(mode: str, tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "commutator.cli", "up", "--http-port", str(port), "--speedup-ratio", "10"]
    args += ["--workers", "1", "--prefill-workers", "1", "--kv-transfer", "simulated"]
    if mode == "distributed":
        args.append("--distributed")
    log_path = tmp_path / "up.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 90
        while b"Commutator is up" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "not up in time"
            time.sleep(0.2)
        assert "and 1 prefill workers (simulated KV transfer)" in log_path.read_text()
        body = json.dumps(
            {"model": "commutator/tiny-llama", "prompt": [10 + i % 3000 for i in range(1500)], "max_tokens": 4}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["usage"]["prompt_tokens"] == 1500
        if mode == "embedded":  # one process: the decode worker's metrics are on the frontend's /metrics
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            remote = [
                line for line in text.splitlines() if line.startswith('commutator_disagg_prefills_total{where="remote"')
            ]
            assert sum(float(line.rsplit(" ", 1)[1]) for line in remote) == 1
        else:
            assert re.search(r"started prefill worker 1 \(pid \d+\)", log_path.read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
