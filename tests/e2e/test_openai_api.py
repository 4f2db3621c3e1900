"""The whole stack as separate processes (frontend with its embedded router, mocker workers)
on real etcd and NATS, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess, free_port
from commutator.engines.tiny_model import ensure_tiny_model
from commutator.v1 import worker_pb2, worker_pb2_grpc
from tokenizers import Tokenizer

pytestmark = pytest.mark.e2e

MODEL = "commutator/tiny-llama"
# The mocker draws an unseeded request's tokens at random, so it meets one of the model's two EOS ids
# (of 4096) about once in 2,000 tokens. A test that counts tokens asks for the full length.
FULL = {"ignore_eos": True}


async def wait_models(base: str, want: set[str], timeout_s: float = 60.0, ssl: object = None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{base}/models", ssl=ssl) as r:
                    if r.status == 200 and {m["id"] for m in (await r.json())["data"]} == want:
                        return
            except aiohttp.ClientError:
                pass
            if loop.time() > deadline:
                raise AssertionError(f"models never became {want}")
            await asyncio.sleep(0.2)


async def wait_serving(base: str, model: str = MODEL, ssl: object = None, timeout_s: float = 60.0) -> None:
    """Wait until a one-token request succeeds (the frontend's router may see workers after their model card)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.post(f"{base}/completions", json=body, ssl=ssl) as r:
                if r.status == 200:
                    return
            if loop.time() > deadline:
                raise AssertionError(f"{model} never served a request")
            await asyncio.sleep(0.1)


async def metric(base: str, series: str) -> float:
    """The value of one series on the frontend's ``/metrics`` (0 while it is absent)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(base.replace("/v1", "/metrics")) as r:
            for line in (await r.text()).splitlines():
                if line.startswith(series + " "):
                    return float(line.rsplit(" ", 1)[1])
    return 0.0


async def until_metric(base: str, series: str, at_least: float, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await metric(base, series) < at_least:
        if loop.time() > deadline:
            raise AssertionError(f"{series} never reached {at_least}")
        await asyncio.sleep(0.02)


async def until_loads(base: str, pred: Callable[[list[float]], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``pred`` holds for the router's request count per worker on ``/metrics``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(base.replace("/v1", "/metrics")) as r:
                loads = [
                    float(line.rsplit(" ", 1)[1])
                    for line in (await r.text()).splitlines()
                    if line.startswith("commutator_router_worker_load{") and 'kind="requests"' in line
                ]
            if pred(loads):
                return
            if loop.time() > deadline:
                raise AssertionError(f"router loads stayed at {loads}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def stack(spawn, etcd_server: EtcdProcess, unique: str) -> AsyncIterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    port = free_port()
    # Real-time passes (5.7 ms a token): a 3,000-token stream that a test cancels lasts about 17 s, not 2.
    workers = [spawn("commutator.decode", "--speedup-ratio", "1") for _ in range(2)]
    frontend = spawn(
        "commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1", "--max-body-bytes", "200000"
    )
    base = f"http://127.0.0.1:{port}/v1"
    await wait_models(base, {MODEL})
    await wait_serving(base)
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    worker_client = EndpointClient(d, unique, "decode", "generate", worker_pb2_grpc.WorkerStub)
    await worker_client.start()
    await worker_client.wait_for_instances(2, 30)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    yield {
        "base": base,
        "client": client,
        "workers": workers,
        "frontend": frontend,
        "worker_client": worker_client,
        "spawn": spawn,
    }
    await client.close()
    await worker_client.close()
    await d.close()


async def test_chat_and_completions_streaming_and_not(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    r = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=12, extra_body=FULL
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]},
        ],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FULL,
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert finish == "length" and usage is not None and usage.completion_tokens == 10 and text

    c = await client.completions.create(model=MODEL, prompt="def main():", max_tokens=8, extra_body=FULL)
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    c = await client.completions.create(model=MODEL, prompt=["first", "second"], max_tokens=3)
    assert sorted(ch.index for ch in c.choices) == [0, 1]
    c = await client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, stream=False)
    assert c.usage.prompt_tokens == 4
    pieces = [
        ch.choices[0].text
        async for ch in await client.completions.create(
            model=MODEL, prompt="import os", max_tokens=6, stream=True, extra_body=FULL
        )
        if ch.choices
    ]
    assert "".join(pieces)


async def test_a_stream_opens_with_its_headers_role_and_first_token_in_one_write(stack) -> None:  # type: ignore[no-untyped-def]
    """The status line, the headers, the role event and the first token's event leave the frontend in
    one write, so the client's first read holds them all; the second token comes a pass (5.7 ms) later."""
    port = int(str(stack["base"]).split(":")[2].split("/")[0])
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True, **FULL}
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        first = await asyncio.wait_for(reader.read(1 << 16), 30)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/event-stream" in first
        events = [json.loads(line[6:]) for line in first.splitlines() if line.startswith(b"data: {")]
        assert [e["choices"][0]["delta"].get("role") for e in events] == ["assistant", None]
        assert events[1]["choices"][0]["delta"]["content"]
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            more = await asyncio.wait_for(reader.read(1 << 16), 30)
            assert more
            rest += more
        assert rest.count(b"data: {") == 1 and b"data: [DONE]" in rest  # the second token, then the end
        # The connection is at a clean end (the push path writes the body's end itself; nothing more
        # follows it) and serves the next request.
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        again = b""
        while not again.endswith(b"0\r\n\r\n"):
            more = await asyncio.wait_for(reader.read(1 << 16), 30)
            assert more
            again += more
        assert again.startswith(b"HTTP/1.1 200 OK\r\n") and again.count(b"data: {") == 3
        assert again.count(b"data: [DONE]") == 1
    finally:
        writer.close()


