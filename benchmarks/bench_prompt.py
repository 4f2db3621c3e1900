"""A token-id prompt's way from the HTTP body to the engine, in process: CPU per request, per stage.

The frontend's and the worker's own functions, for prompts of 1,500 and 12,000 random ids (the
routing benchmark's Mooncake mean, and the trace's own), once with the prompt in ``token_bytes``
(what the frontend sends) and once in ``token_ids`` (what an older worker gets, and what a direct
client may send). docs/hot-path.md, "Long prompts", has the figures from before ``token_bytes``.
Prints the mean over many repetitions; a benchmark, not a test.

``--cold``: before each repetition a write to every cache line of 64 MiB evicts the CPU's caches,
as the other processes of a stack do between two requests on a small machine; the stages then run
one after another as a request's do. docs/hot-path.md, "Request by request against Dynamo", compares
both with the same stages measured in a running frontend.
"""

from __future__ import annotations

import argparse
import random
import time

import orjson
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.common.prompt import with_token_ids
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.scheduler import Scheduler
from commutator.engines.vocab import first_outside
from commutator.engines.wire import request_from_proto
from commutator.frontend.protocol import parse_completion
from commutator.frontend.wire import generate_requests
from commutator.v1 import worker_pb2

VOCAB = 32_000
_EVICT_BYTES = 64 << 20  # larger than this machine's last-level cache (32 MiB)
_evict = bytearray()  # allocated by the first evict_caches()


def evict_caches() -> None:
    """Write one byte in every 64-byte line of a 64 MiB buffer (a C loop): what was cached is gone."""
    if not _evict:
        _evict.extend(bytes(_EVICT_BYTES))
    _evict[::64] = bytes([_evict[0] ^ 1]) * len(range(0, _EVICT_BYTES, 64))


def run(n_tokens: int, wire: str, reps: int, cold: bool = False) -> dict[str, float]:
    rng = random.Random(n_tokens)
    body = orjson.dumps({"model": "m", "prompt": [rng.randrange(VOCAB) for _ in range(n_tokens)], "max_tokens": 8})
    totals: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        t = time.perf_counter()
        totals[name] = totals.get(name, 0.0) + t - t0
        return t

    for rep in range(reps + 20):
        if rep == 20:
            totals.clear()  # the first 20 warm up
        if cold:
            evict_caches()
        t = time.perf_counter()
        req = parse_completion(orjson.loads(body))
        t = lap("frontend: JSON, types and bounds", t)
        prompt = req.prompts[0]
        assert not isinstance(prompt, str) and first_outside(prompt, VOCAB) is None
        t = lap("frontend: vocabulary", t)
        (g,) = generate_requests("r", "m", [prompt], req.sampling, 0, prompt_param="prompt")
        if wire == "token_ids":
            g = with_token_ids(g)
        t = lap("frontend: the protobuf request", t)
        sequence_hashes(local_block_hashes(prompt, 64))
        t = lap("frontend: block hashes (routing)", t)
        frame = worker_pb2.MuxClientFrame()
        start = frame.starts.add()
        start.tag = 1
        start.request.CopyFrom(g)
        data = frame.SerializeToString()
        t = lap("frontend: the start's frame", t)
        got = worker_pb2.MuxClientFrame()
        got.ParseFromString(data)
        ereq = request_from_proto(got.starts[0].request)
        t = lap("worker: frame parsed, request_from_proto", t)
        sched = Scheduler(MockerConfig(block_size=64, num_blocks=4096), vocab_size=VOCAB, context_length=10**6)
        t = time.perf_counter()
        sched.add(ereq)
        lap("worker: the mocker admits it (copy, vocabulary, hashes)", t)
    return {k: v / reps * 1e6 for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--cold", action="store_true", help="evict the CPU caches before each repetition")
    args = ap.parse_args()
    cases = [(n, w) for n in (1_500, 12_000) for w in ("token_bytes", "token_ids")]
    results = {case: run(*case, args.reps, args.cold) for case in cases}
    caches = "caches evicted before each request" if args.cold else "caches warm"
    print(f"prompt path, CPU per request (mean, us), this machine, {caches}")
    head = "".join(f"{f'{n:,} {w}':>20}" for n, w in cases)
    print(f"{'stage':<58}{head}")
    for stage in results[cases[0]]:
        print(f"{stage:<58}" + "".join(f"{results[c][stage]:>20.1f}" for c in cases))
    for side in ("frontend", "worker"):
        sums = [sum(v for k, v in results[c].items() if k.startswith(side)) for c in cases]
        print(f"{side + ' total':<58}" + "".join(f"{s:>20.1f}" for s in sums))


if __name__ == "__main__":
    main()
