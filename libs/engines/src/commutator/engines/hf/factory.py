"""Checks before the hf engine loads anything heavy, and its sizes.

Everything that can be known from ``config.json`` is checked here, when the
worker starts and before it registers: the folder is a model transformers can
read, the architecture is one this engine runs, weights are there, the device
exists. Failures are :class:`EngineError` with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from commutator.common.clock import Clock
from commutator.engines.hf.config import HfConfig
from commutator.engines.hf.engine import HfEngine, ModelPlan
from commutator.engines.hf.kv_cache import CacheGeometry
from commutator.engines.model_info import ModelInfo
from commutator.engines.registry import EngineError

__all__ = ["SUPPORTED_ARCHITECTURES", "build_engine", "plan_model"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""Decoders whose attention layers take their attention function from transformers' registry, with
rotary embeddings applied before it and nothing after it but the output projection."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def _first_line(exc: BaseException) -> str:
    return ((str(exc) or type(exc).__name__).strip().splitlines() or [type(exc).__name__])[0]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"hf: --device {name}: torch sees no CUDA device (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EngineError(f"hf: --device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _dtype(name: str, model_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    declared = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = _DTYPES.get(declared)
    return declared if declared in (torch.float16, torch.bfloat16) else torch.float32


def plan_model(model_path: Path, config: HfConfig) -> ModelPlan:
    """What the engine will load and how big its cache is, from ``config.json`` alone."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise EngineError(f"hf: {path} is not a model folder (no config.json)")
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise EngineError(f"hf: transformers cannot read the model config in {path}: {_first_line(exc)}") from None
    archs = tuple(getattr(mc, "architectures", None) or ())
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise EngineError(
            f"hf: unsupported architecture {', '.join(archs) or getattr(mc, 'model_type', '?')!s} in {path};"
            f" the hf engine runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHTS):
        raise EngineError(f"hf: no weights in {path} (expected *.safetensors or pytorch_model*.bin)")
    try:
        info = ModelInfo.load(path)
    except (OSError, ValueError) as exc:
        raise EngineError(f"hf: cannot read {path}: {_first_line(exc)}") from None

    device = _device(config.device)
    dtype = _dtype(config.dtype, mc, device)
    heads = int(mc.num_attention_heads)
    geometry = CacheGeometry(
        num_layers=int(mc.num_hidden_layers),
        kv_heads=int(getattr(mc, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(mc, "head_dim", None) or mc.hidden_size // heads),
        block_size=config.block_size,
        dtype=dtype,
    )
    context = int(getattr(mc, "max_position_embeddings", 0) or info.context_length)
    window = getattr(mc, "sliding_window", None)
    if window and getattr(mc, "use_sliding_window", True):
        # Attention runs over the whole sequence: exact only while sequences fit in the window.
        context = min(context, int(window))
    if config.context_length:
        context = min(context, config.context_length)
    num_blocks = config.num_blocks
    if num_blocks == 0:
        fits = int(config.kv_cache_gib * 2**30) // geometry.bytes_per_block
        needed = config.max_num_seqs * -(-context // config.block_size)
        num_blocks = min(fits, needed)
        if num_blocks < 1:
            raise EngineError(
                f"hf: --kv-cache-gib {config.kv_cache_gib} holds no block of {geometry.bytes_per_block} bytes"
            )
    return ModelPlan(
        path=path,
        architecture=arch,
        device=device,
        dtype=dtype,
        geometry=geometry,
        num_blocks=num_blocks,
        vocab_size=int(mc.vocab_size),
        context_length=context,
        eos_token_ids=info.eos_token_ids,
    )


def build_engine(model_path: Path, config: HfConfig, clock: Clock | None = None) -> HfEngine:
    plan = plan_model(model_path, config)
    try:
        return HfEngine(plan, config, clock=clock)
    except ValueError as exc:
        raise EngineError(f"hf: {exc}") from None
