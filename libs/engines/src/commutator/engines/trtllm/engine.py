"""``--engine trtllm``: TensorRT-LLM's ``LLM`` (PyTorch backend by default) behind the Engine protocol.

Checked against NVIDIA/TensorRT-LLM (1.x line; ``tensorrt_llm/llmapi/llm.py`` 4c05a74,
``executor/result.py`` a678b91, ``_utils.py`` ed53795, ``sampling_params.py`` a98a906,
``disaggregated_params.py`` 01009a3) and NVIDIA Dynamo's TRT-LLM publisher
(``components/src/dynamo/trtllm/publisher.py``) for how the event and stats queues are polled:

- generate: ``llm.generate_async(token_ids, sampling_params, streaming=True,
  lora_request=..., disaggregated_params=..., cache_salt=...)`` returns a
  ``RequestOutput`` iterated with ``async for`` (:mod:`.mapping`); abort: ``abort()`` on it;
- KV events: ``llm.get_kv_cache_events_async(timeout)`` returns the executor's one
  ``IterationResult``, which yields the event dicts queued so far and, after ``timeout``
  without one, stops and stays stopped until ``mark_undone()`` (the executor calls it
  when a request is submitted: ``_maybe_initialize_iteration_results``, which also
  creates it; before the first request the classic executor asserts it exists). So
  the adapter sends one warm-up request (one token in, one out) at start, and calls
  ``mark_undone()`` before each poll. Events need
  ``KvCacheConfig(enable_block_reuse=True, event_buffer_max_size>0)``, which the factory
  sets unless the user did. The first events are ``created`` (one per attention window),
  whose ``num_blocks_per_cache_level[0]`` is the device cache size this adapter reports
  (else the stats' ``kvCacheStats.maxNumBlocks``, else ``kv_cache_config.max_tokens``);
- load: ``llm.get_stats_async(timeout)`` yields per-iteration dicts (with
  ``enable_iter_perf_stats``; the same ``IterationResult`` behaviour): ``numActiveRequests``, ``numQueuedRequests``,
  ``kvCacheStats.{usedNumBlocks,maxNumBlocks,tokensPerBlock}``,
  ``inflightBatchingStats.{numCtxTokens,numPausedRequests}``, ``attentionDpRank`` (newer);
- ``llm.args``: ``kv_cache_config.tokens_per_block``, ``max_seq_len``, ``max_batch_size``,
  ``max_num_tokens``.

``kv_dump`` answers from a :class:`~commutator.engines.kv_mirror.KvMirror` of the
events this adapter converted (None when KV events are off).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from commutator.engines.trtllm.api import TrtllmApi
from commutator.engines.trtllm.disagg import TrtllmHandoff
from commutator.engines.trtllm.events import TrtllmKvEvents
from commutator.engines.trtllm.mapping import output_step, sampling_kwargs

__all__ = ["TrtllmEngine"]

log = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_BLOCK = 32


def _attr(obj: Any, path: str) -> Any:
    for name in path.split("."):
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return obj


async def _drain(fetch: Any, wait_s: float) -> list[Any]:
    """Everything an ``IterationResult`` holds now (reopened first: it stays stopped after a timeout)."""
    try:
        result = fetch(timeout=wait_s)
    except AssertionError:  # the classic executor before its first request: nothing to read yet
        return []
    reopen = getattr(result, "mark_undone", None)
    if reopen is not None:
        reopen()
    return [item async for item in result]


class _Request:
    __slots__ = ("aborted", "result")

    def __init__(self) -> None:
        self.result: Any = None
        self.aborted = False


class TrtllmEngine:
    """See :class:`commutator.engines.base.Engine`. Lifecycle: ``start`` (builds the ``LLM``),
    concurrent ``generate`` calls, ``shutdown``. All methods run on one event loop."""

    def __init__(
        self,
        api: TrtllmApi,
        model: str,
        llm_kwargs: dict[str, Any],
        *,
        lora_modules: Mapping[str, str] | None = None,
        model_info: ModelInfo | None = None,
        clock: Clock | None = None,
        poll_interval_s: float = 0.02,
        stats_interval_s: float = 1.0,
        start_timeout_s: float = 30.0,
    ) -> None:
        self._api = api
        self.model = model
        self.llm_kwargs = llm_kwargs
        self._loras = dict(lora_modules or {})
        self._lora_ids = {name: i + 1 for i, name in enumerate(self._loras)}
        self._model_info = model_info or ModelInfo()
        self._clock = clock or SystemClock()
        self._poll = poll_interval_s
        self._stats_interval = stats_interval_s
        self._start_timeout = start_timeout_s
        self._llm: Any = None
        self._capacity: EngineCapacity | None = None
        self._accepted: frozenset[str] = frozenset()
        self._generate_params = Keywords()
        self._buffer = KvEventBuffer(mirror=True)
        self._hints: RootSeedHints | None = None
        self._events: TrtllmKvEvents | None = None
        self._tasks = Supervisor(clock=self._clock)
        self._inflight: dict[str, _Request] = {}
        self._handoffs_in: dict[str, TrtllmHandoff] = {}
        self._handoffs_out: dict[str, TrtllmHandoff] = {}
        self._stats: dict[int, EngineStats] = {}
        self._stats_max_blocks = 0
        kv = llm_kwargs.get("kv_cache_config") or {}
        self.kv_events_enabled = (
            bool(_attr(kv, "event_buffer_max_size")) and _attr(kv, "enable_block_reuse") is not False
        )
        self.disaggregation_enabled = llm_kwargs.get("cache_transceiver_config") is not None

    # -- lifecycle -------------------------------------------------------------------
    @property
    def capacity(self) -> EngineCapacity:
        if self._capacity is None:
            raise RuntimeError("the TensorRT-LLM engine is not started")
        return self._capacity

    async def start(self) -> None:
        if self._llm is not None:
            return
        llm = self._api.create_llm(self.model, self.llm_kwargs)  # blocks until the model is loaded
        self._llm = llm
        args = getattr(llm, "args", None)
        block = int(
            _attr(args, "kv_cache_config.tokens_per_block")
            or _attr(args, "build_config.plugin_config.tokens_per_block")
            or _attr(self.llm_kwargs, "kv_cache_config.tokens_per_block")
            or DEFAULT_TOKENS_PER_BLOCK
        )
        self._accepted = self._api.sampling_param_names()
        self._generate_params = Keywords(llm.generate_async)
        self._hints = RootSeedHints(block, clock=self._clock)
        self._events = TrtllmKvEvents(block, self._hints, self._lora_name)
        await self._warm_up()
        total = await self._read_device_blocks(block)
        ctx = int(_attr(args, "max_seq_len") or self._model_info.context_length)
        attention_dp = bool(_attr(args, "enable_attention_dp"))
        self._capacity = EngineCapacity(
            block_size=block,
            total_blocks=total,
            max_num_seqs=int(_attr(args, "max_batch_size") or 0),
            max_batched_tokens=int(_attr(args, "max_num_tokens") or 0),
            context_length=min(ctx, total * block),
            dp_size=int(_attr(args, "tensor_parallel_size") or 1) if attention_dp else 1,
        )
        if self.kv_events_enabled:
            self._tasks.start("trtllm-kv-events", self._pump_events)
        else:
            log.warning("TensorRT-LLM KV events are off (event_buffer_max_size 0 or no block reuse)")
        self._tasks.start("trtllm-stats", self._pump_stats)

    async def _warm_up(self) -> None:
        """One token in, one out: loads kernels and creates the LLM API's event and stats queues."""
        assert self._llm is not None
        bos = self._model_info.bos_token_id
        params = self._api.sampling_params(max_tokens=1, detokenize=False)
        result = self._llm.generate_async(inputs=[bos if bos is not None else 0], sampling_params=params)
        async for _ in result:
            pass

    async def _read_device_blocks(self, block: int) -> int:
        """The device cache size: the ``created`` events, else the stats, else ``kv_cache_config.max_tokens``."""
        assert self._events is not None
        deadline = self._clock.monotonic() + self._start_timeout
        while self._clock.monotonic() < deadline:
            if self.kv_events_enabled:
                await self.drain_events()
            if self._events.device_blocks:
                return self._events.device_blocks
            await self.refresh_stats()
            if self._stats_max_blocks:
                return self._stats_max_blocks
            await self._clock.sleep(self._poll)
        max_tokens = _attr(self.llm_kwargs, "kv_cache_config.max_tokens")
        if max_tokens:
            return int(max_tokens) // block
        raise RuntimeError(
            "TensorRT-LLM did not report its KV cache size (no 'created' KV event, no iteration stats); "
            "set kv_cache_config.max_tokens in --engine-args"
        )

    async def shutdown(self) -> None:
        await self._tasks.close()
        llm, self._llm = self._llm, None
        if llm is None:
            return
        for req in list(self._inflight.values()):
            req.aborted = True
            if req.result is not None:
                with contextlib.suppress(Exception):
                    req.result.abort()
        await asyncio.to_thread(llm.shutdown)

    # -- requests --------------------------------------------------------------------
    def _lora_name(self, lora_id: int) -> str | None:
        return next((n for n, i in self._lora_ids.items() if i == lora_id), None)

    def _generate_kwargs(self, request: EngineRequest) -> dict[str, Any]:
        if (request.kv_import is not None or request.prefill_only) and not self.disaggregation_enabled:
            raise ValueError(
                "TensorRT-LLM needs a cache transceiver for disaggregated serving "
                '(--engine-args \'--cache_transceiver_config {"backend": "UCX"}\')'
            )
        if request.kv_import is not None and not request.kv_import.engine_params:
            raise ValueError(
                "TensorRT-LLM takes a prompt's KV through its cache transceiver (a pull handoff), "
                "not as blocks written into reserved slots"
            )
        api = self._api
        kw: dict[str, Any] = {
            "inputs": list(request.token_ids),
            "sampling_params": api.sampling_params(
                **sampling_kwargs(request, self.capacity.context_length, self._accepted)
            ),
            "streaming": True,
        }
        if request.lora_name:
            path = self._loras.get(request.lora_name)
            if path is None:
                raise ValueError(
                    f"unknown LoRA adapter {request.lora_name!r}; name it with "
                    f"--engine-args '--lora-modules {request.lora_name}=/path/to/adapter'"
                )
            kw["lora_request"] = api.lora_request(request.lora_name, self._lora_ids[request.lora_name], path)
        if request.cache_salt:
            if "cache_salt" not in self._generate_params:
                raise ValueError("cache_salt is not supported by the installed TensorRT-LLM version")
            kw["cache_salt"] = request.cache_salt
        if request.dp_rank is not None and (request.dp_rank != 0 or self.capacity.dp_size > 1):
            raise ValueError("routing a request to an attention-DP rank is not supported by this adapter")
        handoff = self._handoffs_in.get(request.request_id)
        if request.kv_import is not None:
            handoff = TrtllmHandoff.from_bytes(request.kv_import.engine_params)
        if handoff is not None:
            kw["disaggregated_params"] = api.disaggregated_params(**handoff.generation_kwargs())
        elif request.prefill_only and self.disaggregation_enabled:
            kw["disaggregated_params"] = api.disaggregated_params(request_type="context_only")
        return kw

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._llm is None:
            raise RuntimeError("the TensorRT-LLM engine is not started")
        rid = request.request_id
        if rid in self._inflight:
            raise ValueError(f"request {rid!r} is already running")
        kw = self._generate_kwargs(request)
        self._handoffs_in.pop(rid, None)
        assert self._hints is not None
        hint = self._hints.begin(request.token_ids, request.lora_name, request.cache_salt)
        state = _Request()
        self._inflight[rid] = state
        done = False
        try:
            state.result = self._llm.generate_async(**kw)
            first = True
            async for step in state.result:
                out = output_step(step, first, len(request.token_ids), request.logprobs, state.aborted)
                first = False
                if out.finish_reason is not None:
                    done = True
                    params = getattr(step.outputs[0], "disaggregated_params", None)
                    if request.prefill_only and params is not None:
                        self._handoffs_out[rid] = TrtllmHandoff.from_params(params)
                yield out
                if done:
                    return
            done = True
            yield EngineOutput([], FinishReason.ABORT if state.aborted else FinishReason.STOP)
        finally:
            self._inflight.pop(rid, None)
            self._hints.end(hint)
            if not done and state.result is not None:
                with contextlib.suppress(Exception):
                    state.result.abort()

    async def abort(self, request_id: str) -> bool:
        state = self._inflight.get(request_id)
        if state is None or state.result is None:
            return False
        state.aborted = True
        state.result.abort()
        return True

    # -- disaggregation: a pull engine (the cache transceiver fetches the KV) ------------------
    @property
    def kv_handoff(self) -> str:
        return "pull" if self.disaggregation_enabled else ""

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        return None

    def finish_handoff(self, request_id: str) -> bytes:
        handoff = self.take_handoff(request_id)
        if handoff is None:
            raise ValueError(f"TensorRT-LLM's context phase of {request_id} returned no disaggregated_params")
        return handoff.to_bytes()

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        return None  # the generation-only request allocates its own blocks

    def release_import(self, request_id: str) -> None:
        return None

    # -- disaggregation hooks (DESIGN.md 2, opaque parameters) -----------------------
    def attach_handoff(self, request_id: str, handoff: TrtllmHandoff) -> None:
        """Make the next ``generate`` of ``request_id`` a generation-only request continuing ``handoff``."""
        self._handoffs_in[request_id] = handoff

    def take_handoff(self, request_id: str) -> TrtllmHandoff | None:
        """What the finished context-only (``prefill_only``) request left for the generation side."""
        return self._handoffs_out.pop(request_id, None)

    # -- observation -----------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        cap = self.capacity
        out = []
        for rank in range(cap.dp_size):
            s = self._stats.get(rank)
            if s is None:
                running = len(self._inflight) if rank == 0 else 0
                s = EngineStats(rank, running, 0, 0, cap.total_blocks, 0, 0)
            out.append(s)
        return out

    def note_stats(self, stat: Mapping[str, Any]) -> None:
        """Take one iteration's stats dict (the stats pump calls this)."""
        kv = stat.get("kvCacheStats") or {}
        ifb = stat.get("inflightBatchingStats") or {}
        self._stats_max_blocks = int(kv.get("maxNumBlocks") or self._stats_max_blocks)
        cap = self._capacity
        if cap is None:
            return
        tpb = kv.get("tokensPerBlock")
        if tpb and int(tpb) != cap.block_size:
            log.error("TensorRT-LLM reports %s tokens per block; this adapter hashes %d", tpb, cap.block_size)
        used = int(kv.get("usedNumBlocks") or 0)
        rank = int(stat.get("attentionDpRank") or 0)
        self._stats[rank] = EngineStats(
            dp_rank=rank,
            running_requests=int(stat.get("numActiveRequests") or 0),
            waiting_requests=int(stat.get("numQueuedRequests") or 0) + int(ifb.get("numPausedRequests") or 0),
            kv_blocks_used=used,
            kv_blocks_total=int(kv.get("maxNumBlocks") or cap.total_blocks),
            active_decode_blocks=used,
            pending_prefill_tokens=int(ifb.get("numCtxTokens") or 0),
        )

    async def drain_events(self) -> int:
        """Convert every KV event the engine has queued; the number read."""
        assert self._llm is not None and self._events is not None
        n = 0
        for event in await _drain(self._llm.get_kv_cache_events_async, self._poll):
            n += 1
            if event:
                self._buffer.push(self._events.convert(event))
        return n

    async def refresh_stats(self) -> int:
        """Read every iteration stat the engine has queued; the number read."""
        assert self._llm is not None
        stats = await _drain(self._llm.get_stats_async, self._poll)
        for stat in stats:
            if stat:
                self.note_stats(stat)
        return len(stats)

    async def _pump_events(self) -> None:
        while True:
            if not await self.drain_events():
                await self._clock.sleep(self._poll)

    async def _pump_stats(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except Exception as exc:
                log.debug("TensorRT-LLM stats not read: %s", exc)
            await self._clock.sleep(self._stats_interval)

    async def kv_events(self) -> list[KvEventRecord]:
        return await self._buffer.take()

    def failure(self) -> str | None:
        return None  # not detected yet: a dead engine fails its requests one by one

    def kv_dump(self) -> KvDump | None:
        return self._buffer.dump() if self.kv_events_enabled else None

    @property
    def event_converter(self) -> TrtllmKvEvents:
        assert self._events is not None
        return self._events
