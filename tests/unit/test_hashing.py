"""Block hashing golden values (DESIGN.md 4.1). These numbers are a wire contract:
NVIDIA Dynamo computes the same ones, so a change here breaks cross-system parity."""

from __future__ import annotations

import struct

import pytest
import xxhash
from commutator.common.hashing import (
    BLOCK_HASH_SEED,
    block_hash_seed,
    extend_sequence_hash,
    local_block_hashes,
    sequence_hashes,
    tokens_to_bytes,
)

pytestmark = pytest.mark.unit


def test_design_golden_value() -> None:
    assert local_block_hashes(list(range(16)), 16) == [15310707395893867146]


def test_golden_local_hashes() -> None:
    # Published by an independent implementation of the same construction.
    assert local_block_hashes(list(range(1, 33)), 16) == [16863443419780771464, 2287610619914608821]
    assert local_block_hashes(list(range(100, 120)), 16) == [10823191264391160519]  # 4 trailing tokens unhashed


def test_golden_sequence_hash_chain() -> None:
    local = local_block_hashes(list(range(64)), 16)
    assert sequence_hashes(local) == [
        15310707395893867146,
        13769157705258532664,
        11879827756109914528,
        3888788807566526800,
    ]
    assert sequence_hashes(local_block_hashes(list(range(1, 33)), 16)) == [16863443419780771464, 12466389667045779788]


def test_sequence_hash_is_the_documented_construction() -> None:
    local = [11, 22, 33]
    s1 = xxhash.xxh3_64_intdigest(struct.pack("<QQ", 11, 22), seed=1337)
    s2 = xxhash.xxh3_64_intdigest(struct.pack("<QQ", s1, 33), seed=1337)
    assert sequence_hashes(local) == [11, s1, s2]
    assert extend_sequence_hash(None, 11) == 11
    assert extend_sequence_hash(11, 22) == s1


def test_lora_and_salt_seeds_golden() -> None:
    assert block_hash_seed() == BLOCK_HASH_SEED == 1337
    assert block_hash_seed("", "") == 1337  # empty strings count as absent
    assert block_hash_seed("sql-adapter") == 9867606577583457700
    assert block_hash_seed(cache_salt="tenant-a") == 1948188790972764086
    assert block_hash_seed("sql-adapter", "tenant-a") == 11815795368556220449
    assert block_hash_seed("sql-adapter", "tenant-0") == 5012095502646743663  # the sum wrapped at 2^64
    assert local_block_hashes(list(range(16)), 16, block_hash_seed("sql-adapter")) == [14536852851305923245]
    assert local_block_hashes(list(range(16)), 16, block_hash_seed("sql-adapter", "tenant-a")) == [8784638927483316404]
    assert local_block_hashes(list(range(16)), 16, block_hash_seed("sql-adapter", "tenant-0")) == [8522734472946553711]


def test_seed_additions_follow_the_formula() -> None:
    lora = xxhash.xxh3_64_intdigest(b"sql-adapter", seed=0)
    salt = xxhash.xxh3_64_intdigest(b"tenant-a", seed=1)
    assert block_hash_seed("sql-adapter") == (1337 + lora) % 2**64
    assert block_hash_seed("sql-adapter", "tenant-a") == (1337 + lora + salt) % 2**64
    salt0 = xxhash.xxh3_64_intdigest(b"tenant-0", seed=1)
    assert 1337 + lora + salt0 >= 2**64
    assert block_hash_seed("sql-adapter", "tenant-0") == 1337 + lora + salt0 - 2**64


def test_partial_and_empty_inputs() -> None:
    assert local_block_hashes([], 16) == []
    assert local_block_hashes(list(range(15)), 16) == []
    assert sequence_hashes([]) == []
    assert len(local_block_hashes(list(range(4096)), 64)) == 64


def test_bytes_input_matches_list_input() -> None:
    toks = [7, 70000, 2**32 - 1, 0] * 40
    assert local_block_hashes(tokens_to_bytes(toks), 16) == local_block_hashes(toks, 16)
    assert local_block_hashes(memoryview(tokens_to_bytes(toks)), 16) == local_block_hashes(toks, 16)


def test_tokens_are_little_endian_uint32() -> None:
    assert tokens_to_bytes([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5], ["3"]])
def test_bad_token_ids_are_rejected(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        local_block_hashes(bad * 16, 16)  # type: ignore[arg-type]


def test_bad_block_size_and_ragged_bytes() -> None:
    with pytest.raises(ValueError):
        local_block_hashes([1] * 16, 0)
    with pytest.raises(ValueError, match="whole number"):
        local_block_hashes(b"\x00" * 7, 1)
