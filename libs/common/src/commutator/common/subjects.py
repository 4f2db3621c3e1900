"""Names on the event plane, defined once for publishers and consumers.

Namespaces and components are limited to ``[A-Za-z0-9_-]`` (see
:mod:`commutator.common.discovery.types`), so each is one subject token and
valid in stream and bucket names.
"""

from __future__ import annotations

from commutator.common.events.base import StreamSpec

__all__ = [
    "kv_events_stream",
    "kv_events_stream_spec",
    "kv_events_subject",
    "kv_events_subjects",
    "load_subject",
    "load_subjects",
    "model_bucket",
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


def kv_events_stream_spec(namespace: str, component: str) -> StreamSpec:
    """The stream spec workers and routers both ensure (one definition, so they never disagree).

    Routers snapshot the index and purge what every replica has consumed and
    the snapshot covers; the age limit only guards a deployment with no router.
    No byte limit: JetStream reserves a stream's byte limit from the server's
    storage up front, which would make every stream cost its maximum.
    """
    return StreamSpec(
        name=kv_events_stream(namespace, component),
        subjects=(kv_events_subjects(namespace, component),),
        max_age_s=7 * 24 * 3600.0,
    )
