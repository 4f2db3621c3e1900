"""Moving a prompt's KV cache from a prefill worker to a decode worker, behind one interface.

``--kv-transfer`` picks the backend (the pattern of ``router/policies.py``):

- ``simulated`` (mocker): nothing moves; the prefill worker waits
  ``prompt tokens x --kv-bytes-per-token / --transfer-bandwidth-gbps``, the time the
  bytes would take on that link (DESIGN.md 5).
- ``grpc``: the prefill engine exports the prompt's blocks (``kv_export``) and streams
  them into the blocks the decode engine reserved, through the decode worker's
  ``KvTransfer`` gRPC service, which imports them (``kv_import``) and refuses writes
  for a reservation that is gone (the decode worker gave up or its client left).
  For engines that hold KV in CPU memory (hf on CPU).
- ``nixl``: the prefill worker writes straight into the decode engine's reserved blocks
  with NIXL (GPU memory over RDMA/NVLink; CPU memory where UCX registers it), for engines
  that say where their KV lives (``kv_layout``): :mod:`commutator.worker.nixl_transfer`.

The decode side describes where the KV goes (:meth:`TransferBackend.descriptor`,
carried in the PrefillRequest); the prefill side moves it (:meth:`TransferBackend.send`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from commutator.common import metrics
from commutator.common.config import option
from commutator.common.errors import InvalidRequest
from commutator.common.grpc import abort_with
from commutator.common.tls import MutualTls, open_channel
from commutator.engines.base import Engine
from commutator.engines.registry import EngineError
from commutator.v1 import common_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc

__all__ = [
    "TRANSFERS",
    "GrpcTransfer",
    "ImportReservations",
    "KvTransferConfig",
    "KvTransferServicer",
    "SimulatedTransfer",
    "TransferBackend",
    "TransferError",
    "make_transfer",
]

log = logging.getLogger(__name__)

_KIND = {
    "simulated": common_pb2.TransferDescriptor.KIND_SIMULATED,
    "grpc": common_pb2.TransferDescriptor.KIND_GRPC,
    "nixl": common_pb2.TransferDescriptor.KIND_NIXL,
}


@dataclass(frozen=True, slots=True)
class KvTransferConfig:
    """How a prefill worker's KV reaches the decode worker."""

    kv_transfer: str = option(
        "simulated",
        "How push engines' KV (mocker, hf) reaches the decode worker: simulated (a delay of bytes / bandwidth: "
        "the mocker), grpc (KV bytes streamed into the decode worker's reserved blocks: engines with KV in CPU "
        "memory), nixl (GPU memory over NIXL); vLLM, SGLang and TensorRT-LLM move it by their own connectors",
        choices=("simulated", "grpc", "nixl"),
    )
    kv_bytes_per_token: int = option(131072, "simulated: KV bytes per prompt token (131072: an 8B model in bf16)")
    transfer_bandwidth_gbps: float = option(25.0, "simulated: bandwidth of the link, in gigabits per second")
    kv_transfer_chunk_bytes: int = option(4 * 1024 * 1024, "grpc: most KV bytes in one message")
    nixl_timeout_s: float = option(
        30.0, "nixl: longest wait for one request's KV write into the decode worker's blocks to complete (s)"
    )


class TransferError(Exception):
    """The KV could not be moved (the reservation is gone, the peer is unreachable, the layouts differ)."""


class TransferBackend(Protocol):
    name: str

    def descriptor(self, grpc_address: str, block_ids: Sequence[int]) -> common_pb2.TransferDescriptor:
        """Decode side: where this request's KV is to go."""
        ...

    def check_engine(self, engine: Engine, role: str) -> None:
        """:class:`EngineError` if ``engine`` cannot take part in this kind of transfer as ``role``."""
        ...

    async def start(self, engine: Engine) -> None:
        """Once ``engine`` has started, before the first :meth:`descriptor` or :meth:`send`
        (``nixl`` registers the engine's KV memory here)."""
        ...

    async def send(
        self, engine: Engine, request_id: str, prompt_tokens: int, dest: common_pb2.TransferDescriptor
    ) -> int:
        """Prefill side: move the held prompt KV of ``request_id`` to ``dest``; returns the bytes moved."""
        ...

    async def close(self) -> None: ...


