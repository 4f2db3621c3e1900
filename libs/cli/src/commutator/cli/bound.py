"""The affinity bound: the prefix-cache hit share that perfect cache affinity reaches (issue 13).

An offline replay of a workload through one mocker :class:`BlockPool` per
worker (the mocker's own pool: same capacity, same LRU eviction, DESIGN.md 5),
hashing prompts as the mocker does (DESIGN.md 4.1). The *affinity* placement
puts each request on the worker holding its longest cached prefix, ignoring
load; its hit share is what a router with perfect, instant knowledge of every
cache and no regard for load reaches with the same capacity. Every router's
measured ``cached share`` (Σ usage cached tokens / Σ prompt tokens, as
``loadgen`` sums it) is reported as a share of it. The same pass replays
round-robin and (seeded) random placement as baselines, a *pooled* cache (one
pool of ``workers * num_blocks`` blocks: every prefix held once across the
fleet, as perfect affinity with no duplication would hold it), and an infinite
cache (every block ever computed stays cached), the ceiling of any placement.

Read the affinity bound beside the pooled cache: ignoring load, affinity
collapses when every prompt shares a first block (a system prompt; every
request of the Mooncake conversation trace starts with hash id 0). The first
worker then always holds the longest prefix and gets every request, so the
fleet caches no more than one worker, below round-robin. The pooled cache has
no such failure and is the figure to compare routers with on such traces.

Per request, on the chosen worker, exactly what the mocker's scheduler does
when the request runs alone (``engines/mocker/scheduler.py``):

1. Cached tokens: the longest cached prefix of the prompt's full blocks, at
   most ``(n - 1) // block_size`` blocks of an ``n``-token prompt (the last
   token is always computed, to sample from); times the block size. That is
   the ``cached_tokens`` the mocker reports in usage.
2. Admission: take a reference to the cached blocks, then allocate the rest of
   the ``ceil((n + o - 1) / block_size)`` blocks the sequence holds when it
   finishes (``o`` output tokens; the last sampled token is never computed),
   evicting the least recently released cached blocks when nothing is free.
3. Registration: the prompt's full blocks under their sequence hashes, then
   the full blocks holding output tokens (the prompt's partial last block
   among them) under hashes unique to the request. The mocker registers those
   too, under the hashes of its pseudo-random output tokens, which no later
   prompt matches: modelling them as unique keeps both their room and their
   place in the LRU order (registered blocks are evicted after the unregistered
   free ones, so leaving them out would make the cache look larger).
4. Release, last block first, so that a sequence's tail is evicted before its
   prefix.

Requests are replayed one at a time, in order: blocks held by concurrent
requests, preemptions and the order in which concurrent prefills register are
ignored, so this is the affinity bound at the same capacity, not an exact
optimum (a placement that also weighs what it evicts could do better, and a
real run under load may evict a little more). Requests whose prompt does not
fit the context are refused and left out of every sum, as the frontend refuses
them with a 400 that ``loadgen`` does not count; output is capped at what the
context leaves, as the frontend caps ``max_tokens``.

Pure module: no I/O, no asyncio.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash
from commutator.common.hashing import block_hash_seed, extend_sequence_hash, local_block_hashes, sequence_hashes
from commutator.engines.base import KvRemoved
from commutator.engines.mocker.block_pool import BlockPool
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.tiny_model import CONTEXT_LENGTH

__all__ = [
    "PLACEMENTS",
    "BoundResult",
    "Placement",
    "PreparedRequest",
    "ReplayResult",
    "Window",
    "admit_alone",
    "affinity_bound",
    "format_table",
    "infinite_cache_share",
    "prepare",
    "replay",
]

_pack_qq = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest
_OUTPUT_SEED = 0x6F7574  # seeds the stand-in hashes of output blocks
_WATERMARK = MockerConfig().watermark


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """What the replay needs of one request: its prompt's block hashes, lengths and send time."""

    index: int
    at_s: float
    prompt_tokens: int
    output_tokens: int
    local_hashes: tuple[int, ...]
    seq_hashes: tuple[int, ...]


def prepare(
    requests: Iterable[Any],
    *,
    block_size: int = 64,
    context_length: int = CONTEXT_LENGTH,
    num_blocks: int | None = None,
    watermark: float = _WATERMARK,
) -> tuple[list[PreparedRequest], int]:
    """Hash ``requests`` (``RequestSpec`` s with a token-id ``prompt``) as the mocker would; ``(kept, refused)``.

    The context is ``context_length``, lowered (as the mocker lowers it) to what
    ``num_blocks`` hold: ``(num_blocks - int(watermark * num_blocks)) * block_size + 1``.
    A prompt of the context's length or more is refused; output is capped at the room left.
    """
    ctx = context_length
    if num_blocks is not None:
        ctx = min(ctx, (num_blocks - int(watermark * num_blocks)) * block_size + 1)
    seed = block_hash_seed("", "")
    out: list[PreparedRequest] = []
    refused = 0
    for spec in requests:
        prompt = spec.body.get("prompt")
        if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], int):
            raise ValueError("the bound replays token-id prompts (/completions with a list of ints)")
        n = len(prompt)
        if n >= ctx:
            refused += 1
            continue
        max_tokens = int(spec.body.get("max_tokens") or 0)
        o = min(max_tokens, ctx - n) if max_tokens > 0 else ctx - n
        local = local_block_hashes(prompt, block_size, seed)
        out.append(PreparedRequest(len(out), spec.at_s or 0.0, n, o, tuple(local), tuple(sequence_hashes(local))))
    return out, refused


