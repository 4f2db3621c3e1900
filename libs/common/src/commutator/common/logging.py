"""Logging set-up from ``COMMUTATOR_LOG``.

``COMMUTATOR_LOG`` is a comma-separated list: a default level, then optional
``logger=level`` overrides, e.g. ``info`` or ``debug,commutator.router=trace``.
Levels: trace, debug, info, warning, error, critical. ``COMMUTATOR_LOG_FORMAT``
is ``text`` (default) or ``json`` (one object per line).

Structured fields ride along as ``extra=fields(key=value, ...)`` and are
printed as ``key=value`` (text) or as object members (json).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["TRACE", "LogSpecError", "Throttle", "fields", "parse_spec", "setup_logging"]

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class LogSpecError(ValueError):
    """``COMMUTATOR_LOG`` could not be read."""


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` argument carrying structured fields for one log line."""
    return {"commutator_fields": values}


class Throttle:
    """At most one log line per ``interval_s`` for a repeating event (a flood of bad messages
    must not flood the log). :meth:`allow` returns ``None`` to stay quiet, or how many
    occurrences were held back since the last line."""

    __slots__ = ("_held", "_interval", "_next")

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._next = 0.0
        self._held = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self._interval
        held, self._held = self._held, 0
        return held


def parse_spec(spec: str) -> tuple[int, dict[str, int]]:
    """``"debug,commutator.router=trace"`` → ``(DEBUG, {"commutator.router": TRACE})``."""
    default = logging.INFO
    overrides: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, level = part.rpartition("=")
        level_no = _LEVELS.get(level.strip().lower())
        if level_no is None:
            raise LogSpecError(f"unknown log level {level!r} in COMMUTATOR_LOG={spec!r}; use one of {sorted(_LEVELS)}")
        if sep:
            overrides[name.strip()] = level_no
        else:
            default = level_no
    return default, overrides


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname:<5} {record.name}: {record.getMessage()}"
        extra: Mapping[str, Any] | None = getattr(record, "commutator_fields", None)
        if extra:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "commutator_fields", None)
        if extra:
            obj.update(
                {k: v if isinstance(v, int | float | bool | str) or v is None else str(v) for k, v in extra.items()}
            )
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup_logging(spec: str | None = None, fmt: str | None = None, stream: Any = None) -> None:
    """Configure the root logger from ``spec`` (default: ``$COMMUTATOR_LOG`` or ``info``).

    Safe to call more than once (the embedded mode starts several roles in one
    process): the last call wins.
    """
    spec = spec if spec is not None else os.environ.get("COMMUTATOR_LOG", "info")
    fmt = (fmt or os.environ.get("COMMUTATOR_LOG_FORMAT", "text")).lower()
    if fmt not in ("text", "json"):
        raise LogSpecError(f"COMMUTATOR_LOG_FORMAT must be text or json, not {fmt!r}")
    default, overrides = parse_spec(spec)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_commutator", False):
            root.removeHandler(h)
    handler._commutator = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(default)
    for name, level in overrides.items():
        logging.getLogger(name).setLevel(level)
    # Chatty libraries stay at warning unless named explicitly.
    for noisy in ("grpc", "nats", "aiohttp.access", "asyncio"):
        if noisy not in overrides:
            logging.getLogger(noisy).setLevel(max(default, logging.WARNING))