async def test_n_choices_seed_and_logprobs(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    msgs = [{"role": "user", "content": "Two answers please"}]
    r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, n=2, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 16
    again = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, n=2, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    stream = await client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, n=2, stream=True, extra_body=FULL
    )
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts[0] and texts[1]
    lp = await client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, logprobs=True, top_logprobs=2, extra_body=FULL
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


async def test_stop_strings_cut_the_text_and_are_not_returned(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    msgs = [{"role": "user", "content": "Say something long"}]
    full = (
        (await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, seed=11))
        .choices[0]
        .message.content
    )
    assert len(full) > 20
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    r = await client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=40, seed=11, stop=[stop, "\x00never"]
    )
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = ""
    finish = None
    async for chunk in await client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=40, seed=11, stop=stop, stream=True
    ):
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert streamed == expected and finish == "stop"


async def test_repeats_go_to_the_worker_that_cached_them_and_usage_counts_it(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    # Five prompts that differ from their first block on, sent once each: they spread over the two
    # workers. A repeat is served from cache only on the worker that holds its prompt, so only routing
    # by KV overlap gets all five (round-robin sends every repeat to the other worker; random, 1 in 32).
    prompts = [
        f"Variant {k}: " + "\n".join(f"def function_{k}_{i}(x):\n    return x * {i + k}" for i in range(60))
        for k in range(5)
    ]
    first = []
    for p in prompts:
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=2)
        assert r.usage.prompt_tokens > 300 and r.usage.prompt_tokens_details.cached_tokens == 0
        first.append(r.usage.prompt_tokens)
    # The router has every prompt's blocks from the workers' KV events.
    await until_metric(stack["base"], 'commutator_router_index{kind="entries"}', sum(n // 64 for n in first))
    for p, n in zip(prompts, first, strict=True):
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=2)
        # Every full block but the last token's is served from cache (the mocker recomputes one token).
        assert r.usage.prompt_tokens_details.cached_tokens == (n - 1) // 64 * 64


async def test_model_list_follows_workers(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    other = stack["spawn"]("commutator.decode", "--speedup-ratio", "10", "--model-name", "acme/other")
    await wait_models(stack["base"], {MODEL, "acme/other"})
    await wait_serving(stack["base"], "acme/other")
    assert {m.id async for m in client.models.list()} == {MODEL, "acme/other"}
    r = await client.chat.completions.create(
        model="acme/other", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.model == "acme/other"
    other.signal(signal.SIGTERM)
    await wait_models(stack["base"], {MODEL})
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="acme/other", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


async def test_cancelling_mid_stream_frees_the_worker(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    workers: EndpointClient = stack["worker_client"]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go on forever"}],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
        if got >= 5:
            break
    running = [
        (await workers.call("Stats", worker_pb2.StatsRequest(), instance_id=i)).ranks[0] for i in workers.instances
    ]
    assert sum(s.running_requests for s in running) == 1
    # The router counts the stream against its worker (its load gauges are refreshed every second) ...
    await until_loads(stack["base"], lambda v: sorted(v) == [0.0, 1.0])
    await stream.close()
    for _ in range(100):
        stats = [
            (await workers.call("Stats", worker_pb2.StatsRequest(), instance_id=i)).ranks[0] for i in workers.instances
        ]
        if sum(s.running_requests for s in stats) == 0:
            break
        await asyncio.sleep(0.05)
    assert sum(s.running_requests for s in stats) == 0 and sum(s.kv_blocks_used for s in stats) == 0
    # ... and frees it when the client goes away.
    await until_loads(stack["base"], lambda v: v == [0.0, 0.0])


async def test_bad_requests_get_the_right_errors_and_the_server_keeps_serving(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    base: str = stack["base"]
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e404:
        await client.chat.completions.create(model="no/such-model", messages=msgs)
    assert e404.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client.chat.completions.create(model=MODEL, messages=msgs, temperature="hot")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 5}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        await client.completions.create(model=MODEL, prompt=[10**7], max_tokens=2)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/chat/completions", data=b"{not json") as r:
            assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
        async with http.post(f"{base}/chat/completions", data=b"[1, 2]") as r:
            assert r.status == 400
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]})
        async with http.post(f"{base}/chat/completions", data=big) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        async with http.get(f"{base}/nowhere") as r:
            assert r.status == 404 and "error" in await r.json()
        body = {"model": MODEL, "messages": msgs, "max_tokens": 2, "some_future_field": {"x": 1}}
        async with http.post(f"{base}/chat/completions", json=body) as r:
            assert r.status == 200  # unknown fields are ignored
        # Values the parser used to let through to protobuf, which answered 500.
        for path, extra, param in [
            ("completions", {"stop": [-1]}, "stop"),
            ("completions", {"top_k": 2**40}, "top_k"),
            ("chat/completions", {"stop_token_ids": [2**40]}, "stop_token_ids"),
            ("chat/completions", {"min_tokens": 2**33}, "min_tokens"),
            ("completions", {"stop": ["x"] * 10_000}, "stop"),
        ]:
            body = {"model": MODEL, "max_tokens": 2, **extra}
            body.update({"messages": msgs} if path.startswith("chat") else {"prompt": "hi"})
            async with http.post(f"{base}/{path}", json=body) as r:
                assert r.status == 400, (extra, await r.text())
                assert (await r.json())["error"]["param"] == param
    r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, extra_body=FULL)
    assert r.usage.completion_tokens == 3
    assert stack["frontend"].proc.poll() is None


async def test_no_routable_worker_is_503(spawn) -> None:  # type: ignore[no-untyped-def]
    """A worker draining a long request has left the routing set but still publishes its model."""
    port = free_port()
    worker = spawn("commutator.decode", "--speedup-ratio", "1", "--drain-grace-s", "60")
    spawn("commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}/v1"
    await wait_models(base, {MODEL})
    await wait_serving(base)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    long = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "long"}],
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    async for _chunk in long:
        got += 1
        if got == 3:
            worker.signal(signal.SIGTERM)  # deregisters, keeps finishing the stream
            break
    with pytest.raises(openai.APIStatusError) as err:
        for _ in range(100):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            await asyncio.sleep(0.05)
    assert err.value.status_code == 503 and err.value.body["code"] == "no_workers"  # type: ignore[index]
    rest = [c async for c in long]  # the draining worker still finishes the first stream
    assert rest[-1].choices[0].finish_reason == "length"
    await client.close()


