"""Predicted vs found cache hits per worker: is the index's promise kept? (pure, no I/O).

For each request it routes, the router predicts how many of the prompt's blocks the chosen worker
holds (its overlap there, at most all but the last block: an engine always computes a prompt's last
token, so it never reports that block as cached; ``RouteResult.predicted_hit_blocks``). The worker's
first response says how many prompt tokens it found cached. Each difference goes to a histogram
(the shell's); this module watches each worker rank's last requests for a *persistent*
shortfall: an engine whose prefix caching is off, whose block hashes differ from the router's (block
size, hash seed, LoRA or salt handling), or whose KV events stopped arriving. KV routing to such a
worker silently falls back to load balancing, which no error shows.

:class:`HitTracker` keeps, per worker rank, the predicted and found blocks of its last ``window``
requests that had a predicted hit (requests predicted to miss cannot show a missing hit), found
blocks capped at the prediction (surprise hits do not hide misses). When the window is full and the
found share is below ``min_share``, :meth:`HitTracker.observe` returns a :class:`Divergence` for the
shell to log, at most once every ``interval_s`` per worker rank. Time is passed in. Memory: two
lists of ``window`` ints per worker rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from commutator.router.indexer import WorkerKey

__all__ = ["Divergence", "HitTracker"]

WINDOW = 32
"""Requests with a predicted hit per worker rank that a divergence is judged on."""
MIN_SHARE = 0.5
"""A worker rank diverges when it finds less than this share of the blocks predicted cached."""
INTERVAL_S = 60.0
"""At most one divergence report per worker rank this often."""


@dataclass(frozen=True, slots=True)
class Divergence:
    """Over its last ``requests`` requests with a predicted hit, ``key`` found ``found_blocks`` of the
    ``predicted_blocks`` the router predicted cached."""

    key: WorkerKey
    requests: int
    predicted_blocks: int
    found_blocks: int

    @property
    def share(self) -> float:
        return self.found_blocks / self.predicted_blocks if self.predicted_blocks else 1.0


class _Window:
    __slots__ = ("found", "found_sum", "n", "pos", "predicted", "predicted_sum", "quiet_until")

    def __init__(self, size: int) -> None:
        self.predicted = [0] * size
        self.found = [0] * size
        self.predicted_sum = 0
        self.found_sum = 0
        self.pos = 0
        self.n = 0
        self.quiet_until = 0.0


class HitTracker:
    def __init__(self, window: int = WINDOW, min_share: float = MIN_SHARE, interval_s: float = INTERVAL_S) -> None:
        if window < 1:
            raise ValueError("the hit window must hold at least one request")
        self.window = window
        self.min_share = min_share
        self.interval_s = interval_s
        self._windows: dict[WorkerKey, _Window] = {}

    def observe(self, key: WorkerKey, predicted: int, found: int, now: float) -> Divergence | None:
        """One request of ``key``: ``predicted`` blocks predicted cached, ``found`` found cached.
        Returns a divergence to report, or ``None``."""
        if predicted <= 0:
            return None
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(self.window)
        if found > predicted:
            found = predicted
        elif found < 0:
            found = 0
        i = w.pos
        w.predicted_sum += predicted - w.predicted[i]
        w.found_sum += found - w.found[i]
        w.predicted[i] = predicted
        w.found[i] = found
        w.pos = i + 1 if i + 1 < self.window else 0
        if w.n < self.window:
            w.n += 1
            if w.n < self.window:
                return None
        if w.found_sum >= self.min_share * w.predicted_sum or now < w.quiet_until:
            return None
        w.quiet_until = now + self.interval_s
        return Divergence(key, w.n, w.predicted_sum, w.found_sum)

    def forget(self, worker_id: int) -> None:
        """A worker left: drop its ranks' windows."""
        for key in [k for k in self._windows if k[0] == worker_id]:
            del self._windows[key]

    def share(self, key: WorkerKey) -> float | None:
        """Found / predicted blocks over ``key``'s current window (``None``: nothing predicted yet)."""
        w = self._windows.get(key)
        return w.found_sum / w.predicted_sum if w is not None and w.predicted_sum else None
