"""``--engine sglang``: the SGLang adapter (import-guarded: this package imports without ``sglang``).

``--engine-args`` are ``sglang serve`` flags (SGLang's own ``ServerArgs`` parser),
e.g. ``--engine-args "--page-size 16 --mem-fraction-static 0.8 --tp-size 2"``;
the worker's model folder is passed as ``--model-path``. A flag SGLang refuses is
one line and exit 1 before the worker registers anywhere. See docs/engines/sglang.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import tempfile
import uuid
from typing import Any

from commutator.engines.model_info import ModelInfo
from commutator.engines.registry import EngineError, EngineSpec, require_module
from commutator.engines.sglang.api import RealSglangApi, SglangApi
from commutator.engines.sglang.disagg import SglangRendezvous, new_bootstrap_room
from commutator.engines.sglang.engine import SglangEngine

__all__ = ["SglangEngine", "SglangRendezvous", "build_engine", "make_engine", "new_bootstrap_room"]

INSTALL = "pip install 'sglang[all]' (on a machine with an NVIDIA GPU)"


def make_engine(spec: EngineSpec) -> SglangEngine:
    """The registry's factory: the installed ``sglang`` package, or :class:`EngineError` naming what to install."""
    return build_engine(spec)


def build_engine(spec: EngineSpec, api: SglangApi | None = None, *, stats_interval_s: float = 1.0) -> SglangEngine:
    """An SGLang adapter for ``spec`` (not started); ``api`` defaults to the real package."""
    if api is None:
        require_module("sglang", "sglang", INSTALL)
        api = RealSglangApi()
    argv = ["--model-path", str(spec.model_path), *spec.engine_args]
    server_args = _parse(api, argv, spec.engine_args)
    if not getattr(server_args, "kv_events_config", None):
        dp = int(getattr(server_args, "dp_size", 1) or 1)
        config = {"publisher": "zmq", "endpoint": _default_kv_endpoint(dp), "topic": ""}
        server_args = _parse(api, [*argv, "--kv-events-config", json.dumps(config)], spec.engine_args)
    try:
        info = ModelInfo.load(spec.model_path)
    except (OSError, ValueError):
        info = ModelInfo()
    return SglangEngine(api, server_args, model_info=info, clock=spec.clock, stats_interval_s=stats_interval_s)


def _parse(api: SglangApi, argv: list[str], engine_args: tuple[str, ...]) -> Any:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return api.parse_server_args(argv)
    except SystemExit:
        lines = [ln for ln in errors.getvalue().strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else "bad arguments"
        raise EngineError(f"SGLang refused --engine-args {' '.join(engine_args)!r}: {why}") from None
    except Exception as exc:  # ServerArgs checks raise ValueError, AssertionError, RuntimeError...
        first = (str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise EngineError(f"SGLang refused --engine-args {' '.join(engine_args)!r}: {first}") from None


def _default_kv_endpoint(dp_size: int) -> str:
    """An ipc socket nobody else can reach (one rank), or a free TCP port (SGLang offsets it per rank)."""
    if dp_size <= 1:
        path = os.path.join(tempfile.gettempdir(), f"commutator-sglang-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return f"ipc://{path}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://*:{port}"
