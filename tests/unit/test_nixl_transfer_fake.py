"""The nixl KV transfer against a hand-written FAKE of NIXL's agent API (``nixl._api.nixl_agent``; the
real package is not installed here, and the GPU check script runs the real one where it is).

The fake keeps what the real agent checks and does, as far as NixlTransfer can tell: memory
registered by ``(address, length, device, meta)`` tuples, remote agents loaded from their metadata,
transfers refused unless both descriptor lists lie in registered memory (here, and there as the
remote's metadata describes it), and a WRITE that copies the bytes (``ctypes.memmove``, between
CPU buffers of this process) when it reports DONE, then delivers its notification to the target.
Its states (``transfer`` then each ``check_xfer_state``) follow a script, so a test can fail a
write or keep it in progress.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import importlib.util
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from commutator.engines.base import EngineRequest, KvImport, KvLayout, StopParams
from commutator.engines.registry import EngineError, EngineSpec, make_engine
from commutator.v1 import common_pb2
from commutator.worker import nixl_transfer
from commutator.worker.kv_transfer import KvTransferConfig, TransferError, make_transfer
from commutator.worker.nixl_transfer import NixlPeer, NixlTransfer, block_runs, write_descriptors

pytestmark = pytest.mark.unit

CONFIG = KvTransferConfig(kv_transfer="nixl", nixl_timeout_s=5.0)


# -- the fake ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeDescList:
    mem_type: str
    descs: tuple[tuple[int, ...], ...]


@dataclass
class FakeXfer:
    operation: str
    pairs: list[tuple[tuple[int, int, int], tuple[int, int, int]]]
    remote: str
    notif: bytes
    script: list[str]
    state: str = "NEW"
    released: bool = False


class FakeNixlFabric:
    """The network between fake agents: a WRITE reaches its target's memory and notification list here."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeNixlAgent] = {}
        self.script = ["PROC", "DONE"]
        """A new transfer's states: ``transfer`` gives the first, each ``check_xfer_state`` the next (last stays)."""

    def agent(self, name: str) -> FakeNixlAgent:
        agent = self.agents[name] = FakeNixlAgent(name, self)
        return agent


@dataclass
class FakeNixlAgent:
    name: str
    fabric: FakeNixlFabric
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    registered: list[tuple[int, int, int, str]] = field(default_factory=list)
    remotes: dict[str, list[tuple[int, int, int, str]]] = field(default_factory=dict)
    notifs: dict[str, list[bytes]] = field(default_factory=dict)
    xfers: list[FakeXfer] = field(default_factory=list)
    fail_release: bool = False

    def register_memory(self, reg_list: Any, mem_type: str | None = None) -> FakeDescList:
        assert mem_type in ("DRAM", "VRAM") and all(len(d) == 4 for d in reg_list)
        self.calls.append(("register_memory", list(reg_list), mem_type))
        self.registered += [(a, n, dev, mem_type) for a, n, dev, _ in reg_list]
        return FakeDescList(mem_type, tuple(reg_list))

    def deregister_memory(self, dereg_list: FakeDescList) -> None:
        self.calls.append(("deregister_memory", dereg_list))
        gone = {(a, n, dev, dereg_list.mem_type) for a, n, dev, _ in dereg_list.descs}
        self.registered = [r for r in self.registered if r not in gone]

    def get_agent_metadata(self) -> bytes:
        return json.dumps({"name": self.name, "regions": self.registered}).encode()

    def add_remote_agent(self, metadata: bytes) -> str:
        md = json.loads(metadata)
        self.calls.append(("add_remote_agent", md["name"]))
        self.remotes[md["name"]] = [tuple(r) for r in md["regions"]]  # type: ignore[misc]
        return str(md["name"])

    def remove_remote_agent(self, agent: str) -> None:
        self.calls.append(("remove_remote_agent", agent))
        del self.remotes[agent]

    def get_xfer_descs(self, descs: Any, mem_type: str | None = None) -> FakeDescList:
        assert mem_type in ("DRAM", "VRAM") and all(len(d) == 3 for d in descs)
        return FakeDescList(mem_type, tuple(descs))

    def initialize_xfer(
        self, operation: str, local_descs: Any, remote_descs: Any, remote_agent: str, notif_msg: bytes = b""
    ) -> FakeXfer:
        self.calls.append(("initialize_xfer", operation, remote_agent, notif_msg))
        if remote_agent not in self.remotes:
            raise RuntimeError(f"NIXL_ERR_NOT_FOUND: no metadata of remote agent {remote_agent}")
        if len(local_descs.descs) != len(remote_descs.descs):
            raise RuntimeError("NIXL_ERR_INVALID_PARAM: descriptor lists differ in size")
        for descs, regions in ((local_descs, self.registered), (remote_descs, self.remotes[remote_agent])):
            for addr, n, dev in descs.descs:
                if not any(
                    a <= addr and addr + n <= a + length and dev == d and m == descs.mem_type
                    for a, length, d, m in regions
                ):
                    raise RuntimeError(f"NIXL_ERR_NOT_FOUND: {addr:#x}+{n} is not registered memory")
        pairs = list(zip(local_descs.descs, remote_descs.descs, strict=True))
        if any(loc[1] != rem[1] for loc, rem in pairs):
            raise RuntimeError("NIXL_ERR_INVALID_PARAM: descriptor lengths differ")
        xfer = FakeXfer(operation, pairs, remote_agent, bytes(notif_msg), list(self.fabric.script))
        self.xfers.append(xfer)
        return xfer

    def transfer(self, handle: FakeXfer) -> str:
        assert handle.state == "NEW" and not handle.released
        return self._step(handle)

    def check_xfer_state(self, handle: FakeXfer) -> str:
        assert handle.state != "NEW" and not handle.released
        return self._step(handle)

    def _step(self, xfer: FakeXfer) -> str:
        state = xfer.script.pop(0) if len(xfer.script) > 1 else xfer.script[0]
        if state == "DONE" and xfer.state != "DONE":
            for (src, _, _), (dst, n, _) in xfer.pairs:
                if xfer.operation == "READ":
                    src, dst = dst, src
                ctypes.memmove(dst, src, n)
            target = self.fabric.agents[xfer.remote]
            target.notifs.setdefault(self.name, []).append(xfer.notif)
        xfer.state = state
        return state

    def release_xfer_handle(self, handle: FakeXfer) -> None:
        self.calls.append(("release_xfer_handle", handle.state))
        if self.fail_release:
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE: the transfer cannot be cancelled")
        handle.released = True

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        notifs, self.notifs = self.notifs, {}
        return notifs

    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c[0] == method)