# -- placements --------------------------------------------------------------------------------------
class Placement(Protocol):
    name: str

    def pick(self, overlaps: Sequence[int], last_placed: Sequence[int]) -> int:
        """The worker for a request, from each worker's cached prefix (blocks) and when it last got one."""
        ...


class AffinityPlacement:
    """The longest cached prefix wins; ties go to the worker that has gone longest without a request.

    The tie rule spreads new prefixes over the workers like round-robin and is
    deterministic (then the lowest index). "Least full" is not used: once warm,
    every cache is full and its count of free blocks is noise.
    """

    name = "affinity"

    def pick(self, overlaps: Sequence[int], last_placed: Sequence[int]) -> int:
        return min(range(len(overlaps)), key=lambda w: (-overlaps[w], last_placed[w], w))


class RoundRobinPlacement:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, overlaps: Sequence[int], last_placed: Sequence[int]) -> int:
        w = self._next % len(overlaps)
        self._next += 1
        return w


class RandomPlacement:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, overlaps: Sequence[int], last_placed: Sequence[int]) -> int:
        return self._rng.randrange(len(overlaps))


PLACEMENTS = {"affinity": AffinityPlacement, "round-robin": RoundRobinPlacement, "random": RandomPlacement}


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Window:
    """The requests sent in ``[start_s, start_s + window_s)`` of (scaled) trace time."""

    start_s: float
    requests: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def hit_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """One placement's replay: ``cached_tokens / prompt_tokens`` is the hit share the benchmark reports."""

    placement: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    per_worker_requests: tuple[int, ...]
    windows: tuple[Window, ...]
    evicted_blocks: int

    @property
    def hit_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_share": self.hit_share,
            "per_worker_requests": list(self.per_worker_requests),
            "evicted_blocks": self.evicted_blocks,
            "windows": [
                {
                    "start_s": w.start_s,
                    "requests": w.requests,
                    "prompt_tokens": w.prompt_tokens,
                    "cached_tokens": w.cached_tokens,
                    "hit_share": w.hit_share,
                }
                for w in self.windows
            ],
        }


@dataclass(frozen=True, slots=True)
class BoundResult:
    """The affinity bound and its baselines, replayed over the same requests."""

    workers: int
    num_blocks: int
    block_size: int
    refused: int
    bound: ReplayResult
    round_robin: ReplayResult
    random: ReplayResult
    pooled: ReplayResult
    infinite_cache_share: float

    @property
    def hit_share(self) -> float:
        return self.bound.hit_share

    def share_of_bound(self, hit_share: float) -> float:
        """A measured hit share as a fraction of the bound's (0 when the bound is 0)."""
        return hit_share / self.bound.hit_share if self.bound.hit_share else 0.0

    def share_of_pooled(self, hit_share: float) -> float:
        """A measured hit share as a fraction of the pooled cache's (0 when that is 0)."""
        return hit_share / self.pooled.hit_share if self.pooled.hit_share else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "refused": self.refused,
            "hit_share": self.hit_share,
            "infinite_cache_share": self.infinite_cache_share,
            "bound": self.bound.as_dict(),
            "round_robin": self.round_robin.as_dict(),
            "random": self.random.as_dict(),
            "pooled": self.pooled.as_dict(),
        }


