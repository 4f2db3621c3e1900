"""``--engine mocker``: the mocker's settings are the worker's own flags (``--num-blocks`` ...);
``--engine-args`` may carry the same flags, which then override them."""

from __future__ import annotations

import contextlib
import dataclasses
import io

from commutator.common import config as cfg
from commutator.engines.base import Engine
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.engine import MockerEngine
from commutator.engines.registry import EngineError, EngineSpec

__all__ = ["make_engine"]


def make_engine(spec: EngineSpec) -> Engine:
    mocker = spec.mocker
    if spec.engine_args:
        args = list(spec.engine_args)
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                given = vars(cfg.parser(MockerConfig, prog="--engine-args (mocker)").parse_args(args))
                loaded = cfg.load(MockerConfig, argv=args, env={}, prog="--engine-args (mocker)")
        except SystemExit:
            why = errors.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
            raise EngineError(f"the mocker refused --engine-args {' '.join(args)!r}: {why[0]}") from None
        mocker = dataclasses.replace(mocker, **{k: getattr(loaded, k) for k in given})
    try:
        return MockerEngine.for_model(mocker, spec.model_path, clock=spec.clock, hold_prefill=spec.role == "prefill")
    except ValueError as exc:
        raise EngineError(f"mocker: {exc}") from None
