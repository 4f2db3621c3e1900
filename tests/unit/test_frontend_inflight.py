"""The frontend's cap on requests in flight: 429 with Retry-After past it, and a count that is
released however a request ends (answered, failed, or cancelled when its client goes away)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from commutator.frontend.api import OpenAIApi
from commutator.frontend.protocol import RequestLimits

pytestmark = pytest.mark.unit


class FakeRequest:
    """The part of an aiohttp request the API reads before generating: its body.

    ``read`` waits for ``gate`` (a request held in flight), then returns ``body`` or raises ``fail``.
    """

    path = "/v1/completions"
    content_length = None
    headers: dict[str, str] = {}
    _client_max_size = 1 << 20

    def __init__(self, body: bytes = b"{not json", gate: asyncio.Event | None = None, fail: Exception | None = None):
        self.body = body
        self.gate = gate
        self.fail = fail
        self.reads = 0

    async def read(self) -> bytes:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.body


def api(max_inflight: int) -> OpenAIApi:
    # Registry and backend are never reached: every request here ends before routing.
    return OpenAIApi(None, None, limits=RequestLimits(), max_inflight_requests=max_inflight)  # type: ignore[arg-type]


async def until(pred, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline
        await asyncio.sleep(0)


async def test_past_the_cap_is_429_with_retry_after_and_the_body_is_not_read() -> None:
    a = api(2)
    gate = asyncio.Event()
    held = [asyncio.create_task(a.completions(FakeRequest(gate=gate))) for _ in range(2)]  # type: ignore[arg-type]
    await until(lambda: a.inflight_requests == 2)
    extra = FakeRequest()
    r = await a.completions(extra)  # type: ignore[arg-type]
    assert r.status == 429 and r.headers["Retry-After"] == "1" and extra.reads == 0
    err = orjson.loads(r.body)["error"]  # type: ignore[attr-defined]
    assert (err["type"], err["code"]) == ("rate_limit_exceeded", "too_many_requests")
    assert a.inflight_requests == 2
    gate.set()
    assert [(await t).status for t in held] == [400, 400]  # their bodies were not JSON
    assert a.inflight_requests == 0
    assert (await a.chat_completions(FakeRequest())).status == 400  # type: ignore[arg-type]


async def test_a_cancelled_or_failed_request_frees_its_slot() -> None:
    a = api(1)
    held = asyncio.create_task(a.completions(FakeRequest(gate=asyncio.Event())))  # type: ignore[arg-type]
    await until(lambda: a.inflight_requests == 1)
    assert (await a.completions(FakeRequest())).status == 429  # type: ignore[arg-type]
    held.cancel()  # what aiohttp does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await held
    assert a.inflight_requests == 0
    with pytest.raises(RuntimeError):  # the server's middleware answers 500
        await a.completions(FakeRequest(fail=RuntimeError("boom")))  # type: ignore[arg-type]
    assert a.inflight_requests == 0
    assert (await a.completions(FakeRequest())).status == 400  # type: ignore[arg-type]