# -- the replay ------------------------------------------------------------------------------------
def admit_alone(pool: BlockPool, r: PreparedRequest) -> tuple[int, int]:
    """Run ``r`` alone on ``pool`` as the mocker's scheduler would: ``(cached prompt tokens, blocks evicted)``."""
    bs = pool.block_size
    n, seq = r.prompt_tokens, r.seq_hashes
    hits = pool.match_prefix(seq, (n - 1) // bs)
    pool.acquire(hits)
    computed = n + r.output_tokens - 1  # the last sampled token is never computed
    fresh = pool.allocate(-(-computed // bs) - len(hits))
    if fresh is None:  # prepare() caps lengths at what the pool holds
        raise AssertionError(f"request {r.index} does not fit {pool.num_blocks} blocks")
    blocks = hits + fresh
    k, prompt_full = len(hits), n // bs
    if prompt_full > k:
        pool.register(
            seq[k - 1] if k else None, [(blocks[j], seq[j], r.local_hashes[j]) for j in range(k, prompt_full)]
        )
    out_full = computed // bs
    if out_full > prompt_full:
        prev = seq[prompt_full - 1] if prompt_full else None
        parent, stand_ins = prev, []
        for j in range(prompt_full, out_full):
            local = _xxh3(_pack_qq(r.index, j), _OUTPUT_SEED)
            prev = extend_sequence_hash(prev, local)
            stand_ins.append((blocks[j], prev, local))
        pool.register(parent, stand_ins)
    pool.release(blocks[::-1])
    evicted = sum(len(e.data.block_hashes) for e in pool.take_events() if isinstance(e.data, KvRemoved))
    return len(hits) * bs, evicted


def replay(
    requests: Sequence[PreparedRequest],
    placement: Placement,
    *,
    workers: int,
    num_blocks: int,
    block_size: int = 64,
    window_s: float = 5.0,
) -> ReplayResult:
    """Replay ``requests`` in order, one at a time, through ``workers`` pools of ``num_blocks`` blocks."""
    if workers <= 0 or window_s <= 0:
        raise ValueError("workers and window_s must be positive")
    pools = [BlockPool(num_blocks, block_size) for _ in range(workers)]
    last_placed = [-1] * workers
    counts = [0] * workers
    prompt_total = cached_total = evicted = 0
    windows: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        overlaps = [len(p.match_prefix(r.seq_hashes, (r.prompt_tokens - 1) // block_size)) for p in pools]
        w = placement.pick(overlaps, last_placed)
        cached, n_evicted = admit_alone(pools[w], r)
        evicted += n_evicted
        last_placed[w] = i
        counts[w] += 1
        prompt_total += r.prompt_tokens
        cached_total += cached
        win = windows.setdefault(int(r.at_s // window_s), [0, 0, 0])
        win[0] += 1
        win[1] += r.prompt_tokens
        win[2] += cached
    return ReplayResult(
        placement.name,
        len(requests),
        prompt_total,
        cached_total,
        tuple(counts),
        tuple(Window(k * window_s, *v) for k, v in sorted(windows.items())),
        evicted,
    )


def infinite_cache_share(requests: Sequence[PreparedRequest], block_size: int = 64) -> float:
    """The hit share if every prompt block ever computed stayed cached (one worker, no eviction)."""
    seen: set[int] = set()
    prompt_total = cached_total = 0
    for r in requests:
        limit = (r.prompt_tokens - 1) // block_size
        k = 0
        while k < limit and r.seq_hashes[k] in seen:
            k += 1
        seen.update(r.seq_hashes)
        prompt_total += r.prompt_tokens
        cached_total += k * block_size
    return cached_total / prompt_total if prompt_total else 0.0


def affinity_bound(
    requests: Iterable[Any],
    *,
    workers: int,
    num_blocks: int,
    block_size: int = 64,
    context_length: int = CONTEXT_LENGTH,
    window_s: float = 5.0,
    seed: int = 0,
) -> BoundResult:
    """The affinity bound of ``requests`` (``RequestSpec`` s, e.g. a ``TraceWorkload``), with its baselines.

    ``context_length`` is the model's (the tiny model's by default); the mocker
    lowers it to what ``num_blocks`` hold. ``seed`` seeds the random placement.
    """
    prepared, refused = prepare(requests, block_size=block_size, context_length=context_length, num_blocks=num_blocks)
    kw: dict[str, Any] = {"workers": workers, "num_blocks": num_blocks, "block_size": block_size, "window_s": window_s}
    return BoundResult(
        workers,
        num_blocks,
        block_size,
        refused,
        replay(prepared, AffinityPlacement(), **kw),
        replay(prepared, RoundRobinPlacement(), **kw),
        replay(prepared, RandomPlacement(seed), **kw),
        replay(prepared, AffinityPlacement(), **{**kw, "workers": 1, "num_blocks": workers * num_blocks}),
        infinite_cache_share(prepared, block_size),
    )


def format_table(result: BoundResult, measured: Sequence[tuple[str, float]] = ()) -> str:
    """A markdown table: each replay's and each ``(label, measured hit share)``'s share of the two bounds."""
    rows = [
        ("affinity bound", result.bound.hit_share),
        ("pooled cache", result.pooled.hit_share),
        ("round-robin replay", result.round_robin.hit_share),
        ("random replay", result.random.hit_share),
        ("infinite cache", result.infinite_cache_share),
        *((f"measured: {label}", share) for label, share in measured),
    ]
    lines = ["| placement | hit share | / affinity bound | / pooled cache |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {share:.1%} | {result.share_of_bound(share):.2f} | {result.share_of_pooled(share):.2f} |"
        for name, share in rows
    ]
    return "\n".join(lines)
