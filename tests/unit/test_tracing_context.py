"""Trace context without a tracer provider: nothing to parse when the caller sent none, and the
caller's context passed on when it did."""

from __future__ import annotations

import pytest
from commutator.common import tracing
from opentelemetry import trace

pytestmark = pytest.mark.unit

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HEADERS = [("Host", "x"), ("Content-Type", "application/json")]


@pytest.fixture
def no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_provider", None)  # another test may have installed one


def test_without_a_caller_context_the_span_is_invalid_and_nothing_is_injected(no_provider: None) -> None:
    with tracing.server_span("POST /v1/completions", HEADERS, request_id="r") as span:
        assert span is trace.INVALID_SPAN
        assert tracing.inject_metadata([("k", "v")], span=span) == [("k", "v")]


def test_a_callers_trace_context_is_passed_on(no_provider: None) -> None:
    for key in ("traceparent", "Traceparent"):  # HTTP header names in any case
        with tracing.server_span("POST /v1/completions", [*HEADERS, (key, PARENT)]) as span:
            assert span is not trace.INVALID_SPAN
            assert span.get_span_context().trace_id == int(PARENT.split("-")[1], 16)
            # The same trace goes on (the span id is the parent's, or a child's where another test
            # has installed a tracer provider in this process).
            carried = tracing.inject_metadata([("k", "v")], span=span)
            assert carried[0] == ("k", "v") and [k for k, _ in carried[1:]] == ["traceparent"]
            assert carried[1][1].split("-")[1] == PARENT.split("-")[1]
