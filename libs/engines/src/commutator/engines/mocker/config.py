"""Settings of the mocker engine (defaults from DESIGN.md 5)."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import option

__all__ = ["MockerConfig"]


@dataclass(frozen=True, slots=True)
class MockerConfig:
    """The simulated engine: KV cache size, batching limits and speed."""

    block_size: int = option(64, "Tokens per KV block")
    num_blocks: int = option(16384, "KV cache capacity in blocks")
    max_num_seqs: int = option(256, "Most sequences running at once")
    max_batched_tokens: int = option(8192, "Token budget of one engine pass (chunked prefill)")
    speedup_ratio: float = option(1.0, "Simulated time divided by this; 0: no delays at all (overhead benchmarks)")
    watermark: float = option(
        0.01, "Fraction of blocks kept free when admitting new requests (avoids instant preemption)"
    )
    vocab_size: int = option(0, "Vocabulary of generated tokens (0: from the model's config.json, else 32000)")
    context_length: int = option(
        0,
        "Longest prompt plus output (0: from the model's config.json, else 32768);"
        " lowered to what the KV cache holds, (num_blocks - watermark blocks) * block_size + 1",
    )
    mocker_seed: int = option(0, "Seed of generated tokens for requests without a seed, and of engine block ids")
    eos_token_ids: tuple[int, ...] = option((), "End-of-sequence token ids (empty: from the model)")

    def validate(self) -> None:
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise ValueError("block_size and num_blocks must be positive")
        if self.max_num_seqs <= 0 or self.max_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_batched_tokens must be positive")
        if self.speedup_ratio < 0:
            raise ValueError("speedup_ratio must be >= 0")
        if not 0 <= self.watermark < 1:
            raise ValueError("watermark must be in [0, 1)")
