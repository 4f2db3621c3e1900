"""The decode worker as a separate process, on real etcd and NATS, with the mocker engine."""

from __future__ import annotations

import asyncio
import signal

import pytest
from commutator.common import subjects
from commutator.common.errors import InvalidRequest
from commutator.common.events import ConsumerSpec, NatsEventPlane
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import NatsProcess
from commutator.v1 import common_pb2, kv_events_pb2, worker_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def client(decode_workers: EndpointClient) -> EndpointClient:
    return decode_workers


def gen(rid: str, n: int, max_tokens: int, start: int = 0) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=rid,
        token_ids=list(range(start, start + n)),
        stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


async def stats(client: EndpointClient) -> common_pb2.WorkerStats:
    return (await client.call("Stats", worker_pb2.StatsRequest())).ranks[0]


async def test_stream_cancel_frees_blocks(spawn, client: EndpointClient) -> None:  # type: ignore[no-untyped-def]
    # Real-time passes: the stream cancelled below would otherwise reach the context limit (about 3,100
    # tokens) within a second, before a test process slowed by a loaded machine reads its stats.
    worker = spawn("commutator.decode", "--speedup-ratio", "1")
    await client.wait_for_instances(1, timeout_s=60)
    [inst] = client.instances.values()
    assert (inst.info.role, inst.info.model, inst.info.block_size, inst.info.kv_capacity_blocks) == (
        "decode",
        "commutator/tiny-llama",
        64,
        16384,
    )

    # A whole stream: tokens arrive, usage on the first message, a finish reason on the last.
    msgs = [m async for m in client.stream("Generate", gen("full", 200, 12))]
    assert sum(len(m.token_ids) for m in msgs) == 12
    assert msgs[0].prompt_tokens == 200 and msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH

    # Cancel mid-stream: the worker aborts the request and frees its blocks.
    it = client.stream("Generate", gen("cancel-me", 1000, 100_000, start=2000))
    got = 0
    async for m in it:
        got += len(m.token_ids)
        if got >= 5:
            break
    busy = await stats(client)
    assert busy.running_requests == 1 and busy.kv_blocks_used >= 16
    await it.aclose()
    for _ in range(100):
        s = await stats(client)
        if s.running_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert (s.running_requests, s.kv_blocks_used) == (0, 0)

    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        async for _ in client.stream("Generate", common_pb2.GenerateRequest(request_id="bad", token_ids=[10**9])):
            pass
    with pytest.raises(InvalidRequest, match="token_ids is empty"):
        async for _ in client.stream("Generate", common_pb2.GenerateRequest(request_id="empty")):
            pass
    assert worker.proc.poll() is None  # bad input never takes the process down


async def test_kv_events_arrive_in_order_without_gaps(
    spawn, client: EndpointClient, nats_server: NatsProcess, unique: str
) -> None:  # type: ignore[no-untyped-def]
    spawn("commutator.decode", "--speedup-ratio", "0", "--block-size", "16", "--num-blocks", "64")
    await client.wait_for_instances(1, timeout_s=60)
    [inst] = client.instances.values()
    # Enough distinct prompts to fill 64 blocks several times over: stores and evictions.
    for i in range(30):
        async for _ in client.stream("Generate", gen(f"r{i}", 100, 20, start=i * 100)):
            pass
    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    consumer = await plane.pull_consumer(ConsumerSpec(stream=subjects.kv_events_stream(unique, "decode"), durable="t"))
    events: list[kv_events_pb2.KvEvent] = []
    for _ in range(50):
        msgs = await consumer.fetch(100, 0.5)
        for m in msgs:
            assert m.subject == subjects.kv_events_subject(unique, "decode", inst.instance_id)
            events.extend(kv_events_pb2.KvEventBatch.FromString(m.data).events)
            await m.ack()
        if not msgs and events:
            break
    assert [e.event_id for e in events] == list(range(len(events)))
    assert {e.worker_id for e in events} == {inst.instance_id}
    kinds = [e.WhichOneof("data") for e in events]
    assert "stored" in kinds and "removed" in kinds
    stored_blocks = sum(len(e.stored.blocks) for e in events if e.HasField("stored"))
    assert stored_blocks >= 30 * 7  # each 100-token prompt plus 20 tokens fills 7 blocks of 16
    await consumer.close()
    await plane.close()


async def test_sigterm_drains_without_dropping_a_stream(spawn, client: EndpointClient) -> None:  # type: ignore[no-untyped-def]
    worker = spawn("commutator.decode", "--speedup-ratio", "1", "--drain-grace-s", "20")
    await client.wait_for_instances(1, timeout_s=60)
    iid = next(iter(client.instances))
    tokens: list[int] = []
    finish: list[int] = []

    async def consume() -> None:
        # About 3 s of real-time decode: still running when SIGTERM lands, even on a loaded machine.
        async for m in client.stream("Generate", gen("long", 64, 500), instance_id=iid):
            tokens.extend(m.token_ids)
            if m.finish_reason:
                finish.append(m.finish_reason)

    task = asyncio.create_task(consume())
    while len(tokens) < 3:
        await asyncio.sleep(0.01)
    worker.signal(signal.SIGTERM)
    await client.instance_set.wait_for(lambda m: iid not in m, 5)  # deregistered first
    await task  # the in-flight stream runs to its end
    assert len(tokens) == 500 and finish == [common_pb2.FINISH_REASON_LENGTH]
    assert await worker.wait(20) == 0
    assert "draining in_flight=1" in worker.log()


async def test_killed_worker_leaves_discovery_within_its_lease(spawn, client: EndpointClient) -> None:  # type: ignore[no-untyped-def]
    worker = spawn("commutator.decode", "--lease-ttl-s", "2")
    await client.wait_for_instances(1, timeout_s=60)
    worker.signal(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await client.instance_set.wait_for(lambda m: not m, 10)
    assert loop.time() - t0 <= 2 + 1.0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--model-path", "/no/such/folder"), "--model-path /no/such/folder: no such folder"),
        (("--model-path", "{empty}"), "not a model folder (no config.json)"),
        (("--model-path", "{broken}"), "config.json cannot be read"),
        (("--engine", "sglang"), "the sglang engine needs the 'sglang' package"),
        (("--engine", "trtllm"), "the trtllm engine needs the 'tensorrt_llm' package"),
        (("--engine-args", "--num-blocks lots"), "the mocker refused --engine-args '--num-blocks lots'"),
        (("--engine-args", "--unheard-of 1"), "unrecognized arguments: --unheard-of"),
        (("--engine", "hf", "--engine-args", "--device tpu"), "--device"),
    ],
)
async def test_an_unusable_worker_says_why_in_one_line_and_never_registers(  # type: ignore[no-untyped-def]
    spawn, client: EndpointClient, tmp_path, args: tuple[str, ...], says: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    args = tuple(a.format(empty=tmp_path / "empty", broken=tmp_path / "broken") for a in args)
    worker = spawn("commutator.decode", *args)
    assert await worker.wait(60) == 1
    errors = [line for line in worker.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start: " in errors[0] and says in errors[0], worker.log()[-3000:]
    assert "Traceback" not in worker.log()
    assert not client.instances  # nothing registered (discovery never saw this worker)
