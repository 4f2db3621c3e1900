"""An independent closed-loop load client for OpenAI-compatible servers (streaming), to check the harness.

It shares no code with ``commutator.cli.loadgen``: its own prompts, request bodies, SSE parser and
timing, on plain asyncio with the standard ``json`` module (``--uvloop`` for uvloop). ``make
bench-compare`` runs it beside the harness's own client to see whether a ranking of two stacks is a
property of the stacks or of the client that measured them.

Prompts have exact token counts on both stacks: ``--api completions`` sends token ids to
``/v1/completions``; ``--api chat`` sends ``/v1/chat/completions`` messages made of whole-word
tokens of the model's own tokenizer (``--tokenizer``: a ``tokenizer.json``), which re-tokenize to
the same ids. Like the harness's chat workload, ``--prefix-ratio`` of each prompt is one of
``--prefix-groups`` shared prefixes.

Closed loop: ``--concurrency`` tasks, each sending its next request when the previous one ended,
over one keep-alive connection pool, for ``--warmup`` seconds (discarded) and then ``--duration``
seconds; requests started in the window are waited for and counted. On stdout it prints
``measuring`` when the window opens and ``done`` when its last request ended (a harness can
snapshot server CPU at those lines), then writes a JSON report to ``--out`` (or stdout): requests,
errors, req/s, TTFT, per-request inter-token latency and chunk gaps, SSE events and bytes per
request, connections opened and reused, the client's own CPU time and the part of it spent parsing
SSE and JSON.

    python benchmarks/independent_client.py --url http://127.0.0.1:8000/v1 --model M --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

TOKEN_ID_RANGE = (10, 4000)  # inside the tiny model's vocabulary, clear of its special tokens


# -- SSE ------------------------------------------------------------------------------------------
class SseParser:
    """Incremental server-sent-events parser (the WHATWG rules this client needs).

    ``feed(bytes)`` returns the ``data`` of every event completed by those bytes. Lines end with
    ``\\n``, ``\\r\\n`` or ``\\r``; an empty line ends an event; ``data:`` lines of one event are
    joined with ``\\n``; one space after the colon is dropped; comments (``:``) and other fields are
    ignored; an event without data is not dispatched. Bytes may split anywhere, even inside a
    ``\\r\\n`` or a UTF-8 character.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._cr_pending = False

    def feed(self, chunk: bytes) -> list[str]:
        if self._cr_pending and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split across two reads
        self._cr_pending = False
        buf = self._buf + chunk
        events: list[str] = []
        start = 0
        n = len(buf)
        while start < n:
            lf, cr = buf.find(b"\n", start), buf.find(b"\r", start)
            if lf < 0 and cr < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                end, nxt = cr, cr + 1
                if nxt < n and buf[nxt : nxt + 1] == b"\n":
                    nxt += 1
                elif nxt == n:
                    self._cr_pending = True
            else:
                end, nxt = lf, lf + 1
            self._line(buf[start:end], events)
            start = nxt
        self._buf = buf[start:]
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(b":"):
            return
        name, sep, value = line.partition(b":")
        if not sep:
            value = b""
        elif value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", errors="replace"))


