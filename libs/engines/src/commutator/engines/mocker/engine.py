"""The mocker engine: the pure scheduler driven in time on the event loop.

Each pass runs :meth:`Scheduler.step`, then waits the pass's simulated
duration on the injected clock (measured from the start of the pass, so the
scheduler's own CPU time is part of it), then delivers the pass's tokens and
KV events. With ``speedup_ratio`` 0 passes follow each other with no delay
(yielding to the event loop in between). Without an injected clock the wait is
a :class:`~commutator.common.clock.PreciseClock` sleep: the event loop's own
timers end up to a millisecond late, which would lengthen every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path

from commutator.common.clock import Clock, PreciseClock
from commutator.engines.base import (
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KvEventRecord,
)
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.scheduler import Scheduler, Seq
from commutator.engines.mocker.tokens import text_token_ids
from commutator.engines.model_info import ModelInfo
from commutator.engines.outputs import KvEventBuffer, OutputChannel

log = logging.getLogger(__name__)

__all__ = ["MockerEngine", "PushedRequest"]

_MAX_CATCH_UP_S = 0.002
"""How late a pass may start on the host and still count as starting when the last one ended."""


class MockerEngine:
    """A CPU stand-in for a GPU engine (DESIGN.md 5). See :class:`commutator.engines.base.Engine`."""

    def __init__(
        self,
        config: MockerConfig,
        *,
        vocab_size: int = 32000,
        context_length: int = 32768,
        eos_token_ids: tuple[int, ...] = (),
        clock: Clock | None = None,
        engine_salt: int | None = None,
        hold_prefill: bool = False,
        output_ids: Sequence[int] | None = None,
    ) -> None:
        """``hold_prefill`` (a prefill worker's engine): a finished ``prefill_only`` request keeps its
        prompt's blocks until :meth:`release_prefill`, as a real engine keeps them until its KV has
        been moved to the decode worker. ``output_ids``: the ids generated tokens are drawn from (None:
        any id of the vocabulary)."""
        config.validate()
        self.config = config
        self._own_clock: PreciseClock | None = None
        if clock is None:  # passes end on time, not up to a millisecond late on the event loop's timers
            clock = self._own_clock = PreciseClock()
        self.clock = clock
        salt = engine_salt if engine_salt is not None else random.getrandbits(64)
        self.scheduler = Scheduler(
            config,
            vocab_size=config.vocab_size or vocab_size,
            context_length=config.context_length or context_length,
            eos_token_ids=config.eos_token_ids or eos_token_ids,
            engine_salt=salt,
            hold_prefill_blocks=hold_prefill,
            output_ids=output_ids,
        )
        self._capacity = EngineCapacity(
            block_size=config.block_size,
            total_blocks=config.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            context_length=self.scheduler.context_length,
        )
        self._channels: dict[str, OutputChannel] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv_events = KvEventBuffer()
        self._pass_listeners: list[Callable[[], None]] = []
        self.passes = 0
        self.tokens_generated = 0

    @classmethod
    def for_model(cls, config: MockerConfig, model_path: str | Path | None, **kwargs: object) -> MockerEngine:
        """A mocker with the vocabulary, context length and EOS ids of the model at ``model_path``; with
        the model's own vocabulary (no ``vocab_size`` in ``config``) and its ``tokenizer.json``, generated
        tokens are drawn from the ids whose text stands alone (:func:`.tokens.text_token_ids`)."""
        info = ModelInfo.load(model_path) if model_path else ModelInfo()
        output_ids = None
        tokenizer_file = Path(model_path) / "tokenizer.json" if model_path else None
        if not config.vocab_size and tokenizer_file is not None and tokenizer_file.is_file():
            eos = config.eos_token_ids or info.eos_token_ids
            output_ids = text_token_ids(tokenizer_file, info.vocab_size, keep=eos) or None
        return cls(
            config,
            vocab_size=info.vocab_size,
            context_length=info.context_length,
            eos_token_ids=info.eos_token_ids,
            output_ids=output_ids,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def capacity(self) -> EngineCapacity:
        return self._capacity

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mocker-engine")

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
        if self._own_clock is not None:
            self._own_clock.close()

    # -- requests -----------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._task is None:
            raise RuntimeError("engine not started")
        sched = self.scheduler
        rid = request.request_id
        ch = OutputChannel()
        if request.kv_import is not None:
            seq, reason = sched.add_imported(request, request.kv_import.first_token_id)
            ch.push(request.kv_import.first_token_id, None, reason)
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
                done = ch.finish is not None
                yield out
                if done:
                    return
        finally:
            self._channels.pop(rid, None)
            if not done:
                sched.abort(rid)

    def start_request(self, request: EngineRequest, notify: Callable[[], None]) -> PushedRequest:
        """Start ``request`` without a reader task: the pass loop calls ``notify`` whenever the request
        has news, and the caller takes it with :meth:`PushedRequest.take` (the worker's multiplexed
        stream does, once per frame). Raises ``ValueError`` for a request the scheduler refuses."""
        if self._task is None:
            raise RuntimeError("engine not started")
        sched = self.scheduler
        ch = OutputChannel(notify)
        if request.kv_import is not None:
            seq, reason = sched.add_imported(request, request.kv_import.first_token_id)
            ch.push(request.kv_import.first_token_id, None, reason)
        else:
            seq = sched.add(request)
        self._channels[request.request_id] = ch
        self._wake.set()
        return PushedRequest(self, seq, ch)

    def add_pass_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each pass, once the pass has handed its outputs to its requests (the
        worker's stream sends the pass's frame from there, with no turn of the event loop between)."""
        self._pass_listeners.append(listener)

    def remove_pass_listener(self, listener: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._pass_listeners.remove(listener)

    async def abort(self, request_id: str) -> bool:
        ch = self._channels.get(request_id)
        aborted = self.scheduler.abort(request_id)
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
        blocks = self.scheduler.reserve_import(request)
        self._kv_events.push(self.scheduler.pool.take_events())  # evictions made to find room
        return blocks

    def release_import(self, request_id: str) -> None:
        self.scheduler.release_import(request_id)
        self._wake.set()

    def cached_prefix_tokens(self, request: EngineRequest) -> int:
        """Prompt tokens this engine would serve from its prefix cache now."""
        return self.scheduler.cached_prefix_tokens(request)

    def prefill_blocks(self, request_id: str) -> tuple[int, ...] | None:
        """The blocks a finished ``prefill_only`` request holds (``hold_prefill``), in prompt order."""
        seq = self.scheduler.held.get(request_id)
        return tuple(seq.blocks) if seq is not None else None

    def release_prefill(self, request_id: str) -> bool:
        """Free a finished prefill's held blocks (its KV has been moved); False if none are held."""
        released = self.scheduler.release_held(request_id)
        self._wake.set()
        return released

    # -- observation --------------------------------------------------------------
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

    def failure(self) -> str | None:
        task = self._task
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return None
        return f"the mocker's pass loop stopped: {task.exception()!r}"

    def kv_dump(self) -> tuple[list[tuple[int, int, int]], dict[int, int]]:
        pool = self.scheduler.pool
        return [(0, e, s) for e, s in pool.cached_blocks()], {0: pool.next_event_id}

    async def kv_events(self) -> list[KvEventRecord]:
        return await self._kv_events.take()

    @property
    def kv_events_dropped(self) -> int:
        return self._kv_events.dropped

    # -- the loop -----------------------------------------------------------------
    async def _run(self) -> None:
        sched = self.scheduler
        clock = self.clock
        channels = self._channels
        ended: float | None = None  # when the last pass ended in simulated time
        while True:
            if not sched.has_work:
                self._wake.clear()
                await self._wake.wait()
                ended = None
                continue
            now = clock.monotonic()
            # Passes run back to back: the next one starts when the last one ended, not when the host's
            # timer got round to waking this loop (up to a millisecond later, the timer's resolution),
            # so that lateness does not add up pass after pass; a longer stall is not made up for.
            started = now if ended is None or now - ended > _MAX_CATCH_UP_S else ended
            result = sched.step()
            self.passes += 1
            events = sched.pool.take_events()
            if result.pass_ms > 0:
                ended = started + result.pass_ms / 1000.0
                await clock.sleep(ended - clock.monotonic())
            else:
                ended = None
                await asyncio.sleep(0)
            for seq, token, reason, lp in result.outputs:
                ch = channels.get(seq.request_id)
                if ch is not None:
                    ch.push(token, lp, reason)
            self.tokens_generated += len(result.outputs)
            if result.outputs:
                for listener in self._pass_listeners:
                    try:
                        listener()
                    except Exception:  # a listener's failure must not stop the engine
                        log.exception("a pass listener failed")
            self._kv_events.push(events)


class PushedRequest:
    """A request started with :meth:`MockerEngine.start_request`: its output is taken, not awaited."""

    __slots__ = ("_done", "_engine", "_first", "_seq", "channel")

    def __init__(self, engine: MockerEngine, seq: Seq, channel: OutputChannel) -> None:
        self._engine = engine
        self._seq = seq
        self.channel = channel
        self._first = True
        self._done = False

    def take(self) -> EngineOutput | None:
        """The output since the last take (the first one carries the prompt counts, the last one a
        finish reason), or None when there is nothing new."""
        ch = self.channel
        if self._done or (not ch.tokens and ch.finish is None):
            return None
        out = ch.take_now()
        if self._first:
            out.prompt_tokens = self._seq.num_prompt
            out.cached_prompt_tokens = max(self._seq.cached_tokens, 0)
            self._first = False
        if out.finish_reason is not None:
            self._done = True
            self._engine._channels.pop(self._seq.request_id, None)
        return out

    def cancel(self) -> None:
        """Abort the request unless it has finished (its blocks are freed); harmless twice."""
        if not self._done:
            self._done = True
            rid = self._seq.request_id
            self._engine._channels.pop(rid, None)
            self._engine.scheduler.abort(rid)
