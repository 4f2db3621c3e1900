"""An asyncio load generator for OpenAI-compatible servers (streaming chat completions).

Closed loop: ``concurrency`` clients, each sending its next request when the
previous one ends, over keep-alive connections. Per request it records the
time to the first content chunk (TTFT), the gaps between chunks, the tokens
and cached tokens from ``usage``, and errors by kind.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

__all__ = ["RequestResult", "Summary", "run_closed_loop", "summarize"]


@dataclass(slots=True)
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft_s: float | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class Summary:
    requests: int
    errors: dict[str, int]
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    chunk_ms: dict[str, float]
    cached_share: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list[RequestResult], wall_s: float) -> Summary:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    gaps = [g * 1000 for r in ok for g in r.chunk_gaps_s]
    prompt = sum(r.prompt_tokens for r in ok)
    return Summary(
        requests=len(ok),
        errors=dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        wall_s=wall_s,
        requests_per_s=len(ok) / wall_s if wall_s else 0.0,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
        ttft_ms={
            "p50": _pct(ttft, 0.5),
            "p90": _pct(ttft, 0.9),
            "p99": _pct(ttft, 0.99),
            "mean": statistics.fmean(ttft) if ttft else float("nan"),
        },
        chunk_ms={"p50": _pct(gaps, 0.5), "p90": _pct(gaps, 0.9), "p99": _pct(gaps, 0.99)},
        cached_share=sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
    )


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start, end=start)
    try:
        async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                result.error = f"http_{resp.status}"
                await resp.read()
                return result
            last = None
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    result.error = "stream_error"
                    return result
                now = time.perf_counter()
                choices = chunk.get("choices")
                if choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            result.ok = True
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        result.error = type(exc).__name__
    finally:
        result.end = time.perf_counter()
    return result


async def run_closed_loop(
    base_url: str,
    bodies: Iterator[dict[str, Any]],
    *,
    concurrency: int,
    duration_s: float | None = None,
    max_requests: int | None = None,
    path: str = "/chat/completions",
    on_result: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send requests from ``bodies`` with ``concurrency`` clients until ``duration_s`` or ``max_requests``.

    Returns the results and the wall time of the run.
    """
    url = base_url.rstrip("/") + path
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    results: list[RequestResult] = []
    sent = 0
    t0 = time.perf_counter()
    stop_at = t0 + duration_s if duration_s else None

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal sent
            while True:
                if stop_at is not None and time.perf_counter() >= stop_at:
                    return
                if max_requests is not None and sent >= max_requests:
                    return
                sent += 1
                try:
                    body = next(bodies)
                except StopIteration:
                    return
                r = await _one(session, url, body)
                results.append(r)
                if on_result is not None:
                    on_result(r)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t0