# -- prompts --------------------------------------------------------------------------------------
class Prompts:
    """Request bodies of exact prompt length: ``prefix_ratio`` of it shared within ``groups`` groups.

    Chat prompts are one line of whole-word tokens, or with ``lines`` > 0 lines of that many words,
    each line a word without its leading space, then words with one, then a newline token (still
    exact: every piece is one token, and a newline is a pre-tokenization boundary).
    """

    def __init__(
        self,
        api: str,
        *,
        isl: int,
        osl: int,
        groups: int,
        prefix_ratio: float,
        seed: int,
        tokenizer: Path | None = None,
        lines: int = 0,
    ) -> None:
        self.api, self.isl, self.osl, self.lines = api, isl, osl, lines
        self.rng = random.Random(seed)
        self.prefix_len = int(isl * prefix_ratio) if groups else 0
        self.starts: list[Any] = []
        if api == "chat":
            if tokenizer is None:
                raise SystemExit("--api chat needs --tokenizer (a tokenizer.json)")
            self.pool: list[Any] = _word_tokens(tokenizer)
            if lines > 0:
                self.starts = [w[1:] for w in self.pool if w[1:] in _plain_tokens(tokenizer)]
        else:
            self.pool = list(range(*TOKEN_ID_RANGE))
        prng = random.Random(seed + 1)
        self.prefixes = [[self._piece(prng, i) for i in range(self.prefix_len)] for _ in range(max(groups, 1))]

    def _piece(self, rng: random.Random, i: int) -> Any:
        """The token at position ``i``: a newline ending a line, a line's first word, or a word."""
        if self.starts:
            k = i % (self.lines + 1)
            if k == self.lines:
                return "\n"
            if k == 0:
                return rng.choice(self.starts)
        return rng.choice(self.pool)

    def next_body(self, model: str) -> tuple[str, dict[str, Any]]:
        own = [self._piece(self.rng, i) for i in range(self.prefix_len, self.isl)]
        picked = self.prefixes[self.rng.randrange(len(self.prefixes))] + own
        common = {
            "model": model,
            "max_tokens": self.osl,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            text = "".join(picked)
            return "/chat/completions", {"messages": [{"role": "user", "content": text}], **common}
        return "/completions", {"prompt": picked, **common}


def _vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = json.loads(path.read_text())["model"]["vocab"]
    return vocab


def _word_tokens(path: Path) -> list[str]:
    """Tokens that are one space and one ASCII word (byte-level BPE: ``Ġword``): each such piece
    re-tokenizes to itself, so a prompt of n of them is n tokens."""
    words = [" " + tok[1:] for tok in _vocab(path) if tok[:1] in ("Ġ", "▁") and tok[1:].isascii() and tok[1:].isalpha()]
    if len(words) < 100:
        raise SystemExit(f"{path}: too few whole-word tokens for chat prompts ({len(words)})")
    return sorted(words)


def _plain_tokens(path: Path) -> set[str]:
    """Tokens that are an ASCII word with no space before it (a word at the start of a line)."""
    return {tok for tok in _vocab(path) if tok.isascii() and tok.isalpha()}


# -- one request ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Outcome:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    end: float = 0.0
    ttft_s: float | None = None
    last_token_at: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    events: int = 0
    bytes: int = 0
    parse_s: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0


def _has_token(obj: dict[str, Any]) -> bool:
    """An event that carries a generated token: text, or empty text for a token whose text is not out
    yet (part of a character; vLLM streams those as empty chunks), not a role-only or closing chunk."""
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content"):
            return True
        empty = "text" in choice or "content" in delta
        if empty and choice.get("finish_reason") is None and "role" not in delta:
            return True
    return False


async def one_request(http: aiohttp.ClientSession, url: str, body: bytes) -> Outcome:
    out = Outcome(start=time.perf_counter())
    parser = SseParser()
    try:
        async with http.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                out.error = f"http {resp.status}"
                await resp.read()
                return out
            finished = False
            async for raw in resp.content.iter_any():
                now = time.perf_counter()
                out.bytes += len(raw)
                p0 = time.perf_counter()
                for data in parser.feed(raw):
                    out.events += 1
                    if data == "[DONE]":
                        finished = True
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        out.error = "error event"
                        return out
                    if _has_token(obj):
                        if out.ttft_s is None:
                            out.ttft_s = now - out.start
                        else:
                            out.gaps_s.append(now - (out.last_token_at or now))
                        out.last_token_at = now
                    usage = obj.get("usage")
                    if usage:
                        out.completion_tokens = usage.get("completion_tokens") or 0
                        out.prompt_tokens = usage.get("prompt_tokens") or 0
                out.parse_s += time.perf_counter() - p0
                if finished:
                    break
            out.ok = finished and out.ttft_s is not None
            if not out.ok:
                out.error = "stream ended early"
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        out.error = type(exc).__name__
    except ValueError:
        out.error = "bad JSON"
    finally:
        out.end = time.perf_counter()
    return out


# -- the run --------------------------------------------------------------------------------------
def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Connections:
    """Counts the pool's new and reused connections (aiohttp tracing)."""

    def __init__(self) -> None:
        self.created = 0
        self.reused = 0
        self.trace = aiohttp.TraceConfig()
        self.trace.on_connection_create_end.append(self._created)
        self.trace.on_connection_reuseconn.append(self._reused)

    async def _created(self, *_: Any) -> None:
        self.created += 1

    async def _reused(self, *_: Any) -> None:
        self.reused += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = Prompts(
        args.api,
        isl=args.isl,
        osl=args.osl,
        groups=args.prefix_groups,
        prefix_ratio=args.prefix_ratio,
        seed=args.seed,
        tokenizer=args.tokenizer,
        lines=args.lines,
    )
    base = args.url.rstrip("/")
    conns = Connections()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    measured: list[Outcome] = []
    window: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[conns.trace]) as http:
        t0 = time.perf_counter()
        measure_from = t0 + args.warmup
        stop_at = measure_from + args.duration

        async def loop() -> None:
            while (now := time.perf_counter()) < stop_at:
                path, body = prompts.next_body(args.model)
                o = await one_request(http, base + path, json.dumps(body).encode())
                if now >= measure_from:
                    measured.append(o)

        async def mark() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            window["cpu0"], window["t0"] = _cpu_s(), time.perf_counter()
            window["conn0"], window["reuse0"] = conns.created, conns.reused
            print("measuring", flush=True)

        await asyncio.gather(mark(), *(loop() for _ in range(args.concurrency)))
        window["cpu1"], window["t1"] = _cpu_s(), time.perf_counter()
        print("done", flush=True)
    return report(measured, window, conns, args)


