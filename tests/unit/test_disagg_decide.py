"""Conditional disaggregation (DESIGN.md 2, step 1): which prompts a decode worker sends to the
prefill workers. The rule alone, with a stand-in for the inner engine and the prefill pool."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from commutator.engines.base import EngineRequest, KvImport
from commutator.worker.disagg import DisaggConfig, DisaggEngine
from commutator.worker.kv_transfer import KvTransferConfig, SimulatedTransfer

pytestmark = pytest.mark.unit


class Inner:
    kv_handoff = "push"
    cached = 0

    def cached_prefix_tokens(self, request: EngineRequest) -> int:
        return self.cached

    def release_import(self, request_id: str) -> None:
        return None


def engine(prefill_workers: int = 1, **config: object) -> tuple[DisaggEngine, Inner]:
    inner = Inner()
    runtime = SimpleNamespace(namespace="ns")
    eng = DisaggEngine(
        inner,  # type: ignore[arg-type]
        DisaggConfig(**config),  # type: ignore[arg-type]
        SimulatedTransfer(KvTransferConfig()),
        runtime,  # type: ignore[arg-type]
        "m",
        "decode-1",
        lambda: "",
    )
    eng.prefill_workers = lambda: prefill_workers  # type: ignore[method-assign]
    return eng, inner


def req(n: int, **kw: object) -> EngineRequest:
    return EngineRequest("r", list(range(n)), **kw)  # type: ignore[arg-type]


def test_auto_sends_only_long_uncached_prompts_while_the_queue_is_short() -> None:
    eng, inner = engine()
    assert eng.decide(req(1000)) == "local"  # not longer than --max-local-prefill-length
    assert eng.decide(req(1001)) == "remote"
    inner.cached = 64  # the uncached part is what counts
    assert eng.decide(req(1064)) == "local" and eng.decide(req(1065)) == "remote"
    eng.queue_depth = 15
    assert eng.decide(req(5000)) == "remote"
    eng.queue_depth = 16  # --max-prefill-queue-size
    assert eng.decide(req(5000)) == "local"


def test_always_never_and_what_is_never_sent() -> None:
    eng, _ = engine(remote_prefill="always")
    assert eng.decide(req(10)) == "remote"
    eng.queue_depth = 1000
    assert eng.decide(req(10)) == "remote"  # always ignores the queue
    assert eng.decide(req(5000, prefill_only=True)) == "local"
    assert eng.decide(req(5000, kv_import=KvImport(1))) == "local"
    never, _ = engine(remote_prefill="never")
    assert never.decide(req(50_000)) == "local"
    alone, _ = engine(prefill_workers=0, remote_prefill="always")
    assert alone.decide(req(50_000)) == "local"  # no prefill worker serves the model
    unset, inner = engine(remote_prefill="always")
    inner.kv_handoff = ""  # the engine is not set up for disaggregation (vLLM without a connector)
    assert unset.decide(req(50_000)) == "local"


async def test_a_push_start_declined_for_a_remote_prefill_is_not_decided_again_by_generate() -> None:
    """The worker stream asks start_request first; a remote prefill makes it decline, and the request
    then goes through generate(), which must take that decision rather than make it again (the rule
    looks up the prompt's cached prefix, hashing it)."""
    eng, inner = engine()
    started, reserved = [], []
    inner.start_request = lambda request, notify: started.append(request.request_id)  # type: ignore[attr-defined]
    # No room to import the KV: the remote path falls back to prefilling here, which ends the test quickly.
    inner.reserve_import = lambda request: reserved.append(request.request_id)  # type: ignore[attr-defined]

    async def local(request: EngineRequest):  # type: ignore[no-untyped-def]
        yield "first output"

    inner.generate = local  # type: ignore[attr-defined]
    decided = []
    decide = eng.decide

    def counted(request: EngineRequest) -> str:
        decided.append(request.request_id)
        return decide(request)

    eng.decide = counted  # type: ignore[method-assign]
    assert eng.start_request(req(5000), lambda: None) is None and started == []
    assert [x async for x in eng.generate(req(5000))] == ["first output"]
    assert decided == ["r"]  # once, by start_request
    assert reserved == ["r"]  # generate took the remote path it had decided
    assert eng._remote_decided == set()
    eng.start_request(req(10), lambda: None)  # local: started on the inner engine, nothing remembered
    assert started == ["r"] and eng._remote_decided == set()
