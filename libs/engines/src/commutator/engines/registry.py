"""Engines by name: ``--engine mocker|hf|vllm|sglang|trtllm`` (the pattern of ``router/policies.py``).

Each entry names a module and a factory, imported only when chosen, so an engine
whose package is not installed costs nothing until someone asks for it and then
fails with one clear line (:class:`EngineError`). A factory checks what it can
before anything heavy runs: the engine package is importable, the engine's own
parser accepts ``engine_args``, the model folder is usable. It returns an engine
that is not started yet (``Engine.start`` loads it).
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from commutator.common.clock import Clock
from commutator.common.errors import StartupError
from commutator.engines.base import Engine
from commutator.engines.mocker.config import MockerConfig

__all__ = ["ENGINES", "EngineError", "EngineSpec", "make_engine", "require_module", "split_engine_args"]


class EngineError(StartupError):
    """An engine cannot be built or started: not installed, arguments refused, model unusable.

    The message is one line a user can act on; the worker prints it and exits 1
    before it registers anywhere.
    """


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What a factory gets: the model, the engine's own arguments, and the mocker's settings."""

    model_path: Path
    model_name: str
    engine_args: tuple[str, ...] = ()
    """Tokens for the engine's own argument parser (``--engine-args``, split like a shell would)."""
    mocker: MockerConfig = field(default_factory=MockerConfig)
    clock: Clock | None = None
    role: str = "decode"
    """``decode`` or ``prefill``: a prefill engine keeps a finished prompt's blocks until its worker
    has moved them (``release_prefill``) where the engine supports it."""


Factory = Callable[[EngineSpec], Engine]

ENGINES: dict[str, str] = {
    "mocker": "commutator.engines.mocker.factory:make_engine",
    "hf": "commutator.engines.hf:make_engine",
    "vllm": "commutator.engines.vllm:make_engine",
    "sglang": "commutator.engines.sglang:make_engine",
    "trtllm": "commutator.engines.trtllm:make_engine",
}
"""name -> ``module:factory``."""


def split_engine_args(text: str) -> tuple[str, ...]:
    """``--engine-args`` as argument tokens (shell quoting rules)."""
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise EngineError(f"--engine-args {text!r}: {exc}") from None


def make_engine(name: str, spec: EngineSpec) -> Engine:
    """The engine ``name`` for ``spec`` (not started); :class:`EngineError` if it cannot be built."""
    target = ENGINES.get(name)
    if target is None:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module_name, _, factory_name = target.partition(":")
    module = importlib.import_module(module_name)
    factory: Factory = getattr(module, factory_name)
    return factory(spec)


def require_module(module: str, engine: str, install: str) -> None:
    """:class:`EngineError` naming what to install when ``module`` cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(
            f"the {engine} engine needs the {module!r} package ({exc}); install it with: {install}"
        ) from None
