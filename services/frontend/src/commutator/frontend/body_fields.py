"""The request body fields the frontend reads: one table for the parser and for ``/openapi.json``.

Each :class:`BodyField` names a top-level field of a chat or completion body, its
JSON Schema (draft 2020-12, as OpenAPI 3.1 uses) and what it does. Numeric fields
carry their bounds as a :class:`Number`, from which both the parser's range check
(:mod:`commutator.frontend.protocol`) and the schema's ``minimum`` / ``maximum`` come,
so the two cannot drift apart. Structured fields (``messages``, ``prompt``,
``stop``, ``stream_options``, ``tools``) are parsed by hand-written code in
``protocol.py`` and described here beside each other; a unit test
(``tests/unit/test_frontend_openapi.py``) holds the parser to this table: the
fields it reads are exactly the ones listed, and every bound listed is the one
it enforces.

Every optional field may also be ``null`` (the parser reads null as absent).
Fields outside the table are ignored (clients send many we do not use), so the
schemas allow additional properties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = [
    "INT32_MAX",
    "MAX_LOGPROBS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "SEED_MAX",
    "SEED_MIN",
    "UINT32_MAX",
    "BodyField",
    "Number",
    "body_fields",
]

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024

# Ranges of the protobuf field types the values are written into.
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
SEED_MIN = -(2**63)  # negative seeds are taken modulo 2**64 (the wire field is uint64)
SEED_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Number:
    """A number in [lo, hi] (``lo_open``: (lo, hi]); ``integer``: integral (``5.0`` counts, NaN and
    infinities never do)."""

    integer: bool
    lo: int | float
    hi: int | float
    lo_open: bool = False

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        out["maximum"] = self.hi
        return out


@dataclass(frozen=True, slots=True)
class BodyField:
    """A top-level body field: its JSON Schema (``number`` fields: from the bounds) and its description."""

    name: str
    description: str
    schema: Mapping[str, Any] | None = None
    number: Number | None = None
    required: bool = False

    def json_schema(self) -> dict[str, Any]:
        """The field's schema as it goes into the document; an optional field also takes ``null``."""
        base = dict(self.number.schema() if self.number is not None else (self.schema or {}))
        base["description"] = self.description
        if self.required:
            return base
        return {"anyOf": [{k: v for k, v in base.items() if k != "description"}, {"type": "null"}], **_doc(base)}


def _doc(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": schema["description"]} if "description" in schema else {}


def _int(lo: int, hi: int) -> Number:
    return Number(True, lo, hi)


def _float(lo: float, hi: float, lo_open: bool = False) -> Number:
    return Number(False, lo, hi, lo_open)


_BOOL = {"type": "boolean"}
TOKEN_ID: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": UINT32_MAX}
"""A token id: the wire's uint32. The parser takes only JSON integers written without a fraction here."""
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}
TEXT_PART: dict[str, Any] = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
MESSAGE: dict[str, Any] = {
    "type": "object",
    "description": "A chat message. Fields beyond role and content (name, tool_calls, ...) go to the chat"
    " template as they are. content may be null (or absent) on assistant messages only",
    "properties": {
        "role": {"type": "string", "minLength": 1},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": TEXT_PART, "description": "text parts only"},
                {"type": "null"},
            ]
        },
    },
    "required": ["role"],
}
STREAM_OPTIONS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "include_usage": {
            "anyOf": [_BOOL, {"type": "null"}],
            "description": "A last chunk carries the usage (streaming only)",
        }
    },
}


