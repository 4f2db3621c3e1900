"""KV transfer over NIXL (``--kv-transfer nixl``): the prefill worker writes a prompt's KV straight
into the blocks the decode engine reserved for it (DESIGN.md 2, push style).

For engines that say where their KV blocks are in memory (``kv_layout()`` returning a
:class:`~commutator.engines.base.KvLayout`: the hf engine, on CUDA, or on CPU where NIXL's UCX
backend registers host memory). ``import nixl`` happens only here, when the backend is built;
without the package :func:`nixl_agent_factory` raises :class:`EngineError` with what to install.

**The NIXL API used** (the ``nixl`` package, ``nixl._api``; read in ai-dynamo/nixl at commit
8770b655 of 2026-08-21, package version 1.4.0, ``src/api/python/_api.py``; the same calls and
signatures exist in 0.4.0 and 1.0.0): ``nixl_agent(name, nixl_agent_config(backends=["UCX"]))``;
``register_memory([(addr, len, dev_id, "")], "DRAM" | "VRAM")`` (returns the list to give to
``deregister_memory``); ``get_agent_metadata() -> bytes``; ``add_remote_agent(metadata) -> name``;
``remove_remote_agent(name)``; ``get_xfer_descs([(addr, len, dev_id)], mem_type)``;
``initialize_xfer("WRITE", local, remote, remote_name, notif_msg)`` (the agent checks that both
lists lie in registered memory: its own, and the remote's as its metadata describes it);
``transfer(handle)`` and ``check_xfer_state(handle)`` -> ``"DONE" | "PROC" | "ERR"`` (the bindings
may also raise); ``release_xfer_handle(handle)`` (cancels a transfer still in flight, or raises);
``get_new_notifs() -> {agent name: [message bytes]}``. An agent is not safe to call from several
threads at once by default (``sync_mode`` NONE without a listener thread): every call here is made
from the event loop, except the registration in :meth:`NixlTransfer.start`, which runs in a thread
while nothing else uses the agent.

**Lifecycle.** Each worker builds one agent named ``commutator-<uuid>``. :meth:`NixlTransfer.start`
(after the engine started) registers the engine's KV regions, whole (as vLLM's NIXL connector
registers its KV tensors), and encodes this worker's :class:`NixlPeer`. :meth:`NixlTransfer.close`
removes the remote agents and deregisters the memory, before the engine frees it.

**Descriptor** (decode side): ``TransferDescriptor{kind: NIXL, block_ids: the reserved blocks,
nixl_metadata: NixlPeer.encode()}``. ``nixl_metadata`` is ``b"CMNX"``, a little-endian u32 ``n``,
``n`` bytes of UTF-8 JSON ``{"v": 1, "agent": name, "mem_type": "DRAM"|"VRAM", "device_id": int,
"block_bytes": int, "num_blocks": int, "regions": [base address, ...]}``, then the agent's own
metadata bytes (opaque; UCX connection info and memory keys) to the end.

**Send** (prefill side): the remote agent is added once per name and kept (at most
:data:`MAX_REMOTE_AGENTS`, the least recently used idle one removed beyond that). For each region
``r`` and each run of consecutive blocks (source ``s..s+n`` to destination ``d..d+n``) one
descriptor pair: ``(regions[r] + s * block_bytes, n * block_bytes, device)`` here,
``(peer.regions[r] + d * block_bytes, ...)`` there. One ``WRITE`` carries them all, with the
request id as its notification; it is polled until ``DONE`` (``ERR``, an exception, or
``--nixl-timeout-s`` without ``DONE``: :class:`TransferError`), and its handle is released in every
case (on a timeout or a cancel that asks NIXL to cancel the write).

**Completion and visibility.** The decode worker starts decoding when the ``PrefillResult``
arrives, and the prefill worker publishes it only after :meth:`NixlTransfer.send` saw ``DONE``.
That is sufficient for a ``WRITE``: NIXL's UCX backend posts the puts of a request, then
``ucp_ep_flush_nbx`` on the same endpoint, then (once those complete) the notification, and the
request reports ``DONE`` only when all of them have completed (``sendXferRange`` and ``checkXfer``
in ``src/plugins/ucx/ucx_backend.cpp`` at the commit above); a completed UCX endpoint flush means
every earlier RMA operation on it has completed at the target, not only locally. So the bytes are
in the decode engine's memory before the result is even sent, and the decode engine launches its
first kernel on those blocks after it received the result. The source side is equally settled:
the hf engine holds a prefill's blocks until the transfer returns, and their KV was computed
before the first token was sampled and copied to the host (a device synchronisation). The decode
side therefore does not wait for NIXL's notification; it drains the notifications
(:meth:`NixlTransfer.drain_notifications`, at each new descriptor) so they do not pile up in its
agent. Waiting for them as well would add a second wait and timeout on the decode side and
guarantee nothing more: NIXL sends the notification after the same flush.

**Limits.** A one-sided write cannot be refused by the receiver as the ``grpc`` transfer's
``KvTransfer`` service refuses writes for a reservation that is gone: if the decode worker gives up
(its timeout, its client leaving) while a write is in flight, the write may still land in blocks it
has released. The prefill side cancels (releases) the write as soon as it learns of the cancel or
times out, but NIXL cannot always recall puts already issued. The agent metadata travels with every
``PrefillRequest`` (a few KB to tens of KB; it could be published once in discovery instead).
Verified only against a fake of this API on CPU (tests/unit/test_nixl_transfer_fake.py); the GPU
check script runs it on CUDA where ``nixl`` is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from commutator.common import metrics
from commutator.common.clock import Clock, SystemClock
from commutator.engines.base import Engine, KvLayout
from commutator.engines.registry import EngineError
from commutator.v1 import common_pb2
from commutator.worker.kv_transfer import KvTransferConfig, TransferError

__all__ = [
    "INSTALL_HINT",
    "MAX_REMOTE_AGENTS",
    "AgentFactory",
    "NixlAgentApi",
    "NixlPeer",
    "NixlTransfer",
    "block_runs",
    "nixl_agent_factory",
    "write_descriptors",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install nixl (on GPU machines with UCX; the wheel brings NIXL's UCX backend)"
MAX_REMOTE_AGENTS = 64
"""Decode workers' agents a prefill worker keeps loaded; beyond that the least recently used idle one goes."""

