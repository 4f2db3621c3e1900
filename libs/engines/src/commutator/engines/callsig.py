"""Which keyword arguments an engine's entry point takes (engine versions add and rename them)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["Keywords"]


class Keywords:
    """The keyword parameters of a callable; a ``**kwargs`` one (or an unreadable signature) accepts any name."""

    __slots__ = ("_any", "_names")

    def __init__(self, fn: Callable[..., Any] | None = None) -> None:
        self._names: frozenset[str] = frozenset()
        self._any = False
        if fn is None:
            return
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            self._any = True
            return
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self._names = frozenset(p.name for p in params if p.kind in kinds)
        self._any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def __contains__(self, name: object) -> bool:
        return self._any or name in self._names