def _sampling(max_n: int) -> list[BodyField]:
    """The fields chat and completions share."""
    return [
        BodyField(
            "max_tokens", "Most tokens to generate (default: what the context leaves)", number=_int(1, UINT32_MAX)
        ),
        BodyField("min_tokens", "Fewest tokens before EOS or a stop may end the text", number=_int(0, UINT32_MAX)),
        BodyField("temperature", "Sampling temperature (0: greedy)", number=_float(0.0, 2.0)),
        BodyField(
            "top_p", "Nucleus sampling: the smallest set of tokens with this mass", number=_float(0.0, 1.0, True)
        ),
        BodyField("top_k", "Sample among the k likeliest tokens (-1: all)", number=_int(-1, INT32_MAX)),
        BodyField(
            "seed", "Random seed (choice i of n uses seed + i; taken modulo 2**64)", number=_int(SEED_MIN, SEED_MAX)
        ),
        BodyField("frequency_penalty", "Penalty per earlier occurrence of a token", number=_float(-2.0, 2.0)),
        BodyField("presence_penalty", "Penalty on tokens that occurred at all", number=_float(-2.0, 2.0)),
        BodyField(
            "repetition_penalty", "Divides the logits of tokens already seen (1: none)", number=_float(0.0, 10.0, True)
        ),
        BodyField("ignore_eos", "Go on past the end-of-sequence token", schema=_BOOL),
        BodyField("n", "Choices per prompt", number=_int(1, max_n)),
        BodyField("stream", "Server-sent events, one chunk per piece of text, then [DONE]", schema=_BOOL),
        BodyField("stream_options", "Options of a streamed response", schema=STREAM_OPTIONS),
        BodyField(
            "stop",
            f"Strings that end the text (not returned): at most {MAX_STOP_STRINGS} of 1 to {MAX_STOP_STRING_CHARS}"
            f" characters; or token ids (with stop_token_ids at most {MAX_STOP_TOKEN_IDS})",
            schema={
                "anyOf": [
                    _STOP_STRING,
                    {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOP_STRINGS},
                    {"type": "array", "items": TOKEN_ID, "maxItems": MAX_STOP_TOKEN_IDS},
                ]
            },
        ),
        BodyField(
            "stop_token_ids",
            f"Token ids that end the text (with ids given as stop: at most {MAX_STOP_TOKEN_IDS})",
            schema={"type": "array", "items": TOKEN_ID, "maxItems": MAX_STOP_TOKEN_IDS},
        ),
    ]


_MODEL = BodyField(
    "model", "A model the frontend serves (GET /v1/models)", {"type": "string", "minLength": 1}, required=True
)


@cache
def body_fields(chat: bool, max_n: int, max_prompts: int) -> Mapping[str, BodyField]:
    """The fields of a chat (``chat``) or completion body, by name, for the frontend's limits
    (``max_n``: ``--max-n``; ``max_prompts``: ``--max-prompts-per-request``)."""
    if chat:
        own = [
            _MODEL,
            BodyField(
                "messages", "The conversation", {"type": "array", "items": MESSAGE, "minItems": 1}, required=True
            ),
            BodyField(
                "max_completion_tokens", "Most tokens to generate (wins over max_tokens)", number=_int(1, UINT32_MAX)
            ),
            BodyField("logprobs", "Return the chosen tokens' log probabilities", schema=_BOOL),
            BodyField(
                "top_logprobs",
                "Alternatives per token with their logprobs (needs logprobs)",
                number=_int(0, MAX_LOGPROBS),
            ),
            BodyField(
                "tools",
                "Tool definitions, rendered by the chat template",
                {"type": "array", "items": {"type": "object"}},
            ),
            BodyField("add_generation_prompt", "End the prompt with the assistant's turn (default true)", schema=_BOOL),
        ]
    else:
        prompt_text = {"type": "string", "minLength": 1}
        token_ids = {"type": "array", "items": TOKEN_ID, "minItems": 1}
        own = [
            _MODEL,
            BodyField(
                "prompt",
                f"A prompt, or up to {max_prompts} of them: text, or token ids",
                {
                    "anyOf": [
                        prompt_text,
                        {"type": "array", "items": prompt_text, "minItems": 1, "maxItems": max_prompts},
                        token_ids,
                        {"type": "array", "items": token_ids, "minItems": 1, "maxItems": max_prompts},
                    ]
                },
                required=True,
            ),
            BodyField("logprobs", "Alternatives per token with their log probabilities", number=_int(0, MAX_LOGPROBS)),
            BodyField("echo", "Each choice's text starts with its prompt (not with logprobs)", schema=_BOOL),
        ]
    return {f.name: f for f in (*own, *_sampling(max_n))}
