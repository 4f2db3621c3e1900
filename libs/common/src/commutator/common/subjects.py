"""Names on the event plane, defined once for publishers and consumers.

Namespaces and components are limited to ``[A-Za-z0-9_-]`` (see
:mod:`commutator.common.discovery.types`), so each is one subject token and
valid in stream and bucket names.
"""

from __future__ import annotations

import xxhash
from commutator.common.events.base import StreamSpec

__all__ = [
    "kv_events_stream",
    "kv_events_stream_spec",
    "kv_events_subject",
    "kv_events_subjects",
    "kv_stream_max_bytes",
    "load_subject",
    "load_subjects",
    "model_bucket",
    "prefill_cancel_subject",
    "prefill_consumer",
    "prefill_reply_subject",
    "prefill_stream_spec",
    "prefill_subject",
]


def kv_events_stream(namespace: str, component: str) -> str:
    """The JetStream stream of KV events of one (namespace, component)."""
    return f"KV_{namespace}_{component}"


def kv_events_subject(namespace: str, component: str, worker_id: int) -> str:
    return f"kv.{namespace}.{component}.{worker_id:x}"


def kv_events_subjects(namespace: str, component: str) -> str:
    """The wildcard of every worker's KV-event subject in (namespace, component)."""
    return f"kv.{namespace}.{component}.>"


def load_subject(namespace: str, component: str, worker_id: int) -> str:
    """Core (non-persistent) subject of a worker's load statistics."""
    return f"load.{namespace}.{component}.{worker_id:x}"


def load_subjects(namespace: str, component: str) -> str:
    return f"load.{namespace}.{component}.*"


def model_bucket(namespace: str) -> str:
    """Object-store bucket of model artifacts (tokenizer files) referenced by model cards."""
    return f"models_{namespace}"


KV_STREAM_BYTES_PER_BLOCK = 40
"""What one cached block costs in the KV-event stream over its life: a Stored entry (engine id and
local hash, ~24 bytes) and a Removed entry (~10 bytes), plus its share of the message overhead."""
KV_STREAM_TURNOVERS = 64
"""How many complete turnovers of every worker's cache the stream may hold."""
KV_STREAM_MIN_BYTES = 64 * 1024 * 1024


def kv_stream_max_bytes(total_kv_blocks: int) -> int:
    """The byte limit of a KV-event stream that feeds an index of ``total_kv_blocks`` (all workers' caches).

    Routers purge the stream below their snapshots, so it normally holds only the events since the
    last one; the limit bounds it where nobody purges (approximate mode, no router, a stuck consumer).
    Past the limit JetStream drops the oldest messages: a router that still needed them sees a gap in
    the affected workers' event ids and rebuilds them from their cache dumps, so the limit can cost a
    recovery, never a wrong index. 64 turnovers of every cache is far more than a snapshot interval
    holds at real engine speeds.
    """
    return max(KV_STREAM_MIN_BYTES, total_kv_blocks * KV_STREAM_BYTES_PER_BLOCK * KV_STREAM_TURNOVERS)


def kv_events_stream_spec(namespace: str, component: str, max_bytes: int = KV_STREAM_MIN_BYTES) -> StreamSpec:
    """The stream spec workers and routers both ensure (one definition, so they never disagree).

    Workers create it if it is missing (sized for their own cache) and never change it; routers size
    it to the whole index they feed (:func:`kv_stream_max_bytes`). The age limit is the last guard.
    """
    return StreamSpec(
        name=kv_events_stream(namespace, component),
        subjects=(kv_events_subjects(namespace, component),),
        max_age_s=7 * 24 * 3600.0,
        max_bytes=max_bytes,
    )


def _model_token(model: str) -> str:
    """A model name as one subject token (names hold '/', '.' and other characters subjects cannot)."""
    return f"{xxhash.xxh3_64_intdigest(model.encode()):016x}"


def prefill_stream_spec(namespace: str, component: str) -> StreamSpec:
    """The work-queue stream of prefill requests for the prefill workers of (namespace, component).

    Work-queue retention: a request leaves the stream once a prefill worker acks it. Messages
    older than ten minutes go too (their decode workers gave up long before).
    """
    return StreamSpec(
        name=f"PREFILL_{namespace}_{component}",
        subjects=(f"prefill.{namespace}.{component}.req.*",),
        work_queue=True,
        max_age_s=600.0,
    )


def prefill_subject(namespace: str, component: str, model: str) -> str:
    """Where a decode worker queues prefill requests for ``model``."""
    return f"prefill.{namespace}.{component}.req.{_model_token(model)}"


def prefill_consumer(model: str) -> str:
    """The durable consumer the prefill workers of ``model`` share (one consumer group per model)."""
    return f"prefill-{_model_token(model)}"


def prefill_reply_subject(namespace: str, component: str, decode_worker_id: int) -> str:
    """Core subject on which a decode worker receives its PrefillResults."""
    return f"prefill.{namespace}.{component}.reply.{decode_worker_id:x}"


def prefill_cancel_subject(namespace: str, component: str) -> str:
    """Core subject of PrefillCancel messages (every prefill worker of the component listens)."""
    return f"prefill.{namespace}.{component}.cancel"
