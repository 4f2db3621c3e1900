"""The hf engine shell: the mocker's scheduler on the event loop, the model on one thread.

Each pass: :meth:`Scheduler.schedule` plans it on the loop (admissions,
chunked prefill, preemption, block allocation: exactly the mocker's policy and
block pool), the sequences' shares are copied into plain :class:`SeqWork`
items, the model runs them on the engine's model thread (the loop stays free),
and :meth:`Scheduler.complete` ends the pass with the sampled tokens
(registering full blocks: KV events), after which tokens go to their readers.

Between ``schedule`` and ``complete`` the scheduler may only take new requests
and import reservations; an abort that arrives while a pass runs (a client
hanging up) marks the request's stream aborted at once and frees its blocks
when the pass ends.

Disaggregation is *push* style (DESIGN.md 2): a decode engine reserves blocks
with :meth:`reserve_import`; the prefill engine runs the request with
``prefill_only``, keeps its prompt's blocks (:meth:`prefill_blocks`, for
``export_hold_s``), and :meth:`kv_export` gives their bytes; the decode engine
writes them with :meth:`kv_import` and decodes with ``EngineRequest.kv_import``. For
transfers that write the blocks' memory directly (NIXL), :meth:`kv_layout` says where they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from commutator.common.clock import Clock, SystemClock
from commutator.common.logging import fields
from commutator.engines.base import (
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KvEventRecord,
    KvLayout,
)
from commutator.engines.hf.config import HfConfig
from commutator.engines.hf.kv_cache import CacheGeometry
from commutator.engines.hf.runner import ModelRunner, SeqWork
from commutator.engines.hf.sampling import SampleSpec, check_sampling
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.scheduler import Batch, Scheduler, Seq
from commutator.engines.outputs import KvEventBuffer, OutputChannel
from commutator.engines.registry import EngineError

__all__ = ["HfEngine", "ModelPlan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """A model folder checked and sized (see :func:`commutator.engines.hf.factory.plan_model`)."""

    path: Path
    architecture: str
    device: torch.device
    dtype: torch.dtype
    geometry: CacheGeometry
    num_blocks: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...] = ()


class HfEngine:
    """Real generation with a transformers model. See :class:`commutator.engines.base.Engine`."""

    def __init__(
        self, plan: ModelPlan, config: HfConfig, *, engine_salt: int | None = None, clock: Clock | None = None
    ) -> None:
        self.plan = plan
        self.config = config
        self.clock = clock or SystemClock()
        sched_config = MockerConfig(
            block_size=config.block_size,
            num_blocks=plan.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            watermark=config.watermark,
            speedup_ratio=0.0,
        )
        self.scheduler = Scheduler(
            sched_config,
            vocab_size=plan.vocab_size,
            context_length=plan.context_length,
            eos_token_ids=plan.eos_token_ids,
            engine_salt=engine_salt if engine_salt is not None else random.getrandbits(64),
            hold_prefill_blocks=True,
        )
        self._capacity = EngineCapacity(
            block_size=config.block_size,
            total_blocks=plan.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            context_length=self.scheduler.context_length,
        )
        self._runner: ModelRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._channels: dict[str, OutputChannel] = {}
        self._wake = asyncio.Event()
        self._kv_events = KvEventBuffer()
        self._in_pass = False
        self._deferred_aborts: set[str] = set()
        self._held_until: dict[str, float] = {}
        self.passes = 0
        self.prompt_tokens_computed = 0
        """Prompt tokens the model computed (prefix-cache hits excluded)."""
        self.tokens_generated = 0
        self.largest_batch = 0
        """Most sequences computed in one pass so far."""

    @property
    def capacity(self) -> EngineCapacity:
        return self._capacity

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block in :meth:`kv_export`'s format."""
        return self.plan.geometry.bytes_per_block

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        plan = self.plan
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        loop = asyncio.get_running_loop()
        try:
            self._runner = await loop.run_in_executor(
                self._executor,
                lambda: ModelRunner.load(
                    plan.path,
                    device=plan.device,
                    dtype=plan.dtype,
                    geometry=plan.geometry,
                    num_blocks=plan.num_blocks,
                    threads=self.config.threads,
                ),
            )
        except Exception as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            first = ((str(exc) or type(exc).__name__).strip().splitlines() or [""])[0]
            raise EngineError(f"hf: cannot load the model in {plan.path}: {first}") from exc
        log.info(
            "hf engine loaded",
            extra=fields(
                model=str(plan.path),
                architecture=plan.architecture,
                device=str(plan.device),
                dtype=str(plan.dtype).removeprefix("torch."),
                kv_blocks=plan.num_blocks,
                block_size=plan.geometry.block_size,
            ),
        )
        self._task = loop.create_task(self._run(), name="hf-engine")
        self._task.add_done_callback(self._loop_ended)

    def failure(self) -> str | None:
        return self._failure

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The pass loop died (a bug): fail every request rather than leave its stream hanging."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self._failure = f"the hf engine's pass loop stopped: {type(exc).__name__}: {exc}"
        log.error("hf engine loop stopped: %s", exc, exc_info=exc)
        for ch in self._channels.values():
            ch.close(FinishReason.ERROR, f"the hf engine stopped: {type(exc).__name__}: {exc}")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A pass loop that died has said why (failure()); its requests must still be ended below.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for rid, ch in list(self._channels.items()):
            self.scheduler.abort(rid)
            ch.close(FinishReason.ABORT)
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None

    # -- requests -------------------------------------------------------------------
    def _check(self, request: EngineRequest) -> EngineRequest:
        """``ValueError`` for what this engine cannot do; the request with a seed filled in."""
        if request.lora_name:
            raise ValueError("the hf engine does not support LoRA adapters")
        if request.dp_rank not in (None, 0):
            raise ValueError(f"dp_rank {request.dp_rank}: the hf engine has one data-parallel rank")
        check_sampling(request.sampling, request.logprobs)
        if request.sampling.seed is None:
            # No seed: a fresh one, so that sampling differs between requests but survives a preemption.
            return replace(request, sampling=replace(request.sampling, seed=random.getrandbits(63)))
        return request

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._task is None:
            raise RuntimeError("engine not started")
        request = self._check(request)
        sched = self.scheduler
        rid = request.request_id
        ch = OutputChannel()
        if request.kv_import is not None:
            seq, reason = sched.add_imported(request, request.kv_import.first_token_id)
            ch.push(request.kv_import.first_token_id, None, reason)
            self._kv_events.push(sched.pool.take_events())  # the imported blocks are cached now
        else:
            seq = sched.add(request)
        self._channels[rid] = ch
        self._wake.set()
        first = True
        done = False
        try:
            while True:
                out = await ch.take()
                if first:
                    out.prompt_tokens = seq.num_prompt
                    out.cached_prompt_tokens = max(seq.cached_tokens, 0)
                    first = False
                done = out.finish_reason is not None
                yield out
                if done:
                    return
        finally:
            self._channels.pop(rid, None)
            if not done:
                self._abort(rid)

    def _abort(self, request_id: str) -> bool:
        sched = self.scheduler
        if request_id in sched.by_id and self._in_pass:
            self._deferred_aborts.add(request_id)  # its blocks are being computed: freed when the pass ends
            return True
        self._held_until.pop(request_id, None)
        aborted = sched.abort(request_id)
        self._wake.set()
        return aborted

    async def abort(self, request_id: str) -> bool:
        ch = self._channels.get(request_id)
        aborted = self._abort(request_id)
        if ch is not None:
            ch.close(FinishReason.ABORT)
        return aborted

    # -- disaggregation: a push engine (KV written into reserved blocks) --------------------
    kv_handoff = "push"

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        return None

    def finish_handoff(self, request_id: str) -> bytes:
        return b""

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        # The sequence made here is the one that decodes (generate with kv_import): it needs its seed now.
        blocks = self.scheduler.reserve_import(self._check(request))
        self._kv_events.push(self.scheduler.pool.take_events())  # evictions to make room
        return blocks

    def release_import(self, request_id: str) -> None:
        self.scheduler.release_import(request_id)
        self._wake.set()

    def cached_prefix_tokens(self, request: EngineRequest) -> int:
        """Prompt tokens this engine would serve from its prefix cache now."""
        return self.scheduler.cached_prefix_tokens(request)

    # -- KV transfer (push style) ---------------------------------------------------------
    def prefill_blocks(self, request_id: str) -> tuple[int, ...] | None:
        """The blocks holding the prompt KV of a finished ``prefill_only`` request (prompt order), if still held."""
        seq = self.scheduler.held.get(request_id)
        return tuple(seq.blocks) if seq is not None else None

    def release_prefill(self, request_id: str) -> bool:
        """Free the blocks of a finished ``prefill_only`` request (after its export); False if not held."""
        self._held_until.pop(request_id, None)
        released = self.scheduler.release_held(request_id)
        self._wake.set()
        return released

    async def kv_export(self, block_ids: Sequence[int]) -> bytes:
        """The K/V of ``block_ids`` in every layer (format: :mod:`commutator.engines.hf.kv_cache`)."""
        runner = self._require_runner()
        ids = list(block_ids)
        return await asyncio.get_running_loop().run_in_executor(self._executor, runner.export_blocks, ids)

    async def kv_import(self, block_ids: Sequence[int], data: bytes) -> None:
        """Write exported K/V into blocks reserved here with :meth:`reserve_import`.

        ``ValueError`` when a block is not reserved for an import or the data does
        not fit (another model, dtype or block size).
        """
        runner = self._require_runner()
        ids = list(block_ids)
        reserved = {b for seq in self.scheduler.reserved.values() for b in seq.blocks}
        stray = next((b for b in ids if b not in reserved), None)
        if stray is not None:
            raise ValueError(f"block {stray} is not reserved for an import")
        await asyncio.get_running_loop().run_in_executor(self._executor, runner.import_blocks, ids, data)

    def kv_layout(self) -> KvLayout:
        """Where this engine's KV blocks are in memory, for NIXL (see :class:`KvLayout`).

        Valid from :meth:`start` until :meth:`shutdown`: the cache is allocated once and never moves.
        """
        return self._require_runner().cache.layout()

    def _require_runner(self) -> ModelRunner:
        if self._runner is None or self._executor is None:
            raise RuntimeError("engine not started")
        return self._runner

    # -- observation ------------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        s = self.scheduler
        return [
            EngineStats(
                dp_rank=0,
                running_requests=len(s.running),
                waiting_requests=len(s.waiting),
                kv_blocks_used=s.pool.active,
                kv_blocks_total=s.pool.num_blocks,
                active_decode_blocks=s.active_decode_blocks(),
                pending_prefill_tokens=s.pending_prefill_tokens(),
            )
        ]

    def kv_dump(self) -> tuple[list[tuple[int, int, int]], dict[int, int]]:
        pool = self.scheduler.pool
        return [(0, e, s) for e, s in pool.cached_blocks()], {0: pool.next_event_id}

    async def kv_events(self) -> list[KvEventRecord]:
        return await self._kv_events.take()

    # -- the loop -------------------------------------------------------------------
    def _work(self, batch: Batch) -> list[SeqWork]:
        sampling = {id(seq) for seq in batch.samples}
        works = []
        for seq, n in batch.scheduled:
            start = seq.num_computed
            spec = self._sample_spec(seq) if id(seq) in sampling else None
            works.append(SeqWork(list(seq.tokens[start : start + n]), start, list(seq.blocks), spec))
        return works

    @staticmethod
    def _sample_spec(seq: Seq) -> SampleSpec:
        p = seq.sampling
        position = seq.num_output
        rep = p.repetition_penalty if p.repetition_penalty is not None else 1.0
        freq = p.frequency_penalty or 0.0
        pres = p.presence_penalty or 0.0
        banned: tuple[int, ...] = ()
        if position + 1 < seq.min_tokens:
            banned = tuple(sorted(seq.eos | seq.stop_ids))
        return SampleSpec(
            temperature=p.temperature or 0.0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            top_k=p.top_k if p.top_k is not None and p.top_k > 0 else 0,
            seed=p.seed or 0,
            position=seq.num_prompt + position,
            logprobs=seq.logprobs,
            banned=banned,
            frequency_penalty=freq,
            presence_penalty=pres,
            repetition_penalty=rep,
            output_tokens=seq.tokens[seq.num_prompt :] if (freq or pres) else (),
            context_tokens=list(seq.tokens) if rep != 1.0 else (),
        )

    def _release_expired_holds(self) -> float | None:
        """Free prefill blocks nobody exported in time; seconds until the next expiry (None: none held)."""
        now = self.clock.monotonic()
        for rid, until in list(self._held_until.items()):
            if until <= now:
                del self._held_until[rid]
                if self.scheduler.release_held(rid):
                    log.info("prefill blocks of %s released unexported after %.0f s", rid, self.config.export_hold_s)
        return min(self._held_until.values()) - now if self._held_until else None

    async def _idle(self, wait_s: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait_s)

    async def _run(self) -> None:
        sched = self.scheduler
        runner = self._require_runner()
        loop = asyncio.get_running_loop()
        while True:
            next_expiry = self._release_expired_holds()
            if not sched.has_work:
                await self._idle(next_expiry)
                continue
            batch = sched.schedule()
            if not batch.scheduled:
                # Nothing fits now (blocks reserved for imports or held for export): wait for a change.
                await self._idle(next_expiry if next_expiry is not None else 1.0)
                continue
            works = self._work(batch)
            self._in_pass = True
            try:
                sampled = await loop.run_in_executor(self._executor, runner.run, works)
            except Exception as exc:
                self._in_pass = False
                self._fail(batch, exc)
                continue
            self._in_pass = False
            result = sched.complete(batch, sampled)
            self.passes += 1
            self.prompt_tokens_computed += result.prefill_tokens
            self.tokens_generated += len(result.outputs)
            self.largest_batch = max(self.largest_batch, len(batch.scheduled))
            hold_until = self.clock.monotonic() + self.config.export_hold_s
            for seq, token, reason, lp in result.outputs:
                if reason is not None and seq.request_id in sched.held:
                    self._held_until[seq.request_id] = hold_until
                ch = self._channels.get(seq.request_id)
                if ch is not None:
                    ch.push(token, lp, reason)
            self._apply_deferred_aborts()
            self._kv_events.push(sched.pool.take_events())

    def _apply_deferred_aborts(self) -> None:
        for rid in self._deferred_aborts:
            self.scheduler.abort(rid)
        self._deferred_aborts.clear()

    def _fail(self, batch: Batch, exc: BaseException) -> None:
        """The model failed a pass: its requests end with an error; the engine goes on."""
        log.exception("hf engine pass failed (%d sequences)", len(batch.scheduled), exc_info=exc)
        message = f"the hf engine failed: {type(exc).__name__}: {exc}"
        for seq, _ in batch.scheduled:
            ch = self._channels.get(seq.request_id)
            if ch is not None:
                ch.close(FinishReason.ERROR, message)
            self.scheduler.abort(seq.request_id)
        self._apply_deferred_aborts()
        self._kv_events.push(self.scheduler.pool.take_events())
