"""What the TensorRT-LLM adapter takes from the ``tensorrt_llm`` package, behind one injectable object.

:class:`TrtllmApi` is the seam: :class:`RealTrtllmApi` (the default) imports
``tensorrt_llm`` only when called; tests pass a hand-written fake. Everything else
goes through the ``LLM`` object it creates, as it would through ``tensorrt_llm.LLM``.

Facts relied on (``NVIDIA/TensorRT-LLM``, 1.x line, files read at the commits named):
``tensorrt_llm/llmapi/llm.py`` (4c05a74: ``LLM(model, **kwargs)`` refuses keys that are
not fields of ``TorchLlmArgs``/``TrtLlmArgs``), ``tensorrt_llm/llmapi/llm_args.py``
(``KvCacheConfig.enable_block_reuse``, ``event_buffer_max_size`` (0: no events),
``tokens_per_block`` (default 32)), ``tensorrt_llm/sampling_params.py`` (a98a906),
``tensorrt_llm/executor/request.py`` (``LoRARequest(lora_name, lora_int_id, lora_path)``),
``tensorrt_llm/disaggregated_params.py`` (``DisaggregatedParams``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Protocol

__all__ = ["RealTrtllmApi", "TrtllmApi"]


class TrtllmApi(Protocol):
    def validate_args(self, model: str, kwargs: dict[str, Any]) -> None:
        """Raise (ValueError, pydantic's ValidationError) when TensorRT-LLM would refuse ``kwargs``."""
        ...

    def create_llm(self, model: str, kwargs: dict[str, Any]) -> Any:
        """``tensorrt_llm.LLM(model=..., **kwargs)`` (blocks until the model is loaded)."""
        ...

    def sampling_params(self, **kwargs: Any) -> Any:
        """``tensorrt_llm.SamplingParams(**kwargs)``."""
        ...

    def sampling_param_names(self) -> frozenset[str]: ...

    def lora_request(self, name: str, int_id: int, path: str) -> Any:
        """``LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path)``."""
        ...

    def disaggregated_params(self, **kwargs: Any) -> Any:
        """``tensorrt_llm.disaggregated_params.DisaggregatedParams(**kwargs)``."""
        ...


class RealTrtllmApi:
    """The installed ``tensorrt_llm`` package (imported on first use)."""

    def _args_class(self, kwargs: dict[str, Any]) -> Any:
        from tensorrt_llm.llmapi import llm_args

        backend = kwargs.get("backend", "pytorch")
        if backend in (None, "pytorch"):
            return llm_args.TorchLlmArgs
        if backend == "tensorrt":
            return llm_args.TrtLlmArgs
        raise ValueError(f"backend {backend!r} is not supported here (pytorch or tensorrt)")

    def validate_args(self, model: str, kwargs: dict[str, Any]) -> None:
        cls = self._args_class(kwargs)
        fields = set(getattr(cls, "model_fields", {}))
        unknown = sorted(k for k in kwargs if k not in fields and k != "backend")
        if fields and unknown:
            raise ValueError(f"unknown LLM argument(s): {', '.join(unknown)}")
        cls.from_kwargs(model=model, **{k: v for k, v in kwargs.items() if k != "backend"})

    def create_llm(self, model: str, kwargs: dict[str, Any]) -> Any:
        from tensorrt_llm import LLM

        return LLM(model=model, **kwargs)

    def sampling_params(self, **kwargs: Any) -> Any:
        from tensorrt_llm import SamplingParams

        return SamplingParams(**kwargs)

    def sampling_param_names(self) -> frozenset[str]:
        from tensorrt_llm import SamplingParams

        if dataclasses.is_dataclass(SamplingParams):
            return frozenset(f.name for f in dataclasses.fields(SamplingParams) if f.init)
        return frozenset(p for p in inspect.signature(SamplingParams).parameters)

    def lora_request(self, name: str, int_id: int, path: str) -> Any:
        from tensorrt_llm.executor.request import LoRARequest

        return LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path)

    def disaggregated_params(self, **kwargs: Any) -> Any:
        from tensorrt_llm.disaggregated_params import DisaggregatedParams

        return DisaggregatedParams(**kwargs)
