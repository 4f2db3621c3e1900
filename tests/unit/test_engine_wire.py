"""Conversions between the wire protos and engine data."""

from __future__ import annotations

import pytest
from commutator.engines.base import (
    EngineOutput,
    FinishReason,
    KvCleared,
    KvEventRecord,
    KvRemoved,
    KvStored,
    TokenLogprob,
)
from commutator.engines.wire import event_batch, output_to_proto, request_from_proto
from commutator.v1 import common_pb2, kv_events_pb2

pytestmark = pytest.mark.unit


def test_request_fields_and_unset_optionals() -> None:
    req = common_pb2.GenerateRequest(request_id="r", token_ids=[1, 2, 3], lora_name="l", cache_salt="s")
    req.sampling.temperature = 0.0
    req.stop.max_tokens = 5
    req.stop.stop_token_ids.extend([7])
    req.logprobs = 2
    e = request_from_proto(req)
    assert list(e.token_ids) == [1, 2, 3] and (e.lora_name, e.cache_salt) == ("l", "s")
    assert e.sampling.temperature == 0.0 and e.sampling.top_p is None and e.sampling.seed is None
    assert (e.stop.max_tokens, e.stop.stop_token_ids, e.logprobs, e.kv_import) == (5, (7,), 2, None)
    req.disaggregation.first_token_id = 9
    assert request_from_proto(req).kv_import.first_token_id == 9  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.ClearField("request_id"), "request_id is required"),
        (lambda r: r.ClearField("token_ids"), "token_ids is empty"),
        (lambda r: setattr(r.sampling, "temperature", -1.0), "temperature"),
        (lambda r: setattr(r.sampling, "top_p", 1.5), "top_p"),
        (lambda r: (setattr(r.stop, "min_tokens", 9), setattr(r.stop, "max_tokens", 3)), "min_tokens"),
    ],
)
def test_invalid_requests_name_the_problem(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    req = common_pb2.GenerateRequest(request_id="r", token_ids=[1])
    mutate(req)
    with pytest.raises(ValueError, match=message):
        request_from_proto(req)


def test_output_to_proto() -> None:
    out = EngineOutput(
        [5, 6],
        FinishReason.LENGTH,
        prompt_tokens=10,
        cached_prompt_tokens=8,
        logprobs=[TokenLogprob(5, -0.1, ((5, -0.1), (3, -2.0)))],
    )
    p = output_to_proto(out)
    assert list(p.token_ids) == [5, 6] and p.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (p.prompt_tokens, p.cached_prompt_tokens) == (10, 8)
    assert [(t.token_id, round(t.logprob, 3)) for t in p.logprobs[0].top] == [(5, -0.1), (3, -2.0)]


def test_event_batch_round_trip() -> None:
    records = [
        KvEventRecord(0, KvStored(None, ((2**64 - 1, 11), (22, 33)))),
        KvEventRecord(1, KvStored(2**64 - 1, ((44, 55),))),
        KvEventRecord(2, KvRemoved((22, 44))),
        KvEventRecord(3, KvCleared()),
    ]
    wire = kv_events_pb2.KvEventBatch.FromString(event_batch(records, worker_id=0xABC).SerializeToString())
    evs = wire.events
    assert [(e.worker_id, e.event_id, e.WhichOneof("data")) for e in evs] == [
        (0xABC, 0, "stored"),
        (0xABC, 1, "stored"),
        (0xABC, 2, "removed"),
        (0xABC, 3, "cleared"),
    ]
    assert not evs[0].stored.HasField("parent_hash") and evs[1].stored.parent_hash == 2**64 - 1
    assert [(b.block_hash, b.tokens_hash) for b in evs[0].stored.blocks] == [(2**64 - 1, 11), (22, 33)]
    assert list(evs[2].removed.block_hashes) == [22, 44]
