"""Which model folder a worker serves, checked before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

from commutator.engines.registry import EngineError
from commutator.engines.tiny_model import MODEL_NAME as TINY_MODEL_NAME
from commutator.engines.tiny_model import ensure_tiny_model

__all__ = ["resolve_model"]


def resolve_model(model_path: str, model_name: str) -> tuple[Path, str]:
    """The model folder (the tiny model when none is given) and the name it is served under.

    :class:`EngineError` (one line) for a folder that is missing, has no ``config.json``, or
    whose ``config.json`` is not a JSON object.
    """
    if not model_path:
        return ensure_tiny_model(), model_name or TINY_MODEL_NAME
    path = Path(model_path)
    if not path.is_dir():
        raise EngineError(f"--model-path {model_path}: no such folder")
    config = path / "config.json"
    if not config.is_file():
        raise EngineError(f"--model-path {model_path}: not a model folder (no config.json)")
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"--model-path {model_path}: config.json cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise EngineError(f"--model-path {model_path}: config.json is not a JSON object")
    return path, model_name or path.name
