"""``--api-keys-file`` over real HTTP: a frontend and a mocker worker in this process (in-memory
discovery and events, as ``commutator up`` runs them), driven by aiohttp and the ``openai`` client."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from commutator.common.discovery import DiscoveryConfig, MemoryStore
from commutator.common.events import EventPlaneConfig, MemoryBroker
from commutator.common.grpc import GrpcConfig
from commutator.common.local_servers import free_port
from commutator.common.runtime import RuntimeConfig
from commutator.decode.config import DecodeConfig, WorkerConfig
from commutator.decode.worker import DecodeWorker
from commutator.engines.mocker import MockerConfig
from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model
from commutator.frontend.config import FrontendConfig
from commutator.frontend.server import Frontend

pytestmark = pytest.mark.integration

ALICE = "sk-alice-0123456789abcdef"
SLOW = "sk-slow-0123456789abcdefgh"  # 2 requests a minute: the third within the test is refused
KEYS = f"alice {ALICE}\nslow {SLOW} 2/m\n"


@pytest.fixture
async def stack(tmp_path: Path, unique: str) -> AsyncIterator[dict[str, object]]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(KEYS)
    store, broker = MemoryStore(), MemoryBroker()
    runtime = RuntimeConfig(
        discovery=DiscoveryConfig(discovery_backend="memory", namespace=unique),
        events=EventPlaneConfig(event_plane="memory"),
        metrics_port=-1,
    )
    worker = DecodeWorker(
        DecodeConfig(
            runtime=runtime,
            grpc=GrpcConfig(),
            worker=WorkerConfig(engine="mocker", model_path=str(ensure_tiny_model()), model_name=MODEL_NAME),
            mocker=MockerConfig(speedup_ratio=0),
        ),
        memory_store=store,
        memory_broker=broker,
    )
    port = free_port()
    frontend = Frontend(
        FrontendConfig(runtime=runtime, http_host="127.0.0.1", http_port=port, api_keys_file=str(keys_file)),
        memory_store=store,
        memory_broker=broker,
    )
    await worker.start()
    await frontend.start()
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        yield {"base": base, "http": http, "frontend": frontend, "keys_file": keys_file}
    await frontend.drain()
    await worker.drain()


async def _rejected(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, str], float]:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("commutator_frontend_rejected_requests_total{"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            out[(labels["reason"].strip('"'), labels["key"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    assert ALICE not in text and SLOW not in text
    return out


async def test_every_v1_path_needs_a_known_key_and_probes_stay_open(stack, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    http: aiohttp.ClientSession = stack["http"]
    base: str = stack["base"]
    before = await _rejected(http, base)
    for path in ("/health", "/live", "/metrics"):
        async with http.get(f"{base}{path}") as r:
            assert r.status in (200, 503), path  # /health: 503 only while draining
    calls = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "hi"}),
        ("GET", "/v1/no-such-route", None),  # unknown routes too: a 404 would tell which ones exist
        ("GET", "/admin", None),
    ]
    for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789abcdef"}, {"Authorization": ALICE}):
        for method, path, body in calls:
            async with http.request(method, f"{base}{path}", json=body, headers=headers) as r:
                assert r.status == 401, (method, path, headers)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                err = (await r.json())["error"]
                assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", None, "invalid_api_key")
                assert ("missing" in err["message"]) == (not headers)
    after = await _rejected(http, base)
    assert after[("unauthenticated", "")] - before.get(("unauthenticated", ""), 0) == 15

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=ALICE, max_retries=0)
    try:
        assert [m.id async for m in client.models.list()] == [MODEL_NAME]
        r = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("length", "stop")
    finally:
        await client.close()
    with pytest.raises(openai.AuthenticationError) as err:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-wrong-0123456789", max_retries=0) as bad:
            await bad.models.list()
    assert err.value.code == "invalid_api_key"
    assert ALICE not in caplog.text and "sk-wrong" not in caplog.text


async def test_a_key_over_its_limit_gets_429_with_retry_after(stack) -> None:  # type: ignore[no-untyped-def]
    http: aiohttp.ClientSession = stack["http"]
    base: str = stack["base"]
    before = await _rejected(http, base)
    auth = {"Authorization": f"Bearer {SLOW}"}
    for _ in range(2):
        async with http.get(f"{base}/v1/models", headers=auth) as r:
            assert r.status == 200
    async with http.get(f"{base}/v1/models", headers=auth) as r:
        assert r.status == 429
        assert 25 <= int(r.headers["Retry-After"]) <= 30  # one request every 30 s
        err = (await r.json())["error"]
        assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded") and "'slow'" in err["message"]
    async with http.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {ALICE}"}) as r:
        assert r.status == 200  # other keys have their own limit (alice: none)
    after = await _rejected(http, base)
    assert after[("rate_limited", "slow")] - before.get(("rate_limited", "slow"), 0) == 1


async def test_sighup_reloads_the_file_and_a_bad_file_keeps_the_old_keys(stack, caplog) -> None:  # type: ignore[no-untyped-def]
    http: aiohttp.ClientSession = stack["http"]
    base: str = stack["base"]
    keys_file: Path = stack["keys_file"]
    new = "sk-new-0123456789abcdefgh"

    async def status(key: str) -> int:
        async with http.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status

    keys_file.write_text(f"newcomer {new}\n")
    os.kill(os.getpid(), signal.SIGHUP)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await status(new) != 200:
        assert loop.time() < deadline, "SIGHUP did not reload the keys"
        await asyncio.sleep(0.02)
    assert await status(ALICE) == 401
    keys_file.write_text(f"broken {new} 5/fortnight\n")
    assert not stack["frontend"].reload_api_keys()
    assert "API keys not reloaded" in caplog.text and new not in caplog.text
    assert await status(new) == 200


async def test_openapi_json_is_open_and_describes_the_key_and_the_served_models(stack) -> None:  # type: ignore[no-untyped-def]
    http: aiohttp.ClientSession = stack["http"]
    async with http.get(f"{stack['base']}/openapi.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        doc = await r.json()
    assert doc["openapi"].startswith("3.1") and doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["model"]["examples"] == [MODEL_NAME]
    example = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["example"]
    auth = {"Authorization": f"Bearer {ALICE}"}
    async with http.post(f"{stack['base']}/v1/chat/completions", json=example, headers=auth) as r:
        assert r.status == 200 and (await r.json())["object"] == "chat.completion"
