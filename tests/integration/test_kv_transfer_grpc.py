"""The ``grpc`` KV transfer: a real gRPC server (the decode side's ``KvTransfer`` service) and client
(the prefill side's ``GrpcTransfer``) on loopback, and the reservations they write into.

The engines are small hand-written stand-ins with the push-engine methods the transfer calls
(``prefill_blocks``, ``kv_export``, ``kv_bytes_per_block`` on the prefill side; ``kv_import`` on the
decode side); the hf engine's real export/import is exercised end to end in tests/e2e/test_disagg.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
from commutator.common.grpc import GrpcConfig, GrpcServer
from commutator.v1 import common_pb2, kv_transfer_pb2_grpc
from commutator.worker.disagg import Reservations
from commutator.worker.kv_transfer import (
    GrpcTransfer,
    KvTransferConfig,
    KvTransferServicer,
    SimulatedTransfer,
    TransferError,
)

pytestmark = pytest.mark.integration

BLOCK = 1000  # bytes of KV per block


class PrefillSide:
    """Holds each request's prompt blocks; a block's KV is its id repeated (so misplaced bytes show)."""

    kv_bytes_per_block = BLOCK

    def __init__(self, held: dict[str, tuple[int, ...]]) -> None:
        self.held = held

    def prefill_blocks(self, request_id: str) -> tuple[int, ...] | None:
        return self.held.get(request_id)

    async def kv_export(self, block_ids: Sequence[int]) -> bytes:
        return b"".join(bytes([b % 256]) * BLOCK for b in block_ids)


class DecodeSide:
    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}
        self.writes = 0

    async def kv_import(self, block_ids: Sequence[int], data: bytes) -> None:
        if len(data) != len(block_ids) * BLOCK:
            raise ValueError("data of another size")
        self.writes += 1
        for i, b in enumerate(block_ids):
            self.blocks[b] = data[i * BLOCK : (i + 1) * BLOCK]


@pytest.fixture
async def decode() -> AsyncIterator[tuple[DecodeSide, Reservations, list[str], str]]:
    engine, released = DecodeSide(), []
    reservations = Reservations(released.append)
    server = GrpcServer(GrpcConfig())
    servicer = KvTransferServicer(engine, reservations)  # type: ignore[arg-type]
    server.add(kv_transfer_pb2_grpc.add_KvTransferServicer_to_server, servicer, "commutator.v1.KvTransfer")
    await server.start()
    yield engine, reservations, released, server.address
    await server.stop()


def dest(address: str, blocks: Sequence[int]) -> common_pb2.TransferDescriptor:
    return common_pb2.TransferDescriptor(
        kind=common_pb2.TransferDescriptor.KIND_GRPC, grpc_address=address, block_ids=list(blocks)
    )


async def test_the_prompt_kv_lands_in_the_reserved_blocks_in_order(decode) -> None:  # type: ignore[no-untyped-def]
    engine, reservations, released, address = decode
    reservations.add("r", (40, 41, 42, 43, 44))
    transfer = GrpcTransfer(KvTransferConfig(kv_transfer_chunk_bytes=2 * BLOCK))  # three messages
    prefill = PrefillSide({"r": (7, 8, 9, 10, 11)})
    sent = await transfer.send(prefill, "r", 300, dest(address, (40, 41, 42, 43, 44)))  # type: ignore[arg-type]
    assert sent == 5 * BLOCK and engine.writes == 3
    assert {b: engine.blocks[b][:1] for b in engine.blocks} == {
        40: b"\x07",
        41: b"\x08",
        42: b"\x09",
        43: b"\x0a",
        44: b"\x0b",
    }
    assert reservations.hand_over("r") and released == []  # the decoding request keeps the blocks
    await transfer.close()


async def test_a_write_for_a_reservation_that_is_gone_is_refused(decode) -> None:  # type: ignore[no-untyped-def]
    engine, reservations, released, address = decode
    transfer = GrpcTransfer(KvTransferConfig())
    prefill = PrefillSide({"gone": (1, 2), "other": (3,)})
    reservations.add("gone", (5, 6))
    reservations.abandon("gone")  # the client left
    assert released == ["gone"]
    with pytest.raises(TransferError, match=r"FAILED_PRECONDITION.*no KV reservation"):
        await transfer.send(prefill, "gone", 100, dest(address, (5, 6)))  # type: ignore[arg-type]
    # Blocks reserved for another request cannot be written either.
    reservations.add("other", (9,))
    with pytest.raises(TransferError, match=r"INVALID_ARGUMENT.*not reserved"):
        await transfer.send(prefill, "other", 10, dest(address, (8,)))  # type: ignore[arg-type]
    # Nor a prompt whose block count differs from the reservation (caught before sending).
    with pytest.raises(TransferError, match="1 prefilled blocks but 2 reserved"):
        await transfer.send(prefill, "other", 10, dest(address, (9, 10)))  # type: ignore[arg-type]
    assert engine.writes == 0 and engine.blocks == {}
    await transfer.close()


def test_a_reservation_is_never_released_under_a_write() -> None:
    released: list[str] = []
    r = Reservations(released.append)
    r.add("a", (1, 2))
    with r.writing("a") as blocks:
        assert blocks == (1, 2)
        r.abandon("a")  # the decode worker gives up mid-write
        assert released == [] and r.get("a") is None
        assert not r.hand_over("a")
    assert released == ["a"] and len(r) == 0  # released once the write ended
    with r.writing("a") as blocks:
        assert blocks is None  # a later write finds nothing

    r.add("b", (3,))
    with r.writing("b"):
        assert not r.hand_over("b")  # the KV is not all there yet
    assert r.hand_over("b") and released == ["a"]  # handed over: not released
    r.abandon("b")
    assert released == ["a"]


async def test_the_simulated_transfer_takes_prompt_bytes_over_the_bandwidth() -> None:
    """DESIGN.md 5: isl * kv_bytes_per_token / bandwidth (8,192 tokens of 128 KiB over 25 Gb/s: 0.344 s)."""
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    transfer = SimulatedTransfer(KvTransferConfig(), sleep=sleep)
    d = transfer.descriptor("", (1, 2, 3))
    assert d.kind == common_pb2.TransferDescriptor.KIND_SIMULATED and d.kv_bytes_per_token == 131072
    assert await transfer.send(None, "r", 8192, d) == 8192 * 131072  # type: ignore[arg-type]
    assert slept == [pytest.approx(8192 * 131072 * 8 / 25e9)] and round(slept[0], 3) == 0.344
    # The decode side's figure wins: it knows its model's KV size.
    d.kv_bytes_per_token = 65536
    await transfer.send(None, "r", 1000, d)  # type: ignore[arg-type]
    assert slept[1] == pytest.approx(1000 * 65536 * 8 / 25e9)