_MAGIC = b"CMNX"
_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_MEM_TYPES = {"cpu": "DRAM", "cuda": "VRAM"}
_FIRST_POLL_S = 0.0002
_MAX_POLL_S = 0.005


class NixlAgentApi(Protocol):
    """The part of ``nixl._api.nixl_agent`` this backend uses (see the module docstring)."""

    def register_memory(self, reg_list: Any, mem_type: str | None = None) -> Any: ...

    def deregister_memory(self, dereg_list: Any) -> None: ...

    def get_agent_metadata(self) -> bytes: ...

    def add_remote_agent(self, metadata: bytes) -> str: ...

    def remove_remote_agent(self, agent: str) -> None: ...

    def get_xfer_descs(self, descs: Any, mem_type: str | None = None) -> Any: ...

    def initialize_xfer(
        self, operation: str, local_descs: Any, remote_descs: Any, remote_agent: str, notif_msg: bytes = b""
    ) -> Any: ...

    def transfer(self, handle: Any) -> str: ...

    def check_xfer_state(self, handle: Any) -> str: ...

    def release_xfer_handle(self, handle: Any) -> None: ...

    def get_new_notifs(self) -> dict[str, list[bytes]]: ...


AgentFactory = Callable[[str], NixlAgentApi]
"""Builds the agent of the given name."""


