"""Typed requests onto the wire: one ``commutator.v1.GenerateRequest`` per choice.

Pure (no I/O): the values were range-checked by :mod:`commutator.frontend.protocol`
against the protobuf field types, so building the messages cannot fail on them;
what depends on the model (the context length) is checked here, as a 400.
"""

from __future__ import annotations

from commutator.common.prompt import TokenArray, to_le_bytes
from commutator.frontend.protocol import ApiError, SamplingRequest
from commutator.v1 import common_pb2

__all__ = ["generate_requests"]


def generate_requests(
    rid: str,
    model: str,
    prompts: list[TokenArray],
    s: SamplingRequest,
    context_length: int,
    *,
    prompt_param: str,
) -> list[common_pb2.GenerateRequest]:
    """The worker requests of one HTTP request: ``len(prompts) * s.n`` of them, prompt-major.

    ``context_length`` 0 means unknown (``max_tokens`` then goes to the worker as is).
    Raises :class:`ApiError` (400) when a prompt leaves no room in the context, or
    none for ``min_tokens``; ``prompt_param`` names the field the prompt came from.
    """
    out = []
    ctx = context_length
    for p_index, tokens in enumerate(prompts):
        if ctx and len(tokens) >= ctx:
            raise ApiError.bad(
                f"the prompt has {len(tokens)} tokens; this model's context is {ctx} tokens", prompt_param
            )
        max_tokens = s.max_tokens if s.max_tokens is not None else (ctx - len(tokens) if ctx else 0)
        if ctx and max_tokens > ctx - len(tokens):
            max_tokens = ctx - len(tokens)
        if max_tokens and s.min_tokens > max_tokens:
            raise ApiError.bad(
                f"'min_tokens' is {s.min_tokens} but at most {max_tokens} tokens can follow this prompt", "min_tokens"
            )
        packed = to_le_bytes(tokens)  # one copy of the array's buffer (token_ids: an int per token)
        for i in range(s.n):
            g = common_pb2.GenerateRequest(request_id=f"{rid}-{p_index * s.n + i}", model=model, token_bytes=packed)
            st = g.stop
            st.max_tokens = max_tokens
            st.min_tokens = s.min_tokens
            st.ignore_eos = s.ignore_eos
            if s.stop_token_ids:
                st.stop_token_ids.extend(s.stop_token_ids)
            sp = g.sampling
            if s.temperature is not None:
                sp.temperature = s.temperature
            if s.top_p is not None:
                sp.top_p = s.top_p
            if s.top_k is not None:
                sp.top_k = s.top_k
            if s.seed is not None:
                sp.seed = (s.seed + i) % 2**64
            if s.frequency_penalty is not None:
                sp.frequency_penalty = s.frequency_penalty
            if s.presence_penalty is not None:
                sp.presence_penalty = s.presence_penalty
            if s.repetition_penalty is not None:
                sp.repetition_penalty = s.repetition_penalty
            if s.logprobs is not None:
                g.logprobs = s.logprobs
            out.append(g)
    return out
