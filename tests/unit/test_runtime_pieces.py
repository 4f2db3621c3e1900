"""Small pure pieces of the runtime: subject matching, key layout, virtual time, error mapping."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from commutator.common.clock import VirtualClock
from commutator.common.discovery.types import (
    Instance,
    InstanceInfo,
    ModelCard,
    instance_key,
    model_card_key,
    parse_instance_key,
)
from commutator.common.errors import Cancelled, DeadlineExceeded, InvalidRequest, Overloaded, RemoteError, Unavailable
from commutator.common.events.base import subject_matches
from commutator.common.grpc.client import map_rpc_error

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pattern", "subject", "ok"),
    [
        ("kv.ns.decode", "kv.ns.decode", True),
        ("kv.*.decode", "kv.ns.decode", True),
        ("kv.*", "kv.ns.decode", False),
        ("kv.>", "kv.ns.decode", True),
        ("kv.>", "kv", False),
        ("kv.ns.>", "kv.ns", False),
        ("kv.ns", "kv.ns.decode", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, ok: bool) -> None:
    assert subject_matches(pattern, subject) is ok


def test_instance_key_layout_round_trips() -> None:
    key = instance_key("prod", "decode", "generate", 0x694D9A5B1C2D3E4F)
    assert key == "/services/prod/decode/generate-694d9a5b1c2d3e4f"
    assert parse_instance_key(key) == ("prod", "decode", "generate", 0x694D9A5B1C2D3E4F)
    assert parse_instance_key("/services/prod/decode/kv-events-1f") == ("prod", "decode", "kv-events", 0x1F)
    for bad in ("/services/prod/decode", "/other/prod/decode/x-1", "/services/prod/decode/noid"):
        with pytest.raises(ValueError):
            parse_instance_key(bad)
    with pytest.raises(ValueError, match="invalid namespace"):
        instance_key("has/slash", "decode", "x", 1)


def test_instance_and_card_json_round_trip_and_tolerate_extra_fields() -> None:
    info = InstanceInfo(
        address="10.0.0.1:7000", role="decode", model="m", block_size=64, kv_capacity_blocks=16384, dp_size=2
    )
    assert InstanceInfo.from_json(info.to_json()) == info
    assert InstanceInfo.from_json(b'{"address": "a:1", "future_field": 3}') == InstanceInfo(address="a:1")
    streaming = InstanceInfo(address="10.0.0.1:7000", stream_port=7001)  # the worker stream over TCP
    assert InstanceInfo.from_json(streaming.to_json()) == streaming
    assert (streaming.stream_address, info.stream_address) == ("10.0.0.1:7001", "")
    inst = Instance.from_kv("/services/ns/decode/generate-ff", info.to_json())
    assert (inst.instance_id, inst.info) == (0xFF, info)
    card = ModelCard(name="org/m", block_size=16, context_length=8192, eos_token_ids=(1, 2), artifacts={"t": "o"})
    assert ModelCard.from_json(card.to_json()) == card
    assert model_card_key("ns", "org/m", 0xAB) == "/models/ns/org%2Fm/ab"
    with pytest.raises(ValueError):
        InstanceInfo.from_json(b"[1, 2]")


async def test_virtual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper("b", 2.0)), asyncio.create_task(sleeper("a", 1.0))]
    await clock.advance(0.5)
    assert woke == []
    await clock.advance(2.0)
    assert woke == [("a", 1.0), ("b", 2.0)]
    assert clock.monotonic() == 2.5
    await asyncio.gather(*tasks)
    with pytest.raises(ValueError):
        await clock.advance(-1)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "typed"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, Cancelled),
        (grpc.StatusCode.INTERNAL, RemoteError),
        (grpc.StatusCode.UNKNOWN, RemoteError),
    ],
)
def test_status_codes_map_to_typed_errors(code: grpc.StatusCode, typed: type[Exception]) -> None:
    err = map_rpc_error(_FakeRpcError(code, "boom"), "ns/decode/worker/Generate@h:1")
    assert type(err) is typed
    assert str(err) == "ns/decode/worker/Generate@h:1: boom"
    if typed is RemoteError:
        assert err.code == code.name  # type: ignore[attr-defined]
