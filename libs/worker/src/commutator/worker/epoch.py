"""The engine epoch: which incarnation of a worker's engine a KV event, a stat or a dump belongs to.

An engine can restart inside a worker that stays registered (same worker id): its cache is then
empty and its event ids start again from 0. Routers cannot tell that from the ids alone (a restart
whose first events were lost looks like any gap; one whose ids catch up with the old ones looks
like nothing), so every KV event, load statistic and cache-state dump carries the epoch of the
engine that produced it (docs/kv-events.md). A router that sees a newer epoch than it knows for a
worker drops that worker's index entries whatever the event id; an older one is late news from a
dead engine and is dropped.

The epoch is the wall-clock time in nanoseconds at which the engine (re)started, and strictly
greater than the worker's previous one (a clock stepped back cannot reuse or reorder epochs within
a worker). Across worker processes nothing needs ordering: a new process has a new worker id.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["next_epoch"]


def next_epoch(previous: int = 0, now_ns: Callable[[], int] = time.time_ns) -> int:
    """A fresh epoch for an engine (re)start: the time now in nanoseconds, and more than ``previous``."""
    return max(now_ns(), previous + 1)
