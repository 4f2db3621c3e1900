"""``--engine hf``: real generation with torch + transformers, on CPU or CUDA.

The model's own modules (embeddings, projections, norms, MLP, rotary embedding)
run with an attention that reads and writes a paged KV cache; the mocker's pure
scheduler and block pool (DESIGN.md 5) decide every pass, so prefix caching,
chunked prefill, preemption and KV events behave exactly as the mocker's. See
docs/engines/hf.md.

This module imports neither torch nor transformers: :func:`make_engine` checks
that they are installed first and says what to install when they are not.
"""

from __future__ import annotations

from commutator.engines.base import Engine
from commutator.engines.registry import EngineSpec, require_module

__all__ = ["INSTALL_HINT", "make_engine"]

INSTALL_HINT = (
    "pip install 'commutator-engines[hf]' (for CPU, first: pip install torch --index-url"
    " https://download.pytorch.org/whl/cpu); in a Commutator checkout: make torch"
)


def make_engine(spec: EngineSpec) -> Engine:
    """The hf engine for ``spec`` (not started); :class:`EngineError` with one line when it cannot be."""
    from commutator.engines.hf.config import parse_engine_args

    config = parse_engine_args(spec.engine_args)
    require_module("torch", "hf", INSTALL_HINT)
    require_module("transformers", "hf", INSTALL_HINT)
    from commutator.engines.hf.factory import build_engine

    return build_engine(spec.model_path, config, spec.clock)
