"""``commutator up``: the whole stack on this machine.

Embedded (default): one process. Discovery and the event plane are in memory,
and every role still speaks gRPC on loopback to the others, exactly as when
distributed. ``--distributed``: a real etcd and nats-server (temporary data,
free ports) and one process per role; a role that exits on its own (a crashed
worker) is started again after a backoff (1 s doubling to 30 s), with a log
line, while the others keep serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from commutator.common.discovery import DiscoveryConfig, MemoryStore
from commutator.common.events import EventPlaneConfig, MemoryBroker
from commutator.common.grpc import GrpcConfig
from commutator.common.logging import setup_logging
from commutator.common.runtime import RuntimeConfig
from commutator.engines.mocker import MockerConfig
from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model

__all__ = ["up_main"]

log = logging.getLogger("commutator.up")


def _curl(host: str, port: int, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "") else host
    return f"curl http://{shown}:{port}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n  -d '{body}'"


def _prefill_note(args: argparse.Namespace) -> str:
    if not args.prefill_workers:
        return ""
    return f" and {args.prefill_workers} prefill workers ({args.kv_transfer} KV transfer)"


def _banner(args: argparse.Namespace, model: str, mode: str) -> None:
    print(
        f"\nCommutator is up ({mode}): OpenAI API on http://{args.http_host}:{args.http_port}/v1, "
        f"{args.workers} {args.engine} workers"
        + (
            f" and {args.prefill_workers} prefill workers ({args.kv_transfer} KV transfer)"
            if args.prefill_workers
            else ""
        )
        + f", router mode {args.router_mode}.\nTry:\n\n"
        f"{_curl(args.http_host, args.http_port, model)}\n\nCtrl-C stops everything.\n",
        flush=True,
    )


def up_main(args: argparse.Namespace) -> int:
    setup_logging()
    if args.workers < 1 or args.prefill_workers < 0:
        print("--workers must be at least 1 and --prefill-workers at least 0", file=sys.stderr)
        return 2
    if args.distributed:
        return _up_distributed(args)
    import uvloop
    from commutator.common import config as cfg
    from commutator.common.errors import StartupError

    # The roles of the embedded stack share this process's loop: COMMUTATOR_NO_UVLOOP=1 as for every role.
    no_uvloop = cfg.load(RuntimeConfig, argv=[]).no_uvloop
    try:
        return asyncio.run(_up_embedded(args)) if no_uvloop else uvloop.run(_up_embedded(args))
    except KeyboardInterrupt:
        return 0
    except StartupError as exc:
        print(f"commutator up: {exc}", file=sys.stderr)
        return 1


async def _up_embedded(args: argparse.Namespace) -> int:
    from commutator.decode.config import DecodeConfig, WorkerConfig
    from commutator.decode.worker import DecodeWorker
    from commutator.frontend.config import FrontendConfig
    from commutator.frontend.server import Frontend
    from commutator.prefill.config import PrefillConfig
    from commutator.prefill.worker import PrefillWorker
    from commutator.router.config import RouterConfig
    from commutator.worker.kv_transfer import KvTransferConfig

    store, broker = MemoryStore(), MemoryBroker()
    runtime = RuntimeConfig(
        discovery=DiscoveryConfig(discovery_backend="memory", namespace=args.namespace),
        events=EventPlaneConfig(event_plane="memory"),
        metrics_port=-1,  # the frontend serves /metrics for the whole process
    )
    model_path = args.model_path or str(ensure_tiny_model())
    worker = WorkerConfig(
        engine=args.engine,
        engine_args=args.engine_args,
        model_path=model_path,
        model_name="" if args.model_path else MODEL_NAME,
    )
    mocker = MockerConfig(speedup_ratio=args.speedup_ratio)
    transfer = KvTransferConfig(kv_transfer=args.kv_transfer)
    workers: list[DecodeWorker | PrefillWorker] = [
        DecodeWorker(
            DecodeConfig(runtime=runtime, grpc=GrpcConfig(), worker=worker, mocker=mocker, transfer=transfer),
            memory_store=store,
            memory_broker=broker,
        )
        for _ in range(args.workers)
    ]
    workers += [
        PrefillWorker(
            PrefillConfig(runtime=runtime, grpc=GrpcConfig(), worker=worker, mocker=mocker, transfer=transfer),
            memory_store=store,
            memory_broker=broker,
        )
        for _ in range(args.prefill_workers)
    ]
    frontend = Frontend(
        FrontendConfig(
            runtime=runtime,
            router=RouterConfig(router_mode=args.router_mode),
            http_host=args.http_host,
            http_port=args.http_port,
        ),
        memory_store=store,
        memory_broker=broker,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[object] = []
    try:
        for w in workers:
            await w.start()
            started.append(w)
        await frontend.start()
        started.append(frontend)
        _banner(args, workers[0].model_name, "embedded, one process")
        await stop.wait()
        print("\nstopping...", flush=True)
    finally:
        for role in reversed(started):
            await role.drain()  # type: ignore[attr-defined]
    return 0


def _wait_ready(port: int, timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a role exited with status {p.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                data = json.loads(r.read())["data"]
                if data:
                    return str(data[0]["id"])
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the frontend did not list a model within {timeout_s} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Role:
    """One role process of ``commutator up --distributed``, restarted with backoff when it exits on its own."""

    RESTART_DELAY_S = 1.0
    MAX_DELAY_S = 30.0
    STABLE_AFTER_S = 60.0

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.delay = self.RESTART_DELAY_S
        self.restarts = 0

    def start(self) -> None:
        # Own sessions: a terminal's Ctrl-C reaches only this process, which stops the roles in order.
        self.proc = subprocess.Popen([sys.executable, "-m", *self.cmd], env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None
        print(f"started {self.name} (pid {self.proc.pid})", flush=True)

    def check(self, now: float) -> None:
        """Restart the process if it exited and its backoff has passed."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.start()
            return
        if self.proc is None or self.proc.poll() is None:
            return
        # What it started itself (an engine's own processes) shares its process group: gone with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if now - self.started_at >= self.STABLE_AFTER_S:
            self.delay = self.RESTART_DELAY_S  # it had run fine for a while: start over with a short wait
        print(
            f"{self.name} (pid {self.proc.pid}) exited with status {self.proc.returncode}; "
            f"restarting it in {self.delay:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, self.MAX_DELAY_S)

    def stop(self, timeout_s: float) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


def _up_distributed(args: argparse.Namespace) -> int:
    from commutator.common.local_servers import EtcdProcess, NatsProcess

    # Explicit handlers: a shell that starts us in the background may have set SIGINT to "ignore".
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    ensure_tiny_model()
    etcd, nats = EtcdProcess(), NatsProcess()
    roles: list[_Role] = []
    try:
        etcd.start()
        nats.start()
        print(
            f"etcd at {etcd.endpoint}, nats-server at {nats.url} (data in {etcd.data_dir}, {nats.data_dir})", flush=True
        )
        env = dict(
            os.environ,
            COMMUTATOR_ETCD_ENDPOINTS=etcd.endpoint,
            COMMUTATOR_NATS_URL=nats.url,
            COMMUTATOR_NAMESPACE=args.namespace,
        )
        worker_args = ["--speedup-ratio", str(args.speedup_ratio), "--engine", args.engine]
        worker_args += ["--kv-transfer", args.kv_transfer]
        if args.engine_args:
            worker_args += ["--engine-args", args.engine_args]
        if args.model_path:
            worker_args += ["--model-path", args.model_path]
        frontend_args = [
            "--http-port",
            str(args.http_port),
            "--http-host",
            args.http_host,
            "--router-mode",
            args.router_mode,
        ]
        roles = [_Role(f"worker {i + 1}", ["commutator.decode", *worker_args], env) for i in range(args.workers)]
        roles += [
            _Role(f"prefill worker {i + 1}", ["commutator.prefill", *worker_args], env)
            for i in range(args.prefill_workers)
        ]
        roles.append(_Role("frontend", ["commutator.frontend", *frontend_args], env))
        for role in roles:
            role.start()
        model = _wait_ready(args.http_port, 120.0, [r.proc for r in roles if r.proc is not None])
        _banner(args, model, "distributed, one process per role")
        # A role that exits (a crashed worker) is started again with backoff; the rest keep serving.
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            for role in roles:
                role.check(now)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"commutator up: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the drain short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for role in reversed(roles):  # the frontend first, then the workers
            role.stop(40)
        nats.close()
        etcd.close()
