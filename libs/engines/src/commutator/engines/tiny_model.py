"""A tiny Llama model made offline: the model of every test and demo.

No model can be downloaded where Commutator is developed and tested, so this
module builds one, deterministically, in a few seconds:

- a byte-level BPE tokenizer (HF ``tokenizers``) trained on Python standard
  library sources found on this machine, with Llama-3-style special tokens;
- a Llama-3-style chat template;
- ``config.json`` for ``LlamaForCausalLM`` (head_dim 32, so vLLM's CPU build
  accepts it) and randomly initialised float32 weights in ``model.safetensors``.

The weights are random: generated text is noise, but the model loads in
``transformers`` and vLLM, and its tokenizer and template are real, which is
what routing, templating and detokenization need.

    python -m commutator.engines.tiny_model [DIR]     # default: the cache folder below
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "MODEL_NAME", "build_tiny_model", "default_model_dir", "ensure_tiny_model"]

MODEL_NAME = "commutator/tiny-llama"
VERSION = 1
VOCAB_SIZE = 4096
CONTEXT_LENGTH = 4096
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
BOS, EOS_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

# Llama-3 style: every message is a header plus content ended by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_CORPUS_BYTES = 4_000_000


def default_model_dir() -> Path:
    """``$COMMUTATOR_MODEL_DIR``, else ``~/.cache/commutator/models/tiny-llama-v{VERSION}``."""
    env = os.environ.get("COMMUTATOR_MODEL_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "commutator" / "models" / f"tiny-llama-v{VERSION}"


def _corpus() -> Iterator[str]:
    """Standard-library sources in a fixed order, about 4 MB."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield text
        total += len(text)
        if total >= _CORPUS_BYTES:
            return


def _train_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _weights(config: dict[str, int], seed: int = 0) -> dict[str, object]:
    import numpy as np

    rng = np.random.default_rng(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def normal(*shape: int) -> object:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    tensors: dict[str, object] = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, h)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, inter)
        tensors[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(h, dtype=np.float32)
    tensors["lm_head.weight"] = normal(vocab, h)
    return tensors


def build_tiny_model(out_dir: str | Path) -> Path:
    """Write the tiny model into ``out_dir`` (created; existing files replaced)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    tok.save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
    vocab: dict[str, int] = tok.get_vocab()  # type: ignore[attr-defined]
    bos_id, eos_text_id, eot_id = vocab[BOS], vocab[EOS_TEXT], vocab[EOT]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": CONTEXT_LENGTH,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": [eot_id, eos_text_id],
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": [eot_id, eos_text_id]}, indent=2) + "\n"
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": EOS_TEXT,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": CONTEXT_LENGTH,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(vocab[t]): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t in SPECIAL_TOKENS
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": EOS_TEXT}, indent=2) + "\n"
    )
    save_file(_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})  # type: ignore[arg-type]
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json", "model.safetensors"):
        digest.update((out / name).read_bytes())
    (out / "commutator-model.json").write_text(
        json.dumps(
            {"name": MODEL_NAME, "version": VERSION, "sha256": digest.hexdigest(), "python": sys.version.split()[0]},
            indent=2,
        )
        + "\n"
    )
    return out


def ensure_tiny_model(path: str | Path | None = None) -> Path:
    """The tiny model folder, built first if missing. Safe when several processes call it at once."""
    target = Path(path) if path else default_model_dir()
    if (target / "commutator-model.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "commutator-model.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_tiny_model(tmp)
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m commutator.engines.tiny_model", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", help=f"where to write it (default: {default_model_dir()})")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder holds a model")
    args = p.parse_args(argv)
    target = Path(args.out_dir) if args.out_dir else default_model_dir()
    if args.force and target.exists():
        shutil.rmtree(target)
    print(ensure_tiny_model(target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
