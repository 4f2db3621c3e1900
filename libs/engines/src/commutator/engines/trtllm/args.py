"""``--engine-args`` for TensorRT-LLM: flags that become ``tensorrt_llm.LLM`` keyword arguments (pure).

TensorRT-LLM's LLM API takes its configuration as keyword arguments (the
``TorchLlmArgs`` pydantic model, the same one ``trtllm-serve --config file.yaml``
fills). Here each ``--name value`` (or ``--name=value``) becomes ``name=value``:

- ``-`` in names becomes ``_`` (``--max-batch-size 64`` = ``max_batch_size=64``);
- values are read as JSON when they parse (numbers, ``true``, ``null``, objects:
  ``--kv_cache_config '{"free_gpu_memory_fraction": 0.8}'``), else kept as strings;
  a flag with no value is ``true``;
- dotted names set one field of a nested mapping (``--kv_cache_config.tokens_per_block 64``);
- ``--config file.yaml`` (alias ``--extra_llm_api_options``) loads a YAML mapping first;
  flags given on the line override it;
- ``--lora-modules name=path ...`` is Commutator's own: the LoRA adapters requests may
  name (TensorRT-LLM takes a ``LoRARequest(name, int id, path)`` per request).

Whether TensorRT-LLM accepts the result is its own parser's call
(:meth:`~commutator.engines.trtllm.api.TrtllmApi.validate_args`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EngineArgsError", "parse_engine_args"]

_CONFIG_FLAGS = {"config", "extra_llm_api_options"}


class EngineArgsError(ValueError):
    """The flags are not of the form this parser reads."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _set(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        child = target.setdefault(name, {})
        if not isinstance(child, dict):
            raise EngineArgsError(f"--{dotted}: {name} is not a mapping")
        target = child
    target[leaf] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml  # a TensorRT-LLM dependency

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise EngineArgsError(f"--config {path}: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EngineArgsError(f"--config {path}: not a YAML mapping")
    return data


def parse_engine_args(tokens: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(LLM keyword arguments, LoRA name -> path)`` from ``--engine-args`` tokens."""
    flags: dict[str, Any] = {}
    config: dict[str, Any] = {}
    loras: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise EngineArgsError(f"expected --name value, got {tok!r}")
        name, eq, inline = tok[2:].partition("=")
        i += 1
        values: list[str] = []
        if eq:
            values.append(inline)
        else:
            while i < len(tokens) and not tokens[i].startswith("--"):
                values.append(tokens[i])
                i += 1
        if name in ("lora-modules", "lora_modules"):
            for v in values:
                lora, sep, path = v.partition("=")
                if not sep or not lora or not path:
                    raise EngineArgsError(f"--lora-modules takes name=path, got {v!r}")
                loras[lora] = path
            continue
        key = name.replace("-", "_")
        if not key:
            raise EngineArgsError(f"empty flag name in {tok!r}")
        if len(values) > 1:
            raise EngineArgsError(f"--{name} takes one value, got {' '.join(values)!r}")
        if key in _CONFIG_FLAGS:
            if not values:
                raise EngineArgsError(f"--{name} needs a YAML file")
            config = _merge(config, _load_yaml(values[0]))
            continue
        _set(flags, key, _value(values[0]) if values else True)
    return _merge(config, flags), loras
