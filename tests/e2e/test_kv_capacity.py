"""A worker whose KV cache is smaller than the model's context advertises the context it can run, and a
prompt that could never run there is refused (400) instead of hanging in the mocker."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from commutator.common.discovery import Discovery, EtcdBackend, ModelCard
from commutator.common.errors import InvalidRequest
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess, free_port
from commutator.v1 import common_pb2, worker_pb2_grpc

pytestmark = pytest.mark.e2e

MODEL = "commutator/tiny-llama"
KV_MAX_TOKENS = 8 * 16 + 1  # 8 blocks of 16 tokens; a 1% watermark of 8 blocks keeps none free


async def until_serving(http: aiohttp.ClientSession, base: str, timeout_s: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = {"model": MODEL, "prompt": [5], "max_tokens": 1}
    while True:
        try:
            async with http.post(f"{base}/completions", json=body) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass  # not listening yet, or slow to load the tokenizer on a loaded machine
        if loop.time() > deadline:
            raise AssertionError(f"{MODEL} never served a request")
        await asyncio.sleep(0.1)


async def test_a_tiny_kv_cache_is_advertised_and_too_long_prompts_get_400(  # type: ignore[no-untyped-def]
    spawn, etcd_server: EtcdProcess, unique: str
) -> None:
    port = free_port()
    spawn("commutator.decode", "--speedup-ratio", "0", "--num-blocks", "8", "--block-size", "16")
    spawn("commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}/v1"
    # Every request below is answered at once when it is right (speed-up 0); a hang is the defect.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await until_serving(http, base)
        too_long = {"model": MODEL, "prompt": [5] * KV_MAX_TOKENS, "max_tokens": 1}
        async with http.post(f"{base}/completions", json=too_long) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert f"the prompt has {KV_MAX_TOKENS} tokens; this model's context is {KV_MAX_TOKENS}" in error["message"]
        # The longest prompt runs, and output stops at what the cache holds.
        at_limit = {"model": MODEL, "prompt": [5] * (KV_MAX_TOKENS - 1), "ignore_eos": True}
        async with http.post(f"{base}/completions", json=at_limit) as r:
            assert r.status == 200
            body = await r.json()
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 1
        grow = {"model": MODEL, "prompt": [5] * 40, "ignore_eos": True}
        async with http.post(f"{base}/completions", json=grow) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == KV_MAX_TOKENS - 40

    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    try:
        [value] = (await d.backend.get_prefix(f"/models/{unique}/")).values()
        card = ModelCard.from_json(value)
        assert (card.name, card.block_size, card.context_length) == (MODEL, 16, KV_MAX_TOKENS)
        # A token-level client that skips the frontend gets the worker's own refusal, naming the cache.
        workers = EndpointClient(d, unique, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=20)
        await workers.start()
        await workers.wait_for_instances(1, timeout_s=30)
        req = common_pb2.GenerateRequest(request_id="over", token_ids=[5] * KV_MAX_TOKENS)
        with pytest.raises(InvalidRequest, match=r"KV cache \(8 blocks of 16 tokens"):
            async for _ in workers.stream("Generate", req):
                pass
        await workers.close()
    finally:
        await d.close()
