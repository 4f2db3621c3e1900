"""Benchmark workloads: what requests to send, and when.

Prompts are token ids sent to ``/v1/completions`` (exact lengths and exact
shared prefixes, whatever the tokenizer), except the ``chat`` workload, which
sends text to ``/v1/chat/completions`` so that templating and tokenization are
part of what is measured.

Traces use the public Mooncake format: one JSON object per line with
``timestamp`` (ms), ``input_length``, ``output_length`` and ``hash_ids`` (one
id per block of ``block_tokens`` prompt tokens; equal ids mean equal blocks).
Each id becomes ``block_tokens`` deterministic token ids, and the prompt is
cut at ``input_length``.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

__all__ = [
    "ChatWorkload",
    "ConversationWorkload",
    "RequestSpec",
    "SyntheticWorkload",
    "TraceRequest",
    "TraceWorkload",
    "generate_traces",
    "read_trace",
]

TOKEN_LOW, TOKEN_HIGH = 10, 4000  # inside the tiny model's vocabulary, clear of its special tokens


@dataclass(slots=True)
class RequestSpec:
    """One request: a body for ``path``; ``at_s`` is its send time in open-loop replay."""

    path: str
    body: dict[str, Any]
    at_s: float | None = None
    prompt_tokens: int = 0


def _block_tokens(block_id: int, n: int, salt: int = 0) -> list[int]:
    h = xxhash.xxh3_64_intdigest
    span = TOKEN_HIGH - TOKEN_LOW
    raw = struct.pack("<QQ", block_id, salt)
    return [TOKEN_LOW + h(raw, k) % span for k in range(n)]


class _BlockCache:
    def __init__(self, block_tokens: int) -> None:
        self.n = block_tokens
        self._cache: dict[int, list[int]] = {}

    def tokens(self, ids: list[int], length: int) -> list[int]:
        out: list[int] = []
        for i in ids:
            blk = self._cache.get(i)
            if blk is None:
                blk = self._cache[i] = _block_tokens(i, self.n)
            out += blk
            if len(out) >= length:
                break
        if len(out) < length:  # a trace line shorter in ids than in length: pad deterministically
            key = xxhash.xxh3_64_intdigest(struct.pack(f"<{len(ids) + 1}Q", length, *ids))
            out += _block_tokens(key, length - len(out), salt=1)
        return out[:length]


def _completion(prompt: list[int], max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": max(1, max_tokens),
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }


class SyntheticWorkload:
    """Prompt and output lengths from normal distributions; optionally a shared prefix per group."""

    def __init__(
        self,
        *,
        isl_mean: int = 1000,
        isl_std: int = 0,
        osl_mean: int = 64,
        osl_std: int = 0,
        prefix_groups: int = 0,
        prefix_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.isl_mean, self.isl_std, self.osl_mean, self.osl_std = isl_mean, isl_std, osl_mean, osl_std
        self.groups, self.ratio = prefix_groups, prefix_ratio
        self.rng = random.Random(seed)
        self._prefixes = [_block_tokens(10_000_000 + g, int(isl_mean * prefix_ratio)) for g in range(prefix_groups)]
        self._n = 0

    def __iter__(self) -> Iterator[RequestSpec]:
        return self

    def __next__(self) -> RequestSpec:
        rng = self.rng
        isl = max(2, int(rng.gauss(self.isl_mean, self.isl_std))) if self.isl_std else self.isl_mean
        osl = max(1, int(rng.gauss(self.osl_mean, self.osl_std))) if self.osl_std else self.osl_mean
        self._n += 1
        prompt: list[int] = []
        if self.groups and self.ratio > 0:
            prompt = list(self._prefixes[rng.randrange(self.groups)][:isl])
        prompt += _block_tokens(20_000_000 + self._n, isl - len(prompt), salt=rng.getrandbits(32))
        return RequestSpec("/completions", _completion(prompt, osl), prompt_tokens=len(prompt))


class ChatWorkload:
    """Chat messages of about ``isl`` tokens (the same construction as ``make bench-e2e``)."""

    WORDS = (
        "alpha",
        "beta",
        "gamma",
        "delta",
        "import",
        "return",
        "value",
        "self",
        "data",
        "list",
        "print",
        "for",
        "while",
        "class",
        "def",
        "yield",
        "async",
        "await",
        "lambda",
        "none",
        "true",
        "false",
    )

    def __init__(
        self, *, isl: int = 1000, osl: int = 64, prefix_groups: int = 32, prefix_ratio: float = 0.75, seed: int = 0
    ) -> None:
        # About 1.37 tokens per word with the tiny model's tokenizer on this vocabulary.
        self.rng = random.Random(seed)
        self.osl = osl
        shared_words = int(isl * prefix_ratio * 0.73)
        self.unique_words = int(isl * (1 - prefix_ratio) * 0.73)
        self.prefixes = [self._words(random.Random(1000 + g), shared_words) for g in range(prefix_groups)]

    def _words(self, rng: random.Random, n: int) -> str:
        lines = []
        for start in range(0, n, 40):
            lines.append(" ".join(rng.choice(self.WORDS) for _ in range(min(40, n - start))))
        return "\n".join(lines) + "\n"

    def __iter__(self) -> Iterator[RequestSpec]:
        return self

    def __next__(self) -> RequestSpec:
        content = self.prefixes[self.rng.randrange(len(self.prefixes))] + self._words(self.rng, self.unique_words)
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.osl,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return RequestSpec("/chat/completions", body)


class ConversationWorkload:
    """Multi-turn conversations: each turn resends the whole history plus a new user message.

    ``next_turn(user)`` gives a user's next request; the caller sends a user's
    turns one after another (closed loop per user).
    """

    def __init__(
        self,
        *,
        users: int = 16,
        turns: int = 6,
        system_tokens: int = 256,
        user_tokens: int = 96,
        reply_tokens: int = 48,
        seed: int = 0,
    ) -> None:
        self.users, self.turns = users, turns
        self.user_tokens, self.reply_tokens = user_tokens, reply_tokens
        self.system = _block_tokens(30_000_000, system_tokens)
        self.rng = random.Random(seed)
        self._history: dict[int, list[int]] = {}
        self._turn: dict[int, int] = {}

    def next_turn(self, user: int) -> RequestSpec | None:
        turn = self._turn.get(user, 0)
        if turn >= self.turns:
            return None
        hist = self._history.get(user) or list(self.system)
        if turn:
            # The previous reply joins the history (the same tokens for the same user and turn).
            hist += _block_tokens(40_000_000 + user * 1000 + turn, self.reply_tokens)
        hist += _block_tokens(50_000_000 + user * 1000 + turn, self.user_tokens)
        self._history[user] = hist
        self._turn[user] = turn + 1
        return RequestSpec("/completions", _completion(list(hist), self.reply_tokens), prompt_tokens=len(hist))


@dataclass(slots=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            out.append(
                TraceRequest(
                    float(o["timestamp"]),
                    int(o["input_length"]),
                    int(o["output_length"]),
                    [int(x) for x in o["hash_ids"]],
                )
            )
            if limit is not None and len(out) >= limit:
                break
    return out


class TraceWorkload:
    """Open-loop replay of a Mooncake-format trace.

    ``speedup`` divides the trace's clock; ``length_scale`` divides lengths
    (and so the tokens per hash id), to fit a large trace on a small machine.
    ``max_duration_s`` keeps the requests whose scaled send time is within it.
    ``max_prompt_tokens`` cuts longer (scaled) prompts to that many tokens, keeping
    their start, so that every request fits the model's context (a model with a
    short context would refuse them; :attr:`cut_prompts` counts them).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        speedup: float = 1.0,
        block_tokens: int = 512,
        length_scale: float = 1.0,
        max_duration_s: float | None = None,
        max_requests: int | None = None,
        max_output: int | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.requests = read_trace(path, limit=max_requests)
        self.speedup = speedup
        self.scale = length_scale
        self.cache = _BlockCache(max(1, round(block_tokens / length_scale)))
        self.max_duration_s = max_duration_s
        self.max_output = max_output
        self.max_prompt_tokens = max_prompt_tokens
        self.cut_prompts = 0

    def __iter__(self) -> Iterator[RequestSpec]:
        self.cut_prompts = 0
        t0 = self.requests[0].timestamp_ms if self.requests else 0.0
        for r in self.requests:
            at = (r.timestamp_ms - t0) / 1000.0 / self.speedup
            if self.max_duration_s is not None and at > self.max_duration_s:
                return
            isl = max(1, round(r.input_length / self.scale))
            if self.max_prompt_tokens is not None and isl > self.max_prompt_tokens:
                isl = self.max_prompt_tokens
                self.cut_prompts += 1
            osl = max(1, round(r.output_length / self.scale))
            if self.max_output:
                osl = min(osl, self.max_output)
            prompt = self.cache.tokens(r.hash_ids, isl)
            yield RequestSpec("/completions", _completion(prompt, osl), at_s=at, prompt_tokens=len(prompt))


