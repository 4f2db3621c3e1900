"""The mocker's continuous-batching scheduler (pure, no I/O, no clock).

One :meth:`Scheduler.step` is one engine pass, scheduled the way vLLM's v1
scheduler does it:

1. Running sequences first, in admission order: each computes the tokens it
   has not computed yet (a chunk of its prompt while prefilling, one token
   while decoding), within the pass's token budget. A sequence that needs a
   block when none is left preempts the most recently admitted running
   sequence (possibly itself): its blocks are released and it goes back to the
   front of the waiting queue, to be recomputed (prompt plus the tokens
   generated so far; the prefix cache usually still holds most of it).
2. Then admissions from the waiting queue, while budget, sequence slots and
   blocks (above the watermark) last. An admitted sequence first takes the
   longest cached prefix of its blocks (at most all but the last token, which
   must be computed to sample from), then a chunk of the rest.

Blocks that a pass fills are registered in the prefix cache (KV events) when
the pass is planned, as vLLM's v1 scheduler caches them when it allocates them:
a sequence admitted later in the same pass already finds them (a same-pass
hit). At the end of the pass every sequence whose tokens are all computed
samples one token (the first token ends its prefill). :attr:`StepResult.pass_ms` is the pass's
simulated duration from the timing model.

A pass is two calls, so that a real engine can run its model in between:
:meth:`Scheduler.schedule` plans it (admissions, preemptions, block
allocations; a :class:`Batch` of ``(sequence, tokens to compute)``), and
:meth:`Scheduler.complete` ends it with one sampled token per sequence of
:attr:`Batch.samples`. :meth:`Scheduler.step` is the mocker's pass: plan, then
complete with its synthetic tokens. Between the two calls the scheduler's state
must not change except through :meth:`add`, :meth:`reserve_import`,
:meth:`release_import` and :meth:`add_imported`, which leave planned sequences
alone (an abort waits for :meth:`complete`).

The longest sequence the KV cache can run (:attr:`Scheduler.kv_max_tokens`):
an admission must leave ``watermark_blocks`` available after taking its first
chunk's blocks, and a sequence whose prefix is cached (a repeated prompt, or a
recompute after preemption) takes all of its blocks in its first chunk, so
``ceil(L / block_size) <= num_blocks - watermark_blocks`` must hold for the
``L`` tokens it holds at (re)admission, whatever ``max_batched_tokens`` is.
Later chunks and decode steps allocate without the watermark, but a sequence
never needs more blocks than at a readmission: ``L`` is at most prompt plus
output minus one (the last sampled token is never computed). Hence
``kv_max_tokens = (num_blocks - watermark_blocks) * block_size + 1``, and
:attr:`Scheduler.context_length` is the smaller of it and the model's context.
Requests that cannot fit are refused by :meth:`Scheduler.add` (``max_output``
is capped by the context length), and every sequence within it completes: the
oldest running sequence always gets its blocks (it preempts newer ones), and a
sequence alone always fits, from an empty or a warm cache (blocks reserved for
a remote prefill aside: they come back when the transfer ends).
"""

from __future__ import annotations

from collections import deque
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass, field

from commutator.common.hashing import block_hash_seed, extend_sequence_hash, local_block_hashes, sequence_hashes
from commutator.common.prompt import TokenArray, token_array
from commutator.engines.base import EngineRequest, FinishReason, SamplingParams, TokenLogprob
from commutator.engines.mocker.block_pool import BlockPool
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.timing import pass_ms
from commutator.engines.mocker.tokens import request_seed, synthetic_logprobs, token_at
from commutator.engines.vocab import first_outside

__all__ = ["Batch", "Scheduler", "Seq", "StepResult"]


