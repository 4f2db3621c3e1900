"""Disaggregated serving end to end: decode workers, prefill workers and a frontend as separate
processes on real etcd and NATS (the prefill queue is a JetStream work-queue stream)."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp
import openai
import pytest
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess, free_port
from commutator.v1 import common_pb2, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.e2e

MODEL = "commutator/tiny-llama"
BS = 64
LONG = 2000  # over --max-local-prefill-length (1000): prefilled remotely
SHORT = 200
# The mocker's prefill of 2,000 tokens takes about 49 ms of simulated time; divided by these
# speed-ups: slow prefill workers whose work is easy to catch in progress.
SLOW = "0.01"  # about 5 s per long prefill


def prompt(n: int, k: int) -> list[int]:
    return [10 + (k * 7919 + i * 31) % 4000 for i in range(n)]


async def until(pred, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def metric(proc, series: str) -> float:  # type: ignore[no-untyped-def]
    """The sum of ``series`` (a prefix, labels included) on a role process's /metrics."""
    m = re.search(r"worker ready .*metrics_port=(\d+)", proc.log())
    assert m is not None, proc.log()[-2000:]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{m.group(1)}/metrics") as r:
            text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


async def ready(proc, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    async def is_ready() -> bool:
        assert proc.proc.poll() is None, proc.log()[-3000:]
        return "worker ready" in proc.log()

    await until(is_ready, timeout_s)


def where(kind: str) -> str:
    return f'commutator_disagg_prefills_total{{where="{kind}"'


def prefills(outcome: str) -> str:
    return f'commutator_prefill_requests_total{{outcome="{outcome}"'


async def complete(client: openai.AsyncOpenAI, tokens: list[int], max_tokens: int = 8) -> openai.types.Completion:
    return await client.completions.create(
        model=MODEL, prompt=tokens, max_tokens=max_tokens, extra_body={"ignore_eos": True}
    )


@pytest.fixture
async def frontend(spawn) -> dict[str, object]:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = spawn("commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    yield {"proc": proc, "base": base, "client": client}
    await client.close()


async def serving(frontend: dict[str, object], timeout_s: float = 60.0) -> None:
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]

    async def ok() -> bool:
        try:
            await client.completions.create(model=MODEL, prompt=[5], max_tokens=1)
            return True
        except openai.APIError:
            return False

    await until(ok, timeout_s)


async def test_long_prompts_go_to_the_prefill_workers_and_short_ones_stay(spawn, frontend) -> None:  # type: ignore[no-untyped-def]
    decode = spawn("commutator.decode", "--speedup-ratio", "10")
    prefill = spawn("commutator.prefill", "--speedup-ratio", "10")
    await ready(decode)
    await ready(prefill)
    await serving(frontend)
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    local0, remote0 = await metric(decode, where("local")), await metric(decode, where("remote"))
    short = await complete(client, prompt(SHORT, 1))
    assert short.usage.completion_tokens == 8
    assert (await metric(decode, where("local")), await metric(decode, where("remote"))) == (local0 + 1, remote0)
    long = await complete(client, prompt(LONG, 2))
    assert long.usage.completion_tokens == 8 and long.usage.prompt_tokens == LONG
    assert (await metric(decode, where("local")), await metric(decode, where("remote"))) == (local0 + 1, remote0 + 1)
    assert await metric(prefill, prefills("done")) == 1
    assert await metric(prefill, "commutator_prefill_tokens_total") == LONG  # computed there, not here
    # Once the decode worker has the prompt cached (the imported blocks), its uncached part is short.
    again = await complete(client, prompt(LONG, 2))
    assert again.usage.prompt_tokens_details.cached_tokens == (LONG - 1) // BS * BS
    assert await metric(decode, where("local")) == local0 + 2


async def test_two_prefill_workers_share_one_queue_and_nothing_is_prefilled_twice(spawn, frontend) -> None:  # type: ignore[no-untyped-def]
    decode = spawn("commutator.decode", "--speedup-ratio", "1")
    workers = [spawn("commutator.prefill", "--speedup-ratio", "1", "--max-concurrent-prefills", "2") for _ in range(2)]
    for p in (decode, *workers):
        await ready(p)
    await serving(frontend)
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    replies = await asyncio.gather(*(complete(client, prompt(LONG, 10 + k)) for k in range(8)))
    assert all(r.usage.completion_tokens == 8 for r in replies)
    done = [await metric(p, prefills("done")) for p in workers]
    assert sum(done) == 8 and all(done), done  # each prompt prefilled once; both workers took work
    assert await metric(decode, where("remote")) == 8 and await metric(decode, where("fallback")) == 0


async def test_a_prefill_killed_mid_request_is_delivered_again_to_another_worker(spawn, frontend) -> None:  # type: ignore[no-untyped-def]
    decode = spawn("commutator.decode", "--speedup-ratio", "10", "--prefill-timeout-s", "60")
    doomed = spawn("commutator.prefill", "--speedup-ratio", SLOW, "--redelivery-s", "2")
    await ready(decode)
    await ready(doomed)
    await serving(frontend)
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    reply = asyncio.create_task(complete(client, prompt(LONG, 30)))

    async def taken() -> bool:
        return await metric(doomed, 'commutator_prefill_stage_seconds_count{stage="queue"') >= 1

    await until(taken)
    doomed.proc.send_signal(signal.SIGKILL)  # mid-prefill: no heartbeats from now on
    rescuer = spawn("commutator.prefill", "--speedup-ratio", "10", "--redelivery-s", "2")
    r = await asyncio.wait_for(reply, 60)
    assert r.usage.completion_tokens == 8
    await ready(rescuer)
    assert await metric(rescuer, prefills("done")) == 1  # redelivered, prefilled there
    assert await metric(decode, where("remote")) == 1 and await metric(decode, where("fallback")) == 0


async def test_a_prefill_killed_with_no_other_worker_falls_back_to_a_local_prefill(spawn, frontend) -> None:  # type: ignore[no-untyped-def]
    decode = spawn("commutator.decode", "--speedup-ratio", "10", "--prefill-timeout-s", "3")
    doomed = spawn("commutator.prefill", "--speedup-ratio", SLOW)
    await ready(decode)
    await ready(doomed)
    await serving(frontend)
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    reply = asyncio.create_task(complete(client, prompt(LONG, 40)))

    async def taken() -> bool:
        return await metric(doomed, 'commutator_prefill_stage_seconds_count{stage="queue"') >= 1

    await until(taken)
    doomed.proc.send_signal(signal.SIGKILL)
    r = await asyncio.wait_for(reply, 30)  # the client never sees the failed prefill
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == LONG
    assert await metric(decode, where("fallback")) == 1 and await metric(decode, where("remote")) == 0


async def test_a_client_that_leaves_while_its_prefill_is_queued_frees_everything(  # type: ignore[no-untyped-def]
    spawn, frontend, etcd_server: EtcdProcess, unique: str
) -> None:
    decode = spawn("commutator.decode", "--speedup-ratio", "10", "--prefill-timeout-s", "60")
    prefill = spawn("commutator.prefill", "--speedup-ratio", SLOW, "--max-concurrent-prefills", "1")
    await ready(decode)
    await ready(prefill)
    await serving(frontend)
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    workers = EndpointClient(d, unique, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=30)
    await workers.start()
    await workers.wait_for_instances(1)

    async def used() -> int:
        return int((await workers.call("Stats", worker_pb2.StatsRequest())).ranks[0].kv_blocks_used)

    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    first = asyncio.create_task(complete(client, prompt(LONG, 50)))  # takes the only prefill slot (~5 s)
    blocks = -(-LONG // BS)

    async def first_reserved() -> bool:
        return await used() >= blocks

    await until(first_reserved)
    body = {"model": MODEL, "prompt": prompt(LONG, 51), "max_tokens": 8, "stream": True, "ignore_eos": True}

    async def second_client() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{frontend['base']}/completions", json=body) as resp:
                await resp.read()

    second = asyncio.create_task(second_client())

    async def second_reserved() -> bool:
        return await used() >= 2 * blocks

    await until(second_reserved)  # queued behind the first, its blocks reserved here
    second.cancel()  # the client leaves while its prefill waits in the queue
    await asyncio.gather(second, return_exceptions=True)

    async def released() -> bool:
        return await used() == blocks  # only the first request's reservation is left

    await until(released, 10)
    assert (await first).usage.completion_tokens == 8

    async def skipped() -> bool:
        return await metric(prefill, prefills("cancelled")) == 1

    await until(skipped, 20)  # when the worker got to it, it did not run it
    assert await metric(prefill, prefills("done")) == 1
    await workers.close()
    await d.close()


async def test_a_model_without_decode_workers_leaves_the_list_while_prefill_workers_live(spawn, frontend) -> None:  # type: ignore[no-untyped-def]
    decode = spawn("commutator.decode", "--speedup-ratio", "10")
    prefill = spawn("commutator.prefill", "--speedup-ratio", "10")
    await ready(decode)
    await ready(prefill)
    await serving(frontend)
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    assert [m.id async for m in client.models.list()] == [MODEL]
    decode.signal(signal.SIGTERM)
    assert await decode.wait(30) == 0

    async def gone() -> bool:
        return [m.id async for m in client.models.list()] == []

    await until(gone, 15)
    assert prefill.proc.poll() is None


async def test_hf_disaggregated_over_grpc_matches_aggregated_token_for_token(  # type: ignore[no-untyped-def]
    spawn, frontend, etcd_server: EtcdProcess, unique: str
) -> None:
    """The KV bytes arrived intact and in the right blocks: greedy decoding from them is identical."""
    grpc_args = ("--engine", "hf", "--kv-transfer", "grpc")
    decode = spawn("commutator.decode", *grpc_args, "--max-local-prefill-length", "100")
    prefill = spawn("commutator.prefill", *grpc_args)
    alone = spawn("commutator.decode", "--engine", "hf", "--component", "alone", "--remote-prefill", "never")
    for p in (decode, prefill, alone):
        await ready(p, 120)
    await serving(frontend)
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    clients = {}
    for component in ("decode", "alone"):
        c = EndpointClient(d, unique, component, "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=60)
        await c.start()
        await c.wait_for_instances(1)
        clients[component] = c

    async def tokens(component: str, rid: str, toks: list[int]) -> list[int]:
        req = common_pb2.GenerateRequest(
            request_id=rid, token_ids=toks, stop=common_pb2.StopConditions(max_tokens=24, ignore_eos=True)
        )
        return [t async for m in clients[component].stream("Generate", req) for t in m.token_ids]

    for k, n in enumerate((150, 333, 701)):
        toks = prompt(n, 60 + k)
        assert await tokens("decode", f"dis{k}", toks) == await tokens("alone", f"agg{k}", toks)
    assert await metric(decode, where("remote")) == 3 and await metric(prefill, prefills("done")) == 3
    assert await metric(decode, 'commutator_kv_transfer_bytes_total{backend="grpc",direction="received"') > 0
    # And through the frontend, with the openai client.
    client: openai.AsyncOpenAI = frontend["client"]  # type: ignore[assignment]
    toks = prompt(400, 70)
    via_frontend = await client.completions.create(
        model=MODEL, prompt=toks, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert via_frontend.usage.completion_tokens == 16
    assert await metric(decode, where("remote")) == 4
    for c in clients.values():
        await c.close()
    await d.close()
