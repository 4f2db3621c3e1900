"""Choosing each sequence's next token from the model's logits.

- Temperature 0 or unset: greedy (``argmax``; the lowest token id wins a tie, as in
  transformers' ``generate``), so the same prompt always gives the same tokens.
- Otherwise: penalties, then ``logits / temperature``, top-k, top-p, and one draw
  from a generator seeded by ``(seed, position)``, the position in the whole
  sequence: a request with a seed gives the same tokens whatever it is batched
  with, after a preemption, and when it is continued elsewhere with its output so
  far appended to its prompt (migration; penalties aside, which count the output).
- Penalties (vLLM's and OpenAI's semantics): ``repetition_penalty`` divides the
  positive logits and multiplies the negative ones of every token in the prompt
  or the output; ``frequency_penalty * count + presence_penalty * (count > 0)`` is
  subtracted for each token of the output so far. They apply to greedy too.
- ``min_tokens``: EOS and stop token ids are masked until the output is long enough.
- Logprobs are those of the model's own distribution (``log_softmax`` of the raw
  logits, before penalties and temperature, like vLLM's default): the chosen
  token's, and the ``N`` most likely tokens.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xxhash
from commutator.engines.base import SamplingParams, TokenLogprob

__all__ = ["MAX_LOGPROBS", "SampleSpec", "check_sampling", "draw_seed", "sample"]

MAX_LOGPROBS = 20
_pack = struct.Struct("<QQ").pack
_U63 = (1 << 63) - 1


def check_sampling(params: SamplingParams, logprobs: int | None) -> None:
    """``ValueError`` for values this engine cannot sample with (the worker answers 400)."""
    if params.temperature is not None and params.temperature < 0:
        raise ValueError("temperature must be >= 0")
    if params.top_p is not None and not 0 < params.top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        raise ValueError("repetition_penalty must be > 0")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        if value is not None and not -2 <= value <= 2:
            raise ValueError(f"{name} must be in [-2, 2]")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of the token at ``position`` (in the sequence) of a request seeded with ``seed``."""
    return xxhash.xxh3_64_intdigest(_pack(seed & ((1 << 64) - 1), position), 5) & _U63


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """How one sequence picks its next token (built from its request and its state)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    position: int = 0
    """Index of the token being chosen in the whole sequence (a prompt of n tokens: n for the first output)."""
    logprobs: int | None = None
    banned: tuple[int, ...] = ()
    """Token ids that must not be chosen now (EOS and stop ids before ``min_tokens``)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    output_tokens: Sequence[int] = ()
    """The output so far (frequency and presence penalties)."""
    context_tokens: Sequence[int] = ()
    """Prompt and output so far (repetition penalty)."""

    @property
    def processes_logits(self) -> bool:
        return bool(self.banned or self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def _penalise(row: torch.Tensor, spec: SampleSpec) -> None:
    if spec.repetition_penalty != 1.0 and spec.context_tokens:
        ids = torch.tensor(sorted(set(spec.context_tokens)), dtype=torch.long, device=row.device)
        vals = row[ids]
        row[ids] = torch.where(vals > 0, vals / spec.repetition_penalty, vals * spec.repetition_penalty)
    if (spec.frequency_penalty or spec.presence_penalty) and spec.output_tokens:
        counts = Counter(spec.output_tokens)
        ids = torch.tensor(list(counts), dtype=torch.long, device=row.device)
        n = torch.tensor(list(counts.values()), dtype=row.dtype, device=row.device)
        row[ids] -= spec.frequency_penalty * n + spec.presence_penalty
    if spec.banned:
        row[torch.tensor(spec.banned, dtype=torch.long, device=row.device)] = float("-inf")


def _draw(row: torch.Tensor, spec: SampleSpec) -> int:
    logits = row / spec.temperature
    if 0 < spec.top_k < logits.numel():
        kth = torch.topk(logits, spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the more likely ones already reach top_p (the most likely one always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= spec.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    gen = torch.Generator(device=row.device)
    gen.manual_seed(draw_seed(spec.seed, spec.position))
    return int(torch.multinomial(probs, 1, generator=gen).item())


def sample(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> list[tuple[int, TokenLogprob | None]]:
    """One token (and its logprobs when asked) per row of ``logits`` (``[rows, vocab]``, float32)."""
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(s.logprobs is not None for s in specs) else None
    work = logits.clone() if any(s.processes_logits for s in specs) else logits
    tokens = [0] * len(specs)
    greedy: list[int] = []
    for i, spec in enumerate(specs):
        if spec.processes_logits:
            _penalise(work[i], spec)
        if spec.temperature > 0:
            tokens[i] = _draw(work[i], spec)
        else:
            greedy.append(i)
    if greedy:
        for i, tok in zip(greedy, work[greedy].argmax(dim=-1).tolist(), strict=True):
            tokens[i] = int(tok)
    out: list[tuple[int, TokenLogprob | None]] = []
    for i, spec in enumerate(specs):
        lp = None
        if spec.logprobs is not None and raw_logprobs is not None:
            row = raw_logprobs[i]
            top = torch.topk(row, spec.logprobs) if spec.logprobs else None
            alts = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
            lp = TokenLogprob(tokens[i], float(row[tokens[i]]), alts)
        out.append((tokens[i], lp))
    return out
