"""The mocker's timing model (DESIGN.md 5), in milliseconds of simulated GPU time."""

from __future__ import annotations

__all__ = ["decode_ms", "pass_ms", "prefill_ms"]


def prefill_ms(new_prompt_tokens: int) -> float:
    """Time to prefill ``new_prompt_tokens`` tokens in one pass (0 when there are none)."""
    if new_prompt_tokens <= 0:
        return 0.0
    t = float(new_prompt_tokens)
    return 4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142


def decode_ms(kv_usage: float) -> float:
    """Time of one decode step for the batch at KV usage ``kv_usage`` (fraction of blocks in use)."""
    u = kv_usage
    return max(1.0, -25.74 * u * u + 54.01 * u + 5.74)


def pass_ms(new_prompt_tokens: int, decoding: bool, kv_usage: float, speedup_ratio: float) -> float:
    """Duration of one engine pass; 0 when ``speedup_ratio`` is 0 (no delays at all).

    A pass that decodes nothing costs only its prefill: the reference points of
    DESIGN.md 5 (512 prompt tokens: 24.4 ms to the first token) are prefill alone.
    """
    if speedup_ratio <= 0:
        return 0.0
    total = prefill_ms(new_prompt_tokens) + (decode_ms(kv_usage) if decoding else 0.0)
    return total / speedup_ratio