class SimulatedTransfer:
    name = "simulated"

    def __init__(self, config: KvTransferConfig, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self._bytes_per_token = config.kv_bytes_per_token
        self._bytes_per_s = config.transfer_bandwidth_gbps * 1e9 / 8
        self._sleep = sleep

    def descriptor(self, grpc_address: str, block_ids: Sequence[int]) -> common_pb2.TransferDescriptor:
        return common_pb2.TransferDescriptor(
            kind=_KIND["simulated"], block_ids=list(block_ids), kv_bytes_per_token=self._bytes_per_token
        )

    def check_engine(self, engine: Engine, role: str) -> None:
        if hasattr(engine, "kv_export") or hasattr(engine, "kv_import"):
            raise EngineError(
                "--kv-transfer simulated moves no KV bytes (it times the mocker's transfers): an engine with "
                "real KV needs --kv-transfer grpc (or nixl on GPUs)"
            )

    async def start(self, engine: Engine) -> None:
        return None

    def seconds(self, prompt_tokens: int, bytes_per_token: int) -> float:
        return prompt_tokens * bytes_per_token / self._bytes_per_s

    async def send(
        self, engine: Engine, request_id: str, prompt_tokens: int, dest: common_pb2.TransferDescriptor
    ) -> int:
        per_token = dest.kv_bytes_per_token or self._bytes_per_token
        await self._sleep(self.seconds(prompt_tokens, per_token))
        return prompt_tokens * per_token

    async def close(self) -> None:
        return None


class GrpcTransfer:
    name = "grpc"

    def __init__(self, config: KvTransferConfig, tls: MutualTls | None = None) -> None:
        self._chunk_bytes = max(1, config.kv_transfer_chunk_bytes)
        self._tls = tls
        self._channels: dict[str, tuple[grpc.aio.Channel, kv_transfer_pb2_grpc.KvTransferStub]] = {}

    def descriptor(self, grpc_address: str, block_ids: Sequence[int]) -> common_pb2.TransferDescriptor:
        return common_pb2.TransferDescriptor(kind=_KIND["grpc"], grpc_address=grpc_address, block_ids=list(block_ids))

    def check_engine(self, engine: Engine, role: str) -> None:
        need = ("prefill_blocks", "kv_export", "kv_bytes_per_block") if role == "prefill" else ("kv_import",)
        missing = [m for m in need if not hasattr(engine, m)]
        if missing:
            raise EngineError(
                f"--kv-transfer grpc needs an engine that can {'export' if role == 'prefill' else 'import'} its "
                f"KV blocks ({', '.join(missing)}): the hf engine can; use --kv-transfer simulated for the mocker"
            )

    async def start(self, engine: Engine) -> None:
        return None

    def _stub(self, address: str) -> kv_transfer_pb2_grpc.KvTransferStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = open_channel(
                address,
                self._tls,
                [
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ],
            )
            entry = self._channels[address] = (channel, kv_transfer_pb2_grpc.KvTransferStub(channel))
        return entry[1]

    async def send(
        self, engine: Engine, request_id: str, prompt_tokens: int, dest: common_pb2.TransferDescriptor
    ) -> int:
        src = engine.prefill_blocks(request_id)  # type: ignore[attr-defined]
        if src is None:
            raise TransferError(f"{request_id}: no prefilled blocks are held to send")
        dst = list(dest.block_ids)
        if len(src) != len(dst):
            raise TransferError(
                f"{request_id}: {len(src)} prefilled blocks but {len(dst)} reserved (the workers' block sizes differ?)"
            )
        per_block = engine.kv_bytes_per_block  # type: ignore[attr-defined]
        step = max(1, self._chunk_bytes // max(1, per_block))
        sent = 0

        async def chunks() -> AsyncIterator[kv_transfer_pb2.KvChunk]:
            nonlocal sent
            for i in range(0, len(src), step):
                data = await engine.kv_export(src[i : i + step])  # type: ignore[attr-defined]
                sent += len(data)
                yield kv_transfer_pb2.KvChunk(request_id=request_id, block_ids=dst[i : i + step], data=data)

        try:
            await self._stub(dest.grpc_address).Write(chunks(), timeout=60.0)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            raise TransferError(
                f"{request_id}: KV write to {dest.grpc_address} failed: {code}: {err.details()}"
            ) from None
        metrics.KV_TRANSFER_BYTES.labels("grpc", "sent").inc(sent)
        return sent

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()


TRANSFERS: dict[str, Callable[[KvTransferConfig, MutualTls | None], TransferBackend]] = {
    "simulated": lambda config, _tls: SimulatedTransfer(config),
    "grpc": GrpcTransfer,
}


def make_transfer(config: KvTransferConfig, tls: MutualTls | None = None) -> TransferBackend:
    """The backend ``config.kv_transfer`` names (:class:`EngineError` when it cannot be used here).
    ``tls``: mutual TLS for the backends that talk gRPC."""
    if config.kv_transfer == "nixl":
        from commutator.worker.nixl_transfer import NixlTransfer

        return NixlTransfer(config)
    factory = TRANSFERS.get(config.kv_transfer)
    if factory is None:
        raise EngineError(f"unknown --kv-transfer {config.kv_transfer!r}")
    return factory(config, tls)


class ImportReservations(Protocol):
    """The decode side's reservations, as the ``KvTransfer`` service sees them."""

    def writing(self, request_id: str) -> contextlib.AbstractContextManager[Sequence[int] | None]:
        """The blocks reserved for ``request_id`` (``None``: none), kept reserved while the context lasts."""
        ...


class KvTransferServicer(kv_transfer_pb2_grpc.KvTransferServicer):
    """Decode side of the ``grpc`` transfer: KV bytes into the blocks reserved for a request.

    A write for a request with no reservation (the decode worker gave up, or its client left)
    is refused with FAILED_PRECONDITION; a reservation is never released while a write into it
    is under way (:class:`ImportReservations`).
    """

    def __init__(self, engine: Engine, reservations: ImportReservations) -> None:
        self._engine = engine
        self._reservations = reservations

    async def Write(
        self, request_iterator: AsyncIterator[kv_transfer_pb2.KvChunk], context: grpc.aio.ServicerContext
    ) -> kv_transfer_pb2.KvWriteAck:
        blocks = written = 0
        t0 = time.perf_counter()
        async for chunk in request_iterator:
            with self._reservations.writing(chunk.request_id) as reserved:
                if reserved is None:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"no KV reservation for {chunk.request_id!r} (the decode worker gave up on it)",
                    )
                allowed = set(reserved)  # type: ignore[arg-type]
                stray = [b for b in chunk.block_ids if b not in allowed]
                if stray:
                    await abort_with(
                        context, InvalidRequest(f"blocks {stray[:4]} are not reserved for {chunk.request_id}")
                    )
                try:
                    await self._engine.kv_import(list(chunk.block_ids), chunk.data)  # type: ignore[attr-defined]
                except ValueError as exc:
                    await abort_with(context, InvalidRequest(f"KV import for {chunk.request_id} refused: {exc}"))
            blocks += len(chunk.block_ids)
            written += len(chunk.data)
        metrics.KV_TRANSFER_BYTES.labels("grpc", "received").inc(written)
        log.debug("imported %d KV blocks (%d bytes) in %.1f ms", blocks, written, (time.perf_counter() - t0) * 1e3)
        return kv_transfer_pb2.KvWriteAck(blocks_written=blocks, bytes_written=written)