def report(
    measured: list[Outcome], window: dict[str, float], conns: Connections, args: argparse.Namespace
) -> dict[str, Any]:
    ok = [o for o in measured if o.ok]
    wall = window["t1"] - window["t0"]
    cpu = window["cpu1"] - window["cpu0"]
    errors: dict[str, int] = {}
    for o in measured:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    ttft = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
    itl = [
        (o.last_token_at - o.start - o.ttft_s) * 1000 / (o.completion_tokens - 1)
        for o in ok
        if o.ttft_s is not None and o.last_token_at is not None and o.completion_tokens > 1
    ]
    gaps = [g * 1000 for o in ok for g in o.gaps_s]
    n = max(1, len(ok))
    return {
        "client": "independent",
        "api": args.api,
        "concurrency": args.concurrency,
        "loop": "uvloop" if args.uvloop else "asyncio",
        "requests": len(ok),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_ms": {"p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99)},
        "itl_ms": {"p50": _pct(itl, 0.5), "p99": _pct(itl, 0.99)},
        "chunk_gap_ms": {"p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99)},
        "prompt_tokens_per_req": sum(o.prompt_tokens for o in ok) / n,
        "output_tokens_per_req": sum(o.completion_tokens for o in ok) / n,
        "sse_events_per_req": sum(o.events for o in ok) / n,  # [DONE] included
        "bytes_per_req": sum(o.bytes for o in ok) / n,
        "connections_opened": conns.created - window["conn0"],
        "connections_reused": conns.reused - window["reuse0"],
        "cpu_s": cpu,
        "cpu_ms_per_req": cpu * 1000 / n,
        "cpu_pct_of_core": 100 * cpu / wall if wall > 0 else 0.0,
        "parse_ms_per_req": sum(o.parse_s for o in ok) * 1000 / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (with /v1)")
    p.add_argument("--model", default="commutator/tiny-llama")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json of the model (--api chat)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (discarded)")
    p.add_argument("--isl", type=int, default=1000, help="prompt tokens")
    p.add_argument("--osl", type=int, default=64, help="output tokens")
    p.add_argument("--prefix-groups", type=int, default=32)
    p.add_argument("--prefix-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lines", type=int, default=0, help="chat: tokens per line (0: the prompt is one line)")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's own loop")
    p.add_argument("--out", type=Path, help="write the JSON report here (default: stdout)")
    args = p.parse_args(argv)
    if args.uvloop:
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0 if result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