async def test_tls_with_a_self_signed_certificate(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    spawn("commutator.decode", "--speedup-ratio", "10")
    spawn(
        "commutator.frontend",
        "--http-port",
        str(port),
        "--http-host",
        "127.0.0.1",
        "--tls-cert-path",
        str(cert),
        "--tls-key-path",
        str(key),
    )
    import ssl

    ctx = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}/v1"
    await wait_models(base, {MODEL}, ssl=ctx)
    await wait_serving(base, ssl=ctx)
    import httpx2

    client = openai.AsyncOpenAI(base_url=base, api_key="unused", http_client=httpx2.AsyncClient(verify=ctx))
    r = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "secure?"}], max_tokens=3, extra_body=FULL
    )
    assert r.usage.completion_tokens == 3
    await client.close()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served on that port
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)


async def test_all_workers_busy_is_529(spawn) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    spawn("commutator.decode", "--speedup-ratio", "0.01")  # any prefill takes about 1.7 s
    spawn("commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1", "--busy-prefill-tokens", "1")
    base = f"http://127.0.0.1:{port}/v1"
    await wait_models(base, {MODEL})
    await wait_serving(base)
    routed = 'commutator_router_decisions_total{outcome="routed"}'
    before = await metric(base, routed)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    slow = asyncio.create_task(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one slow prompt " * 20}], max_tokens=1
        )
    )
    # Routed (the decision is counted at once), still prefilling: its worker is over the busy threshold.
    await until_metric(base, routed, before + 1)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert err.value.status_code == 529 and err.value.body["code"] == "overloaded"  # type: ignore[index]
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert (await slow).usage.completion_tokens == 1
    await client.close()