def nixl_agent_factory() -> AgentFactory:
    """The real ``nixl_agent`` with the UCX backend; :class:`EngineError` when ``nixl`` cannot be imported."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        reason = (str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise EngineError(f"--kv-transfer nixl needs the nixl package ({reason}): {INSTALL_HINT}") from None

    def make(name: str) -> NixlAgentApi:
        agent: NixlAgentApi = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        return agent

    return make


@dataclass(frozen=True, slots=True)
class NixlPeer:
    """What a sender needs to write into a worker's KV blocks: the ``nixl_metadata`` of its descriptors."""

    agent: str
    mem_type: str
    device_id: int
    block_bytes: int
    num_blocks: int
    regions: tuple[int, ...]
    agent_metadata: bytes

    def encode(self) -> bytes:
        header = {
            "v": _VERSION,
            "agent": self.agent,
            "mem_type": self.mem_type,
            "device_id": self.device_id,
            "block_bytes": self.block_bytes,
            "num_blocks": self.num_blocks,
            "regions": list(self.regions),
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        return _MAGIC + _HEADER_LEN.pack(len(raw)) + raw + self.agent_metadata

    @classmethod
    def decode(cls, data: bytes) -> NixlPeer:
        """The peer ``data`` describes; ``ValueError`` (one line) when it is not one."""
        start = len(_MAGIC) + _HEADER_LEN.size
        if len(data) < start or data[: len(_MAGIC)] != _MAGIC:
            raise ValueError("not Commutator NIXL metadata (no CMNX header)")
        (n,) = _HEADER_LEN.unpack_from(data, len(_MAGIC))
        if start + n > len(data):
            raise ValueError(f"truncated NIXL metadata ({len(data)} bytes, header says {start + n} at least)")
        try:
            header = json.loads(data[start : start + n])
        except ValueError as exc:
            raise ValueError(f"unreadable NIXL metadata header: {exc}") from None
        if not isinstance(header, dict) or header.get("v") != _VERSION:
            raise ValueError(f"NIXL metadata of version {header.get('v') if isinstance(header, dict) else '?'}")

        def count(key: str, low: int) -> int:
            value = header.get(key)
            if type(value) is not int or value < low:
                raise ValueError(f"NIXL metadata field {key!r} is {value!r}")
            return value

        regions = header.get("regions")
        if not isinstance(regions, list) or not regions or any(type(r) is not int or r <= 0 for r in regions):
            raise ValueError("NIXL metadata without region addresses")
        agent, mem_type = header.get("agent"), header.get("mem_type")
        if not isinstance(agent, str) or not agent:
            raise ValueError("NIXL metadata without an agent name")
        if not isinstance(mem_type, str) or mem_type not in _MEM_TYPES.values():
            raise ValueError(f"NIXL metadata of memory type {mem_type!r}")
        metadata = data[start + n :]
        if not metadata:
            raise ValueError("NIXL metadata without the agent's own metadata")
        return cls(
            agent=agent,
            mem_type=mem_type,
            device_id=count("device_id", 0),
            block_bytes=count("block_bytes", 1),
            num_blocks=count("num_blocks", 1),
            regions=tuple(regions),
            agent_metadata=bytes(metadata),
        )

    def same_shape(self, other: NixlPeer) -> bool:
        """Whether blocks can be copied region by region between the two."""
        return self.block_bytes == other.block_bytes and len(self.regions) == len(other.regions)


def block_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first source block, first destination block, count)`` for each run that is consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def write_descriptors(
    local: NixlPeer, src: Sequence[int], remote: NixlPeer, dst: Sequence[int]
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """The ``(address, length, device id)`` lists, here and there, that copy blocks ``src`` into ``dst``."""
    bb = local.block_bytes
    runs = block_runs(src, dst)
    here = [(base + s * bb, n * bb, local.device_id) for base in local.regions for s, _, n in runs]
    there = [(base + d * bb, n * bb, remote.device_id) for base in remote.regions for _, d, n in runs]
    return here, there


@dataclass(frozen=True, slots=True)
class _Registered:
    peer: NixlPeer
    encoded: bytes
    registration: Any


class NixlTransfer:
    """``--kv-transfer nixl``; see the module docstring. One per worker, used from its event loop."""

    name = "nixl"

    def __init__(
        self,
        config: KvTransferConfig,
        *,
        agent_factory: AgentFactory | None = None,
        clock: Clock | None = None,
    ) -> None:
        factory = agent_factory if agent_factory is not None else nixl_agent_factory()
        self.agent_name = f"commutator-{uuid.uuid4().hex}"
        try:
            self.agent = factory(self.agent_name)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(
                f"--kv-transfer nixl: no NIXL agent with the UCX backend here: {_first_line(exc)}"
            ) from exc
        self._timeout_s = config.nixl_timeout_s
        self._clock: Clock = clock or SystemClock()
        self._local: _Registered | None = None
        self._remotes: OrderedDict[str, int] = OrderedDict()  # agent name -> writes in flight to it
        self._sent = metrics.KV_TRANSFER_BYTES.labels("nixl", "sent")

    # -- both sides ------------------------------------------------------------------------
    def check_engine(self, engine: Engine, role: str) -> None:
        need = ("kv_layout", "prefill_blocks") if role == "prefill" else ("kv_layout",)
        missing = [m for m in need if not hasattr(engine, m)]
        if missing:
            raise EngineError(
                f"--kv-transfer nixl needs an engine that says where its KV blocks are in memory "
                f"({', '.join(missing)}): the hf engine does; use --kv-transfer simulated for the mocker"
            )

    async def start(self, engine: Engine) -> None:
        """Register ``engine``'s KV memory with the agent (in a thread: pinning GPU memory takes a while)."""
        if self._local is None:
            self.check_engine(engine, "decode")
            self._local = await asyncio.to_thread(self._register, engine.kv_layout)  # type: ignore[attr-defined]

    def _register(self, kv_layout: Callable[[], KvLayout]) -> _Registered:
        layout = kv_layout()
        mem_type = _MEM_TYPES.get(layout.device)
        if mem_type is None:
            raise EngineError(
                f"--kv-transfer nixl registers CPU or CUDA memory; this engine's KV is on {layout.device}"
            )
        regs = [(base, layout.region_bytes, layout.device_id, "") for base in layout.regions]
        try:
            registration = self.agent.register_memory(regs, mem_type)
            metadata = self.agent.get_agent_metadata()
        except Exception as exc:
            raise EngineError(
                f"--kv-transfer nixl: NIXL could not register the engine's KV memory ({mem_type}, "
                f"{len(regs)} regions of {layout.region_bytes} bytes): {_first_line(exc)}"
            ) from exc
        peer = NixlPeer(
            agent=self.agent_name,
            mem_type=mem_type,
            device_id=layout.device_id,
            block_bytes=layout.block_bytes,
            num_blocks=layout.num_blocks,
            regions=layout.regions,
            agent_metadata=bytes(metadata),
        )
        log.info(
            "NIXL agent %s registered %d KV regions of %d bytes (%s, device %d)",
            self.agent_name,
            len(regs),
            layout.region_bytes,
            mem_type,
            layout.device_id,
        )
        return _Registered(peer, peer.encode(), registration)

    def _registered(self) -> _Registered:
        if self._local is None:
            raise RuntimeError("the nixl transfer is used before start(engine) registered the engine's KV memory")
        return self._local

    async def close(self) -> None:
        for name in list(self._remotes):
            self._remove_remote(name)
        if self._local is not None:
            try:
                self.agent.deregister_memory(self._local.registration)
            except Exception as exc:
                log.warning("NIXL could not deregister the KV memory: %s", _first_line(exc))
            self._local = None

    # -- decode side -----------------------------------------------------------------------
    def descriptor(self, grpc_address: str, block_ids: Sequence[int]) -> common_pb2.TransferDescriptor:
        local = self._registered()
        self.drain_notifications()
        return common_pb2.TransferDescriptor(
            kind=common_pb2.TransferDescriptor.KIND_NIXL, block_ids=list(block_ids), nixl_metadata=local.encoded
        )

    def drain_notifications(self) -> list[str]:
        """Request ids whose KV writes into this worker completed since the last call (NIXL's notifications).

        Nothing waits for them (see the module docstring); they are taken so that they do not pile up.
        """
        try:
            notifs = self.agent.get_new_notifs()
        except Exception as exc:
            log.warning("NIXL notifications not read: %s", _first_line(exc))
            return []
        return [m.decode(errors="replace") for messages in notifs.values() for m in messages]

    # -- prefill side ----------------------------------------------------------------------
    async def send(
        self, engine: Engine, request_id: str, prompt_tokens: int, dest: common_pb2.TransferDescriptor
    ) -> int:
        local = self._registered().peer
        if dest.kind != common_pb2.TransferDescriptor.KIND_NIXL:
            kind = common_pb2.TransferDescriptor.Kind.Name(dest.kind)
            raise TransferError(f"{request_id}: the decode worker asked for a {kind} transfer, not NIXL")
        src = engine.prefill_blocks(request_id)  # type: ignore[attr-defined]
        if src is None:
            raise TransferError(f"{request_id}: no prefilled blocks are held to send")
        dst = list(dest.block_ids)
        if len(src) != len(dst):
            raise TransferError(
                f"{request_id}: {len(src)} prefilled blocks but {len(dst)} reserved (the workers' block sizes differ?)"
            )
        try:
            remote = NixlPeer.decode(dest.nixl_metadata)
        except ValueError as exc:
            raise TransferError(f"{request_id}: {exc}") from None
        if not remote.same_shape(local):
            raise TransferError(
                f"{request_id}: the decode engine's KV layout ({len(remote.regions)} regions, {remote.block_bytes} "
                f"bytes per block) differs from this one's ({len(local.regions)}, {local.block_bytes}): "
                "run the same model, dtype and block size on both sides"
            )
        stray = next((b for b in dst if b >= remote.num_blocks), None)
        if stray is not None:
            raise TransferError(f"{request_id}: block {stray} is outside the decode engine's {remote.num_blocks}")
        if not src:
            return 0
        here, there = write_descriptors(local, src, remote, dst)
        with self._remote(remote) as remote_name:
            await self._write(request_id, remote_name, here, local.mem_type, there, remote.mem_type)
        moved = len(src) * local.block_bytes * len(local.regions)
        self._sent.inc(moved)
        return moved

    async def _write(
        self,
        request_id: str,
        remote_name: str,
        here: list[tuple[int, int, int]],
        here_type: str,
        there: list[tuple[int, int, int]],
        there_type: str,
    ) -> None:
        agent = self.agent
        handle = None
        try:
            local_descs = agent.get_xfer_descs(here, here_type)
            remote_descs = agent.get_xfer_descs(there, there_type)
            if local_descs is None or remote_descs is None:
                raise TransferError(f"{request_id}: NIXL refused the block descriptors")
            handle = agent.initialize_xfer("WRITE", local_descs, remote_descs, remote_name, request_id.encode())
            await self._wait(request_id, handle, agent.transfer(handle))
        except (TransferError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise TransferError(
                f"{request_id}: NIXL write to {remote_name} failed: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        finally:
            if handle is not None:
                try:
                    agent.release_xfer_handle(handle)  # cancels it if still in flight
                except Exception as exc:
                    log.warning("NIXL did not release the write of %s: %s", request_id, _first_line(exc))

    async def _wait(self, request_id: str, handle: Any, state: str) -> None:
        deadline = self._clock.monotonic() + self._timeout_s
        pause = _FIRST_POLL_S
        while state == "PROC":
            if self._clock.monotonic() >= deadline:
                raise TransferError(f"{request_id}: the NIXL write did not complete within {self._timeout_s:g} s")
            await self._clock.sleep(pause)
            pause = min(2 * pause, _MAX_POLL_S)
            state = self.agent.check_xfer_state(handle)
        if state != "DONE":
            raise TransferError(f"{request_id}: the NIXL write ended in state {state}")

    @contextlib.contextmanager
    def _remote(self, peer: NixlPeer) -> Iterator[str]:
        """The remote agent of ``peer``, added on first use and kept; counted as busy meanwhile."""
        name = peer.agent
        if name not in self._remotes:
            try:
                added = self.agent.add_remote_agent(peer.agent_metadata)
            except Exception as exc:
                raise TransferError(
                    f"NIXL could not load the decode worker's agent {name}: {_first_line(exc)}"
                ) from None
            if added != name:
                with contextlib.suppress(Exception):
                    self.agent.remove_remote_agent(added)
                raise TransferError(f"the NIXL metadata of agent {name} describes agent {added}")
            self._remotes[name] = 0
        self._remotes.move_to_end(name)
        self._remotes[name] += 1
        self._evict()
        try:
            yield name
        finally:
            if name in self._remotes:
                self._remotes[name] -= 1

    def _evict(self) -> None:
        for name in [n for n, busy in self._remotes.items() if not busy]:
            if len(self._remotes) <= MAX_REMOTE_AGENTS:
                return
            self._remove_remote(name)

    def _remove_remote(self, name: str) -> None:
        self._remotes.pop(name, None)
        try:
            self.agent.remove_remote_agent(name)
        except Exception as exc:
            log.warning("NIXL could not remove the remote agent %s: %s", name, _first_line(exc))

    @property
    def remote_agents(self) -> tuple[str, ...]:
        """The decode workers' agents loaded now, least recently used first."""
        return tuple(self._remotes)


def _first_line(exc: BaseException) -> str:
    return ((str(exc) or type(exc).__name__).strip().splitlines() or [""])[0]
