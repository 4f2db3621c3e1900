"""Routing modes as plugins behind one protocol (pure).

A policy picks one candidate for a request, or ``None``. Candidates have
already been filtered (model, busy thresholds) by the router. Adding a mode
is one class here and one line in :data:`POLICIES`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from commutator.router.indexer import WorkerKey
from commutator.router.load import ActiveLoad

__all__ = [
    "POLICIES",
    "ArmSelector",
    "DirectPolicy",
    "KvPolicy",
    "LeastLoadedPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouteContext",
    "RoutingPolicy",
    "kv_cost",
    "kv_picks",
    "kv_terms",
    "make_policy",
    "softmax_pick",
    "weigh",
]


@dataclass(slots=True)
class RouteContext:
    """What a policy may look at for one request."""

    isl: int
    block_size: int
    load: ActiveLoad
    overlaps: dict[WorkerKey, int] = field(default_factory=dict)
    """Cached leading blocks per worker (kv mode only)."""
    active_overlaps: dict[WorkerKey, int] = field(default_factory=dict)
    """Leading prompt blocks already active per worker (kv mode only)."""
    requested: WorkerKey | None = None
    """The worker the caller asked for (direct mode)."""
    costs: list[float] | None = None
    """Filled by the kv policy: the cost of each candidate, in candidate order."""
    arm: int | None = None
    """Filled by an adaptive kv policy: the arm the request was routed with."""
    contested: bool = False
    """Filled by an adaptive kv policy: whether its arms would have picked different workers."""


class ArmSelector(Protocol):
    """What an adaptive kv policy asks (:class:`commutator.router.adaptive.AdaptiveTuner`)."""

    def settings(self) -> list[tuple[float, float, float]]: ...

    def select(self, picks: Sequence[int]) -> int: ...


class RoutingPolicy(Protocol):
    name: str
    needs_overlap: bool

    def choose(self, ctx: RouteContext, candidates: Sequence[WorkerKey]) -> WorkerKey | None: ...


def kv_terms(ctx: RouteContext, candidates: Sequence[WorkerKey]) -> tuple[list[float], list[int], list[int]]:
    """DESIGN.md 4.4's terms per candidate, before weighting: the prompt blocks it would compute with
    nothing cached (its pending prefill plus this request's), its cached leading blocks, and its decode
    blocks (its active blocks plus this request's not already among them)."""
    bs = ctx.block_size
    raw_prefill = ctx.isl / bs
    request_blocks = -(-ctx.isl // bs)
    prefill_tokens = ctx.load.prefill_tokens.get
    active_blocks = ctx.load.active_blocks.get
    active_overlap = ctx.active_overlaps.get
    overlap = ctx.overlaps.get
    return (
        [prefill_tokens(c, 0) / bs + raw_prefill for c in candidates],
        [overlap(c, 0) for c in candidates],
        [active_blocks(c, 0) + request_blocks - active_overlap(c, 0) for c in candidates],
    )


def weigh(terms: tuple[list[float], list[int], list[int]], overlap_weight: float, decode_weight: float) -> list[float]:
    """The cost of each candidate from its :func:`kv_terms`: ``max(0, prefill - overlap_weight * cached)
    + decode_weight * decode`` (``decode_weight`` is 1 in DESIGN.md; ``--decode-weight``)."""
    w, dw = overlap_weight, decode_weight
    return [(p if (p := b - w * o) > 0 else 0.0) + dw * d for b, o, d in zip(*terms, strict=True)]


def kv_cost(ctx: RouteContext, worker: WorkerKey, overlap_weight: float, decode_weight: float = 1.0) -> float:
    """DESIGN.md 4.4's cost of one worker (see :func:`kv_terms` and :func:`weigh`)."""
    return weigh(kv_terms(ctx, [worker]), overlap_weight, decode_weight)[0]


def kv_picks(
    ctx: RouteContext, candidates: Sequence[WorkerKey], settings: Sequence[tuple[float, float, float]], u: float
) -> tuple[list[int], list[list[float]]]:
    """The candidate (index) each (overlap weight, temperature, decode weight) setting picks, and the
    costs it saw, all drawing on one uniform number ``u`` in [0, 1) (ties, and sampling at T > 0), so
    that settings that rank the candidates alike pick alike."""
    terms = kv_terms(ctx, candidates)
    picks: list[int] = []
    all_costs: list[list[float]] = []
    for weight, temperature, dw in settings:
        costs = weigh(terms, weight, dw)
        all_costs.append(costs)
        lo = min(costs)
        hi = max(costs)
        if temperature <= 0 or hi == lo:
            best = [i for i, c in enumerate(costs) if c == lo]  # all of them when every cost is equal
            picks.append(best[int(u * len(best))])
            continue
        scale = (hi - lo) * temperature
        weights = [math.exp(-(c - lo) / scale) for c in costs]
        target = u * sum(weights)
        acc = 0.0
        pick = len(weights) - 1
        for i, w in enumerate(weights):
            acc += w
            if target < acc:
                pick = i
                break
        picks.append(pick)
    return picks, all_costs


def softmax_pick(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index chosen with probability proportional to ``exp(-(c - min) / ((max - min) * T))``;
    ``T == 0``: the lowest cost, ties broken uniformly."""
    lo = min(costs)
    if temperature <= 0:
        best = [i for i, c in enumerate(costs) if c == lo]
        return best[0] if len(best) == 1 else rng.choice(best)
    hi = max(costs)
    if hi == lo:
        return rng.randrange(len(costs))
    scale = (hi - lo) * temperature
    weights = [math.exp(-(c - lo) / scale) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


class KvPolicy:
    name = "kv"
    needs_overlap = True

    def __init__(
        self,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        rng: random.Random | None = None,
        decode_weight: float = 1.0,
    ) -> None:
        if not (math.isfinite(decode_weight) and decode_weight >= 0):
            raise ValueError(f"--decode-weight must be a finite number >= 0, got {decode_weight}")
        self.overlap_weight = overlap_weight
        self.decode_weight = decode_weight
        self.temperature = temperature
        self.rng = rng or random.Random()
        self.tuner: ArmSelector | None = None
        """Adaptive routing: while set, :meth:`choose` routes through the tuner's arms."""

    def choose(self, ctx: RouteContext, candidates: Sequence[WorkerKey]) -> WorkerKey | None:
        if not candidates:
            return None
        if self.tuner is not None:
            picks, arm_costs = kv_picks(ctx, candidates, self.tuner.settings(), self.rng.random())
            arm = self.tuner.select(picks)
            ctx.arm = arm
            ctx.contested = any(p != picks[0] for p in picks)
            ctx.costs = arm_costs[arm]
            return candidates[picks[arm]]
        costs = weigh(kv_terms(ctx, candidates), self.overlap_weight, self.decode_weight)
        ctx.costs = costs
        return candidates[softmax_pick(costs, self.temperature, self.rng)]


class RoundRobinPolicy:
    name = "round-robin"
    needs_overlap = False

    def __init__(self, **_: object) -> None:
        self._next = itertools.count()

    def choose(self, ctx: RouteContext, candidates: Sequence[WorkerKey]) -> WorkerKey | None:
        if not candidates:
            return None
        return sorted(candidates)[next(self._next) % len(candidates)]


class RandomPolicy:
    name = "random"
    needs_overlap = False

    def __init__(self, rng: random.Random | None = None, **_: object) -> None:
        self.rng = rng or random.Random()

    def choose(self, ctx: RouteContext, candidates: Sequence[WorkerKey]) -> WorkerKey | None:
        return self.rng.choice(candidates) if candidates else None


class LeastLoadedPolicy:
    """Fewest active blocks (then fewest active requests); ties uniformly at random."""

    name = "least-loaded"
    needs_overlap = False

    def __init__(self, rng: random.Random | None = None, **_: object) -> None:
        self.rng = rng or random.Random()

    def choose(self, ctx: RouteContext, candidates: Sequence[WorkerKey]) -> WorkerKey | None:
        if not candidates:
            return None
        load = ctx.load
        keys = [(load.active_blocks.get(c, 0), load.active_requests.get(c, 0)) for c in candidates]
        lo = min(keys)
        best = [c for c, k in zip(candidates, keys, strict=True) if k == lo]
        return best[0] if len(best) == 1 else self.rng.choice(best)


class DirectPolicy:
    """The caller names the worker; ``None`` if it is not among the candidates."""

    name = "direct"
    needs_overlap = False

    def __init__(self, **_: object) -> None:
        pass

    def choose(self, ctx: RouteContext, candidates: Sequence[WorkerKey]) -> WorkerKey | None:
        if ctx.requested is None:
            return None
        if ctx.requested in candidates:
            return ctx.requested
        # A worker id without a dp rank: any rank of that worker.
        ranks = [c for c in candidates if c[0] == ctx.requested[0]]
        return ranks[0] if ranks else None


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "kv": KvPolicy,
    "round-robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "least-loaded": LeastLoadedPolicy,
    "direct": DirectPolicy,
}


def make_policy(
    name: str,
    *,
    overlap_weight: float = 1.0,
    temperature: float = 0.0,
    rng: random.Random | None = None,
    decode_weight: float = 1.0,
) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown router mode {name!r}; choose one of {sorted(POLICIES)}")
    if name == "kv":
        return KvPolicy(overlap_weight=overlap_weight, temperature=temperature, rng=rng, decode_weight=decode_weight)
    return POLICIES[name](rng=rng)
