"""Settings of the router (standalone service or embedded in the frontend)."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import group, option
from commutator.common.grpc import GrpcConfig
from commutator.common.runtime import RuntimeConfig
from commutator.router.policies import POLICIES

__all__ = ["RouterConfig", "RouterServiceConfig"]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """How requests are routed to workers."""

    router_mode: str = option("kv", "How a worker is chosen", choices=tuple(POLICIES))
    overlap_weight: float = option(1.0, "Weight of cached prompt blocks in the kv cost (0: pure load balancing)")
    decode_weight: float = option(
        1.0,
        "Weight of a block of load (the worker's active blocks plus the request's new ones) in the kv cost; "
        "1 is DESIGN.md 4.4. Below 1, cached prefixes count for more against spreading load: fewer prompt "
        "tokens computed and lower TTFT, a somewhat less even decode load (docs/routing.md, 'Decode weight')",
    )
    router_temperature: float = option(0.0, "0: lowest cost wins; > 0: softmax sampling over costs")
    router_adaptive: bool = option(
        False,
        "kv mode: tune the overlap weight, decode weight and temperature online, among --adaptive-weights x "
        "--adaptive-decode-weights x --adaptive-temperatures, from the TTFT of the requests routed with each "
        "and how many predicted cache hits the workers confirm (docs/routing.md); off: --overlap-weight, "
        "--decode-weight and --router-temperature",
    )
    adaptive_weights: tuple[float, ...] = option((1.0,), "--router-adaptive: overlap weights tried")
    adaptive_decode_weights: tuple[float, ...] = option(
        (1.0, 0.5, 0.25), "--router-adaptive: decode weights tried (see --decode-weight)"
    )
    adaptive_temperatures: tuple[float, ...] = option((0.0,), "--router-adaptive: temperatures tried")
    adaptive_explore: float = option(
        0.1,
        "--router-adaptive: share of contested requests (the arms pick different workers) routed with an "
        "arm drawn at random",
    )
    adaptive_half_life: float = option(
        200.0, "--router-adaptive: requests after which an observation counts half in an arm's mean TTFT"
    )
    kv_events: bool = option(
        True, "Index workers' KV events; --no-kv-events: approximate mode (remember own decisions)"
    )
    approx_ttl_s: float = option(120.0, "Approximate mode: how long a routed prompt counts as cached")
    busy_kv_usage: float = option(0.0, "Skip workers whose KV usage is at or above this fraction (0: off)")
    busy_prefill_tokens: int = option(0, "Skip workers with this many prompt tokens waiting for prefill (0: off)")
    load_timeout_s: float = option(
        0.0,
        "Force-free a request's load if its end is never reported (0: the generate timeout plus 60 s, "
        "so a stream that is still allowed to run keeps its accounting)",
    )
    router_replica_sync: bool = option(False, "Share load accounting with the other router replicas")
    snapshot_interval_s: float = option(60.0, "How often the index is snapshotted to the object store (0: never)")
    worker_component: str = option("decode", "Discovery component of the workers to route to")
    worker_endpoint: str = option("generate", "Discovery endpoint of the workers' Worker service")
    router_block_size: int = option(0, "Block size for hashing prompts (0: the workers' registered block size)")
    generate_timeout_s: float = option(3600.0, "Deadline of a proxied Generate stream")
    worker_stream: str = option(
        "tcp",
        "How requests reach a worker: tcp (all of this process's requests to it over one stream on a plain TCP "
        "connection; a worker that advertises no stream port is reached as with mux), mux (the same stream as "
        "one gRPC GenerateMany call) or unary (one gRPC Generate call per request)",
        choices=("tcp", "mux", "unary"),
    )
    worker_stream_buffer: int = option(
        4096,
        "tcp, mux: updates one request may have waiting unread before it is cancelled (its client stopped reading);"
        " the other requests on the stream never wait for it",
    )
    worker_retries: int = option(
        3,
        "Before a request's first response: how many times a worker that cannot be reached is excluded "
        "and the request routed to another",
    )
    migration_limit: int = option(
        3,
        "After a request's first response: how many times it may be migrated when its worker fails (the prompt "
        "and the tokens streamed so far continue on another worker; the client sees one stream). 0: off, the "
        "request fails with UNAVAILABLE",
    )
    health_probe_interval_s: float = option(
        1.0,
        "A worker that could not be reached gets no requests until it leaves discovery or answers a gRPC "
        "health check; this is how often it is checked",
    )

    @property
    def effective_load_timeout_s(self) -> float:
        return self.load_timeout_s if self.load_timeout_s > 0 else self.generate_timeout_s + 60.0


@dataclass(frozen=True, slots=True)
class RouterServiceConfig:
    """The standalone router service: python -m commutator.router."""

    runtime: RuntimeConfig = group(RuntimeConfig)
    grpc: GrpcConfig = group(GrpcConfig)
    router: RouterConfig = group(RouterConfig)
    router_component: str = option("router", "Discovery component the router registers under")
