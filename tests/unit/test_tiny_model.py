"""The offline tiny model: deterministic, loadable, shaped for vLLM's CPU build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from commutator.engines.model_info import ModelInfo
from commutator.engines.tiny_model import SPECIAL_TOKENS, build_tiny_model, ensure_tiny_model
from safetensors.numpy import load_file
from tokenizers import Tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_tiny_model()


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_tokenizer_round_trips_text_and_knows_its_special_tokens(model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "def hello(name):\n    return f'héllo, {name} 🌍'\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    code = "import os\nfor name in sorted(os.listdir(path)):\n    print(name)\n"
    assert len(tok.encode(code).ids) < len(code) / 2  # a trained vocabulary, not bytes
    for special in SPECIAL_TOKENS:
        assert tok.token_to_id(special) is not None
    assert tok.get_vocab_size() == 4096


def test_config_suits_vllm_cpu_and_weights_match_it(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] >= 32 and cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    weights = load_file(str(model_dir / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (
        cfg["num_key_value_heads"] * cfg["head_dim"],
        cfg["hidden_size"],
    )
    assert sum(w.nbytes for w in weights.values()) < 8 * 1024 * 1024
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tc and tc["eos_token"] == "<|eot_id|>"
    info = ModelInfo.load(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert info.eos_token_ids == (tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>"))
    assert (info.vocab_size, info.context_length) == (4096, 4096)
