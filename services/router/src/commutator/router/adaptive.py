"""Adaptive kv routing: the overlap weight, decode weight and temperature tuned from what happens
(pure, no I/O).

``--router-adaptive`` (off by default; kv mode only). The kv cost (DESIGN.md 4.4) weighs a cached
prompt block against a block of load with ``overlap_weight`` (and the load with ``decode_weight``,
``--decode-weight``); which weights serve a workload best depends on how much of it repeats, how
full the caches are and how far the index can be trusted, none of which the router knows
beforehand. :class:`AdaptiveTuner` learns it online:

- **Arms.** Each (overlap weight, decode weight, temperature) of ``--adaptive-weights`` x
  ``--adaptive-decode-weights`` x ``--adaptive-temperatures`` is an arm.
- **Only contested requests teach.** For every request the kv policy works out the worker each arm
  would pick (one shared random draw for ties and sampling, so arms that rank the workers alike pick
  alike). Where all arms pick the same worker (most requests) the choice of arm cannot matter: the
  request goes there under the best arm and is not an observation. Where they differ (a *contested*
  request) :meth:`AdaptiveTuner.select` picks the arm: Thompson sampling on the arms' mean TTFT over
  contested requests (each arm's mean drawn from a normal around it, as wide as its uncertainty;
  the lowest draw routes), with ``--adaptive-explore`` of them drawn uniformly so that no arm stops
  being measured as the workload changes. Every arm is thus measured on the same kind of request,
  and the exploration costs nothing on the requests where it could not change anything.
- **Outcome.** The router times each request from its routing decision to its first token (TTFT
  as the router sees it: queueing and prefill on the worker, the network both ways). An arm's score
  is the exponentially weighted mean (and variance) of its contested requests' TTFT
  (``--adaptive-half-life`` requests).
- **Choice.** Every ``_DECIDE_EVERY`` contested observations the arm with the lowest mean among
  those with ``_MIN_SAMPLES`` observations becomes the best one: the arm every uncontested request,
  and every decision that is not observed (the Route RPC), is routed with. A change is logged with
  every arm's score.
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

_DECIDE_EVERY = 20
_MIN_SAMPLES = 10
_MIN_TRUST = 0.25


@dataclass(slots=True)
class Arm:
    """One (overlap weight, decode weight, temperature) setting and what its contested requests saw."""

    weight: float
    temperature: float
    decode_weight: float = 1.0
    score_ms: float = 0.0  # exponentially weighted mean TTFT
    var_ms2: float = 0.0  # exponentially weighted variance of TTFT
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
        self._max_n = (2.0 - self._alpha) / self._alpha  # the effective sample count of the weighted mean
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
        self.contested = 0  # requests on which the arms disagreed
        self.decisions = 0  # requests routed through select()

    @property
    def accuracy(self) -> float:
        """Cached blocks the workers found per block the index predicted (1 before any prediction)."""
        return self._actual / self._predicted if self._predicted > 0 else 1.0

    @property
    def trust(self) -> float:
        return min(1.0, max(_MIN_TRUST, self.accuracy))

    def params(self, arm: int) -> tuple[float, float, float]:
        """(overlap weight, temperature, decode weight) to route with under ``arm``: its overlap weight
        scaled by the trust."""
        a = self.arms[arm]
        return a.weight * self.trust, a.temperature, a.decode_weight

    def settings(self) -> list[tuple[float, float, float]]:
        """:meth:`params` of every arm, in arm order."""
        trust = self.trust
        return [(a.weight * trust, a.temperature, a.decode_weight) for a in self.arms]

    def select(self, picks: Sequence[int]) -> int:
        """The arm to route a request with, given the candidate each arm would pick (``picks``, in arm
        order): the best arm where they all agree, else (a contested request) a Thompson draw, or
        with probability ``explore`` an arm drawn uniformly."""
        self.decisions += 1
        first = picks[self.best]
        if all(p == first for p in picks):
            return self.best
        self.contested += 1
        rng = self._rng
        if rng.random() < self.explore:
            return rng.randrange(len(self.arms))
        unmeasured = [i for i, a in enumerate(self.arms) if a.samples < 2]
        if unmeasured:
            return rng.choice(unmeasured)
        max_n = self._max_n
        draws = [a.score_ms + rng.gauss(0.0, 1.0) * math.sqrt(a.var_ms2 / min(a.samples, max_n)) for a in self.arms]
        return min(range(len(draws)), key=draws.__getitem__)

    def observe(
        self, arm: int, ttft_s: float, predicted_blocks: int, cached_blocks: int, contested: bool = True
    ) -> None:
        """A request routed under ``arm`` got its first token ``ttft_s`` after routing; the index had
        predicted ``predicted_blocks`` cached on its worker, which found ``cached_blocks``. Only a
        ``contested`` request (the arms disagreed) counts towards the arm's score."""
        if not math.isfinite(ttft_s) or ttft_s < 0 or not 0 <= arm < len(self.arms):
            return
        if predicted_blocks > 0 or cached_blocks > 0:
            keep = 1.0 - self._alpha
            self._predicted = self._predicted * keep + predicted_blocks
            self._actual = self._actual * keep + min(cached_blocks, predicted_blocks)
        if not contested:
            return
        a = self.arms[arm]
        ms = ttft_s * 1000.0
        if a.samples == 0:
            a.score_ms, a.var_ms2 = ms, 0.0
        elif a.samples == 1:
            a.var_ms2 = (ms - a.score_ms) ** 2 / 2.0
            a.score_ms = (a.score_ms + ms) / 2.0
        else:
            # Exponentially weighted mean and variance (West's incremental form).
            diff = ms - a.score_ms
            step = self._alpha * diff
            a.score_ms += step
            a.var_ms2 = (1.0 - self._alpha) * (a.var_ms2 + diff * step)
        a.samples += 1
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
                "adaptive routing: %s -> %s (mean TTFT ms of contested requests by arm: %s; "
                "%d of %d requests contested; index accuracy %.2f)",
                self.arms[self.best].label(),
                self.arms[best].label(),
                ", ".join(f"{a.label()} {a.score_ms:.1f} ({a.samples})" for a in self.arms),
                self.contested,
                self.decisions,
                self.accuracy,
            )
            self.best = best
            self.changes += 1