async def test_a_stream_whose_worker_dies_ends_with_an_error_event(spawn) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    worker = spawn("commutator.decode", "--speedup-ratio", "1")
    spawn("commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}/v1"
    await wait_models(base, {MODEL})
    await wait_serving(base)
    async with aiohttp.ClientSession() as http:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        async with http.post(f"{base}/chat/completions", json=body) as r:
            assert r.status == 200
            lines: list[bytes] = []
            async for line in r.content:
                if line.strip():
                    lines.append(line.strip())
                if len(lines) == 5:
                    worker.signal(signal.SIGKILL)
    events = [json.loads(x[6:]) for x in lines if x.startswith(b"data: {")]
    assert lines[-1] == b"data: [DONE]"
    assert "error" in events[-1] and events[-1]["error"]["type"] == "service_unavailable"


async def test_a_dead_frontends_load_leaves_the_other_replicas_at_once(  # type: ignore[no-untyped-def]
    spawn, etcd_server: EtcdProcess, unique: str
) -> None:
    spawn("commutator.decode", "--speedup-ratio", "1")
    port_a, port_b = free_port(), free_port()
    common = ("--http-host", "127.0.0.1", "--router-replica-sync")
    frontend_a = spawn("commutator.frontend", "--http-port", str(port_a), "--lease-ttl-s", "2", *common)
    spawn("commutator.frontend", "--http-port", str(port_b), *common)
    base_a, base_b = f"http://127.0.0.1:{port_a}/v1", f"http://127.0.0.1:{port_b}/v1"
    for base in (base_a, base_b):
        await wait_models(base, {MODEL})
        await wait_serving(base)
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    frontends = await d.list_instances(unique, "frontend")
    assert sorted(f.info.address for f in frontends) == sorted(f"127.0.0.1:{p}" for p in (port_a, port_b))
    assert {f.info.role for f in frontends} == {"frontend"}
    await d.close()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_a}/chat/completions", json={**body, **FULL}) as r:
            assert r.status == 200
            await r.content.readline()
            # B counts A's stream against the worker (replica sync) ...
            await until_loads(base_b, lambda v: v == [1.0])
            frontend_a.signal(signal.SIGKILL)
    # ... and frees it as soon as A's lease is gone, not after the load timeout.
    await until_loads(base_b, lambda v: v == [0.0], timeout_s=15)


