"""The chaos suite (issue 14): streaming load on the distributed stack while a schedule kills its parts.

The stack, every part its own process on loopback: etcd, nats-server (JetStream), 3 mocker decode
workers, one router service, and two frontends: frontend A routes with its embedded router, frontend
B sends its requests to the router service (``--router-endpoint``); both routers share load (replica
sync). Closed-loop streaming completions go to the two frontends in turn.

Every request has a seed, ``ignore_eos`` and a fixed ``max_tokens``; the mocker's token at each
position is a function of the seed and the position (as a model's is), so the client knows the
exact text each request must stream, and checks it: a token repeated or lost after a migration shows
as a wrong text.

The schedule cycles through the faults, one at a time, each followed by a restart of what it killed:
a worker (SIGKILL, the one running the most requests), the router service (SIGKILL), etcd (SIGKILL)
and nats-server (SIGKILL). Each fault's recovery time runs from the kill until every frontend serves
again and the routers know all three workers again.

Reported: requests completed (exact text and usage), failed with a clear error (an HTTP error or an
SSE error event; by the fault whose window they fell in), lost (no answer and no error: must be 0),
wrong output (must be 0), migrations; at the end, once the load has stopped, the router service's
index against each worker's own dump of its cache (must be identical).

``python -m commutator.cli.chaos [--requests 1000] [--concurrency 12] [--fault-every 8]``
(``make chaos``; the test suite runs a short form: tests/e2e/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.errors import NotFound, Unavailable
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess, NatsProcess, free_port
from commutator.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

__all__ = ["ChaosConfig", "Report", "run_chaos"]

MODEL = "commutator/tiny-llama"
FAULTS = ("worker", "router", "etcd", "nats")


@dataclass
class ChaosConfig:
    requests: int = 1000
    concurrency: int = 12
    max_tokens: int = 40
    prompt_tokens: int = 96
    speedup: float = 0.5
    fault_every_s: float = 8.0
    """Seconds between one fault's recovery and the next fault."""
    down_s: float = 2.0
    """How long a killed part stays down before it is restarted."""
    first_fault_s: float = 4.0
    faults: tuple[str, ...] = FAULTS
    request_timeout_s: float = 60.0
    logs: Path | None = None


@dataclass
class Result:
    index: int
    frontend: str
    start: float
    end: float = 0.0
    kind: str = "lost"  # ok | error | wrong | lost
    detail: str = ""


@dataclass
class Fault:
    kind: str
    at: float
    recovered: float | None = None


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    migrations: int = 0
    router_migrations: int = 0
    """Streams a frontend sent to a router again after its router service died mid-stream."""
    index_mismatches: dict[str, str] = field(default_factory=dict)
    workers_compared: int = 0
    wall_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(1 for r in self.results if r.kind == kind)

    def failures_by_fault(self) -> Counter[str]:
        """Each failed request attributed to the fault whose window (kill to recovery, plus the
        request timeout before it) it ended in; 'none' if no fault was active."""
        out: Counter[str] = Counter()
        for r in self.results:
            if r.kind != "error":
                continue
            cause = "none"
            for f in self.faults:
                end = f.recovered if f.recovered is not None else float("inf")
                if f.at <= r.end <= end + 1.0:
                    cause = f.kind
            out[cause] += 1
        return out

    def lines(self) -> list[str]:
        n = len(self.results)
        out = [
            f"{n} streaming requests in {self.wall_s:.0f} s: {self.count('ok')} completed exactly, "
            f"{self.count('error')} failed with a clear error, {self.count('lost')} lost (no answer, no error), "
            f"{self.count('wrong')} with wrong output (tokens repeated, lost or different)",
            f"migrations: {self.migrations} after a worker failed, {self.router_migrations} after the router "
            "service failed",
        ]
        by_fault = self.failures_by_fault()
        out.append(
            "failed requests by fault: " + (", ".join(f"{k} {v}" for k, v in sorted(by_fault.items())) or "none")
        )
        errors = Counter(r.detail[:120] for r in self.results if r.kind in ("error", "lost", "wrong"))
        for msg, k in errors.most_common(8):
            out.append(f"  {k} x {msg}")
        for f in self.faults:
            rec = f"{f.recovered - f.at:.1f} s" if f.recovered is not None else "never"
            out.append(f"fault {f.kind} at {f.at:.1f} s: recovered in {rec}")
        if self.index_mismatches:
            for w, why in self.index_mismatches.items():
                out.append(f"index of worker {w}: DIFFERS from its dump: {why}")
        else:
            out.append(f"index after recovery: identical to the dumps of all {self.workers_compared} workers")
        return out


