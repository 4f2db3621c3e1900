"""An asyncio load generator for OpenAI-compatible servers (streaming).

Closed loop: ``concurrency`` clients, each sending its next request when the
previous one ends. Open loop: requests go out at their scheduled times (a
trace) or as a Poisson process at a given rate, however many are in flight.
Per request it records the time to the first content chunk (TTFT), the
gaps between chunks, the per-token decode time (TPOT: time after the first
chunk over the remaining tokens), the tokens and cached tokens from ``usage``,
and errors by kind. Connections are kept alive; ``ClientCounters``, when
given, counts connections opened and reused, SSE events and bytes read.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from commutator.cli.workloads import ConversationWorkload, RequestSpec

__all__ = [
    "ClientCounters",
    "RequestResult",
    "Summary",
    "arrival_offsets",
    "run_closed_loop",
    "run_conversations",
    "run_open_loop",
    "summarize",
]


@dataclass(slots=True)
class ClientCounters:
    """What the client did on the wire: connections opened and reused, SSE data lines, bytes of lines."""

    connections_opened: int = 0
    connections_reused: int = 0
    sse_events: int = 0
    bytes_read: int = 0

    def trace_config(self) -> aiohttp.TraceConfig:
        tc = aiohttp.TraceConfig()

        async def opened(*_: Any) -> None:
            self.connections_opened += 1

        async def reused(*_: Any) -> None:
            self.connections_reused += 1

        tc.on_connection_create_end.append(opened)
        tc.on_connection_reuseconn.append(reused)
        return tc

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


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
    send_lag_s: float = 0.0  # open loop: how late the client sent it

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.end - self.start - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class Summary:
    requests: int
    errors: dict[str, int]
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    chunk_ms: dict[str, float]
    cached_share: float
    goodput_per_s: float | None = None
    prompt_tokens_per_req: float = 0.0
    send_lag_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _dist(values: list[float]) -> dict[str, float]:
    return {
        "p50": _pct(values, 0.5),
        "p90": _pct(values, 0.9),
        "p99": _pct(values, 0.99),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def summarize(
    results: list[RequestResult], wall_s: float, *, ttft_slo_ms: float | None = None, itl_slo_ms: float | None = None
) -> Summary:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    itl = [t * 1000 for r in ok if (t := r.tpot_s) is not None]
    gaps = [g * 1000 for r in ok for g in r.chunk_gaps_s]
    prompt = sum(r.prompt_tokens for r in ok)
    goodput = None
    if ttft_slo_ms is not None or itl_slo_ms is not None:
        good = 0
        for r in ok:
            if ttft_slo_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > ttft_slo_ms):
                continue
            if itl_slo_ms is not None and (t := r.tpot_s) is not None and t * 1000 > itl_slo_ms:
                continue
            good += 1
        goodput = good / wall_s if wall_s else 0.0
    return Summary(
        requests=len(ok),
        errors=dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        wall_s=wall_s,
        requests_per_s=len(ok) / wall_s if wall_s else 0.0,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
        ttft_ms=_dist(ttft),
        itl_ms=_dist(itl),
        chunk_ms=_dist(gaps),
        cached_share=sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        goodput_per_s=goodput,
        prompt_tokens_per_req=prompt / len(ok) if ok else 0.0,
        send_lag_ms=_dist([r.send_lag_s * 1000 for r in results]),
    )


def carries_token(choice: dict[str, Any]) -> bool:
    """A streamed choice that carries a generated token: text, or empty text for a token whose text is
    not out yet (part of a UTF-8 character; vLLM and Commutator stream those as empty chunks). A role-only
    chunk and a closing chunk (empty, with its finish reason) carry none."""
    delta = choice.get("delta") or {}
    if choice.get("text") or delta.get("content"):
        return True
    empty = "text" in choice or "content" in delta
    return empty and choice.get("finish_reason") is None and "role" not in delta


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], counters: ClientCounters | None = None
) -> RequestResult:
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
                if counters is not None:
                    counters.bytes_read += len(line)
                if not line.startswith(b"data: "):
                    continue
                if counters is not None:
                    counters.sse_events += 1
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    result.error = "stream_error"
                    return result
                now = time.perf_counter()
                choices = chunk.get("choices")
                if choices and carries_token(choices[0]):
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            result.ok = True
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        result.error = type(exc).__name__
    except orjson.JSONDecodeError:
        result.error = "bad_json"
    finally:
        result.end = time.perf_counter()
    return result


def _session(limit: int, counters: ClientCounters | None = None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
        trace_configs=[counters.trace_config()] if counters is not None else None,
    )


def _body(spec: RequestSpec, model: str) -> dict[str, Any]:
    return {"model": model, **spec.body}


async def run_closed_loop(
    base_url: str,
    model: str,
    specs: Iterator[RequestSpec],
    *,
    concurrency: int,
    duration_s: float | None = None,
    max_requests: int | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    counters: ClientCounters | None = None,
    settle_s: float = 0.0,
    on_settled: Callable[[], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """``concurrency`` clients until ``duration_s`` or ``max_requests``. Returns the results and the wall time.

    ``settle_s``: the same clients run that many seconds first, unmeasured (the requests sent then are left
    out, and so are their connections and SSE events); ``on_settled`` is called when the measured window
    begins, and the wall time counts from then. Unlike a separate warm-up, the load does not stop and start
    again, so the measured window sees the loop's steady state rather than its synchronized start."""
    base = base_url.rstrip("/")
    results: list[RequestResult] = []
    sent = 0
    t0 = time.perf_counter()
    settle_at = t0 + max(settle_s, 0.0)
    stop_at = settle_at + duration_s if duration_s else None
    async with _session(concurrency, counters) as session:
        settled = settle_s <= 0

        def settle() -> None:
            nonlocal settled
            if not settled:
                settled = True
                if counters is not None:  # the connections were opened, and first reused, before the window
                    counters.connections_opened = counters.connections_reused = 0
                if on_settled is not None:
                    on_settled()

        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def at_settle_time() -> None:  # a loop timer can fire a little before perf_counter's deadline
            nonlocal timer
            left = settle_at - time.perf_counter()
            if left > 0:
                timer = loop.call_later(left, at_settle_time)
            else:
                settle()

        if not settled:
            timer = loop.call_later(settle_s, at_settle_time)

        async def client() -> None:
            nonlocal sent
            while (stop_at is None or time.perf_counter() < stop_at) and (max_requests is None or sent < max_requests):
                measured = time.perf_counter() >= settle_at
                if measured:
                    settle()  # before the timer if this client got there first
                    sent += 1
                try:
                    spec = next(specs)
                except StopIteration:
                    return
                r = await _one(session, base + spec.path, _body(spec, model), counters if measured else None)
                if measured:
                    results.append(r)
                    if on_result is not None:
                        on_result(r)

        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            if timer is not None:
                timer.cancel()
        settle()  # a loop that ended before its window began still reports one
    return results, time.perf_counter() - settle_at


