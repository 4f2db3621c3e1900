"""Deterministic pseudo-random output tokens (and synthetic logprobs) for the mocker."""

from __future__ import annotations

import struct

import xxhash

__all__ = ["request_seed", "synthetic_logprobs", "token_at"]

_pack = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest
_U64 = (1 << 64) - 1


def request_seed(request_id: str, sampling_seed: int | None, engine_seed: int) -> int:
    """The seed of a request's tokens: its own seed if given, else one derived from its id."""
    if sampling_seed is not None:
        return sampling_seed & _U64
    return _xxh3(request_id.encode(), engine_seed & _U64)


def token_at(seed: int, position: int, vocab_size: int) -> int:
    """The token a request with ``seed`` generates at ``position`` (0-based, in the whole sequence: a prompt
    of ``n`` tokens gets its first output token at ``n``). Like a model's, the output depends on where the
    sequence is, not on how it was cut into prompt and output, so a request continued on another worker with
    its streamed tokens appended to the prompt (migration) generates what it would have generated."""
    return _xxh3(_pack(seed, position), 7) % vocab_size


def synthetic_logprobs(
    seed: int, position: int, token: int, vocab_size: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """A logprob for ``token`` and ``top`` alternatives (the chosen token ranks first).

    The mocker computes no distribution; these numbers are deterministic
    stand-ins so that clients of the logprobs API can be exercised end to end.
    """
    h = _xxh3(_pack(seed, position), 11)
    chosen = -((h % 997) / 1000.0)
    alts: list[tuple[int, float]] = [(token, chosen)]
    for k in range(1, top):
        alt = (token + k * 7919) % vocab_size
        alts.append((alt, chosen - 0.5 * k - ((h >> (k % 48)) % 100) / 1000.0))
    return chosen, tuple(alts[:top])
