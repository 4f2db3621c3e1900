"""Every Prometheus metric of Commutator, defined once, on one registry.

Cores compute statistics; service shells update these objects. Each process
serves the registry as Prometheus text on its metrics port
(:class:`commutator.common.http.StatusServer`). Roles that share a process
(the embedded mode) share the registry; labels tell them apart.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

__all__ = ["REGISTRY", "render"]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_NS = "commutator"

BUILD_INFO = Info(_NS + "_build", "Commutator version and role of this process", registry=REGISTRY)

TASK_RESTARTS = Counter(
    _NS + "_task_restarts",
    "Background tasks (ingestion, publishers, watches) that died and were started again",
    ["task"],
    registry=REGISTRY,
)

# ---- discovery --------------------------------------------------------------
DISCOVERY_REGISTRATIONS = Gauge(
    _NS + "_discovery_registrations",
    "Keys this process holds in discovery under its lease",
    ["backend"],
    registry=REGISTRY,
)
DISCOVERY_LEASE_KEEPALIVES = Counter(
    _NS + "_discovery_lease_keepalives",
    "Lease keep-alive attempts by result (ok, failed, lost)",
    ["backend", "result"],
    registry=REGISTRY,
)
DISCOVERY_LEASE_REGRANTS = Counter(
    _NS + "_discovery_lease_regrants",
    "Leases granted again after the old one was lost (registrations re-put)",
    ["backend"],
    registry=REGISTRY,
)
DISCOVERY_WATCH_RESTARTS = Counter(
    _NS + "_discovery_watch_restarts",
    "Prefix watches re-created after the connection to the store broke",
    ["backend"],
    registry=REGISTRY,
)

# ---- event plane ------------------------------------------------------------
EVENTS_PUBLISHED = Counter(
    _NS + "_events_published",
    "Messages acknowledged by the event plane",
    ["stream"],
    registry=REGISTRY,
)
EVENTS_PUBLISH_RETRIES = Counter(
    _NS + "_events_publish_retries",
    "Publishes sent again after an ack timed out or failed (deduplicated by message id)",
    ["stream"],
    registry=REGISTRY,
)
EVENTS_PUBLISH_FAILURES = Counter(
    _NS + "_events_publish_failures",
    "Messages given up on after every retry failed",
    ["stream"],
    registry=REGISTRY,
)
EVENTS_PUBLISH_PENDING = Gauge(
    _NS + "_events_publish_pending",
    "Published messages not yet acknowledged",
    ["stream"],
    registry=REGISTRY,
)
EVENTS_CONSUMED = Counter(
    _NS + "_events_consumed",
    "Messages delivered to a consumer of this process",
    ["stream", "consumer"],
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    _NS + "_events_dropped",
    "Messages dropped by reason (slow_subscriber: a bounded subscriber queue was full)",
    ["reason"],
    registry=REGISTRY,
)
BAD_MESSAGES = Counter(
    _NS + "_bad_messages",
    "Messages that could not be read and were skipped, by source (kv_events, worker_stats, replica_sync)",
    ["source"],
    registry=REGISTRY,
)
EVENT_PLANE_RECONNECTS = Counter(
    _NS + "_event_plane_reconnects",
    "Reconnections to the event-plane server",
    ["backend"],
    registry=REGISTRY,
)

# ---- gRPC -------------------------------------------------------------------
GRPC_CLIENT_ERRORS = Counter(
    _NS + "_grpc_client_errors",
    "Failed calls by service, method and typed error kind",
    ["service", "method", "kind"],
    registry=REGISTRY,
)
GRPC_SERVER_INFLIGHT = Gauge(
    _NS + "_grpc_server_inflight",
    "RPCs being served",
    ["service"],
    registry=REGISTRY,
)
GRPC_CLIENT_LATENCY = Histogram(
    _NS + "_grpc_client_unary_seconds",
    "Latency of unary calls made through EndpointClient",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)

# ---- workers (decode / aggregated) -------------------------------------------------
WORKER_REQUESTS = Counter(
    _NS + "_worker_requests",
    "Generate requests finished, by outcome (stop, length, abort, error, cancelled, invalid)",
    ["worker", "outcome"],
    registry=REGISTRY,
)
WORKER_ACTIVE_REQUESTS = Gauge(
    _NS + "_worker_active_requests",
    "Generate streams being served",
    ["worker"],
    registry=REGISTRY,
)
WORKER_OUTPUT_TOKENS = Counter(
    _NS + "_worker_output_tokens",
    "Tokens streamed to clients",
    ["worker"],
    registry=REGISTRY,
)
WORKER_STREAM_MESSAGES = Counter(
    _NS + "_worker_stream_messages",
    "Generate stream messages sent (tokens / messages shows how much coalescing a slow client caused)",
    ["worker"],
    registry=REGISTRY,
)
WORKER_PROMPT_TOKENS = Counter(
    _NS + "_worker_prompt_tokens",
    "Prompt tokens received, and how many of them the prefix cache served",
    ["worker", "kind"],
    registry=REGISTRY,
)
WORKER_TTFT_SECONDS = Histogram(
    _NS + "_worker_ttft_seconds",
    "Time from receiving a request to sending its first token, inside the worker",
    ["worker"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
WORKER_KV_BLOCKS = Gauge(
    _NS + "_worker_kv_blocks",
    "KV cache blocks: used (held by running requests) and total",
    ["worker", "kind"],
    registry=REGISTRY,
)
WORKER_QUEUE = Gauge(
    _NS + "_worker_requests_in_engine",
    "Requests inside the engine: running or waiting",
    ["worker", "state"],
    registry=REGISTRY,
)
WORKER_KV_EVENTS = Counter(
    _NS + "_worker_kv_events",
    "KV events published (and dropped because the publisher fell behind)",
    ["worker", "result"],
    registry=REGISTRY,
)

# ---- disaggregation ----------------------------------------------------------------
DISAGG_PREFILLS = Counter(
    _NS + "_disagg_prefills",
    "Prompts a decode worker prefilled: local, remote, or fallback (remote failed or timed out, then local)",
    ["worker", "where"],
    registry=REGISTRY,
)
PREFILL_QUEUE_DEPTH = Gauge(
    _NS + "_prefill_queue_depth",
    "Prefill requests waiting in the queue (as last polled)",
    ["component"],
    registry=REGISTRY,
)
PREFILL_REQUESTS = Counter(
    _NS + "_prefill_requests",
    "Prefill work taken from the queue, by outcome (done, failed, cancelled, expired, bad)",
    ["worker", "outcome"],
    registry=REGISTRY,
)
PREFILL_TOKENS = Counter(
    _NS + "_prefill_tokens",
    "Prompt tokens a prefill worker computed (not served from its cache)",
    ["worker"],
    registry=REGISTRY,
)
PREFILL_STAGE_SECONDS = Histogram(
    _NS + "_prefill_stage_seconds",
    "Time of a remote prefill by stage: queue, prefill, transfer",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
KV_TRANSFER_BYTES = Counter(
    _NS + "_kv_transfer_bytes",
    "KV cache bytes moved between workers, by backend and direction (sent, received)",
    ["backend", "direction"],
    registry=REGISTRY,
)

# ---- multiplexed worker streams ---------------------------------------------------------------
WORKER_STREAM_OVERFLOWS = Counter(
    _NS + "_worker_stream_overflows",
    "Requests cancelled because their client stopped reading: more updates waiting unread than --worker-stream-buffer",
    registry=REGISTRY,
)

# ---- router --------------------------------------------------------------------------
ROUTER_STAGE_SECONDS = Histogram(
    _NS + "_router_stage_seconds",
    "Routing overhead per decision, by stage (hash, match, select, total)",
    ["stage"],
    buckets=(5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
    registry=REGISTRY,
)
ROUTER_DECISIONS = Counter(
    _NS + "_router_decisions",
    "Routing decisions by outcome (routed, all_busy, no_workers)",
    ["outcome"],
    registry=REGISTRY,
)
ROUTER_PROMPT_BLOCKS = Counter(
    _NS + "_router_prompt_blocks",
    "Prompt blocks routed, and how many the chosen worker had cached (overlap / prompt = predicted KV hit rate); "
    "of requests whose first response came: the hits predicted (overlap, at most all but the last block) and "
    "found by the worker (found_hit / predicted_hit = how far the index's predictions hold)",
    ["kind"],
    registry=REGISTRY,
)
ROUTER_CACHE_HIT_ERROR = Histogram(
    _NS + "_router_cache_hit_error_blocks",
    "Per routed request: prompt blocks its worker found cached (cached prompt tokens / block size) minus the "
    "blocks the router predicted (its overlap there, at most all but the last block); below 0: predicted hits "
    "the engine did not find (no _sum: negative buckets; sums are in commutator_router_prompt_blocks_total)",
    buckets=(-128, -32, -8, -2, -1, 0, 1, 2, 8, 32, 128),
    registry=REGISTRY,
)
ROUTER_KV_EVENTS = Counter(
    _NS + "_router_kv_events",
    "KV events by what the index did with them",
    ["result"],
    registry=REGISTRY,
)
ROUTER_KV_EVENT_LAG = Histogram(
    _NS + "_router_kv_event_lag_seconds",
    "From the event plane storing a batch of KV events to this router's index applying it",
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
ROUTER_INDEX = Gauge(
    _NS + "_router_index",
    "Size of the KV index: nodes (distinct blocks), entries ((block, worker) pairs), workers",
    ["kind"],
    registry=REGISTRY,
)
ROUTER_WORKER_LOAD = Gauge(
    _NS + "_router_worker_load",
    "The router's load view per worker: active_blocks, prefill_tokens, requests, kv_usage",
    ["worker", "kind"],
    registry=REGISTRY,
)
ROUTER_ADAPTIVE = Gauge(
    _NS + "_router_adaptive",
    "--router-adaptive: the overlap weight in use (the best arm's, times the trust in the index), the decode "
    "weight in use and the "
    "index's accuracy (cached blocks the workers found per block it predicted)",
    ["kind"],
    registry=REGISTRY,
)
ROUTER_INHIBITIONS = Counter(
    _NS + "_router_worker_inhibitions",
    "Workers kept out of routing after a connection failure (inhibited), and let back in (lifted)",
    ["event"],
    registry=REGISTRY,
)
ROUTER_RETRIES = Counter(
    _NS + "_router_retries",
    "Requests routed again because their worker could not be reached before the first response",
    registry=REGISTRY,
)
ROUTER_MIGRATIONS = Counter(
    _NS + "_router_migrations",
    "Requests whose worker failed after streaming tokens: migrated (continued on another worker), or "
    "failed because they had been migrated --migration-limit times already (limit)",
    ["outcome"],
    registry=REGISTRY,
)
FRONTEND_ROUTER_MIGRATIONS = Counter(
    _NS + "_frontend_router_migrations",
    "Requests whose router service failed after streaming tokens: migrated (sent to a router again with the "
    "tokens so far), or failed because they had been migrated --migration-limit times already (limit)",
    ["outcome"],
    registry=REGISTRY,
)
WORKER_ENGINE_RESTARTS = Counter(
    _NS + "_worker_engine_restarts",
    "Engines that failed and were replaced in place (--engine-restarts)",
    registry=REGISTRY,
)
ROUTER_RECOVERIES = Counter(
    _NS + "_router_recoveries",
    "Workers rebuilt from a dump of their cache state after lost events, by result (ok, failed, stale_epoch: "
    "the dump predates an engine restart already seen)",
    ["result"],
    registry=REGISTRY,
)
ROUTER_EPOCH_RESETS = Counter(
    _NS + "_router_epoch_resets",
    "Worker ranks whose index entries were dropped because their engine restarted (a newer epoch), "
    "by what carried the new epoch (event, stats, dump)",
    ["source"],
    registry=REGISTRY,
)
ROUTER_SNAPSHOTS = Counter(
    _NS + "_router_snapshots",
    "Index snapshots written to the object store",
    registry=REGISTRY,
)
ROUTER_REPLICA_EVENTS = Counter(
    _NS + "_router_replica_events",
    "Load events exchanged with other router replicas",
    ["direction"],
    registry=REGISTRY,
)

# ---- frontend ------------------------------------------------------------------------
FRONTEND_REQUESTS = Counter(
    _NS + "_frontend_requests",
    "HTTP requests by endpoint and status code",
    ["endpoint", "status"],
    registry=REGISTRY,
)
FRONTEND_REJECTED = Counter(
    _NS + "_frontend_rejected_requests",
    "Requests refused by --api-keys-file before their endpoint: reason unauthenticated (no or unknown key) or"
    " rate_limited; key is the key's name from the file (empty when none matched), never the key",
    ["reason", "key"],
    registry=REGISTRY,
)
FRONTEND_INFLIGHT = Gauge(
    _NS + "_frontend_inflight_requests",
    "Generation requests being served",
    registry=REGISTRY,
)
FRONTEND_TTFT_SECONDS = Histogram(
    _NS + "_frontend_ttft_seconds",
    "Time from receiving a request to its first token, at the frontend",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
FRONTEND_CHUNK_SECONDS = Histogram(
    _NS + "_frontend_inter_chunk_seconds",
    "Mean time between the streamed chunks of a response, one observation per response",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
FRONTEND_TOKENS = Counter(
    _NS + "_frontend_tokens",
    "Tokens: prompt, cached (prompt tokens served from a prefix cache), completion",
    ["kind"],
    registry=REGISTRY,
)


def render() -> bytes:
    """The registry as Prometheus text exposition."""
    return generate_latest(REGISTRY)
