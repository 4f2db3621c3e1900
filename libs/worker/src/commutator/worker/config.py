"""Settings every worker role shares: the engine, the model, where it registers, how it reports."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import option
from commutator.engines.registry import ENGINES

__all__ = ["WorkerConfig"]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What this worker serves and how it reports."""

    engine: str = option("mocker", "Engine behind this worker", choices=tuple(ENGINES))
    engine_args: str = option(
        "",
        "Arguments for the engine's own parser, as one shell-quoted string (vllm: AsyncEngineArgs flags such as "
        "'--max-model-len 2048 --dtype bfloat16'; sglang: 'sglang serve' flags such as '--page-size 16'; trtllm: "
        "LLM keyword arguments as '--name value', e.g. '--kv_cache_config.free_gpu_memory_fraction 0.8'; "
        "mocker: its flags, which override --num-blocks and the rest)",
    )
    model_path: str = option("", "Model folder (HF layout); empty: the tiny test model, built on first use")
    model_name: str = option(
        "", "Name clients use for the model; empty: from the folder (the tiny model: commutator/tiny-llama)"
    )
    component: str = option("", "Discovery component this worker registers under (empty: its role, decode or prefill)")
    endpoint: str = option("generate", "Discovery endpoint of the Worker service")
    stats_interval_s: float = option(1.0, "Publish load statistics at least this often")
    stats_min_interval_s: float = option(0.05, "Publish load statistics on change, at most this often")
    kv_events_max_batch: int = option(1024, "Most KV events in one published message")
    stream_interval_ms: float = option(
        2.0,
        "Least time between two messages of a Generate stream after the first: tokens produced closer together "
        "go out in one message (0: a message per engine output). Engines decoding slower than this are unaffected.",
    )
    engine_restarts: int = option(
        0,
        "An engine that fails (it can serve nothing more) is replaced in place, keeping the worker's registration "
        "and id, up to this many times an hour; its requests in flight fail (the router migrates them), and the "
        "new engine's epoch resets this worker's index entries in every router (docs/kv-events.md). 0, or past "
        "the limit, or a role that cannot swap its engine: the worker drains and exits 1, for its supervisor",
    )
    stream_port: int = option(
        0,
        "TCP port of the worker stream (docs/worker-stream.md, Transports), on the gRPC server's host and "
        "advertised in discovery (0: a free port; -1: no TCP stream, clients use GenerateMany over gRPC)",
    )
