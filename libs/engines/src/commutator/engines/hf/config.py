"""Settings of the hf engine: its own flags, given through ``--engine-args`` (no torch needed here)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from commutator.common import config as cfg
from commutator.common.config import option
from commutator.engines.registry import EngineError

__all__ = ["DTYPES", "HfConfig", "parse_engine_args"]

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class HfConfig:
    """The hf engine (torch + transformers): device, precision, KV cache and batching limits."""

    device: str = option("auto", "cpu, cuda or cuda:N; auto: cuda when torch sees a GPU, else cpu")
    dtype: str = option(
        "auto", "Weights and KV cache precision; auto: float32 on CPU, the model's dtype on CUDA", choices=DTYPES
    )
    block_size: int = option(16, "Tokens per KV block (the prefix cache's unit, and the router's)")
    num_blocks: int = option(0, "KV cache capacity in blocks; 0: as many as --kv-cache-gib holds")
    kv_cache_gib: float = option(
        1.0, "KV cache size in GiB when --num-blocks is 0 (at most what --max-num-seqs full contexts need)"
    )
    max_num_seqs: int = option(64, "Most sequences running at once")
    max_batched_tokens: int = option(2048, "Token budget of one engine pass (longer prompts are chunked)")
    watermark: float = option(0.01, "Fraction of blocks kept free when admitting new requests")
    context_length: int = option(0, "Longest prompt plus output; 0: the model's (lowered to what the cache holds)")
    threads: int = option(
        0, "torch CPU threads (torch.set_num_threads); 0: on CPU every core but one (kept for the event loop)"
    )
    export_hold_s: float = option(
        30.0, "How long a finished prefill-only request keeps its prompt's blocks for kv_export"
    )

    def validate(self) -> None:
        if self.block_size <= 0:
            raise ValueError("--block-size must be positive")
        if self.num_blocks < 0 or self.kv_cache_gib <= 0:
            raise ValueError("--num-blocks must be >= 0 and --kv-cache-gib positive")
        if self.max_num_seqs <= 0 or self.max_batched_tokens <= 0:
            raise ValueError("--max-num-seqs and --max-batched-tokens must be positive")
        if not 0 <= self.watermark < 1:
            raise ValueError("--watermark must be in [0, 1)")
        if self.context_length < 0 or self.threads < 0 or self.export_hold_s < 0:
            raise ValueError("--context-length, --threads and --export-hold-s must be >= 0")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"--device {dev!r}: expected auto, cpu, cuda or cuda:N")


def parse_engine_args(args: Sequence[str]) -> HfConfig:
    """``--engine-args`` tokens as an :class:`HfConfig`; :class:`EngineError` with one line when refused."""
    argv = list(args)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            config = cfg.load(HfConfig, argv=argv, env={}, prog="--engine-args (hf)")
    except SystemExit:
        why = errors.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
        raise EngineError(f"the hf engine refused --engine-args {' '.join(argv)!r}: {why[0]}") from None
    try:
        config.validate()
    except ValueError as exc:
        raise EngineError(f"the hf engine refused --engine-args {' '.join(argv)!r}: {exc}") from None
    return config
