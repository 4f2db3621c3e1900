"""Stacks under test, started fresh for each measurement: Commutator, and NVIDIA Dynamo 1.6.1.

Both run the same topology on this machine: one frontend process and two
mocker worker processes with the same KV cache (block size 64, 16384 blocks),
batching limits, timing model and speed-up, serving the tiny model.
Commutator runs on a real etcd and nats-server (started here); Dynamo runs
with file discovery (no etcd, no NATS), as its documentation allows.

Dynamo is installed on demand into ``build/dynamo-venv`` (never a project
dependency): its two wheels without dependencies (``ai-dynamo`` requires
``aisimulate``, fetched from an index unreachable here, which only its planner
uses), then their other requirements as pinned in
``benchmarks/dynamo-requirements.txt``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from commutator.cli.cpu import Role
from commutator.common.local_servers import EtcdProcess, NatsProcess, free_port
from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model

__all__ = [
    "DYNAMO_VERSION",
    "CommutatorStack",
    "DynamoStack",
    "Stack",
    "StackStartError",
    "cpu_seconds",
    "ensure_dynamo",
    "repo_root",
]

DYNAMO_VERSION = "1.6.1"
MOCKER = {"block_size": 64, "num_blocks": 16384, "max_num_seqs": 256, "max_batched_tokens": 8192}


class StackStartError(RuntimeError):
    """A stack's role exited while it started, or the stack did not serve in time."""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def repo_root() -> Path:
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "uv.lock").is_file() and (p / "benchmarks").is_dir():
            return p
    return Path.cwd()


def ensure_dynamo(build_dir: Path | None = None, log: Callable[[str], object] = print) -> Path:
    """The python of a venv holding Dynamo, installed there first if needed."""
    build = build_dir or repo_root() / "build"
    venv = build / "dynamo-venv"
    py = venv / "bin" / "python"
    marker = venv / f".dynamo-{DYNAMO_VERSION}"
    if marker.is_file():
        return py
    log(f"installing ai-dynamo=={DYNAMO_VERSION} into {venv} (once; takes a minute)...")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "--no-deps", f"ai-dynamo=={DYNAMO_VERSION}", f"ai-dynamo-runtime=={DYNAMO_VERSION}"], check=True
    )
    reqs = repo_root() / "benchmarks" / "dynamo-requirements.txt"
    subprocess.run([*pip, "-r", str(reqs)], check=True)
    subprocess.run([str(py), "-c", "import dynamo.frontend, dynamo.mocker"], check=True)
    marker.write_text(DYNAMO_VERSION + "\n")
    return py


async def _wait_serving(
    base: str, procs: list[subprocess.Popen[bytes]], log_dir: Path, timeout_s: float = 120.0
) -> None:
    """Until a one-token request succeeds."""
    deadline = time.monotonic() + timeout_s
    body = {"model": MODEL_NAME, "prompt": [11, 12, 13, 14], "max_tokens": 1}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise StackStartError(
                        f"a process of the stack exited with {p.returncode} while starting (logs in {log_dir})"
                    )
            try:
                async with http.post(f"{base}/completions", json=body, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.2)
    raise StackStartError(f"the stack at {base} did not serve within {timeout_s} s (logs in {log_dir})")


