"""What an engine adapter needs to know about a model folder (HF layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelInfo"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Vocabulary, context and special tokens read from ``config.json`` (and its neighbours)."""

    vocab_size: int = 32000
    context_length: int = 32768
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def load(cls, model_path: str | Path) -> ModelInfo:
        path = Path(model_path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        cfg = json.loads(cfg_file.read_text())
        eos = cfg.get("eos_token_id")
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            vocab_size=int(cfg.get("vocab_size", 32000)),
            context_length=int(cfg.get("max_position_embeddings", 32768)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )
