"""Our requests as TensorRT-LLM ``SamplingParams``, and its ``RequestOutput`` as our outputs (pure).

Checked against NVIDIA/TensorRT-LLM ``tensorrt_llm/sampling_params.py`` (a98a906) and
``tensorrt_llm/executor/result.py`` (a678b91):

- ``SamplingParams`` (keyword-only dataclass): ``max_tokens`` (default 32, so always
  set here), ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``temperature``,
  ``top_p`` (0 refused by the runtime), ``top_k`` (0 or None: all), ``seed``,
  ``frequency_penalty``, ``presence_penalty``, ``repetition_penalty`` (> 0),
  ``logprobs`` (top-k per output token), ``detokenize`` (False: Commutator detokenizes);
- ``LLM.generate_async(inputs, sampling_params, streaming=True, ...)`` returns a
  ``RequestOutput`` to iterate with ``async for``; each step updates
  ``outputs[0]`` (``CompletionOutput``): ``token_ids_diff`` (new token ids),
  ``logprobs_diff`` (per new token a ``{token_id: Logprob(logprob, rank)}`` dict, or
  a float), ``finish_reason`` (``stop``, ``length``, ``timeout``, ``cancelled``, and
  ``not_finished`` for a context-only request), ``disaggregated_params``;
  ``RequestOutput.cached_tokens`` is the prompt tokens reused from the cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from commutator.engines.base import EngineOutput, EngineRequest, FinishReason, TokenLogprob

__all__ = ["output_step", "sampling_kwargs"]


def sampling_kwargs(request: EngineRequest, context_length: int, accepted: frozenset[str]) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments; ValueError for what TensorRT-LLM cannot take."""
    room = context_length - len(request.token_ids)
    if room <= 0:
        raise ValueError(
            f"the prompt has {len(request.token_ids)} tokens; this engine's context is {context_length} tokens"
        )
    s, st = request.sampling, request.stop
    out: dict[str, Any] = {"max_tokens": 1 if request.prefill_only else min(st.max_tokens or room, room)}
    out["detokenize"] = False
    if st.min_tokens:
        out["min_tokens"] = st.min_tokens
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
    if s.seed is not None:
        out["seed"] = s.seed
    if s.frequency_penalty is not None:
        out["frequency_penalty"] = s.frequency_penalty
    if s.presence_penalty is not None:
        out["presence_penalty"] = s.presence_penalty
    if s.repetition_penalty is not None:
        if s.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 for TensorRT-LLM")
        out["repetition_penalty"] = s.repetition_penalty
    if request.logprobs is not None:
        out["logprobs"] = max(request.logprobs, 1)
    unknown = sorted(k for k in out if k not in accepted)
    if unknown:
        raise ValueError(f"the installed TensorRT-LLM version does not accept {', '.join(unknown)}")
    return out


_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "not_finished": FinishReason.LENGTH,  # a context-only (prefill) request: it stopped after the first token
    "cancelled": FinishReason.ABORT,
}


def _logprob(value: Any) -> float:
    return float(getattr(value, "logprob", value))


def _token_logprobs(token_ids: Sequence[int], diffs: Sequence[Any], top: int) -> list[TokenLogprob]:
    out = []
    for tid, entry in zip(token_ids, diffs, strict=False):
        if isinstance(entry, Mapping):
            value = _logprob(entry[tid]) if tid in entry else float("nan")
            ranked = sorted(entry.items(), key=lambda kv: (getattr(kv[1], "rank", None) or 0, -_logprob(kv[1])))
            alts = tuple((int(k), _logprob(v)) for k, v in ranked[:top]) if top else ()
            out.append(TokenLogprob(int(tid), value, alts))
        else:
            out.append(TokenLogprob(int(tid), float(entry)))
    return out


def output_step(result: Any, first: bool, prompt_tokens: int, logprobs: int | None, aborted: bool) -> EngineOutput:
    """Our output for one step of a streaming ``RequestOutput``."""
    comp = result.outputs[0]
    new = [int(t) for t in comp.token_ids_diff]
    out = EngineOutput(new)
    if logprobs is not None:
        out.logprobs = _token_logprobs(new, list(comp.logprobs_diff or ()), logprobs)
    if first:
        out.prompt_tokens = prompt_tokens
        out.cached_prompt_tokens = int(getattr(result, "cached_tokens", 0) or 0)
    reason = comp.finish_reason
    if reason is not None:
        if reason in _FINISH:
            out.finish_reason = _FINISH[reason]
        elif aborted:
            out.finish_reason = FinishReason.ABORT
        else:
            out.finish_reason = FinishReason.ERROR
            out.error = f"TensorRT-LLM finished the request: {reason}"
    elif getattr(result, "finished", False):
        out.finish_reason = FinishReason.ABORT if aborted else FinishReason.STOP
    return out
