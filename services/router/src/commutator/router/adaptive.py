"""Adaptive kv routing: the overlap weight, decode weight and temperature tuned from what happens
(pure, no I/O).

``--router-adaptive`` (off by default; kv mode only). The kv cost (DESIGN.md 4.4) weighs a cached
prompt block against a block of load with ``overlap_weight`` (and the load with ``decode_weight``,
``--decode-weight``); which weights serve a workload best
depends on how much of it repeats, how full the caches are and how far the index can be trusted,
none of which the router knows beforehand. :class:`AdaptiveTuner` learns it online:

- **Arms.** Each (overlap weight, decode weight, temperature) of ``--adaptive-weights`` x
  ``--adaptive-decode-weights`` x ``--adaptive-temperatures`` is an arm. Every request is routed
  with one arm: the best one so far, or, with probability ``--adaptive-explore``, one drawn
  uniformly (so that every arm keeps being measured as the workload changes).
- **Outcome.** The router times each request from its routing decision to its first token (TTFT
  as the router sees it: queueing and prefill on the worker, the network both ways). An arm's score
  is the exponentially weighted mean of its requests' TTFT (``--adaptive-half-life`` requests).
  Requests are assigned to arms at random, so every arm sees the same mix of prompt lengths on
  average and the means compare like with like.
- **Choice.** Every ``_DECIDE_EVERY`` observations the arm with the lowest score among those with
  ``_MIN_SAMPLES`` observations becomes the best one; a change is logged with every arm's score.
- **Trust in the index.** Per request the router predicts the chosen worker's cached blocks (the
  index's overlap, at most all but the last block, which an engine always computes) and the worker
  reports what it really found cached. The weighted ratio actual / predicted (``accuracy``) scales
  the weight actually used: an overlap that only materialises 70% of the time is worth 70% of a
  block. The ratio is clamped to ``[_MIN_TRUST, 1]``.

Everything is bounded: the weights and temperatures used are the configured ones (the overlap weight
times a trust factor of at most 1), and nothing grows with the number of requests.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AdaptiveTuner", "Arm"]

log = logging.getLogger(__name__)

_DECIDE_EVERY = 50
_MIN_SAMPLES = 20
_MIN_TRUST = 0.25


@dataclass(slots=True)
class Arm:
    """One (overlap weight, decode weight, temperature) setting and what its requests saw."""

    weight: float
    temperature: float
    decode_weight: float = 1.0
    score_ms: float = 0.0  # exponentially weighted mean TTFT
    samples: int = 0

    def label(self) -> str:
        return f"w={self.weight:g},dw={self.decode_weight:g},T={self.temperature:g}"


class AdaptiveTuner:
    def __init__(
        self,
        weights: Sequence[float],
        temperatures: Sequence[float] = (0.0,),
        *,
        decode_weights: Sequence[float] = (1.0,),
        explore: float = 0.1,
        half_life: float = 200.0,
        start: tuple[float, float, float] = (1.0, 0.0, 1.0),
        rng: random.Random | None = None,
    ) -> None:
        """``start``: the (overlap weight, temperature, decode weight) it starts from, as the arm closest
        to it (the fixed ``--overlap-weight``, ``--router-temperature`` and ``--decode-weight``)."""
        if not weights or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError("adaptive weights must be finite and >= 0, at least one")
        if not temperatures or any(t < 0 or not math.isfinite(t) for t in temperatures):
            raise ValueError("adaptive temperatures must be finite and >= 0, at least one")
        if not decode_weights or any(d < 0 or not math.isfinite(d) for d in decode_weights):
            raise ValueError("adaptive decode weights must be finite and >= 0, at least one")
        if not 0 <= explore <= 1:
            raise ValueError("adaptive exploration must be in [0, 1]")
        if half_life <= 0:
            raise ValueError("adaptive half-life must be > 0")
        self.arms = [Arm(float(w), float(t), float(d)) for w in weights for d in decode_weights for t in temperatures]
        self.explore = explore
        self._alpha = 1.0 - 0.5 ** (1.0 / half_life)
        self._rng = rng or random.Random()
        self.best = min(
            range(len(self.arms)),
            key=lambda i: (
                abs(self.arms[i].weight - start[0]),
                abs(self.arms[i].decode_weight - start[2]),
                abs(self.arms[i].temperature - start[1]),
                i,
            ),
        )
        self._since_decision = 0
        self._predicted = 0.0  # exponentially weighted sums of predicted and actually cached blocks
        self._actual = 0.0
        self.changes = 0

    @property
    def accuracy(self) -> float:
        """Cached blocks the workers found per block the index predicted (1 before any prediction)."""
        return self._actual / self._predicted if self._predicted > 0 else 1.0

    @property
    def trust(self) -> float:
        return min(1.0, max(_MIN_TRUST, self.accuracy))

    def pick(self) -> int:
        """The arm for the next request."""
        if len(self.arms) > 1 and self._rng.random() < self.explore:
            return self._rng.randrange(len(self.arms))
        return self.best

    def params(self, arm: int) -> tuple[float, float, float]:
        """(overlap weight, temperature, decode weight) to route with under ``arm``: its overlap weight
        scaled by the trust."""
        a = self.arms[arm]
        return a.weight * self.trust, a.temperature, a.decode_weight

    def observe(self, arm: int, ttft_s: float, predicted_blocks: int, cached_blocks: int) -> None:
        """A request routed under ``arm`` got its first token ``ttft_s`` after routing; the index had
        predicted ``predicted_blocks`` cached on its worker, which found ``cached_blocks``."""
        if not math.isfinite(ttft_s) or ttft_s < 0 or not 0 <= arm < len(self.arms):
            return
        a = self.arms[arm]
        ms = ttft_s * 1000.0
        a.score_ms = ms if a.samples == 0 else a.score_ms + self._alpha * (ms - a.score_ms)
        a.samples += 1
        if predicted_blocks > 0 or cached_blocks > 0:
            keep = 1.0 - self._alpha
            self._predicted = self._predicted * keep + predicted_blocks
            self._actual = self._actual * keep + min(cached_blocks, predicted_blocks)
        self._since_decision += 1
        if self._since_decision >= _DECIDE_EVERY:
            self._since_decision = 0
            self._decide()

    def _decide(self) -> None:
        ready = [i for i, a in enumerate(self.arms) if a.samples >= _MIN_SAMPLES]
        if not ready:
            return
        best = min(ready, key=lambda i: self.arms[i].score_ms)
        cur = self.arms[self.best]
        if best != self.best and (cur.samples < _MIN_SAMPLES or self.arms[best].score_ms < cur.score_ms):
            log.info(
                "adaptive routing: %s -> %s (mean TTFT ms by arm: %s; index accuracy %.2f)",
                self.arms[self.best].label(),
                self.arms[best].label(),
                ", ".join(f"{a.label()} {a.score_ms:.1f} ({a.samples})" for a in self.arms),
                self.accuracy,
            )
            self.best = best
            self.changes += 1
