"""``--engine sglang``: SGLang's ``Engine`` behind the Engine protocol.

Checked against ``sgl-project/sglang`` (``python/sglang/srt/entrypoints/engine.py``
at 001067f, ``managers/tokenizer_manager.py``, ``managers/io_struct.py``,
``disaggregation/kv_events.py``, ``mem_cache`` event mixin; version 0.5.x era, 2026):

- generate: ``await engine.async_generate(input_ids=..., sampling_params=...,
  stream=True, rid=...)`` returns an async iterator of dicts (see :mod:`.mapping`);
  LoRA by adapter name (``lora_path``), ``cache_salt`` (keyword-only, newer versions),
  ``routed_dp_rank`` (``data_parallel_rank`` in older versions);
- abort: ``engine.tokenizer_manager.abort_request(rid=...)``; the stream then ends
  with an ``abort`` finish reason;
- capacity: ``engine.server_args.page_size`` and the first scheduler's info
  (``engine._scheduler_init_result.scheduler_infos[0]``, ``engine.scheduler_info``
  in older versions): ``max_total_num_tokens``; ``tokenizer_manager.context_len``
  (``Engine.get_server_info`` cannot be used here: it runs the event loop itself);
- load: ``await engine.tokenizer_manager.get_load()`` -> per rank ``dp_rank``,
  ``num_reqs`` (running + waiting), ``num_waiting_reqs``, ``num_tokens`` (KV tokens in
  use plus waiting prompts) or ``num_pages`` (newer);
- KV events: the scheduler's ZMQ publisher configured by ``--kv-events-config``
  (:mod:`.events`). The adapter adds ``--kv-events-config`` when the user did not:
  an ``ipc://`` socket in the temp folder (one rank) or ``tcp://*:<free port>``
  (several ranks, since SGLang offsets ports per rank).

``kv_dump`` answers from a :class:`~commutator.engines.kv_mirror.KvMirror` of the
events this adapter converted (None when KV events are off).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from commutator.common.clock import Clock, SystemClock
from commutator.common.tasks import Supervisor
from commutator.engines.base import (
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KvDump,
    KvEventRecord,
)
from commutator.engines.callsig import Keywords
from commutator.engines.kv_buffer import KvEventBuffer
from commutator.engines.model_info import ModelInfo
from commutator.engines.seed_hints import RootSeedHints
from commutator.engines.sglang.api import KvEventSource, SglangApi, subscriber_endpoint
from commutator.engines.sglang.disagg import SglangRendezvous, new_bootstrap_room
from commutator.engines.sglang.events import SglangKvEvents
from commutator.engines.sglang.mapping import OutputTracker, sampling_params

__all__ = ["SglangEngine", "kv_events_endpoint"]

log = logging.getLogger(__name__)


def kv_events_endpoint(server_args: Any) -> tuple[str, str] | None:
    """``(endpoint, topic)`` of the ZMQ publisher ``--kv-events-config`` asks for; None when off."""
    raw = getattr(server_args, "kv_events_config", None)
    if not raw:
        return None
    cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if cfg.get("publisher", "null") != "zmq":
        return None
    return str(cfg.get("endpoint") or "tcp://*:5557"), str(cfg.get("topic") or "")


def _scheduler_info(engine: Any) -> Mapping[str, Any]:
    init = getattr(engine, "_scheduler_init_result", None)
    infos = getattr(init, "scheduler_infos", None)
    if infos:
        return infos[0]  # type: ignore[no-any-return]
    return getattr(engine, "scheduler_info", None) or {}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


class SglangEngine:
    """See :class:`commutator.engines.base.Engine`. Lifecycle: ``start`` (loads the model), then
    concurrent ``generate`` calls, then ``shutdown``. All methods run on one event loop."""

    def __init__(
        self,
        api: SglangApi,
        server_args: Any,
        *,
        model_info: ModelInfo | None = None,
        clock: Clock | None = None,
        stats_interval_s: float = 1.0,
    ) -> None:
        self._api = api
        self.server_args = server_args
        self._model_info = model_info or ModelInfo()
        self._clock = clock or SystemClock()
        self._stats_interval = stats_interval_s
        self._engine: Any = None
        self._capacity: EngineCapacity | None = None
        self._accepted_sampling: frozenset[str] = frozenset()
        self._generate_params = Keywords()
        self._incremental = bool(
            getattr(server_args, "incremental_streaming_output", False) or getattr(server_args, "stream_output", False)
        )
        self._buffer = KvEventBuffer(mirror=True)
        self._events: SglangKvEvents | None = None
        self._hints: RootSeedHints | None = None
        self._sources: list[KvEventSource] = []
        self._tasks = Supervisor(clock=self._clock)
        self._inflight: dict[str, OutputTracker] = {}
        self._rendezvous: dict[str, SglangRendezvous] = {}
        self._loads: dict[int, EngineStats] = {}
        self.kv_events_enabled = False
        self.event_errors = 0

    # -- lifecycle -------------------------------------------------------------------
    @property
    def capacity(self) -> EngineCapacity:
        if self._capacity is None:
            raise RuntimeError("the SGLang engine is not started")
        return self._capacity

    async def start(self) -> None:
        if self._engine is not None:
            return
        sa = self.server_args
        # Blocks the event loop until the model is loaded: sglang.Engine must be built on the main thread.
        engine = self._api.create_engine(sa)
        self._engine = engine
        self._capacity = self._read_capacity(engine)
        page = self._capacity.block_size
        if page == 1:
            log.warning(
                "SGLang runs with --page-size 1: the router indexes every token as a block; "
                "pass --engine-args '--page-size 16' (or larger) for a smaller index"
            )
        self._accepted_sampling = self._api.sampling_param_names()
        self._generate_params = Keywords(engine.async_generate)
        self._hints = RootSeedHints(page, clock=self._clock)
        self._events = SglangKvEvents(page, self._hints)
        where = kv_events_endpoint(sa)
        if where is None:
            log.warning("SGLang KV events are off (no zmq --kv-events-config): KV routing will not see this worker")
        else:
            endpoint, topic = where
            for rank in range(self._capacity.dp_size):
                source = self._api.open_kv_events(subscriber_endpoint(endpoint, rank), topic)
                self._sources.append(source)
                self._tasks.start(f"sglang-kv-events-{rank}", self._pump_factory(rank, source))
            self.kv_events_enabled = True
        self._tasks.start("sglang-load", self._poll_load)

    def _read_capacity(self, engine: Any) -> EngineCapacity:
        sa = self.server_args
        info = _scheduler_info(engine)
        page = int(getattr(sa, "page_size", None) or 1)
        total_tokens = int(info.get("max_total_num_tokens") or 0)
        if total_tokens <= 0:
            raise RuntimeError("SGLang reported no KV cache capacity (max_total_num_tokens)")
        limits = [
            getattr(getattr(engine, "tokenizer_manager", None), "context_len", None),
            getattr(sa, "context_length", None),
        ]
        model_ctx = next((int(x) for x in limits if x), self._model_info.context_length)
        return EngineCapacity(
            block_size=page,
            total_blocks=total_tokens // page,
            max_num_seqs=int(getattr(sa, "max_running_requests", None) or info.get("max_running_requests") or 0),
            max_batched_tokens=int(
                getattr(sa, "chunked_prefill_size", None) or getattr(sa, "max_prefill_tokens", None) or total_tokens
            ),
            context_length=min(model_ctx, total_tokens),
            dp_size=int(getattr(sa, "dp_size", 1) or 1),
        )

    async def shutdown(self) -> None:
        await self._tasks.close()
        for source in self._sources:
            with contextlib.suppress(Exception):
                source.close()
        self._sources.clear()
        engine, self._engine = self._engine, None
        if engine is None:
            return
        for rid, tracker in list(self._inflight.items()):
            tracker.aborted = True
            self._abort_in_engine(engine, rid)
        await asyncio.to_thread(engine.shutdown)

    # -- requests --------------------------------------------------------------------
    def _require(self) -> Any:
        if self._engine is None:
            raise RuntimeError("the SGLang engine is not started")
        return self._engine

    def _generate_kwargs(self, request: EngineRequest) -> dict[str, Any]:
        """``async_generate`` keyword arguments for ``request``; ValueError for what cannot be mapped."""
        rid = request.request_id
        if request.kv_import is not None:
            if not request.kv_import.engine_params:
                raise ValueError(
                    "SGLang takes a prompt's KV from a prefill engine by rendezvous, "
                    "not as blocks written into reserved slots"
                )
            self._rendezvous[rid] = SglangRendezvous.from_bytes(request.kv_import.engine_params)
        kw: dict[str, Any] = {
            "input_ids": list(request.token_ids),
            "sampling_params": sampling_params(request, self.capacity.context_length, self._accepted_sampling),
            "stream": True,
            "rid": rid,
        }
        if request.logprobs is not None:
            kw.update(return_logprob=True, top_logprobs_num=request.logprobs, logprob_start_len=-1)
        if request.lora_name:
            kw["lora_path"] = request.lora_name
        if request.cache_salt:
            self._need("cache_salt", "cache_salt")
            kw["cache_salt"] = request.cache_salt
        if request.dp_rank is not None:
            if not 0 <= request.dp_rank < self.capacity.dp_size:
                raise ValueError(f"dp_rank {request.dp_rank} is outside this engine's {self.capacity.dp_size} ranks")
            name = "routed_dp_rank" if "routed_dp_rank" in self._generate_params else "data_parallel_rank"
            self._need(name, "dp_rank")
            kw[name] = request.dp_rank
        mode = str(getattr(self.server_args, "disaggregation_mode", "null") or "null")
        rendezvous = self._rendezvous.get(rid)
        if rendezvous is not None:
            kw.update(bootstrap_host=rendezvous.host, bootstrap_port=rendezvous.port, bootstrap_room=rendezvous.room)
        elif mode != "null":
            raise ValueError(f"this SGLang engine runs --disaggregation-mode {mode}: requests need a rendezvous")
        return kw

    def _need(self, param: str, what: str) -> None:
        if param not in self._generate_params:
            raise ValueError(f"{what} is not supported by the installed SGLang version (no {param} argument)")

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        engine = self._require()
        rid = request.request_id
        if rid in self._inflight:
            raise ValueError(f"request {rid!r} is already running")
        kw = self._generate_kwargs(request)
        self._rendezvous.pop(rid, None)
        tracker = OutputTracker(len(request.token_ids), request.logprobs, self._incremental)
        assert self._hints is not None
        hint = self._hints.begin(request.token_ids, request.lora_name, request.cache_salt)
        self._inflight[rid] = tracker
        stream: Any = None
        done = False
        try:
            stream = await engine.async_generate(**kw)
            async for chunk in stream:
                out = tracker.step(chunk)
                done = out.finish_reason is not None
                yield out
                if done:
                    return
            done = True
            if tracker.aborted:
                yield EngineOutput([], FinishReason.ABORT)
            else:
                yield EngineOutput([], FinishReason.ERROR, error="SGLang ended the stream without a finish reason")
        finally:
            self._inflight.pop(rid, None)
            self._hints.end(hint)
            if not done and self._engine is not None:
                self._abort_in_engine(self._engine, rid)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def abort(self, request_id: str) -> bool:
        tracker = self._inflight.get(request_id)
        if tracker is None or self._engine is None:
            return False
        tracker.aborted = True
        self._abort_in_engine(self._engine, request_id)
        return True

    @staticmethod
    def _abort_in_engine(engine: Any, rid: str) -> None:
        try:
            engine.tokenizer_manager.abort_request(rid=rid)
        except Exception:
            log.exception("SGLang could not abort request %s", rid)

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        return None  # SGLang reserves its own pages when a rendezvous request arrives

    def release_import(self, request_id: str) -> None:
        return None

    # -- disaggregation hooks (DESIGN.md 2, rendezvous) ------------------------------
    @property
    def disaggregation_mode(self) -> str:
        """``null``, ``prefill`` or ``decode`` (``--disaggregation-mode``)."""
        return str(getattr(self.server_args, "disaggregation_mode", "null") or "null")

    def bootstrap_address(self) -> tuple[str, int] | None:
        """Where this prefill engine's bootstrap server listens; None unless ``--disaggregation-mode prefill``."""
        if self.disaggregation_mode != "prefill":
            return None
        return str(getattr(self.server_args, "host", "127.0.0.1")), int(
            getattr(self.server_args, "disaggregation_bootstrap_port", 8998)
        )

    @property
    def kv_handoff(self) -> str:
        return "rendezvous" if self.disaggregation_mode in ("prefill", "decode") else ""

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        """A prefill engine: a fresh bootstrap room at its bootstrap server, armed for ``request``."""
        address = self.bootstrap_address()
        if address is None:
            raise ValueError(f"this SGLang engine runs --disaggregation-mode {self.disaggregation_mode}, not prefill")
        rendezvous = SglangRendezvous(address[0], address[1], new_bootstrap_room())
        self.attach_rendezvous(request.request_id, rendezvous)
        return rendezvous.to_bytes()

    def finish_handoff(self, request_id: str) -> bytes:
        return b""

    def attach_rendezvous(self, request_id: str, rendezvous: SglangRendezvous) -> None:
        """Make the next ``generate`` of ``request_id`` meet its peer engine in ``rendezvous``."""
        self._rendezvous[request_id] = rendezvous

    # -- observation -----------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        cap = self.capacity
        out = []
        for rank in range(cap.dp_size):
            s = self._loads.get(rank)
            if s is None:
                running = len(self._inflight) if rank == 0 else 0
                s = EngineStats(rank, running, 0, 0, cap.total_blocks, 0, 0)
            out.append(s)
        return out

    async def refresh_stats(self) -> None:
        """Ask the engine for its load now (the background poller does this every ``stats_interval_s``)."""
        engine = self._require()
        loads = await engine.tokenizer_manager.get_load()
        if isinstance(loads, Mapping) or not loads:
            return  # old versions answer one number for the whole engine
        cap = self.capacity
        page = cap.block_size
        for item in loads:
            rank = int(_get(item, "dp_rank", 0) or 0)
            waiting = int(_get(item, "num_waiting_reqs", 0) or 0)
            running = max(int(_get(item, "num_reqs", 0) or 0) - waiting, 0)
            pages = _get(item, "num_pages", None)
            if pages is None:
                pages = -(-int(_get(item, "num_tokens", 0) or 0) // page)
            used = min(int(pages), cap.total_blocks)
            self._loads[rank] = EngineStats(rank, running, waiting, used, cap.total_blocks, used, 0)

    async def _poll_load(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except Exception as exc:
                log.debug("SGLang load not read: %s", exc)
            await self._clock.sleep(self._stats_interval)

    def _pump_factory(self, rank: int, source: KvEventSource) -> Any:
        async def pump() -> None:
            while True:
                seq, batch = await source.recv()
                self.ingest(batch, rank, seq)

        return pump

    def ingest(self, batch: Any, dp_rank: int = 0, seq: int | None = None) -> list[KvEventRecord]:
        """Convert one decoded event batch of ``dp_rank`` and queue the records (the pumps call this)."""
        assert self._events is not None
        try:
            records = self._events.convert(batch, dp_rank, seq)
        except Exception:
            self.event_errors += 1
            log.exception("unreadable SGLang KV event batch from rank %d; resetting that rank", dp_rank)
            records = self._events.converter.convert([{"type": "AllBlocksCleared"}], dp_rank)
        self._buffer.push(records)
        return records

    async def kv_events(self) -> list[KvEventRecord]:
        return await self._buffer.take()

    def failure(self) -> str | None:
        return None  # not detected yet: a dead engine fails its requests one by one

    def kv_dump(self) -> KvDump | None:
        if not self.kv_events_enabled:
            return None
        return self._buffer.dump()

    @property
    def event_converter(self) -> SglangKvEvents:
        assert self._events is not None
        return self._events
