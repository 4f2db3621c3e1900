"""The stack as separate processes over mutual TLS (docs/security.md): a frontend sends requests to a
router service over gRPC, the router reaches a mocker worker over its TCP worker stream and gRPC, every
hop with certificates made for the session. A frontend without certificates is refused by the router
and answers its client with a clear error, and nothing goes down."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from commutator.common.local_servers import free_port

pytestmark = pytest.mark.e2e

MODEL = "commutator/tiny-llama"


async def _complete(base: str, timeout_s: float = 60.0, *, until_ok: bool = True) -> tuple[int, dict[str, Any]]:
    """The answer to a completion, once the frontend knows the model (and, with ``until_ok``, once one
    succeeds: the router may see the worker a little after the frontend sees its model)."""
    body = {"model": MODEL, "prompt": "over mutual TLS", "max_tokens": 4, "ignore_eos": True}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{base}/models") as r:
                    known = r.status == 200 and MODEL in {m["id"] for m in (await r.json())["data"]}
                if known:
                    async with http.post(f"{base}/completions", json=body) as r:
                        status, payload = r.status, await r.json()
                    if status == 200 or not until_ok or loop.time() > deadline:
                        return status, payload
            except aiohttp.ClientError:
                pass
            if loop.time() > deadline:
                raise AssertionError(f"{base} never knew {MODEL}")
            await asyncio.sleep(0.2)


async def test_frontend_router_and_worker_over_mutual_tls(spawn: Any, pki: Any) -> None:
    server_env, client_env = pki.tls_env("server"), pki.tls_env("client")
    worker = spawn("commutator.decode", "--speedup-ratio", "10", env=server_env)
    router = spawn("commutator.router", env=server_env)
    port, plain_port = free_port(), free_port()
    common = ("--http-host", "127.0.0.1", "--router-endpoint", "router")
    frontend = spawn("commutator.frontend", "--http-port", str(port), *common, env=client_env)
    status, payload = await _complete(f"http://127.0.0.1:{port}/v1")
    assert status == 200, (payload, router.log()[-3000:])
    assert payload["usage"]["completion_tokens"] == 4
    assert "mutual TLS" in worker.log() and "worker stream listening" in worker.log()

    # A frontend without certificates: the router refuses its handshake; its client gets a clear error.
    plain = spawn("commutator.frontend", "--http-port", str(plain_port), *common)
    status, payload = await _complete(f"http://127.0.0.1:{plain_port}/v1", until_ok=False)
    assert status == 503, payload
    assert payload["error"]["type"] == "service_unavailable", payload
    for p in (worker, router, frontend, plain):
        assert p.proc.poll() is None, p.log()[-2000:]
    status, _ = await _complete(f"http://127.0.0.1:{port}/v1")  # the mTLS path still serves
    assert status == 200
