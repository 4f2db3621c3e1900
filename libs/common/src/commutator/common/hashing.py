"""Block hashing shared by workers and routers (DESIGN.md 4.1).

A prompt is cut into full blocks of ``block_size`` tokens; a trailing partial
block has no hash. Each full block gets a *local* hash, XXH3-64 of its tokens as
little-endian uint32 bytes, and a *sequence* hash that identifies the block
together with its whole prefix. The values are bit-for-bit those of NVIDIA
Dynamo, so indexes and traces can be compared across the two systems.

Pure module: no I/O, no asyncio. Never use Python's ``hash()`` for blocks.
"""

from __future__ import annotations

import array
import functools
import struct
import sys
from collections.abc import Callable, Sequence

import xxhash

__all__ = [
    "BLOCK_HASH_SEED",
    "block_hash_seed",
    "extend_sequence_hash",
    "local_block_hashes",
    "sequence_hashes",
    "tokens_to_bytes",
]

BLOCK_HASH_SEED = 1337
"""Seed of every local block hash (before the LoRA and salt additions)."""

_U64 = (1 << 64) - 1
_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack


def block_hash_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The seed for local block hashes of a request.

    ``1337``, plus ``XXH3_64(lora_name, seed=0)`` with a LoRA adapter, plus
    ``XXH3_64(cache_salt, seed=1)`` with a cache salt; additions wrap at 2^64
    and an empty string counts as absent.
    """
    seed = BLOCK_HASH_SEED
    if lora_name:
        seed = (seed + _xxh3(lora_name.encode(), 0)) & _U64
    if cache_salt:
        seed = (seed + _xxh3(cache_salt.encode(), 1)) & _U64
    return seed


@functools.lru_cache(maxsize=4096)
def _packer(length: int) -> Callable[..., bytes]:
    return struct.Struct(f"<{length}I").pack


def tokens_to_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes: a copy of an ``array('I')``'s buffer (a prompt read
    from ``token_bytes``), else one C call over the ints.

    Raises ``ValueError`` when an id is negative, above 2^32 - 1, or not an int.
    """
    if isinstance(token_ids, array.array) and token_ids.typecode == "I" and token_ids.itemsize == 4:
        if sys.byteorder == "little":
            return token_ids.tobytes()
        swapped = array.array("I", token_ids)  # pragma: no cover - no big-endian machine in CI
        swapped.byteswap()  # pragma: no cover
        return swapped.tobytes()  # pragma: no cover
    try:
        # One C call for the whole list, with a compiled Struct per prompt length.
        return _packer(len(token_ids))(*token_ids)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2^32): {exc}") from None


def local_block_hashes(
    token_ids: Sequence[int] | bytes | memoryview,
    block_size: int,
    seed: int = BLOCK_HASH_SEED,
) -> list[int]:
    """Local hashes of the full blocks of ``token_ids``.

    ``token_ids`` is a sequence of ints, an ``array('I')`` of them (hashed from
    its buffer), or its little-endian uint32 bytes (as from
    :func:`tokens_to_bytes`, or a request's ``token_bytes``). The partial block
    at the end is not hashed.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # Block-sized slices of bytes cost less than memoryview slices.
    data: bytes | memoryview
    if isinstance(token_ids, bytes):
        data = token_ids
    elif isinstance(token_ids, bytearray | memoryview):
        data = memoryview(token_ids).cast("B")
    else:
        data = tokens_to_bytes(token_ids)
    if len(data) % 4:
        raise ValueError("token bytes must be a whole number of uint32 values")
    step = block_size * 4
    end = len(data) - len(data) % step
    return [_xxh3(data[i : i + step], seed) for i in range(0, end, step)]


def sequence_hashes(local_hashes: Sequence[int]) -> list[int]:
    """Sequence hashes of a chain of local hashes.

    ``seq[0] = local[0]``; ``seq[i] = XXH3_64(le_u64(seq[i-1]) ++ le_u64(local[i]), 1337)``.
    """
    out: list[int] = []
    if not local_hashes:
        return out
    prev = local_hashes[0]
    out.append(prev)
    for h in local_hashes[1:]:
        prev = _xxh3(_pack_pair(prev, h), BLOCK_HASH_SEED)
        out.append(prev)
    return out


def extend_sequence_hash(parent_sequence_hash: int | None, local_hash: int) -> int:
    """The sequence hash of a block whose prefix ends in ``parent_sequence_hash``."""
    if parent_sequence_hash is None:
        return local_hash
    return _xxh3(_pack_pair(parent_sequence_hash, local_hash), BLOCK_HASH_SEED)