class Seq:
    """One request inside the scheduler."""

    __slots__ = (
        "blocks",
        "cached_tokens",
        "eos",
        "hash_seed",
        "local_hashes",
        "logprobs",
        "max_output",
        "min_tokens",
        "num_computed",
        "num_output",
        "num_prompt",
        "num_registered",
        "prefill_end",
        "prefill_only",
        "request_id",
        "sampling",
        "seed",
        "seq_hashes",
        "stop_ids",
        "tokens",
    )

    def __init__(self, request_id: str, tokens: MutableSequence[int], hash_seed: int) -> None:
        self.request_id = request_id
        self.tokens = tokens
        self.num_prompt = len(tokens)
        self.num_computed = 0
        self.prefill_end = len(tokens)
        self.blocks: list[int] = []
        self.hash_seed = hash_seed
        self.local_hashes: list[int] = []
        self.seq_hashes: list[int] = []
        self.num_registered = 0
        self.num_output = 0
        self.cached_tokens = -1  # set at first admission
        self.max_output = 0
        self.min_tokens = 0
        self.eos: frozenset[int] = frozenset()
        self.stop_ids: frozenset[int] = frozenset()
        self.seed = 0
        self.sampling = SamplingParams()
        self.prefill_only = False
        self.logprobs: int | None = None


@dataclass(slots=True)
class Batch:
    """One planned pass: what to compute, and who samples at its end.

    ``scheduled`` holds ``(seq, num_new)`` in pass order (running sequences, then
    admissions): ``seq`` computes its tokens ``num_computed .. num_computed + num_new``
    into ``seq.blocks``. ``samples`` are the sequences whose computed tokens then
    reach ``len(seq.tokens)``, in the same order; each samples one token.
    """

    scheduled: list[tuple[Seq, int]] = field(default_factory=list)
    samples: list[Seq] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_seqs: int = 0
    kv_usage: float = 0.0
    pass_ms: float = 0.0
    preempted: int = 0
    admitted: int = 0


@dataclass(slots=True)
class StepResult:
    """What one pass did. ``outputs`` holds ``(seq, token, finish_reason or None, logprob)``."""

    outputs: list[tuple[Seq, int, FinishReason | None, TokenLogprob | None]] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_seqs: int = 0
    kv_usage: float = 0.0
    pass_ms: float = 0.0
    preempted: int = 0
    admitted: int = 0