class BufferEngine:
    """An engine's KV as NIXL sees it: ``regions`` CPU buffers of ``num_blocks`` blocks, and held prefill blocks."""

    def __init__(self, regions: int = 4, num_blocks: int = 8, block_bytes: int = 64, fill: int = 0) -> None:
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.buffers = [ctypes.create_string_buffer(bytes([fill]) * (num_blocks * block_bytes)) for _ in range(regions)]
        self.held: dict[str, tuple[int, ...]] = {}

    def kv_layout(self) -> KvLayout:
        bases = tuple(ctypes.addressof(b) for b in self.buffers)
        return KvLayout("cpu", 0, bases, self.block_bytes, self.num_blocks)

    def prefill_blocks(self, request_id: str) -> tuple[int, ...] | None:
        return self.held.get(request_id)

    def block(self, region: int, block: int) -> bytes:
        raw = self.buffers[region].raw
        return raw[block * self.block_bytes : (block + 1) * self.block_bytes]

    def fill_block(self, region: int, block: int, value: int) -> None:
        ctypes.memset(ctypes.addressof(self.buffers[region]) + block * self.block_bytes, value, self.block_bytes)


class SteppingClock:
    """Time that passes only by sleeping: a poll loop runs its course at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def nixl(fabric: FakeNixlFabric, clock: SteppingClock | None = None) -> NixlTransfer:
    return NixlTransfer(CONFIG, agent_factory=fabric.agent, clock=clock)


def agent_of(fabric: FakeNixlFabric, transfer: NixlTransfer) -> FakeNixlAgent:
    return fabric.agents[transfer.agent_name]


async def pair(
    fabric: FakeNixlFabric, a: Any, b: Any, clock: SteppingClock | None = None
) -> tuple[NixlTransfer, NixlTransfer]:
    """A prefill side on ``a`` and a decode side on ``b``, started."""
    sender, receiver = nixl(fabric, clock), nixl(fabric, clock)
    sender.check_engine(a, "prefill")
    receiver.check_engine(b, "decode")
    await sender.start(a)
    await receiver.start(b)
    return sender, receiver


# -- two hf engines on CPU ----------------------------------------------------------------------------
@asynccontextmanager
async def hf_engine(model_path: Path) -> AsyncIterator[Any]:
    args = ("--device", "cpu", "--threads", "1", "--block-size", "16", "--num-blocks", "32")
    engine = make_engine("hf", EngineSpec(model_path, "tiny", args))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def tokens(engine: Any, request: EngineRequest) -> list[int]:
    return [t async for out in engine.generate(request) for t in out.token_ids]


async def test_fake_nixl_write_between_two_hf_engines_on_cpu_decodes_the_same_tokens() -> None:
    pytest.importorskip("torch", reason="the hf engine needs torch: make torch")
    pytest.importorskip("transformers")
    from commutator.engines.tiny_model import ensure_tiny_model

    p = [10 + (21 * 7919 + k * 131 + k * k) % 4000 for k in range(37)]  # 2 full blocks of 16 and a partial third
    fabric = FakeNixlFabric()
    async with hf_engine(ensure_tiny_model()) as a, hf_engine(ensure_tiny_model()) as b:
        alone = await tokens(a, EngineRequest("alone", p, stop=StopParams(max_tokens=12)))
        sender, receiver = await pair(fabric, a, b)

        layout = b.kv_layout()  # 2 layers, K and V: 4 regions, the cache tensors themselves
        runner = b._require_runner()
        assert layout.regions == tuple(t.data_ptr() for i in range(2) for t in (runner.cache.k[i], runner.cache.v[i]))
        assert (layout.device, layout.num_blocks, layout.block_bytes) == ("cpu", 32, 16 * 2 * 32 * 4)
        assert agent_of(fabric, receiver).calls[0] == (
            "register_memory",
            [(base, 32 * layout.block_bytes, 0, "") for base in layout.regions],
            "DRAM",
        )

        first = await tokens(a, EngineRequest("x", p, stop=StopParams(max_tokens=12), prefill_only=True))
        assert first == alone[:1]
        held = a.prefill_blocks("x")
        request = EngineRequest("x", p, stop=StopParams(max_tokens=12), kv_import=KvImport(first_token_id=first[0]))
        reserved = b.reserve_import(request)
        assert held is not None and reserved is not None and len(held) == len(reserved) == 3

        dest = receiver.descriptor("unused:0", reserved)
        assert dest.kind == common_pb2.TransferDescriptor.KIND_NIXL and list(dest.block_ids) == list(reserved)
        moved = await sender.send(a, "x", len(p), dest)
        assert moved == 3 * a.kv_bytes_per_block
        assert await b.kv_export(reserved) == await a.kv_export(held)  # B's blocks are byte-identical to A's
        assert receiver.drain_notifications() == ["x"]  # the WRITE's notification carries the request id
        a.release_prefill("x")

        decoded = await tokens(b, dataclasses.replace(request, kv_import=KvImport(first[0], reserved)))
        assert decoded == alone
        assert b.prompt_tokens_computed == 0  # B computed no prompt token: it decoded from the written KV

        await sender.close()
        await receiver.close()
        assert agent_of(fabric, receiver).registered == [] and agent_of(fabric, sender).remotes == {}


# -- the pieces -----------------------------------------------------------------------------------------
def test_fake_nixl_metadata_round_trip_and_its_exact_encoding() -> None:
    peer = NixlPeer("commutator-ab", "VRAM", 3, 4096, 1000, (0x7F0000000000, 0x7F0001000000), b"\x00agent\xffmd")
    data = peer.encode()
    assert NixlPeer.decode(data) == peer
    n = int.from_bytes(data[4:8], "little")
    assert data[:4] == b"CMNX" and data[8 + n :] == b"\x00agent\xffmd"
    assert json.loads(data[8 : 8 + n]) == {
        "v": 1,
        "agent": "commutator-ab",
        "mem_type": "VRAM",
        "device_id": 3,
        "block_bytes": 4096,
        "num_blocks": 1000,
        "regions": [0x7F0000000000, 0x7F0001000000],
    }
    header = data[: 8 + n]
    for bad, why in [
        (b"", "no CMNX header"),
        (b"XXXX" + data[4:], "no CMNX header"),
        (data[: 8 + n - 1], "truncated"),
        (header, "without the agent's own metadata"),
        (data.replace(b'"v":1', b'"v":2'), "version 2"),
        (data.replace(b'"VRAM"', b'"FILE"'), "memory type 'FILE'"),
        (data.replace(b'"block_bytes":4096', b'"block_bytes":null'), "'block_bytes' is None"),
    ]:
        with pytest.raises(ValueError, match=why):
            NixlPeer.decode(bad)


def test_fake_nixl_descriptors_cover_each_region_and_merge_consecutive_blocks() -> None:
    assert block_runs([4, 5, 6, 9, 2], [0, 1, 3, 4, 5]) == [(4, 0, 2), (6, 3, 1), (9, 4, 1), (2, 5, 1)]
    assert block_runs([], []) == []
    here = NixlPeer("a", "DRAM", 0, 100, 10, (1000, 5000), b"m")
    there = NixlPeer("b", "VRAM", 1, 100, 20, (70000, 90000), b"m")
    local, remote = write_descriptors(here, [3, 4, 7], there, [10, 11, 0])
    assert local == [(1300, 200, 0), (1700, 100, 0), (5300, 200, 0), (5700, 100, 0)]
    assert remote == [(71000, 200, 1), (70000, 100, 1), (91000, 200, 1), (90000, 100, 1)]


def test_fake_nixl_missing_package_is_one_engine_error_naming_what_to_install() -> None:
    if importlib.util.find_spec("nixl") is not None:
        pytest.skip("nixl is installed here")
    with pytest.raises(EngineError, match=r"--kv-transfer nixl needs the nixl package .*pip install nixl") as info:
        make_transfer(KvTransferConfig(kv_transfer="nixl"))
    assert "\n" not in str(info.value)


def test_fake_nixl_refuses_engines_that_do_not_say_where_their_kv_is() -> None:
    class Mocker:  # the mocker's KV is simulated: no memory to register
        def prefill_blocks(self, request_id: str) -> None:
            return None

    transfer = nixl(FakeNixlFabric())
    for role in ("prefill", "decode"):
        with pytest.raises(EngineError, match=r"says where its KV blocks are in memory \(kv_layout\)") as info:
            transfer.check_engine(Mocker(), role)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)


# -- sending -------------------------------------------------------------------------------------------------
async def test_fake_nixl_write_copies_the_held_blocks_into_the_reserved_ones() -> None:
    fabric = FakeNixlFabric()
    a, b = BufferEngine(), BufferEngine(fill=0xEE)
    for region in range(4):
        for block in range(8):
            a.fill_block(region, block, 16 * region + block)
    a.held["r1"] = (2, 3, 6)
    sender, receiver = await pair(fabric, a, b)
    moved = await sender.send(a, "r1", 40, receiver.descriptor("", [5, 6, 0]))
    assert moved == 3 * 4 * 64
    for region in range(4):
        assert [b.block(region, blk) for blk in (5, 6, 0)] == [a.block(region, blk) for blk in (2, 3, 6)]
        assert b.block(region, 1) == b"\xee" * 64  # nothing else was touched
    sent = agent_of(fabric, sender)
    assert sent.xfers[0].operation == "WRITE" and sent.xfers[0].notif == b"r1"
    assert len(sent.xfers[0].pairs) == 4 * 2  # per region: blocks 2-3 in one descriptor, block 6 in another
    assert sent.calls[-1] == ("release_xfer_handle", "DONE")


async def test_fake_nixl_remote_agent_is_added_once_and_reused() -> None:
    fabric = FakeNixlFabric()
    a, b, c = BufferEngine(), BufferEngine(), BufferEngine()
    a.held = {"r1": (0,), "r2": (1,), "r3": (2,)}
    sender, to_b = await pair(fabric, a, b)
    to_c = nixl(fabric)
    await to_c.start(c)
    await sender.send(a, "r1", 10, to_b.descriptor("", [3]))
    await sender.send(a, "r2", 10, to_b.descriptor("", [4]))
    await sender.send(a, "r3", 10, to_c.descriptor("", [4]))
    sent = agent_of(fabric, sender)
    assert [c[1] for c in sent.calls if c[0] == "add_remote_agent"] == [to_b.agent_name, to_c.agent_name]
    assert sender.remote_agents == (to_b.agent_name, to_c.agent_name)
    await sender.close()
    assert [c[1] for c in sent.calls if c[0] == "remove_remote_agent"] == [to_b.agent_name, to_c.agent_name]


async def test_fake_nixl_keeps_at_most_the_bound_of_remote_agents() -> None:
    fabric = FakeNixlFabric()
    a = BufferEngine(regions=1, num_blocks=1, block_bytes=8)
    a.held["r"] = (0,)
    sender = nixl(fabric)
    await sender.start(a)
    receivers = []
    for _ in range(nixl_transfer.MAX_REMOTE_AGENTS + 1):
        receiver = nixl(fabric)
        await receiver.start(BufferEngine(regions=1, num_blocks=1, block_bytes=8))
        await sender.send(a, "r", 1, receiver.descriptor("", [0]))
        receivers.append(receiver)
    assert len(sender.remote_agents) == nixl_transfer.MAX_REMOTE_AGENTS
    assert receivers[0].agent_name not in sender.remote_agents
    assert ("remove_remote_agent", receivers[0].agent_name) in agent_of(fabric, sender).calls


async def test_fake_nixl_failed_transfer_state_is_a_transfer_error() -> None:
    fabric = FakeNixlFabric()
    a, b = BufferEngine(), BufferEngine(fill=0xEE)
    a.held["r1"] = (0, 1)
    sender, receiver = await pair(fabric, a, b)
    fabric.script = ["PROC", "PROC", "ERR"]
    with pytest.raises(TransferError, match="r1: the NIXL write ended in state ERR"):
        await sender.send(a, "r1", 20, receiver.descriptor("", [0, 1]))
    assert agent_of(fabric, sender).calls[-1] == ("release_xfer_handle", "ERR")
    assert b.block(0, 0) == b"\xee" * 64 and receiver.drain_notifications() == []

    fabric.script = ["ERR"]  # refused when posted
    with pytest.raises(TransferError, match="state ERR"):
        await sender.send(a, "r1", 20, receiver.descriptor("", [0, 1]))


async def test_fake_nixl_write_that_never_completes_times_out_and_is_released() -> None:
    fabric = FakeNixlFabric()
    clock = SteppingClock()
    a, b = BufferEngine(), BufferEngine()
    a.held["r1"] = (0,)
    sender, receiver = await pair(fabric, a, b, clock)
    fabric.script = ["PROC"]
    with pytest.raises(TransferError, match=r"r1: the NIXL write did not complete within 5 s"):
        await sender.send(a, "r1", 10, receiver.descriptor("", [1]))
    assert 5.0 <= clock.now < 5.1
    assert agent_of(fabric, sender).calls[-1] == ("release_xfer_handle", "PROC")  # NIXL is asked to cancel it
    assert sender.remote_agents == (receiver.agent_name,)  # no longer busy: it can be evicted later

    agent_of(fabric, sender).fail_release = True  # a release that fails is logged, the error stays the timeout
    with pytest.raises(TransferError, match="did not complete"):
        await sender.send(a, "r1", 10, receiver.descriptor("", [1]))


async def test_fake_nixl_refused_requests_name_the_problem() -> None:
    fabric = FakeNixlFabric()
    a, b = BufferEngine(), BufferEngine()
    a.held["r1"] = (0, 1)
    sender, receiver = await pair(fabric, a, b)
    good = receiver.descriptor("", [2, 3])
    cases = [
        ("gone", good, "gone: no prefilled blocks are held"),
        ("r1", receiver.descriptor("", [2]), "2 prefilled blocks but 1 reserved"),
        ("r1", common_pb2.TransferDescriptor(kind=common_pb2.TransferDescriptor.KIND_GRPC), "a KIND_GRPC transfer"),
        ("r1", receiver.descriptor("", [2, 8]), "block 8 is outside the decode engine's 8"),
    ]
    broken = common_pb2.TransferDescriptor()
    broken.CopyFrom(good)
    broken.nixl_metadata = b"nonsense"
    cases.append(("r1", broken, "no CMNX header"))
    other = nixl(fabric)
    await other.start(BufferEngine(block_bytes=32))
    cases.append(("r1", other.descriptor("", [2, 3]), r"\(4 regions, 32 bytes per block\) differs .* \(4, 64\)"))
    peer = NixlPeer.decode(good.nixl_metadata)
    lying = common_pb2.TransferDescriptor()
    lying.CopyFrom(good)  # addresses the decode worker never registered: NIXL refuses the transfer
    lying.nixl_metadata = dataclasses.replace(peer, regions=tuple(r + (1 << 40) for r in peer.regions)).encode()
    cases.append(("r1", lying, "NIXL write to commutator-.* failed: RuntimeError: NIXL_ERR_NOT_FOUND"))
    for rid, dest, why in cases:
        with pytest.raises(TransferError, match=why):
            await sender.send(a, rid, 20, dest)
    assert b.block(0, 2) == b"\0" * 64
    assert agent_of(fabric, sender).count("initialize_xfer") == 1  # only the lying one reached NIXL


async def test_fake_nixl_is_used_only_after_start_and_close_releases_everything() -> None:
    fabric = FakeNixlFabric()
    transfer = nixl(fabric)
    with pytest.raises(RuntimeError, match="before start"):
        transfer.descriptor("", [0])
    engine = BufferEngine()
    await transfer.start(engine)
    await transfer.start(engine)  # once
    agent = agent_of(fabric, transfer)
    assert agent.count("register_memory") == 1 and len(agent.registered) == 4
    await transfer.close()
    assert agent.count("deregister_memory") == 1 and agent.registered == []
