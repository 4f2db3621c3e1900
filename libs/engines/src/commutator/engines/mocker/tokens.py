"""Deterministic pseudo-random output tokens (and synthetic logprobs) for the mocker."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import xxhash

__all__ = ["request_seed", "synthetic_logprobs", "text_token_ids", "token_at"]

_pack = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest
_U64 = (1 << 64) - 1


def request_seed(request_id: str, sampling_seed: int | None, engine_seed: int) -> int:
    """The seed of a request's tokens: its own seed if given, else one derived from its id."""
    if sampling_seed is not None:
        return sampling_seed & _U64
    return _xxh3(request_id.encode(), engine_seed & _U64)


def token_at(seed: int, position: int, vocab_size: int, ids: Sequence[int] | None = None) -> int:
    """The token a request with ``seed`` generates at ``position`` (0-based, in the whole sequence: a prompt
    of ``n`` tokens gets its first output token at ``n``). Like a model's, the output depends on where the
    sequence is, not on how it was cut into prompt and output, so a request continued on another worker with
    its streamed tokens appended to the prompt (migration) generates what it would have generated.

    ``ids`` (from :func:`text_token_ids`): draw from these instead of the whole ``[0, vocab_size)``."""
    h = _xxh3(_pack(seed, position), 7)
    return ids[h % len(ids)] if ids else h % vocab_size


def text_token_ids(tokenizer_file: str | Path, vocab_size: int, keep: Iterable[int] = ()) -> tuple[int, ...]:
    """The ids below ``vocab_size`` whose text stands on its own, in order, with ``keep`` (the EOS ids).

    Random ids over a whole byte-level vocabulary are about 3% single bytes of multi-byte characters and
    special tokens: streamed text full of U+FFFD and tokens that show no text until the next one, which a
    model writing prose rarely produces. The mocker draws from the rest: not an added (special) token,
    and decoding alone to non-empty text with no U+FFFD."""
    return _text_token_ids(str(tokenizer_file), vocab_size, tuple(sorted(set(keep))))


@lru_cache(maxsize=4)
def _text_token_ids(tokenizer_file: str, vocab_size: int, keep: tuple[int, ...]) -> tuple[int, ...]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    added = set(tok.get_added_tokens_decoder())
    n = min(vocab_size, tok.get_vocab_size(with_added_tokens=True))
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    ok = {i for i, t in enumerate(texts) if i not in added and t and "\ufffd" not in t}
    return tuple(sorted(ok | {k for k in keep if 0 <= k < vocab_size}))


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