class Scheduler:
    def __init__(
        self,
        config: MockerConfig,
        *,
        vocab_size: int,
        context_length: int,
        eos_token_ids: tuple[int, ...] = (),
        engine_salt: int = 0,
        hold_prefill_blocks: bool = False,
        output_ids: Sequence[int] | None = None,
    ) -> None:
        """``hold_prefill_blocks``: a finished ``prefill_only`` sequence keeps its blocks (in :attr:`held`)
        until :meth:`release_held`, so that an engine can export its prompt's KV (disaggregated prefill).
        ``output_ids``: the ids generated tokens are drawn from (:func:`.tokens.text_token_ids`); None: any
        id of the vocabulary."""
        config.validate()
        self.config = config
        self.block_size = config.block_size
        self.vocab_size = vocab_size
        self.output_ids = output_ids or None
        self.context_length = context_length
        self.eos = frozenset(eos_token_ids)
        self.pool = BlockPool(config.num_blocks, config.block_size, engine_salt)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.by_id: dict[str, Seq] = {}
        self.reserved: dict[str, Seq] = {}
        self.hold_prefill_blocks = hold_prefill_blocks
        self.held: dict[str, Seq] = {}
        """Finished prefill-only sequences whose blocks are kept for export (``hold_prefill_blocks``)."""
        self._watermark_blocks = int(config.watermark * config.num_blocks)
        self.model_context_length = context_length
        self.kv_max_tokens = (config.num_blocks - self._watermark_blocks) * config.block_size + 1
        """The longest sequence (prompt plus output) the KV cache can run (see the module docstring)."""
        self.context_length = min(context_length, self.kv_max_tokens)
        """The longest sequence this engine runs: the model's context, or less if the KV cache is smaller."""
        self.total_preemptions = 0

    # -- requests -----------------------------------------------------------------
    def _make_seq(self, req: EngineRequest) -> Seq:
        n = len(req.token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if req.request_id in self.by_id or req.request_id in self.reserved or req.request_id in self.held:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if n >= self.context_length:
            if self.context_length == self.model_context_length:
                raise ValueError(f"the prompt has {n} tokens; this model's context is {self.context_length} tokens")
            cfg = self.config
            raise ValueError(
                f"the prompt has {n} tokens; this engine's KV cache ({cfg.num_blocks} blocks of {cfg.block_size}"
                f" tokens, {self._watermark_blocks} kept free for admissions) runs sequences of at most"
                f" {self.kv_max_tokens} tokens, so at most {self.kv_max_tokens - 1} prompt tokens"
            )
        # The sequence's own copy, as uint32 (it grows by the output): one memcpy from a prompt read
        # from token_bytes, one C loop from a list; a protobuf field is first read as a list.
        src = req.token_ids
        try:
            tokens = token_array(src if isinstance(src, list | TokenArray) else src[:])
            bad = first_outside(tokens, self.vocab_size)
        except ValueError:
            bad = next(t for t in src if not (isinstance(t, int) and 0 <= t < self.vocab_size))
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        seq = Seq(req.request_id, tokens, block_hash_seed(req.lora_name, req.cache_salt))
        seq.local_hashes = local_block_hashes(tokens, self.block_size, seq.hash_seed)
        seq.seq_hashes = sequence_hashes(seq.local_hashes)
        room = self.context_length - n
        seq.max_output = min(req.stop.max_tokens, room) if req.stop.max_tokens > 0 else room
        seq.min_tokens = req.stop.min_tokens
        seq.eos = frozenset() if req.stop.ignore_eos else self.eos
        seq.stop_ids = frozenset(req.stop.stop_token_ids)
        seq.seed = request_seed(req.request_id, req.sampling.seed, self.config.mocker_seed)
        seq.prefill_only = req.prefill_only
        seq.logprobs = req.logprobs
        seq.sampling = req.sampling
        return seq

    def add(self, req: EngineRequest) -> Seq:
        """Queue a request. Raises ``ValueError`` for requests that can never run.

        A prompt of :attr:`context_length` tokens or more can never run (the model's
        context, or what the KV cache holds); output is capped at ``context_length - prompt``.
        """
        seq = self._make_seq(req)
        self.waiting.append(seq)
        self.by_id[seq.request_id] = seq
        return seq

    def reserve_import(self, req: EngineRequest) -> tuple[int, ...] | None:
        """Blocks for a prompt whose KV a prefill worker will write here; ``None`` if no room."""
        seq = self._make_seq(req)
        n_blocks = -(-seq.num_prompt // self.block_size)
        if self.pool.available - n_blocks < self._watermark_blocks:
            return None
        blocks = self.pool.allocate(n_blocks)
        if blocks is None:
            return None
        seq.blocks = blocks
        self.reserved[seq.request_id] = seq
        return tuple(blocks)

    def release_import(self, request_id: str) -> None:
        seq = self.reserved.pop(request_id, None)
        if seq is not None:
            self.pool.release(seq.blocks[::-1])

    def add_imported(self, req: EngineRequest, first_token: int) -> tuple[Seq, FinishReason | None]:
        """Start decoding a request whose prompt KV arrived in its reserved blocks.

        The first token came from the prefill worker; it is counted as this
        request's first output. Returns the sequence and its finish reason if
        that first token already ends it.
        """
        seq = self.reserved.pop(req.request_id, None)
        if seq is None:
            raise ValueError(f"no blocks reserved for request {req.request_id!r}")
        if not 0 <= first_token < self.vocab_size:
            self.pool.release(seq.blocks[::-1])
            raise ValueError(f"first token {first_token} is outside the vocabulary")
        seq.num_computed = seq.num_prompt
        seq.cached_tokens = 0
        self._register_full_blocks(seq, seq.num_computed)
        seq.tokens.append(first_token)
        seq.num_output = 1
        reason = self._finish_reason(seq, first_token)
        if reason is not None:
            self.pool.release(seq.blocks[::-1])
            return seq, reason
        self.running.append(seq)
        self.by_id[seq.request_id] = seq
        return seq, None

    def cached_prefix_tokens(self, req: EngineRequest) -> int:
        """Prompt tokens of ``req`` its admission would find in the prefix cache now (no side effects)."""
        n = len(req.token_ids)
        bs = self.block_size
        if n <= bs:
            return 0
        seq_hashes = sequence_hashes(
            local_block_hashes(req.token_ids, bs, block_hash_seed(req.lora_name, req.cache_salt))
        )
        return len(self.pool.match_prefix(seq_hashes, (n - 1) // bs)) * bs

    def release_held(self, request_id: str) -> bool:
        """Free the blocks a finished prefill-only request kept for export; False if none are held."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.pool.release(seq.blocks[::-1])
        seq.blocks = []
        return True

    def abort(self, request_id: str) -> bool:
        """Remove a request and free its blocks. False if unknown (already finished)."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            if request_id in self.reserved:
                self.release_import(request_id)
                return True
            return self.release_held(request_id)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.blocks:
            self.pool.release(seq.blocks[::-1])
            seq.blocks = []
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one pass -----------------------------------------------------------------
    def step(self) -> StepResult:
        """One mocker pass: :meth:`schedule`, then :meth:`complete` with synthetic tokens."""
        batch = self.schedule()
        vocab = self.vocab_size
        ids = self.output_ids
        sampled: list[tuple[int, TokenLogprob | None]] = []
        for seq in batch.samples:
            # The position in the whole sequence, as a model sees it: a request continued elsewhere
            # (migrated: its prompt is the old prompt plus the tokens streamed so far) goes on exactly.
            position = seq.num_prompt + seq.num_output
            token = token_at(seq.seed, position, vocab, ids)
            lp = None
            if seq.logprobs is not None:
                chosen, top = synthetic_logprobs(seq.seed, position, token, vocab, seq.logprobs)
                lp = TokenLogprob(token, chosen, top)
            sampled.append((token, lp))
        return self.complete(batch, sampled)

    def schedule(self) -> Batch:
        """Plan one pass (see the module docstring); the caller computes it, then calls :meth:`complete`."""
        cfg = self.config
        bs = self.block_size
        pool = self.pool
        budget = cfg.max_batched_tokens
        batch = Batch()
        scheduled = batch.scheduled
        prefill_tokens = 0
        decode_seqs = 0

        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            want = len(seq.tokens) - seq.num_computed
            num_new = want if want <= budget else budget
            need = -(-(seq.num_computed + num_new) // bs) - len(seq.blocks)
            if need > 0:
                blocks = pool.allocate(need)
                while blocks is None:
                    victim = running[-1]
                    self._preempt(victim)
                    batch.preempted += 1
                    if victim is seq:
                        break
                    blocks = pool.allocate(need)
                if blocks is None:
                    break  # this sequence preempted itself; every later one is gone too
                seq.blocks.extend(blocks)
            if (seq.num_computed + num_new) // bs > seq.num_registered:
                self._register_full_blocks(seq, seq.num_computed + num_new)
            scheduled.append((seq, num_new))
            budget -= num_new
            if seq.num_computed < seq.prefill_end:
                prefill_tokens += num_new
            else:
                decode_seqs += 1
            i += 1

        if batch.preempted == 0:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                seq = waiting[0]
                hits = pool.match_prefix(seq.seq_hashes, (len(seq.tokens) - 1) // bs) if seq.seq_hashes else []
                num_cached = len(hits) * bs
                remaining = len(seq.tokens) - num_cached
                num_new = remaining if remaining <= budget else budget
                need = -(-(num_cached + num_new) // bs) - len(hits)
                pool.acquire(hits)
                if pool.available - need < self._watermark_blocks or (blocks := pool.allocate(need)) is None:
                    pool.release(hits[::-1])
                    break
                waiting.popleft()
                seq.blocks = hits + blocks
                seq.num_computed = num_cached
                seq.num_registered = len(hits)
                if seq.cached_tokens < 0:
                    seq.cached_tokens = num_cached
                if (num_cached + num_new) // bs > seq.num_registered:
                    self._register_full_blocks(seq, num_cached + num_new)
                running.append(seq)
                scheduled.append((seq, num_new))
                budget -= num_new
                prefill_tokens += num_new
                batch.admitted += 1

        batch.samples = [seq for seq, num_new in scheduled if seq.num_computed + num_new >= len(seq.tokens)]
        batch.prefill_tokens = prefill_tokens
        batch.decode_seqs = decode_seqs
        batch.kv_usage = pool.usage
        batch.pass_ms = pass_ms(prefill_tokens, decode_seqs > 0, batch.kv_usage, cfg.speedup_ratio)
        return batch

    def complete(self, batch: Batch, sampled: Sequence[tuple[int, TokenLogprob | None]]) -> StepResult:
        """End the pass ``batch``: its computed tokens become KV, ``sampled[i]`` is the token of ``batch.samples[i]``.

        Registers the blocks that became full (KV events) and finishes sequences
        that stop. Sampled tokens must be inside the vocabulary.
        """
        if len(sampled) != len(batch.samples):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(batch.samples)} sampling sequences")
        result = StepResult(
            prefill_tokens=batch.prefill_tokens,
            decode_seqs=batch.decode_seqs,
            kv_usage=batch.kv_usage,
            pass_ms=batch.pass_ms,
            preempted=batch.preempted,
            admitted=batch.admitted,
        )
        outputs = result.outputs
        finished: list[Seq] = []
        k = 0
        for seq, num_new in batch.scheduled:
            seq.num_computed += num_new  # its full blocks were registered when it was scheduled
            if seq.num_computed < len(seq.tokens):
                continue  # a prefill chunk that does not finish the prompt
            token, lp = sampled[k]
            k += 1
            seq.tokens.append(token)
            seq.num_output += 1
            reason = self._finish_reason(seq, token)
            outputs.append((seq, token, reason, lp))
            if reason is not None:
                finished.append(seq)
        for seq in finished:
            self._finish(seq)
        return result

    def _finish_reason(self, seq: Seq, token: int) -> FinishReason | None:
        n = seq.num_output
        if seq.prefill_only:
            return FinishReason.STOP
        if n >= seq.min_tokens and (token in seq.eos or token in seq.stop_ids):
            return FinishReason.STOP
        if n >= seq.max_output:
            return FinishReason.LENGTH
        return None

    def _register_full_blocks(self, seq: Seq, num_tokens: int) -> None:
        """Register the blocks of ``seq`` that its first ``num_tokens`` tokens fill (KV events)."""
        bs = self.block_size
        full = min(num_tokens // bs, len(seq.blocks))
        k = seq.num_registered
        if full <= k:
            return
        have = len(seq.seq_hashes)
        if have < full:
            # Blocks made of generated tokens: hash them as they fill.
            new_local = local_block_hashes(seq.tokens[have * bs : full * bs], bs, seq.hash_seed)
            prev = seq.seq_hashes[-1] if have else None
            for h in new_local:
                prev = extend_sequence_hash(prev, h)
                seq.local_hashes.append(h)
                seq.seq_hashes.append(prev)
        self.pool.register(
            seq.seq_hashes[k - 1] if k else None,
            [(seq.blocks[j], seq.seq_hashes[j], seq.local_hashes[j]) for j in range(k, full)],
        )
        seq.num_registered = full

    def _preempt(self, seq: Seq) -> None:
        """Back to the front of the waiting queue; everything is recomputed on readmission."""
        self.running.remove(seq)
        self.pool.release(seq.blocks[::-1])
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.prefill_end = len(seq.tokens)
        self.waiting.appendleft(seq)
        self.total_preemptions += 1

    def _finish(self, seq: Seq) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.by_id.pop(seq.request_id, None)
        if seq.prefill_only and self.hold_prefill_blocks:
            self.held[seq.request_id] = seq
            return
        self.pool.release(seq.blocks[::-1])
        seq.blocks = []

    # -- statistics ---------------------------------------------------------------
    def active_decode_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.running if s.num_computed >= s.prefill_end)

    def pending_prefill_tokens(self) -> int:
        waiting = sum(len(s.tokens) for s in self.waiting)
        return waiting + sum(s.prefill_end - s.num_computed for s in self.running if s.num_computed < s.prefill_end)