def arrival_offsets(
    specs: Iterable[RequestSpec], *, rate: float | None, duration_s: float | None, seed: int = 0
) -> Iterator[tuple[float, RequestSpec]]:
    """When to send each request, in seconds from the start: its own ``at_s`` (a trace), else a Poisson
    process of ``rate`` per second (exponential gaps from ``random.Random(seed)``: the same seed gives the
    same offsets), else all at once. Stops before the first offset past ``duration_s``."""
    rng = random.Random(seed)
    at = 0.0
    for spec in specs:
        if spec.at_s is not None:
            at = spec.at_s
        elif rate:
            at += rng.expovariate(rate)
        if duration_s is not None and at > duration_s:
            return
        yield at, spec


async def run_open_loop(
    base_url: str,
    model: str,
    specs: Iterable[RequestSpec],
    *,
    rate: float | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    on_result: Callable[[RequestResult], None] | None = None,
    counters: ClientCounters | None = None,
) -> tuple[list[RequestResult], float]:
    """Send each request at its offset from ``arrival_offsets``, however many are in flight.

    Returns when every sent request has finished. A request sent later than its offset (the client
    itself short of CPU) carries the delay in ``RequestResult.send_lag_s``.
    """
    base = base_url.rstrip("/")
    results: list[RequestResult] = []
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    async with _session(10_000, counters) as session:

        async def send(spec: RequestSpec, lag_s: float) -> None:
            r = await _one(session, base + spec.path, _body(spec, model), counters)
            r.send_lag_s = lag_s
            results.append(r)
            if on_result is not None:
                on_result(r)

        for at, spec in arrival_offsets(specs, rate=rate, duration_s=duration_s, seed=seed):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(0.0, time.perf_counter() - t0 - at)
            task = asyncio.get_running_loop().create_task(send(spec, lag))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


async def run_conversations(
    base_url: str,
    model: str,
    workload: ConversationWorkload,
    *,
    on_result: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Every user's turns one after another; users in parallel."""
    base = base_url.rstrip("/")
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    async with _session(workload.users) as session:

        async def user(u: int) -> None:
            while (spec := workload.next_turn(u)) is not None:
                r = await _one(session, base + spec.path, _body(spec, model))
                results.append(r)
                if on_result is not None:
                    on_result(r)

        await asyncio.gather(*(user(u) for u in range(workload.users)))
    return results, time.perf_counter() - t0