def generate_traces(out_dir: str | Path, seed: int = 7) -> list[Path]:
    """Write the shipped workload set (Mooncake format, 512-token blocks): prefix-heavy, conversation, long-prompt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    next_id = [0]

    def new_ids(n: int) -> list[int]:
        ids = list(range(next_id[0], next_id[0] + n))
        next_id[0] += n
        return ids

    written = []
    # prefix-heavy: 120 shared prefixes (system prompts, few-shot examples) of 3-8 blocks with Zipf-like
    # popularity; each request one of them plus 1-2 blocks of its own. 20 requests/s for 60 s. Together
    # the prefixes outgrow one worker's cache but not two: placement decides the hit rate.
    prefixes = [new_ids(rng.randint(3, 8)) for _ in range(120)]
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(120)]
    lines, t = [], 0.0
    for _ in range(1200):
        t += rng.expovariate(20.0) * 1000
        ids = rng.choices(prefixes, weights)[0] + new_ids(rng.randint(1, 2))
        isl = len(ids) * 512 - rng.randint(0, 400)
        lines.append(
            {"timestamp": round(t), "input_length": isl, "output_length": rng.randint(40, 400), "hash_ids": ids}
        )
    written.append(_write(out / "prefix_heavy.jsonl", lines))
    # conversation: 60 sessions of 3-8 turns; each turn extends the previous turn's ids.
    lines = []
    for s in range(60):
        start = rng.uniform(0, 50_000)
        ids = new_ids(2)
        t = start
        for _turn in range(rng.randint(3, 8)):
            ids = ids + new_ids(rng.randint(1, 2))
            lines.append(
                {
                    "timestamp": round(t),
                    "input_length": len(ids) * 512 - rng.randint(0, 300),
                    "output_length": rng.randint(60, 300),
                    "hash_ids": list(ids),
                }
            )
            t += rng.uniform(4_000, 15_000)
        del s
    lines.sort(key=lambda o: float(o["timestamp"]))  # type: ignore[arg-type]
    written.append(_write(out / "conversation.jsonl", lines))
    # long-prompt: 16-48 block prompts (8k-24k tokens at 512 per block), little sharing, 2 req/s.
    lines, t = [], 0.0
    docs = [new_ids(rng.randint(16, 48)) for _ in range(40)]
    for _ in range(240):
        t += rng.expovariate(2.0) * 1000
        doc = docs[rng.randrange(40)] if rng.random() < 0.3 else new_ids(rng.randint(16, 48))
        lines.append(
            {
                "timestamp": round(t),
                "input_length": len(doc) * 512 - rng.randint(0, 500),
                "output_length": rng.randint(20, 200),
                "hash_ids": list(doc),
            }
        )
    written.append(_write(out / "long_prompt.jsonl", lines))
    return written


def _write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(o, separators=(", ", ": ")) + "\n" for o in lines))
    return path