class Stack:
    """A started stack: its OpenAI base URL and its frontend process (for CPU accounting)."""

    name = "stack"

    def __init__(
        self,
        *,
        speedup: float,
        router_mode: str,
        workers: int = 2,
        num_blocks: int = MOCKER["num_blocks"],
        log_dir: Path | None = None,
        prefill_workers: int = 0,
        worker_args: tuple[str, ...] = (),
        prefill_args: tuple[str, ...] = (),
        frontend_args: tuple[str, ...] = (),
    ) -> None:
        """``prefill_workers`` (Commutator only): prefill workers beside the decode workers;
        ``worker_args`` / ``prefill_args``: more flags for each decode / prefill worker;
        ``frontend_args`` (Commutator only): more flags for the frontend (``--processes 2``)."""
        self.num_blocks = num_blocks
        self.prefill_workers = prefill_workers
        self.worker_args = tuple(worker_args)
        self.prefill_args = tuple(prefill_args)
        self.frontend_args = tuple(frontend_args)
        self.metrics_ports: dict[str, list[int]] = {"decode": [], "prefill": []}
        self.speedup = speedup
        self.router_mode = router_mode
        self.workers = workers
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.frontend: subprocess.Popen[bytes] | None = None
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self._logs: list[object] = []
        self._labels: dict[int, str] = {}
        self._spawned = 0

    def _spawn(self, cmd: list[str], env: dict[str, str], label: str) -> subprocess.Popen[bytes]:
        self._spawned += 1
        log = open(self._log_dir / f"{label}-{self._spawned - 1}.log", "wb")
        self._logs.append(log)
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self._labels[p.pid] = label
        return p

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not self.frontend]

    def roles(self) -> list[Role]:
        """Every process of the stack, for CPU accounting: the frontend, each worker ("worker 1",
        "prefill 1", "mocker 1": the name its log has), then the rest."""
        out = [Role("frontend", "frontend", self.frontend.pid)] if self.frontend else []
        seen: dict[str, int] = {}
        for p in self.procs:
            if p is self.frontend:
                continue
            label = self._labels.get(p.pid, "worker")
            seen[label] = seen.get(label, 0) + 1
            out.append(Role(f"{label} {seen[label]}", "worker", p.pid))
        return out

    async def start(self) -> None:
        raise NotImplementedError

    async def launch(self, attempts: int = 3) -> None:
        """:meth:`start`, again on fresh ports when a role exits while starting or the stack does not
        serve: a port chosen free can be taken by another process before the role binds it (a run of
        ``bench compare`` starts dozens of stacks). The last failure is raised, every process stopped."""
        for attempt in range(1, attempts + 1):
            try:
                await self.start()
                return
            except StackStartError as exc:
                await self.stop()
                if attempt == attempts:
                    raise
                print(f"  {self.name} stack did not start ({exc}); starting it again on fresh ports", flush=True)
                self.port = free_port()
                self.base_url = f"http://127.0.0.1:{self.port}/v1"
                self.metrics_ports = {"decode": [], "prefill": []}

    async def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                await asyncio.to_thread(p.wait, 30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self.procs.clear()


class CommutatorStack(Stack):
    name = "commutator"

    async def start(self) -> None:
        model = ensure_tiny_model()
        self.etcd, self.nats = EtcdProcess(), NatsProcess()
        self.etcd.start()
        self.nats.start()
        env = dict(
            os.environ,
            COMMUTATOR_ETCD_ENDPOINTS=self.etcd.endpoint,
            COMMUTATOR_NATS_URL=self.nats.url,
            COMMUTATOR_NAMESPACE="bench",
            COMMUTATOR_LOG="warning",
        )
        mocker = [
            "--model-path",
            str(model),
            "--model-name",
            MODEL_NAME,
            "--speedup-ratio",
            str(self.speedup),
            "--block-size",
            str(MOCKER["block_size"]),
            "--num-blocks",
            str(self.num_blocks),
            "--max-num-seqs",
            str(MOCKER["max_num_seqs"]),
            "--max-batched-tokens",
            str(MOCKER["max_batched_tokens"]),
        ]
        for role, count, extra in (
            ("decode", self.workers, self.worker_args),
            ("prefill", self.prefill_workers, self.prefill_args),
        ):
            for _ in range(count):
                port = free_port()
                self.metrics_ports[role].append(port)
                cmd = [sys.executable, "-m", f"commutator.{role}", *mocker, "--metrics-port", str(port), *extra]
                self._spawn(cmd, env, "worker" if role == "decode" else "prefill")
        self.frontend = self._spawn(
            [
                sys.executable,
                "-m",
                "commutator.frontend",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(self.port),
                "--router-mode",
                self.router_mode,
                *self.frontend_args,
            ],
            env,
            "frontend",
        )
        await _wait_serving(self.base_url, self.procs, self._log_dir)

    def roles(self) -> list[Role]:
        out = super().roles()
        for label, server in (("etcd", self.etcd), ("nats-server", self.nats)):
            if server.proc is not None:
                out.append(Role(label, "infra", server.proc.pid))
        return out

    async def stop(self) -> None:
        """Also after a start that failed part way."""
        await super().stop()
        for server in (getattr(self, "nats", None), getattr(self, "etcd", None)):
            if server is not None:
                server.close()


class DynamoStack(Stack):
    name = "dynamo"

    def __init__(self, python: Path, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.python = str(python)

    async def start(self) -> None:
        model = ensure_tiny_model()
        self._kv_dir = tempfile.mkdtemp(prefix="dynamo-file-kv-")
        env = dict(
            os.environ,
            DYN_FILE_KV=self._kv_dir,
            DYN_TCP_RPC_HOST="127.0.0.1",
            DYN_EVENT_PLANE_HOST="127.0.0.1",
            DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
            DYN_SYSTEM_HOST="127.0.0.1",
            DYN_LOG="warn",
        )
        for _ in range(self.workers):
            self._spawn(
                [
                    self.python,
                    "-m",
                    "dynamo.mocker",
                    "--model-path",
                    str(model),
                    "--model-name",
                    MODEL_NAME,
                    "--speedup-ratio",
                    str(self.speedup),
                    "--block-size",
                    str(MOCKER["block_size"]),
                    "--num-gpu-blocks-override",
                    str(self.num_blocks),
                    "--max-num-seqs",
                    str(MOCKER["max_num_seqs"]),
                    "--max-num-batched-tokens",
                    str(MOCKER["max_batched_tokens"]),
                    "--discovery-backend",
                    "file",
                ],
                env,
                "mocker",
            )
        self.frontend = self._spawn(
            [
                self.python,
                "-m",
                "dynamo.frontend",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(self.port),
                "--router-mode",
                self.router_mode,
                "--discovery-backend",
                "file",
            ],
            env,
            "frontend",
        )
        await _wait_serving(self.base_url, self.procs, self._log_dir)

    async def stop(self) -> None:
        await super().stop()
        if getattr(self, "_kv_dir", None):
            shutil.rmtree(self._kv_dir, ignore_errors=True)
