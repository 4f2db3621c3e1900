"""OpenAI request bodies into typed requests, with errors in OpenAI's format.

Every value a client sends is checked here, once; a bad one is a 400 that
names the field. Unknown fields are ignored (clients send many we do not use).

Each number is range-checked against the protobuf field it lands in
(``commutator.v1`` ``SamplingOptions`` / ``StopConditions`` / ``GenerateRequest``:
uint32 token counts and token ids, int32 ``top_k``, uint64 ``seed``, float32
sampling values) and against its meaning (``temperature`` in [0, 2] and the
frequency and presence penalties in [-2, 2] as OpenAI bounds them,
``repetition_penalty`` in (0, 10]). Integers may come as integral floats (``5.0``);
NaN and infinities are refused. Stop conditions are capped because the
detokenizer checks every stop string on every token: at most
:data:`MAX_STOP_STRINGS` strings (8x OpenAI's 4) of 1 to
:data:`MAX_STOP_STRING_CHARS` characters each, and at most
:data:`MAX_STOP_TOKEN_IDS` stop token ids (``stop`` given as ids plus
``stop_token_ids``). Fan-out (prompts, ``n``, prompts x ``n``: each choice is
a worker stream opened at once) is capped by :class:`RequestLimits`, which the
frontend builds from its flags.

Every top-level field read here, with its bounds, is listed once in
:mod:`commutator.frontend.body_fields`, which the numeric checks read their
bounds from and ``/openapi.json`` is made from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from commutator.common.prompt import TokenArray, token_array
from commutator.engines.vocab import positions_at_most
from commutator.frontend.body_fields import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    UINT32_MAX,
    BodyField,
    body_fields,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_LOGPROBS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "RequestLimits",
    "SamplingRequest",
    "fields_of",
    "parse_chat",
    "parse_completion",
]


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        """Sent as the ``Retry-After`` header (429, 529): when trying again may succeed."""
        self.close = close
        """Close the connection after the answer (a body that cannot be read to its end: stalled, undecodable)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def bad(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, message, param=param)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """How many worker streams one HTTP request may open (one per prompt and choice).

    The defaults are the frontend's flag defaults (``--max-prompts-per-request`` and the rest,
    where they are explained). A request over a limit is a 400 naming ``prompt`` or ``n``.
    """

    max_prompts_per_request: int = 256
    max_n: int = 128
    max_choices_per_request: int = 256

    def __post_init__(self) -> None:
        for name in ("max_prompts_per_request", "max_n", "max_choices_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


DEFAULT_LIMITS = RequestLimits()


@dataclass(slots=True)
class SamplingRequest:
    """Generation settings shared by chat and completions."""

    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    """Top alternatives per token (0: only the chosen token's logprob); ``None``: no logprobs."""


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingRequest
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


@dataclass(slots=True)
class CompletionRequest:
    model: str
    prompts: list[str | TokenArray]
    """Each prompt: text, or token ids as uint32 values (``array('I')``)."""
    sampling: SamplingRequest
    echo: bool = False
    """Each choice's text starts with its prompt's text (token-id prompts decoded)."""


# -- value checks ---------------------------------------------------------------------------
def _int(body: dict[str, Any], name: str, lo: int, hi: int, param: str | None = None) -> int | None:
    """``body[name]`` as an int in [lo, hi] (integral floats accepted), ``None`` when absent."""
    v = body.get(name)
    if v is None:
        return None
    param = param or name
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():  # False for NaN and infinities
            v = int(v)
        else:
            raise ApiError.bad(f"'{param}' must be an integer, got {_kind(v)}", param)
    if not lo <= v <= hi:
        raise ApiError.bad(f"'{param}' must be in [{lo}, {hi}], got {_short(v)}", param)
    return v


def _float(
    body: dict[str, Any], name: str, lo: float, hi: float, lo_open: bool = False, param: str | None = None
) -> float | None:
    """``body[name]`` as a finite float in [lo, hi] (or (lo, hi]), ``None`` when absent."""
    v = body.get(name)
    if v is None:
        return None
    param = param or name
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError.bad(f"'{param}' must be a number, got {_kind(v)}", param)
    try:
        f = float(v)
    except OverflowError:  # an int beyond any float
        f = math.inf if v > 0 else -math.inf
    if not math.isfinite(f) or (f <= lo if lo_open else f < lo) or f > hi:
        raise ApiError.bad(f"'{param}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {_short(v)}", param)
    return f


def _int_field(body: dict[str, Any], f: BodyField) -> int | None:
    """``body[f.name]`` within the bounds the table gives it."""
    assert f.number is not None and f.number.integer, f.name
    return _int(body, f.name, lo=int(f.number.lo), hi=int(f.number.hi))


def _float_field(body: dict[str, Any], f: BodyField) -> float | None:
    assert f.number is not None and not f.number.integer, f.name
    n = f.number
    return _float(body, f.name, lo=float(n.lo), hi=float(n.hi), lo_open=n.lo_open)


def fields_of(limits: RequestLimits, *, chat: bool) -> dict[str, BodyField]:
    """The body fields of a chat or completion request under ``limits`` (bounds included)."""
    return dict(body_fields(chat, limits.max_n, limits.max_prompts_per_request))


def _bool(body: dict[str, Any], name: str, default: bool = False, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        param = param or name
        raise ApiError.bad(f"'{param}' must be true or false, got {_kind(v)}", param)
    return v


def _token_ids(value: list[Any], param: str) -> list[int]:
    """A list of token ids, each an integer in [0, 2**32) (the wire's uint32); integral floats (``5.0``)
    count, as they do for every integer field (JSON Schema's ``integer``)."""
    if _all_ints(value) and min(value) >= 0 and max(value) <= UINT32_MAX:  # C loops; a prompt has thousands
        return value  # the request's own list (parsed JSON): nobody else holds it
    out = []
    for t in value:
        if not _is_token(t) or not 0 <= t <= UINT32_MAX:
            raise ApiError.bad(f"'{param}' token ids must be integers in [0, {UINT32_MAX}], got {_short(t)}", param)
        out.append(int(t))
    return out


def _prompt_ids(value: list[Any], param: str) -> TokenArray:
    """A token-id prompt as uint32 values (``array('I')``), each id checked as :func:`_token_ids` does.

    One C loop when every id is an int (0.09 ms for 12,000 ids, where checking the list's types and
    bounds took 0.9 ms); the array is what the wire's ``token_bytes`` and the block hashes read. The
    loop takes JSON's ``true`` and ``false`` as 1 and 0, so the few ids that are 0 or 1 are looked at.
    """
    try:
        ids = token_array(value)
    except ValueError:
        return token_array(_token_ids(value, param))  # integral floats count; a bad id gets its message
    if any(type(value[i]) is bool for i in positions_at_most(ids, 1)):
        _token_ids(value, param)  # raises for the bool
    return ids


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_token(x: Any) -> bool:
    """An integer, or a float with no fraction (not NaN or infinite)."""
    return _is_int(x) or (isinstance(x, float) and x.is_integer())


def _all_ints(xs: list[Any]) -> bool:
    """Every item is an int and none a bool (a non-empty list)."""
    return set(map(type, xs)) == {int}


def _kind(v: Any) -> str:
    return type(v).__name__


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError.bad("'model' is required and must be a string", "model")
    return model


def _stop(body: dict[str, Any], s: SamplingRequest) -> None:
    """``stop`` (strings, or token ids as some clients send) and ``stop_token_ids``."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list):
            raise ApiError.bad(f"'stop' must be a string or a list of strings, got {_kind(stop)}", "stop")
        if all(isinstance(x, str) for x in stop):
            if len(stop) > MAX_STOP_STRINGS:
                raise ApiError.bad(f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
            for x in stop:
                if not x or len(x) > MAX_STOP_STRING_CHARS:
                    raise ApiError.bad(
                        f"'stop' strings must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(x)}", "stop"
                    )
            s.stop = list(stop)
        elif all(_is_token(x) for x in stop):
            s.stop_token_ids = _token_ids(stop, "stop")  # token ids given as stop (some clients do)
        else:
            raise ApiError.bad("'stop' must be a string, a list of strings, or a list of token ids", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise ApiError.bad(f"'stop_token_ids' must be a list of token ids, got {_kind(ids)}", "stop_token_ids")
        s.stop_token_ids += _token_ids(ids, "stop_token_ids")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError.bad(
            f"{len(s.stop_token_ids)} stop token ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
            "stop_token_ids" if ids is not None else "stop",
        )


def _sampling(body: dict[str, Any], limits: RequestLimits, *, chat: bool) -> SamplingRequest:
    f = body_fields(chat, limits.max_n, limits.max_prompts_per_request)
    s = SamplingRequest()
    mt = _int_field(body, f["max_completion_tokens"]) if chat else None
    s.max_tokens = mt if mt is not None else _int_field(body, f["max_tokens"])
    s.min_tokens = _int_field(body, f["min_tokens"]) or 0
    if s.max_tokens is not None and s.min_tokens > s.max_tokens:
        raise ApiError.bad("'min_tokens' must not exceed 'max_tokens'", "min_tokens")
    s.temperature = _float_field(body, f["temperature"])
    s.top_p = _float_field(body, f["top_p"])
    s.top_k = _int_field(body, f["top_k"])  # -1: no top-k
    s.seed = _int_field(body, f["seed"])
    s.frequency_penalty = _float_field(body, f["frequency_penalty"])
    s.presence_penalty = _float_field(body, f["presence_penalty"])
    # Divides the logits of tokens already seen: 1 is none, values past 10 only make the model unusable.
    s.repetition_penalty = _float_field(body, f["repetition_penalty"])
    s.ignore_eos = _bool(body, "ignore_eos")
    s.n = _int_field(body, f["n"]) or 1
    s.stream = _bool(body, "stream")
    _stop(body, s)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError.bad("'stream_options' must be an object", "stream_options")
        s.include_usage = _bool(opts, "include_usage", param="stream_options.include_usage")
    if chat:
        if _bool(body, "logprobs"):
            s.logprobs = _int_field(body, f["top_logprobs"]) or 0
        elif body.get("top_logprobs") is not None:
            raise ApiError.bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        s.logprobs = _int_field(body, f["logprobs"])
    return s


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError.bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError.bad(f"{where} must be an object", where)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ApiError.bad(f"{where}.role must be a string", f"{where}.role")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise ApiError.bad(f"{where}.content is required", f"{where}.content")
            content = ""
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ApiError.bad(
                        f"{where}.content[{j}]: only text parts are supported, got {kind!r}", f"{where}.content"
                    )
        elif not isinstance(content, str):
            raise ApiError.bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        out.append({**m, "content": content})
    return out


def _check_choices(n_prompts: int, n: int, limits: RequestLimits) -> None:
    if n_prompts * n > limits.max_choices_per_request:
        raise ApiError.bad(
            f"{n_prompts} prompt(s) with 'n' {n} make {n_prompts * n} choices; "
            f"at most {limits.max_choices_per_request} are allowed per request",
            "n",
        )


def parse_chat(body: Any, limits: RequestLimits = DEFAULT_LIMITS) -> ChatRequest:
    """A chat request; raises :class:`ApiError` (400, ``param`` naming the field) for any bad value."""
    if not isinstance(body, dict):
        raise ApiError.bad("the request body must be a JSON object")
    model = _model(body)
    messages = _messages(body)
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError.bad("'tools' must be a list of objects", "tools")
    sampling = _sampling(body, limits, chat=True)
    _check_choices(1, sampling.n, limits)
    return ChatRequest(
        model,
        messages,
        sampling,
        tools or None,
        add_generation_prompt=_bool(body, "add_generation_prompt", default=True),
    )


def _prompts(prompt: Any, limits: RequestLimits) -> list[str | TokenArray]:
    """``prompt``: a string, strings, token ids, or lists of token ids; none of them empty."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt:
        if not _is_token(prompt[0]) and len(prompt) > limits.max_prompts_per_request:
            raise ApiError.bad(
                f"'prompt' has {len(prompt)} prompts; at most {limits.max_prompts_per_request} are allowed per request",
                "prompt",
            )
        if all(isinstance(p, str) for p in prompt):
            if not all(prompt):
                raise ApiError.bad("'prompt' must not be empty", "prompt")
            return list(prompt)
        if _is_token(prompt[0]):
            return [_prompt_ids(prompt, "prompt")]
        if all(isinstance(p, list) and p for p in prompt):
            return [_prompt_ids(p, "prompt") for p in prompt]
    raise ApiError.bad(
        "'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id lists (non-empty)",
        "prompt",
    )


def parse_completion(body: Any, limits: RequestLimits = DEFAULT_LIMITS) -> CompletionRequest:
    """A completion request; raises :class:`ApiError` (400, ``param`` naming the field) for any bad value."""
    if not isinstance(body, dict):
        raise ApiError.bad("the request body must be a JSON object")
    model = _model(body)
    prompts = _prompts(body.get("prompt"), limits)
    sampling = _sampling(body, limits, chat=False)
    _check_choices(len(prompts), sampling.n, limits)
    echo = _bool(body, "echo")
    if echo and sampling.logprobs is not None:
        # OpenAI and vLLM then also return the prompt's logprobs, which workers do not compute.
        raise ApiError.bad("'echo' cannot be combined with 'logprobs' (prompt logprobs are not available)", "echo")
    return CompletionRequest(model, prompts, sampling, echo=echo)