class _Role:
    """A role process started with the stack's environment, restartable with the same arguments."""

    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.module, self.args, self.env = name, module, args, env
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _expected_texts(cfg: ChaosConfig, n: int) -> tuple[list[list[int]], list[str]]:
    """Every request's prompt and the exact text the mocker streams for it."""
    from commutator.engines.mocker.tokens import text_token_ids, token_at
    from commutator.engines.model_info import ModelInfo
    from commutator.engines.tiny_model import ensure_tiny_model
    from commutator.frontend.detokenize import TextStream
    from tokenizers import Tokenizer

    model_dir = ensure_tiny_model()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    info = ModelInfo.load(model_dir)
    table = text_token_ids(model_dir / "tokenizer.json", info.vocab_size, keep=info.eos_token_ids)  # as the mocker
    prompts, texts = [], []
    for i in range(n):
        p = [10 + (i * 7919 + j * 31) % 4000 for j in range(cfg.prompt_tokens)]
        ids = [token_at(_seed(i), len(p) + k, info.vocab_size, table) for k in range(cfg.max_tokens)]
        ts = TextStream(tok)
        prompts.append(p)
        texts.append(ts.push(ids) + ts.flush())
    return prompts, texts


def _seed(i: int) -> int:
    return 100_000 + i


class _Chaos:
    def __init__(self, cfg: ChaosConfig, logs: Path) -> None:
        self.cfg = cfg
        self.logs = logs
        self.etcd = EtcdProcess()
        self.nats = NatsProcess()
        self.namespace = "chaos" + uuid.uuid4().hex[:8]
        self.t0 = 0.0
        self.report = Report()
        self.workers: list[_Role] = []
        self.worker_seq = 0
        self.frontends: dict[str, tuple[_Role, str]] = {}
        self.router: _Role | None = None
        self.done = asyncio.Event()
        self.env: dict[str, str] = {}
        self.http: aiohttp.ClientSession | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- the stack ----------------------------------------------------------------------------
    def _role(self, name: str, module: str, *args: str) -> _Role:
        r = _Role(name, module, list(args), self.env, self.logs)
        r.start()
        return r

    def _new_worker(self) -> _Role:
        self.worker_seq += 1
        return self._role(
            f"worker{self.worker_seq}",
            "commutator.decode",
            *("--speedup-ratio", str(self.cfg.speedup), "--block-size", "16", "--lease-ttl-s", "3"),
        )

    async def start(self) -> None:
        await asyncio.to_thread(self.etcd.start)
        await asyncio.to_thread(self.nats.start)
        self.env = dict(
            os.environ,
            COMMUTATOR_ETCD_ENDPOINTS=self.etcd.endpoint,
            COMMUTATOR_NATS_URL=self.nats.url,
            COMMUTATOR_NAMESPACE=self.namespace,
            COMMUTATOR_LOG="info",
            PYTHONUNBUFFERED="1",
        )
        self.workers = [self._new_worker() for _ in range(3)]
        self.router = self._role("router", "commutator.router", "--router-replica-sync")
        for name, extra in (("frontend-a", ()), ("frontend-b", ("--router-endpoint", "router"))):
            port = free_port()
            role = self._role(
                name,
                "commutator.frontend",
                *("--http-host", "127.0.0.1", "--http-port", str(port), "--router-replica-sync", *extra),
            )
            self.frontends[name] = (role, f"http://127.0.0.1:{port}")
        self.discovery = Discovery(EtcdBackend([self.etcd.endpoint]))
        await self.discovery.start()
        self.worker_client = EndpointClient(
            self.discovery, self.namespace, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=10
        )
        self.router_client = EndpointClient(
            self.discovery, self.namespace, "router", "route", router_pb2_grpc.RouterStub, default_timeout_s=30
        )
        await self.worker_client.start()
        await self.router_client.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s))
        if not await self._healthy(timeout_s=120):
            raise RuntimeError("the stack did not come up; logs in " + str(self.logs))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        for c in ("worker_client", "router_client"):
            with contextlib.suppress(Exception):
                await getattr(self, c).close()
        with contextlib.suppress(Exception):
            await self.discovery.close()
        for role, _ in self.frontends.values():
            role.stop()
        if self.router is not None:
            self.router.stop()
        for w in self.workers:
            w.stop()
        await asyncio.to_thread(self.nats.close)
        await asyncio.to_thread(self.etcd.close)

    async def _probe(self, base: str) -> bool:
        assert self.http is not None
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}
        try:
            async with self.http.post(f"{base}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def _routers_know_all_workers(self) -> bool:
        """Every router replica routes to every live worker (3 of them)."""
        try:
            live = [w for w in self.worker_client.instances]
            if len(live) != 3:
                return False
            for wid in live:
                r = await self.router_client.call(
                    "Route", router_pb2.RouteRequest(token_ids=[1], worker_id=wid), timeout_s=2
                )
                if r.outcome != router_pb2.ROUTE_OUTCOME_ROUTED:
                    return False
        except Exception:
            return False
        return True

    async def _healthy(self, timeout_s: float, gone: int | None = None) -> bool:
        """Both frontends answer and the routers route to the 3 live workers; ``gone`` (a killed worker)
        among them does not count: until its lease expires it still looks live."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            oks = await asyncio.gather(*(self._probe(base) for _, base in self.frontends.values()))
            if all(oks) and gone not in self.worker_client.instances and await self._routers_know_all_workers():
                return True
            await asyncio.sleep(0.2)
        return False

    # -- the load -----------------------------------------------------------------------------
    async def _one(self, i: int, prompt: list[int], want: str) -> Result:
        assert self.http is not None
        name = "frontend-a" if i % 2 == 0 else "frontend-b"
        base = self.frontends[name][1]
        res = Result(i, name, self.now())
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": self.cfg.max_tokens,
            "seed": _seed(i),
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        text: list[str] = []
        finish: list[str] = []
        usage: dict[str, Any] = {}
        done = False
        try:
            async with self.http.post(f"{base}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    res.kind, res.detail = "error", f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return res
                async for raw in resp.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        res.kind, res.detail = "error", f"SSE error: {chunk['error'].get('message', '')[:200]}"
                        return res
                    for c in chunk.get("choices", []):
                        text.append(c.get("text", ""))
                        if c.get("finish_reason"):
                            finish.append(c["finish_reason"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        except (TimeoutError, aiohttp.ClientError) as exc:
            res.kind, res.detail = "lost", f"{type(exc).__name__}: {exc}"[:200]
            return res
        finally:
            res.end = self.now()
        if not done:
            res.kind, res.detail = "lost", "the stream ended without [DONE] or an error"
        elif "".join(text) != want or finish != ["length"]:
            res.kind, res.detail = "wrong", f"text differs from the expected output (finish {finish})"
        elif usage.get("completion_tokens") != self.cfg.max_tokens or usage.get("prompt_tokens") != len(prompt):
            res.kind, res.detail = "wrong", f"usage {usage}"
        else:
            res.kind = "ok"
        return res

    async def load(self, prompts: list[list[int]], texts: list[str]) -> None:
        nxt = iter(range(len(prompts)))

        async def client() -> None:
            for i in nxt:
                self.report.results.append(await self._one(i, prompts[i], texts[i]))

        await asyncio.gather(*(client() for _ in range(self.cfg.concurrency)))
        self.done.set()

    # -- the faults ---------------------------------------------------------------------------
    @staticmethod
    def _instance_id(worker: _Role) -> int | None:
        m = re.search(r"worker ready .*?instance_id=([0-9a-f]+)", worker.log())
        return None if m is None else int(m.group(1), 16)

    async def _busiest_worker(self) -> _Role:
        best, most = self.workers[0], -1
        for w in self.workers:
            wid = self._instance_id(w)
            if wid is None:
                continue
            try:
                resp = await self.worker_client.call("Stats", worker_pb2.StatsRequest(), instance_id=wid, timeout_s=2)
            except Exception:
                continue
            n = sum(r.running_requests for r in resp.ranks)
            if n > most:
                best, most = w, n
        return best

    async def _inject(self, kind: str) -> None:
        fault = Fault(kind, self.now())
        self.report.faults.append(fault)
        gone: int | None = None  # a killed worker's instance, which must be gone before it counts as recovered
        if kind == "worker":
            victim = await self._busiest_worker()
            fault.at = self.now()
            gone = self._instance_id(victim)
            victim.kill()
            self.workers.remove(victim)
            await asyncio.sleep(self.cfg.down_s)
            self.workers.append(self._new_worker())
        elif kind == "router":
            assert self.router is not None
            self.router.kill()
            await asyncio.sleep(self.cfg.down_s)
            self.router.start()
        elif kind == "etcd":
            await asyncio.to_thread(self.etcd.kill)
            await asyncio.sleep(self.cfg.down_s)
            await asyncio.to_thread(self.etcd.start)
        elif kind == "nats":
            await asyncio.to_thread(self.nats.kill)
            await asyncio.sleep(self.cfg.down_s)
            await asyncio.to_thread(self.nats.start)
        else:
            raise ValueError(f"unknown fault {kind!r}")
        if await self._healthy(timeout_s=90, gone=gone):
            fault.recovered = self.now()

    async def schedule(self) -> None:
        await asyncio.sleep(self.cfg.first_fault_s)
        k = 0
        while not self.done.is_set():
            await self._inject(self.cfg.faults[k % len(self.cfg.faults)])
            k += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.done.wait(), self.cfg.fault_every_s)

    # -- the index after recovery -------------------------------------------------------------
    async def compare_index(self) -> None:
        """The router service's index against every worker's dump, once events have settled."""

        async def snapshot() -> tuple[dict[int, set[tuple[int, int]]], dict[int, set[tuple[int, int]]], list[int]]:
            routed: dict[int, set[tuple[int, int]]] = {}
            async for batch in self.router_client.stream("Dump", router_pb2.DumpRequest(), timeout_s=30):  # type: ignore[arg-type]
                for ev in batch.events:
                    routed.setdefault(ev.worker_id, set()).update(
                        (b.block_hash, b.sequence_hash) for b in ev.stored.blocks
                    )
            own: dict[int, set[tuple[int, int]]] = {}
            gone: list[int] = []
            for wid in list(self.worker_client.instances):
                try:
                    d = await self.worker_client.call(
                        "DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=wid, timeout_s=30
                    )
                except (Unavailable, NotFound):
                    # A killed worker whose registration has not expired yet (its lease outlives it by up to
                    # the TTL, and an etcd restart renews every lease): not settled yet.
                    gone.append(wid)
                    continue
                own[wid] = {(b.block_hash, b.sequence_hash) for ev in d.events for b in ev.stored.blocks}
            return routed, own, gone

        routed: dict[int, set[tuple[int, int]]] = {}
        own: dict[int, set[tuple[int, int]]] = {}
        gone: list[int] = []
        for _ in range(60):  # events in flight, a worker's registration still expiring: give it time
            routed, own, gone = await snapshot()
            if not gone and {w: routed.get(w, set()) for w in own} == own and set(routed) <= set(own):
                break
            await asyncio.sleep(0.5)
        for wid in gone:
            self.report.index_mismatches[f"{wid:x}"] = "still registered but not answering after 30 s"
        self.report.workers_compared = len(own)
        for wid, blocks in own.items():
            got = routed.get(wid, set())
            if got != blocks:
                self.report.index_mismatches[f"{wid:x}"] = (
                    f"{len(blocks - got)} blocks missing from the index, {len(got - blocks)} extra"
                )
        for wid in set(routed) - set(own):
            self.report.index_mismatches[f"{wid:x}"] = f"{len(routed[wid])} blocks of a worker that is gone"

    def count_migrations(self) -> None:
        n = 0
        for role in [self.frontends["frontend-a"][0], *(r for r in [self.router] if r is not None)]:
            n += role.log().count("migrating it to another worker")
        self.report.migrations = n
        self.report.router_migrations = self.frontends["frontend-b"][0].log().count("sending it to a router again")


async def run_chaos(cfg: ChaosConfig) -> Report:
    logs = cfg.logs or Path(tempfile.mkdtemp(prefix="commutator-chaos-"))
    logs.mkdir(parents=True, exist_ok=True)
    prompts, texts = await asyncio.to_thread(_expected_texts, cfg, cfg.requests)
    chaos = _Chaos(cfg, logs)
    try:
        await chaos.start()
        chaos.t0 = time.monotonic()
        sched = asyncio.create_task(chaos.schedule())
        await chaos.load(prompts, texts)
        await sched
        chaos.report.wall_s = chaos.now()
        await chaos.compare_index()
        chaos.count_migrations()
    finally:
        await chaos.close()
    return chaos.report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--speedup", type=float, default=0.5, help="the mocker workers' --speedup-ratio")
    ap.add_argument("--fault-every", type=float, default=8.0, help="seconds from one fault's recovery to the next")
    ap.add_argument("--down", type=float, default=2.0, help="seconds a killed part stays down")
    ap.add_argument("--faults", default=",".join(FAULTS), help="the cycle of faults: " + ",".join(FAULTS))
    ap.add_argument("--logs", type=Path, default=Path("build/chaos"), help="role logs")
    a = ap.parse_args(argv)
    faults = tuple(f for f in a.faults.split(",") if f)
    if bad := [f for f in faults if f not in FAULTS]:
        ap.error(f"unknown faults {bad}; choose from {list(FAULTS)}")
    cfg = ChaosConfig(
        requests=a.requests,
        concurrency=a.concurrency,
        max_tokens=a.max_tokens,
        speedup=a.speedup,
        fault_every_s=a.fault_every,
        down_s=a.down,
        faults=faults,
        logs=a.logs,
    )
    print(
        f"chaos: {cfg.requests} streaming requests, {cfg.concurrency} clients, {cfg.max_tokens} tokens each; "
        f"3 workers, a router service, 2 frontends; faults {', '.join(faults)} in turn; logs in {a.logs}",
        flush=True,
    )
    report = asyncio.run(run_chaos(cfg))
    for line in report.lines():
        print(line)
    bad_worker = report.failures_by_fault().get("worker", 0)
    ok = (
        report.count("lost") == 0
        and report.count("wrong") == 0
        and not report.index_mismatches
        and bad_worker == 0
        and all(f.recovered is not None for f in report.faults)
    )
    print("chaos: PASS" if ok else "chaos: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
