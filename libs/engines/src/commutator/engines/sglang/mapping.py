"""Our requests as SGLang ``async_generate`` arguments, and its streamed dicts as our outputs (pure).

Checked against ``sgl-project/sglang``: ``python/sglang/srt/entrypoints/engine.py``
(``Engine.async_generate``, commit 001067f), ``python/sglang/srt/sampling/sampling_params.py``
(commit 0bebedd) and ``python/sglang/srt/managers/tokenizer_manager.py`` /
``schedule_batch.py`` (the ``FINISH_*.to_json`` shapes):

- ``sampling_params`` is a dict: ``max_new_tokens``, ``min_new_tokens``,
  ``stop_token_ids``, ``ignore_eos``, ``temperature``, ``top_p``, ``top_k`` (-1: all),
  ``frequency_penalty``, ``presence_penalty``, ``repetition_penalty``; newer versions
  add ``sampling_seed`` (the adapter refuses a seed when the installed version has none);
- logprobs: ``return_logprob=True``, ``top_logprobs_num=k``, ``logprob_start_len=-1``
  (output tokens only); the answers are ``meta_info["output_token_logprobs"]``
  ``[(logprob, token_id, text), ...]`` and ``meta_info["output_top_logprobs"]``;
- each streamed dict has ``output_ids`` and ``meta_info`` with ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens`` and ``finish_reason`` (None, or
  ``{"type": "stop"|"length"|"abort", ...}``). ``output_ids`` (and the logprob lists)
  hold every token so far by default and only the new ones with
  ``--incremental-streaming-output`` (``--stream-output`` in older versions);
  :class:`OutputTracker` tells the two apart by ``completion_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from commutator.engines.base import EngineOutput, EngineRequest, FinishReason, TokenLogprob

__all__ = ["OutputTracker", "max_new_tokens", "sampling_params"]


def max_new_tokens(request: EngineRequest, context_length: int) -> int:
    """The output budget: ``max_tokens``, or up to the context limit; ValueError when there is no room."""
    room = context_length - len(request.token_ids)
    if room <= 0:
        raise ValueError(
            f"the prompt has {len(request.token_ids)} tokens; this engine's context is {context_length} tokens"
        )
    budget = request.stop.max_tokens or room
    if request.prefill_only:
        budget = 1
    return min(budget, room)


def sampling_params(request: EngineRequest, context_length: int, accepted: frozenset[str]) -> dict[str, Any]:
    """SGLang's ``sampling_params`` dict; ValueError for what the installed version cannot take."""
    s, st = request.sampling, request.stop
    out: dict[str, Any] = {"max_new_tokens": max_new_tokens(request, context_length)}
    if st.min_tokens:
        out["min_new_tokens"] = st.min_tokens
    if st.stop_token_ids:
        out["stop_token_ids"] = list(st.stop_token_ids)
    if st.ignore_eos:
        out["ignore_eos"] = True
    if s.temperature is not None:
        out["temperature"] = s.temperature
    if s.top_p is not None:
        out["top_p"] = s.top_p
    if s.top_k is not None and s.top_k > 0:
        out["top_k"] = s.top_k
    if s.frequency_penalty is not None:
        out["frequency_penalty"] = s.frequency_penalty
    if s.presence_penalty is not None:
        out["presence_penalty"] = s.presence_penalty
    if s.repetition_penalty is not None:
        out["repetition_penalty"] = s.repetition_penalty
    if s.seed is not None:
        if "sampling_seed" not in accepted:
            raise ValueError("seed is not supported by the installed SGLang version (no sampling_seed)")
        out["sampling_seed"] = s.seed
    unknown = sorted(k for k in out if k not in accepted)
    if unknown:
        raise ValueError(f"the installed SGLang version does not accept {', '.join(unknown)}")
    return out


_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class OutputTracker:
    """Turns one request's streamed dicts into deltas. One per request."""

    def __init__(self, prompt_tokens: int, logprobs: int | None, incremental: bool = False) -> None:
        self._prompt = prompt_tokens
        self._top = logprobs or 0
        self._want_logprobs = logprobs is not None
        self._incremental = incremental
        self._sent = 0
        self._sent_lp = 0
        self._first = True
        self.aborted = False
        """Set by the adapter when it aborted the request (an abort finish is then ABORT, not ERROR)."""
        self.finish: FinishReason | None = None

    def step(self, chunk: Mapping[str, Any]) -> EngineOutput:
        meta = chunk.get("meta_info") or {}
        ids = chunk.get("output_ids")
        if ids is None:
            raise RuntimeError(
                "SGLang streamed no output_ids; this adapter needs a version whose stream carries token ids"
            )
        completion = meta.get("completion_tokens")
        new = self._delta(list(ids), completion, self._sent)
        self._sent += len(new)
        out = EngineOutput([int(t) for t in new])
        if self._want_logprobs:
            out.logprobs = self._logprobs(meta, completion, len(new))
        if self._first:
            self._first = False
            out.prompt_tokens = int(meta.get("prompt_tokens") or self._prompt)
            out.cached_prompt_tokens = int(meta.get("cached_tokens") or 0)
        reason = meta.get("finish_reason")
        if reason is not None:
            out.finish_reason, out.error = self._finish(reason)
            self.finish = out.finish_reason
        return out

    def _delta(self, items: list[Any], completion: Any, sent: int) -> list[Any]:
        if completion is None:
            return items if self._incremental else items[sent:]
        if len(items) == int(completion):  # every item so far (or the first incremental chunk)
            return items[sent:]
        return items

    def _logprobs(self, meta: Mapping[str, Any], completion: Any, n_new: int) -> list[TokenLogprob]:
        toks = list(meta.get("output_token_logprobs") or ())
        tops = list(meta.get("output_top_logprobs") or ())
        start = self._sent_lp
        toks = self._delta(toks, completion, start)
        tops = self._delta(tops, completion, start) if tops else []
        self._sent_lp += len(toks)
        out: list[TokenLogprob] = []
        for i, entry in enumerate(toks[:n_new]):
            value, token_id = float(entry[0]), int(entry[1])
            top: tuple[tuple[int, float], ...] = ()
            if self._top and i < len(tops) and tops[i]:
                top = tuple((int(t[1]), float(t[0])) for t in _as_list(tops[i])[: self._top])
            out.append(TokenLogprob(token_id, value, top))
        return out

    def _finish(self, reason: Any) -> tuple[FinishReason, str | None]:
        kind = reason.get("type") if isinstance(reason, Mapping) else str(reason)
        if kind in _FINISH:
            return _FINISH[kind], None
        if self.aborted:
            return FinishReason.ABORT, None
        message = reason.get("message") if isinstance(reason, Mapping) else None
        return FinishReason.ERROR, str(message or f"SGLang finished the request: {kind}")


def _as_list(x: Any) -> Sequence[Any]:
    return x if isinstance(x, list | tuple) else list(x)
