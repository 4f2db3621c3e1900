"""``--engine trtllm``: the TensorRT-LLM adapter (import-guarded: this package imports without ``tensorrt_llm``).

``--engine-args`` become ``tensorrt_llm.LLM`` keyword arguments (:mod:`.args`), checked
by TensorRT-LLM's own argument model before anything starts, e.g.
``--engine-args "--tensor_parallel_size 2 --kv_cache_config.free_gpu_memory_fraction 0.8"``.
Unless given, the adapter turns on what KV routing and load reporting need:
``kv_cache_config.enable_block_reuse``, ``kv_cache_config.event_buffer_max_size``
and ``enable_iter_perf_stats``. See docs/engines/trtllm.md.
"""

from __future__ import annotations

import copy
from typing import Any

from commutator.engines.model_info import ModelInfo
from commutator.engines.registry import EngineError, EngineSpec, require_module
from commutator.engines.trtllm.api import RealTrtllmApi, TrtllmApi
from commutator.engines.trtllm.args import EngineArgsError, parse_engine_args
from commutator.engines.trtllm.disagg import TrtllmHandoff
from commutator.engines.trtllm.engine import TrtllmEngine

__all__ = ["TrtllmEngine", "TrtllmHandoff", "build_engine", "llm_kwargs", "make_engine"]

INSTALL = "pip install tensorrt_llm (NVIDIA's wheels; needs an NVIDIA GPU and CUDA)"

KV_EVENT_BUFFER = 16384
"""``kv_cache_config.event_buffer_max_size`` unless given: events the engine holds for the adapter's poller."""


def make_engine(spec: EngineSpec) -> TrtllmEngine:
    """The registry's factory: the installed ``tensorrt_llm``, or :class:`EngineError` naming what to install."""
    return build_engine(spec)


def llm_kwargs(parsed: dict[str, Any]) -> dict[str, Any]:
    """``parsed`` plus the settings KV routing needs, where the user left them unset."""
    kwargs = copy.deepcopy(parsed)
    kv = kwargs.setdefault("kv_cache_config", {})
    if isinstance(kv, dict):
        kv.setdefault("enable_block_reuse", True)
        kv.setdefault("event_buffer_max_size", KV_EVENT_BUFFER)
    kwargs.setdefault("enable_iter_perf_stats", True)
    return kwargs


def build_engine(spec: EngineSpec, api: TrtllmApi | None = None, **engine_options: Any) -> TrtllmEngine:
    """A TensorRT-LLM adapter for ``spec`` (not started); ``api`` defaults to the real package."""
    if api is None:
        require_module("tensorrt_llm", "trtllm", INSTALL)
        api = RealTrtllmApi()
    shown = " ".join(spec.engine_args)
    try:
        parsed, loras = parse_engine_args(spec.engine_args)
    except EngineArgsError as exc:
        raise EngineError(f"--engine-args {shown!r} for trtllm: {exc}") from None
    if "model" in parsed:
        raise EngineError("--engine-args for trtllm: the model is the worker's --model-path, not --model")
    kwargs = llm_kwargs(parsed)
    model = str(spec.model_path)
    try:
        api.validate_args(model, kwargs)
    except Exception as exc:  # pydantic's ValidationError, ValueError, TypeError: all mean "refused"
        first = (str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise EngineError(f"TensorRT-LLM refused --engine-args {shown!r}: {first}") from None
    try:
        info = ModelInfo.load(spec.model_path)
    except (OSError, ValueError):
        info = ModelInfo()
    return TrtllmEngine(api, model, kwargs, lora_modules=loras, model_info=info, clock=spec.clock, **engine_options)
