"""Block hashing cost: a 4096-token prompt (Python list of ints), list-to-bytes included.

Target (issue 2): at most 40 us at block size 64 on the 2-core dev machine.
Prints the median and p99 of per-call times over many repetitions.
"""

from __future__ import annotations

import random
import statistics
import time

from commutator.common.hashing import local_block_hashes, sequence_hashes, tokens_to_bytes
from commutator.common.prompt import token_array


def per_call_us(fn, reps: int = 200, inner: int = 50) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return sorted(samples)


def report(name: str, samples: list[float]) -> None:
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]
    print(f"{name:<52} p50 {p50:7.2f} us   p99 {p99:7.2f} us")


def main() -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(0, 152_000) for _ in range(4096)]
    data = tokens_to_bytes(tokens)
    local64 = local_block_hashes(tokens, 64)
    for _ in range(2000):  # warm-up
        local_block_hashes(tokens, 64)
    print("block hashing, 4096-token prompt (list of ints), this machine")
    report(
        "local hashes, block 64 (pack + 64 x XXH3)  [target <= 40]", per_call_us(lambda: local_block_hashes(tokens, 64))
    )
    report("local hashes, block 16 (pack + 256 x XXH3)", per_call_us(lambda: local_block_hashes(tokens, 16)))
    report("  of which: pack 4096 ids to LE uint32 bytes", per_call_us(lambda: tokens_to_bytes(tokens)))
    report("  of which: 64 x XXH3 on slices of the bytes", per_call_us(lambda: local_block_hashes(data, 64)))
    ids = token_array(tokens)
    report("local hashes, block 64, of an array('I') (token_bytes)", per_call_us(lambda: local_block_hashes(ids, 64)))
    report("sequence hashes of 64 local hashes", per_call_us(lambda: sequence_hashes(local64)))


if __name__ == "__main__":
    main()
