"""Token ids against a vocabulary, in C loops (a prompt has thousands of ids).

Used by the frontend on every prompt and by the mocker on every request it admits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from commutator.common.prompt import TokenArray

__all__ = ["first_outside", "positions_at_most"]


def first_outside(tokens: Sequence[int], vocab_size: int) -> int | None:
    """The first id of ``tokens`` outside [0, ``vocab_size``), or ``None`` when every id is inside.

    An ``array('I')`` is scanned by numpy over a copy of its buffer (3 µs for 12,000 ids, where
    ``max()`` boxes every id: 0.5 ms), so the array stays free to grow; anything else by ``min``/``max``.
    """
    if not tokens:
        return None
    if isinstance(tokens, TokenArray) and tokens.typecode == "I":
        view = np.frombuffer(tokens.tobytes(), dtype=np.uint32)
        over = view >= vocab_size
        return int(view[int(over.argmax())]) if over.any() else None
    if min(tokens) >= 0 and max(tokens) < vocab_size:
        return None
    return next(t for t in tokens if not 0 <= t < vocab_size)


def positions_at_most(tokens: TokenArray, bound: int) -> list[int]:
    """The indexes of the ids of ``tokens`` (an ``array('I')``) that are at most ``bound``, in order."""
    view = np.frombuffer(tokens.tobytes(), dtype=np.uint32)
    return np.flatnonzero(view <= bound).tolist()  # type: ignore[no-any-return]
