"""The vLLM adapter against a hand-written FAKE of vLLM's AsyncLLM API (the real engine runs in
tests/vllm, in its own environment). The fake publishes its KV events on a real ZMQ socket in
vLLM's wire format (multipart topic / 8-byte seq / msgpack batch) and answers replay requests as
vLLM's ROUTER socket does."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from commutator.common.hashing import block_hash_seed, local_block_hashes, sequence_hashes
from commutator.engines.base import (
    EngineRequest,
    FinishReason,
    KvCleared,
    KvImport,
    KvStored,
    SamplingParams,
    StopParams,
)
from commutator.engines.vllm.engine import SchedulerLoad, VllmApi, VllmEngine

pytestmark = pytest.mark.unit

BS = 16


class FakeLogprob:
    def __init__(self, logprob: float, rank: int) -> None:
        self.logprob = logprob
        self.rank = rank


class FakeVllmPublisher:
    """vLLM's ZmqEventPublisher, as far as a subscriber can tell: PUB + ROUTER replay."""

    def __init__(self, endpoint: str, replay: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(endpoint)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(replay)
        self.seq = 0
        self.kept: list[tuple[int, bytes]] = []
        self.replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, events: list[dict[str, Any]], *, drop: bool = False, keep: bool = True) -> None:
        payload = msgspec.msgpack.encode([1.0, events, 0])
        seq, self.seq = self.seq, self.seq + 1
        if keep:
            self.kept.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in self.kept:
                if seq >= first:
                    await self.router.send_multipart([client, b"", b"", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    def close(self) -> None:
        self.replay_task.cancel()
        self.ctx.destroy(linger=0)


class FakeAsyncLLM:
    """AsyncLLM's surface the adapter uses: generate (delta outputs), abort, shutdown, vllm_config."""

    def __init__(self, publisher: FakeVllmPublisher, load: SchedulerLoad, connector: str | None = None) -> None:
        self.publisher = publisher
        self.load = load
        self.vllm_config = SimpleNamespace(
            cache_config=SimpleNamespace(block_size=BS, num_gpu_blocks=100),
            scheduler_config=SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=512),
            model_config=SimpleNamespace(max_model_len=1024),
            parallel_config=SimpleNamespace(data_parallel_size=1),
            kv_transfer_config=SimpleNamespace(kv_connector=connector, kv_role="kv_both") if connector else None,
        )
        self.pulled: list[dict[str, Any]] = []
        self.calls: list[tuple[dict[str, Any], dict[str, Any], str]] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.shut = False
        self.stored: set[int] = set()

    async def generate(
        self, prompt: dict[str, Any], sampling: dict[str, Any], request_id: str, **kw: Any
    ) -> AsyncIterator[Any]:
        self.calls.append((prompt, sampling, request_id))
        tokens = prompt["prompt_token_ids"]
        full = len(tokens) // BS * BS
        cached = 0
        base = tokens[0] * 1000 + (100_000 if "cache_salt" in prompt else 0)
        ids = [base + i for i in range(full // BS)]  # engine ids: the fake's own choice
        if ids and ids[0] in self.stored:
            cached = (len(tokens) - 1) // BS * BS
        elif ids:
            self.stored.update(ids)
            extra = [(prompt["cache_salt"],)] + [None] * (len(ids) - 1) if "cache_salt" in prompt else None
            await self.publisher.publish(
                [
                    {
                        "type": "BlockStored",
                        "block_hashes": ids,
                        "parent_block_hash": None,
                        "token_ids": tokens[:full],
                        "block_size": BS,
                        "lora_id": None,
                        "medium": "GPU",
                        "lora_name": None,
                        **({"extra_keys": extra} if extra else {}),
                    }
                ]
            )
        self.load.running, self.load.kv_usage, self.load.at = 1, 0.25, 1e18  # "just now", whatever the clock
        n = sampling["max_tokens"] or 5
        # A KV connector's handoff (vLLM's NIXL connector, as in nixl/pull_scheduler.py): a request with
        # do_remote_decode keeps its blocks and finishes with the parameters a decode engine reads them by;
        # one with do_remote_prefill reads them from the engine they name.
        kv_params = (sampling.get("extra_args") or {}).get("kv_transfer_params")
        handoff = None
        if kv_params and kv_params.get("do_remote_decode"):
            handoff = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": [[base + i for i in range(len(tokens) // BS)]],
                "remote_engine_id": "engine-p",
                "remote_request_id": f"{request_id}-0a1b",
                "remote_host": "10.0.0.7",
                "remote_port": 5600,
                "tp_size": 1,
            }
        elif kv_params and kv_params.get("do_remote_prefill"):
            self.pulled.append(kv_params)
        try:
            for i in range(n):
                last = i == n - 1
                lps = None
                if "logprobs" in sampling:
                    lps = [{7 + i: FakeLogprob(-0.5, 1), 99: FakeLogprob(-1.5, 2), 100: FakeLogprob(-2.5, 3)}]
                out = SimpleNamespace(token_ids=[7 + i], finish_reason="length" if last else None, logprobs=lps)
                yield SimpleNamespace(
                    outputs=[out], num_cached_tokens=cached, finished=last, kv_transfer_params=handoff if last else None
                )
                await asyncio.sleep(0)
        finally:
            self.closed.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
async def engine() -> AsyncIterator[tuple[VllmEngine, FakeAsyncLLM, FakeVllmPublisher]]:
    async for started in _engine(None):
        yield started


@pytest.fixture
async def nixl_engine() -> AsyncIterator[tuple[VllmEngine, FakeAsyncLLM, FakeVllmPublisher]]:
    """An engine whose arguments configure a KV connector (--kv-transfer-config)."""
    async for started in _engine("NixlConnector"):
        yield started


async def _engine(connector: str | None) -> AsyncIterator[tuple[VllmEngine, FakeAsyncLLM, FakeVllmPublisher]]:
    workdir = Path(tempfile.mkdtemp(prefix="fake-vllm-"))
    kv, replay = f"ipc://{workdir}/kv", f"ipc://{workdir}/replay"
    publisher = FakeVllmPublisher(kv, replay)
    holder: dict[str, FakeAsyncLLM] = {}

    def make_llm(load: SchedulerLoad) -> FakeAsyncLLM:
        holder["llm"] = FakeAsyncLLM(publisher, load, connector)
        return holder["llm"]

    eng = VllmEngine(VllmApi(make_llm=make_llm, sampling_params=lambda **kw: kw), kv, replay, workdir)
    await eng.start()
    await asyncio.sleep(0.2)  # ZMQ subscriptions take a moment to reach the publisher
    yield eng, holder["llm"], publisher
    await eng.shutdown()
    publisher.close()


async def run(eng: VllmEngine, req: EngineRequest) -> list[Any]:
    return [o async for o in eng.generate(req)]


def prompt(n: int, start: int = 3) -> list[int]:
    return [start + i for i in range(n)]


async def test_fake_vllm_generate_maps_sampling_outputs_and_cached_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    eng, llm, _ = engine
    assert eng.capacity.block_size == BS and eng.capacity.total_blocks == 100 and eng.capacity.context_length == 1024
    req = EngineRequest(
        "r1",
        prompt(40),
        SamplingParams(temperature=0.0, top_k=0, seed=5, repetition_penalty=1.1),
        StopParams(max_tokens=3, min_tokens=1, stop_token_ids=(9,), ignore_eos=True),
        logprobs=2,
    )
    outs = await run(eng, req)
    prompt_sent, sampling, rid = llm.calls[0]
    assert rid == "r1" and prompt_sent == {"prompt_token_ids": prompt(40)}
    assert sampling == {
        "max_tokens": 3,
        "min_tokens": 1,
        "stop_token_ids": [9],
        "ignore_eos": True,
        "temperature": 0.0,
        "seed": 5,
        "repetition_penalty": 1.1,
        "top_k": -1,
        "logprobs": 2,
    }
    assert [o.token_ids for o in outs] == [[7], [8], [9]]
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[0].prompt_tokens == 40
    assert outs[0].cached_prompt_tokens == 0
    lp = outs[0].logprobs[0]  # type: ignore[index]
    assert (lp.token_id, lp.logprob, lp.top) == (7, -0.5, ((7, -0.5), (99, -1.5)))
    again = await run(eng, EngineRequest("r2", prompt(40), stop=StopParams(max_tokens=1)))
    assert again[0].cached_prompt_tokens == 32  # the fake reports vLLM's count: full blocks but the last token's


async def test_fake_vllm_closing_the_stream_early_ends_the_request_there(engine) -> None:  # type: ignore[no-untyped-def]
    eng, llm, _ = engine
    gen = eng.generate(EngineRequest("long", prompt(10), stop=StopParams(max_tokens=50)))
    await gen.__anext__()
    assert eng.stats()[0].running_requests == 1
    assert await eng.abort("long") and llm.aborted == ["long"]
    await gen.aclose()  # type: ignore[attr-defined]
    assert llm.closed == ["long"] and not await eng.abort("long")


async def test_fake_vllm_refuses_what_it_cannot_map(engine) -> None:  # type: ignore[no-untyped-def]
    eng, _, _ = engine
    with pytest.raises(ValueError, match="LoRA"):
        await run(eng, EngineRequest("l", prompt(4), lora_name="adapter"))
    assert eng.kv_handoff == ""  # no KV connector in its arguments: not set up for disaggregation
    with pytest.raises(ValueError, match="needs a KV connector"):
        await run(eng, EngineRequest("p", prompt(4), prefill_only=True))


async def test_fake_vllm_with_a_kv_connector_is_a_pull_engine_of_the_handoff(nixl_engine) -> None:  # type: ignore[no-untyped-def]
    eng, llm, _ = nixl_engine
    assert eng.kv_handoff == "pull" and eng.start_handoff(EngineRequest("p", prompt(40))) is None
    # Prefill side: one token, the connector asked to keep the blocks for a remote decode.
    outs = await run(eng, EngineRequest("p", prompt(40), stop=StopParams(max_tokens=50), prefill_only=True))
    assert [o.token_ids for o in outs] == [[7]]
    _, sampling, _ = llm.calls[0]
    assert sampling["max_tokens"] == 1 and sampling["extra_args"] == {"kv_transfer_params": {"do_remote_decode": True}}
    params = json.loads(eng.finish_handoff("p"))
    assert params["do_remote_prefill"] and params["remote_engine_id"] == "engine-p"
    assert params["remote_block_ids"] == [[3000, 3001]] and params["remote_request_id"] == "p-0a1b"
    with pytest.raises(ValueError, match="no kv_transfer_params"):
        eng.finish_handoff("p")  # taken once
    # Decode side: the parameters go back to vLLM as they came; its connector reads the KV.
    handoff = KvImport(first_token_id=7, engine_params=json.dumps(params).encode())
    outs = await run(eng, EngineRequest("d", prompt(40), stop=StopParams(max_tokens=3), kv_import=handoff))
    assert [o.token_ids for o in outs] == [[7], [8], [9]] and outs[0].prompt_tokens == 40
    _, sampling, _ = llm.calls[1]
    assert sampling["extra_args"] == {"kv_transfer_params": params} and sampling["max_tokens"] == 3
    assert llm.pulled == [params]
    with pytest.raises(ValueError, match="not a vLLM kv_transfer_params"):
        await run(eng, EngineRequest("bad", prompt(40), kv_import=KvImport(7, engine_params=b"{}")))


async def test_fake_vllm_kv_events_become_ours_with_our_hashes_and_a_dump(engine) -> None:  # type: ignore[no-untyped-def]
    eng, _, _ = engine
    await run(eng, EngineRequest("a", prompt(40), stop=StopParams(max_tokens=1)))
    await run(eng, EngineRequest("s", prompt(40, start=500), cache_salt="tenant", stop=StopParams(max_tokens=1)))
    records = await asyncio.wait_for(eng.kv_events(), 5)
    while len(records) < 2:
        records += await asyncio.wait_for(eng.kv_events(), 5)
    first, second = records
    assert [r.event_id for r in records] == [0, 1]
    assert first.data == KvStored(None, tuple(zip((3000, 3001), local_block_hashes(prompt(32), BS), strict=True)))
    salted = local_block_hashes(prompt(32, start=500), BS, block_hash_seed("", "tenant"))
    assert isinstance(second.data, KvStored) and [h for _, h in second.data.blocks] == salted
    blocks, watermarks = eng.kv_dump()  # type: ignore[misc]
    assert watermarks == {0: 2}
    # Every block as the router keys it: engine id -> sequence hash.
    want = {(0, 3000 + i, h) for i, h in enumerate(sequence_hashes(local_block_hashes(prompt(32), BS)))}
    want |= {(0, 600_000 + i, h) for i, h in enumerate(sequence_hashes(salted))}
    assert set(blocks) == want


async def test_fake_vllm_a_missed_batch_is_replayed_and_a_lost_one_clears(engine) -> None:  # type: ignore[no-untyped-def]
    eng, _, pub = engine
    store = {
        "type": "BlockStored",
        "parent_block_hash": None,
        "token_ids": prompt(16),
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    await pub.publish([{**store, "block_hashes": [1]}])
    await pub.publish([{**store, "block_hashes": [2]}], drop=True)  # missed by the subscriber, kept for replay
    await pub.publish([{**store, "block_hashes": [3]}])
    got: list[Any] = []
    while len(got) < 3:
        got += await asyncio.wait_for(eng.kv_events(), 5)
    assert [r.data.blocks[0][0] for r in got] == [1, 2, 3]  # type: ignore[union-attr]
    await pub.publish([{**store, "block_hashes": [4]}], drop=True, keep=False)  # gone for good
    await pub.publish([{"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}])
    more: list[Any] = []
    while len(more) < 2:
        more += await asyncio.wait_for(eng.kv_events(), 5)
    assert isinstance(more[0].data, KvCleared)  # the router forgets this worker's blocks, then goes on
    assert eng.kv_dump() == ([], {0: more[-1].event_id + 1})


def test_a_workers_socket_folder_is_named_after_it_and_dead_workers_folders_are_swept(tmp_path: Path) -> None:
    """A worker killed before its engine's shutdown leaves its IPC folder behind; the next one
    started removes it, and never a live process's."""
    import os
    import subprocess
    import sys

    from commutator.engines.vllm import make_workdir

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = tmp_path / f"commutator-vllm-{int(gone.stdout)}-abc123"
    (dead / "kv-events").parent.mkdir()
    (dead / "kv-events").write_bytes(b"")
    live = tmp_path / f"commutator-vllm-{os.getppid()}-def456"
    live.mkdir()
    other = tmp_path / "commutator-vllm-notapid"
    other.mkdir()

    mine = make_workdir(tmp_path)
    assert mine.is_dir() and mine.name.startswith(f"commutator-vllm-{os.getpid()}-")
    assert not dead.exists()
    assert live.is_dir() and other.is_dir()
