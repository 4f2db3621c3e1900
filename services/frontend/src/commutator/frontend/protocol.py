"""OpenAI request bodies into typed requests, with errors in OpenAI's format.

Every value a client sends is checked here, once; a bad one is a 400 that
names the field. Unknown fields are ignored (clients send many we do not use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "SamplingRequest",
    "parse_chat",
    "parse_completion",
]

MAX_N = 128
MAX_LOGPROBS = 20


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def bad(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, message, param=param)


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
    prompts: list[str | list[int]]
    sampling: SamplingRequest
    echo: bool = False


# -- value checks ---------------------------------------------------------------------------
def _int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ApiError.bad(f"'{name}' must be an integer, got {type(v).__name__}", name)
    if lo is not None and v < lo:
        raise ApiError.bad(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise ApiError.bad(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def _float(
    body: dict[str, Any], name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError.bad(f"'{name}' must be a number, got {type(v).__name__}", name)
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError.bad(f"'{name}' must be {'>' if lo_open else '>='} {lo:g}, got {v:g}", name)
    if hi is not None and v > hi:
        raise ApiError.bad(f"'{name}' must be <= {hi:g}, got {v:g}", name)
    return v


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError.bad(f"'{name}' must be true or false, got {type(v).__name__}", name)
    return v


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError.bad("'model' is required and must be a string", "model")
    return model


def _sampling(body: dict[str, Any], *, chat: bool) -> SamplingRequest:
    s = SamplingRequest()
    mt = _int(body, "max_completion_tokens", lo=1) if chat else None
    s.max_tokens = mt if mt is not None else _int(body, "max_tokens", lo=1)
    s.min_tokens = _int(body, "min_tokens", lo=0) or 0
    if s.max_tokens is not None and s.min_tokens > s.max_tokens:
        raise ApiError.bad("'min_tokens' must not exceed 'max_tokens'", "min_tokens")
    s.temperature = _float(body, "temperature", lo=0.0, hi=2.0)
    s.top_p = _float(body, "top_p", lo=0.0, hi=1.0, lo_open=True)
    s.top_k = _int(body, "top_k", lo=-1)
    s.seed = _int(body, "seed", lo=-(2**63), hi=2**64 - 1)
    s.frequency_penalty = _float(body, "frequency_penalty", lo=-2.0, hi=2.0)
    s.presence_penalty = _float(body, "presence_penalty", lo=-2.0, hi=2.0)
    s.repetition_penalty = _float(body, "repetition_penalty", lo=0.0, lo_open=True)
    s.ignore_eos = _bool(body, "ignore_eos")
    s.n = _int(body, "n", lo=1, hi=MAX_N) or 1
    s.stream = _bool(body, "stream")
    stop = body.get("stop")
    if stop is None:
        s.stop = []
    elif isinstance(stop, str):
        s.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        s.stop = list(stop)
    elif isinstance(stop, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in stop):
        s.stop_token_ids = list(stop)  # token ids given as stop (some clients do)
    else:
        raise ApiError.bad("'stop' must be a string or a list of strings", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids):
            raise ApiError.bad("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
        s.stop_token_ids += ids
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError.bad("'stream_options' must be an object", "stream_options")
        s.include_usage = _bool(opts, "include_usage")
    if chat:
        if _bool(body, "logprobs"):
            s.logprobs = _int(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS) or 0
        elif body.get("top_logprobs") is not None:
            raise ApiError.bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        s.logprobs = _int(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
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


def parse_chat(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError.bad("the request body must be a JSON object")
    model = _model(body)
    messages = _messages(body)
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError.bad("'tools' must be a list of objects", "tools")
    return ChatRequest(
        model,
        messages,
        _sampling(body, chat=True),
        tools or None,
        add_generation_prompt=_bool(body, "add_generation_prompt", default=True),
    )


def parse_completion(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError.bad("the request body must be a JSON object")
    model = _model(body)
    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt
        )
    ):
        prompts = [list(p) for p in prompt]
    else:
        raise ApiError.bad(
            "'prompt' must be a string, a list of strings, a list of token ids, "
            "or a list of token-id lists (non-empty)",
            "prompt",
        )
    if any(isinstance(p, str) and not p for p in prompts):
        raise ApiError.bad("'prompt' must not be empty", "prompt")
    return CompletionRequest(model, prompts, _sampling(body, chat=False), echo=_bool(body, "echo"))