async def test_requests_over_the_inflight_cap_get_429_until_one_finishes(spawn) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    spawn("commutator.decode", "--speedup-ratio", "1")  # real time: 200 tokens take over a second
    spawn("commutator.frontend", "--http-port", str(port), "--http-host", "127.0.0.1", "--max-inflight-requests", "1")
    base = f"http://127.0.0.1:{port}/v1"
    await wait_models(base, {MODEL})
    await wait_serving(base)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "go on"}]
    inflight = "commutator_frontend_inflight_requests"

    async def one() -> openai.types.Completion:
        return await client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=FULL)

    async def until_idle() -> None:
        for _ in range(200):
            if await metric(base, inflight) == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the frontend still counts a request in flight")

    async def rejected() -> None:
        with pytest.raises(openai.RateLimitError) as err:
            await one()
        assert err.value.status_code == 429 and int(err.value.response.headers["Retry-After"]) >= 1
        assert err.value.body["type"] == "rate_limit_exceeded"  # type: ignore[index]
        assert err.value.body["code"] == "too_many_requests"  # type: ignore[index]

    slow = await client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=200,
        stream=True,
        extra_body=FULL,  # type: ignore[arg-type]
    )
    chunks = slow.__aiter__()
    await chunks.__anext__()
    await rejected()
    rest = [c async for c in chunks]
    assert rest[-1].choices[0].finish_reason == "length"
    await until_idle()  # the slot is freed just after the last byte is written
    assert (await one()).choices[0].finish_reason == "length"

    # A client that goes away mid-stream frees its slot too.
    slow = await client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=2000,
        stream=True,
        extra_body=FULL,  # type: ignore[arg-type]
    )
    await slow.__aiter__().__anext__()
    await rejected()
    await slow.close()
    await until_idle()
    assert (await one()).choices[0].finish_reason == "length"
    await client.close()


async def test_echo_puts_the_prompt_first(stack) -> None:  # type: ignore[no-untyped-def]
    client: openai.AsyncOpenAI = stack["client"]
    prompt = "def main():"
    plain = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=5, extra_body=FULL)
    echoed = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, seed=5, echo=True, extra_body=FULL
    )
    assert plain.choices[0].text and echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.completion_tokens == 8 and echoed.usage.prompt_tokens == plain.usage.prompt_tokens

    chunks = [
        c.choices[0].text
        async for c in await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, seed=5, echo=True, stream=True, extra_body=FULL
        )
        if c.choices
    ]
    assert chunks[0] == prompt and "".join(chunks) == echoed.choices[0].text

    # Token-id prompts echo their decoded text; with n > 1 every choice starts with its own prompt.
    tokenizer = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    ids = tokenizer.encode("hello world", add_special_tokens=False).ids
    many = await client.completions.create(
        model=MODEL,
        prompt=[ids, tokenizer.encode("import os", add_special_tokens=False).ids],
        max_tokens=3,
        n=2,
        echo=True,
    )
    starts = {c.index: c.text for c in many.choices}
    assert sorted(starts) == [0, 1, 2, 3]
    assert starts[0].startswith("hello world") and starts[1].startswith("hello world")
    assert starts[2].startswith("import os") and starts[3].startswith("import os")
    streamed: dict[int, str] = {}
    async for c in await client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, stream=True):
        for ch in c.choices:
            streamed.setdefault(ch.index, ch.text)  # the first piece of each choice
    assert streamed == {0: "hello world"}

    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1)
    assert err.value.body["param"] == "echo"  # type: ignore[index]
