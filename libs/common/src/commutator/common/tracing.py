"""OpenTelemetry tracing: set-up, and W3C trace context carried in gRPC metadata.

Without an OTLP endpoint (``--otlp-endpoint`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``)
spans are not exported and tracing costs next to nothing. Tests install an
in-memory exporter. The frontend takes the W3C ``traceparent`` of the HTTP
request; every gRPC call made through :mod:`commutator.common.grpc` carries the
current context in its metadata, and servers open their spans as children of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

__all__ = ["extract_context", "inject_metadata", "server_span", "setup_tracing", "tracer"]

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None

_TRACER = trace.get_tracer("commutator")
"""Taken once: until a provider is installed it is a proxy that delegates to the provider set later, so
keeping it costs nothing in correctness and saves a provider look-up (an environment read) per span."""


def setup_tracing(
    service_name: str,
    otlp_endpoint: str | None = None,
    exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """Install the process's tracer provider.

    ``exporter`` (tests: an ``InMemorySpanExporter``) is attached with a simple,
    synchronous processor; an ``otlp_endpoint`` gets a batching OTLP/gRPC
    exporter. With neither, nothing is installed and spans are no-ops.
    The first call wins (OpenTelemetry allows one global provider).
    """
    global _provider
    if _provider is not None:
        if exporter is not None:
            _provider.add_span_processor(SimpleSpanProcessor(exporter))
        return _provider
    if exporter is None and not otlp_endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
        log.info("tracing: exporting spans over OTLP to %s", otlp_endpoint)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the exporters (end of process)."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_metadata(metadata: Sequence[tuple[str, str]] = (), span: trace.Span | None = None) -> list[tuple[str, str]]:
    """``metadata`` plus the W3C headers of ``span`` (default: the current span), if any."""
    if span is trace.INVALID_SPAN:  # from server_span's fast path: there is no context to carry on
        return list(metadata)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return [*metadata, *carrier.items()]


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The OpenTelemetry context carried in gRPC invocation metadata or HTTP headers (whose names
    are in any case: ``Traceparent`` is ``traceparent``)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


_fields_of: tuple[object, frozenset[str]] = (None, frozenset())


def _propagated_fields() -> frozenset[str]:
    """The carrier keys the global propagators read (kept until the propagators change)."""
    global _fields_of
    textmap = propagate.get_global_textmap()
    if _fields_of[0] is not textmap:
        _fields_of = (textmap, frozenset(textmap.fields))
    return _fields_of[1]


@contextlib.contextmanager
def server_span(name: str, metadata: Iterable[tuple[str, Any]] | None, **attributes: Any) -> Iterator[trace.Span]:
    """A server span for one RPC, parented by the caller's context from ``metadata``.

    The span is not made *current*: streaming handlers are async generators,
    which may be finished in another task's context than the one they started
    in, and a current-context token cannot be reset across contexts. Pass the
    span to :func:`inject_metadata` to carry it on to downstream calls.

    Where no tracer provider is installed and ``metadata`` carries none of the
    propagators' fields (``traceparent``, ``tracestate``, ``baggage`` by default),
    there is nothing to record or pass on: the span is ``INVALID_SPAN``, with no
    parsing (about 9 µs a request saved on the frontend and again on the worker).
    A caller's trace context is still passed on when there is one.
    """
    if _provider is None:
        fields = _propagated_fields()
        if not any(isinstance(k, str) and k.lower() in fields for k, _ in (metadata or ())):
            yield trace.INVALID_SPAN
            return
    ctx = extract_context(metadata)
    span = _TRACER.start_span(name, context=ctx, kind=trace.SpanKind.SERVER, attributes=attributes or None)
    try:
        yield span
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
            span.record_exception(exc)
        raise
    finally:
        span.end()
