"""``/openapi.json`` kept in step with the request parser.

The document's request schemas come from the parser's field table; these tests hold the parser
(``parse_chat`` / ``parse_completion``) to the document a client reads:
- the top-level fields the parser reads are exactly the properties the schema lists (and the same
  for ``stream_options`` and a message), found by parsing bodies that record every key looked up;
- every numeric bound the schema states is the one the parser enforces, at both edges;
- for every field and a spread of probe values, the schema accepts the value exactly when the
  parser does (a JSON Schema validator against the parser's answer).
"""

from __future__ import annotations

import math
from typing import Any

import jsonschema_rs
import pytest
from commutator.frontend.openapi import OPENAPI_VERSION, openapi_document, request_schema
from commutator.frontend.protocol import ApiError, RequestLimits, parse_chat, parse_completion

pytestmark = pytest.mark.unit

LIMITS = RequestLimits(max_prompts_per_request=8, max_n=16, max_choices_per_request=64)
MSG = {"role": "user", "content": "hi"}
BASE = {True: {"model": "m", "messages": [MSG]}, False: {"model": "m", "prompt": "hi"}}
# Fields that only mean something with another one (the rest of the body is BASE).
NEEDS = {(True, "top_logprobs"): {"logprobs": True}}


class Recording(dict):  # type: ignore[type-arg]
    """A dict that notes every key looked up in it."""

    def __init__(self, data: dict[str, Any], seen: set[str]) -> None:
        super().__init__(data)
        self.seen = seen

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)


def parse(chat: bool, body: Any) -> Any:
    return (parse_chat if chat else parse_completion)(body, LIMITS)


def props(schema: dict[str, Any]) -> set[str]:
    return set(schema["properties"])


def numeric(field_schema: dict[str, Any]) -> dict[str, Any] | None:
    """The integer or number branch of a field's schema (optional fields: anyOf [that, null])."""
    for branch in field_schema.get("anyOf", [field_schema]):
        if branch.get("type") in ("integer", "number"):
            return branch  # type: ignore[no-any-return]
    return None


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_the_parser_reads_exactly_the_fields_the_schema_lists(chat: bool) -> None:
    schema = request_schema(LIMITS, chat=chat)
    seen: set[str] = set()
    for extra in ({}, {"logprobs": True} if chat else {"logprobs": 2}, {"max_tokens": 5, "min_tokens": 1}):
        parse(chat, Recording({**BASE[chat], **extra}, seen))
    assert seen == props(schema)
    assert set(schema["required"]) == ({"model", "messages"} if chat else {"model", "prompt"})

    opts_seen: set[str] = set()
    parse(chat, {**BASE[chat], "stream": True, "stream_options": Recording({"include_usage": True}, opts_seen)})
    opts_schema = next(b for b in schema["properties"]["stream_options"]["anyOf"] if b.get("type") == "object")
    assert opts_seen == props(opts_schema)
    if chat:
        msg_seen: set[str] = set()
        parse(chat, {**BASE[chat], "messages": [Recording(MSG, msg_seen)]})
        assert msg_seen == props(schema["properties"]["messages"]["items"])


def _bound_cases() -> list[tuple[bool, str]]:
    return [
        (chat, name)
        for chat in (True, False)
        for name, f in request_schema(LIMITS, chat=chat)["properties"].items()
        if numeric(f) is not None
    ]


@pytest.mark.parametrize(("chat", "name"), _bound_cases(), ids=lambda v: str(v))
def test_every_numeric_bound_in_the_schema_is_the_parsers(chat: bool, name: str) -> None:
    n = numeric(request_schema(LIMITS, chat=chat)["properties"][name])
    assert n is not None
    integer = n["type"] == "integer"
    body = {**BASE[chat], **NEEDS.get((chat, name), {})}
    step = 1 if integer else 1e-6
    lo_ok = n["minimum"] if "minimum" in n else n["exclusiveMinimum"] + step
    lo_bad = n["minimum"] - step if "minimum" in n else n["exclusiveMinimum"]
    for good in (lo_ok, n["maximum"]):
        parse(chat, {**body, name: good})
        if integer:
            parse(chat, {**body, name: float(good)} if abs(good) < 2**53 else {**body, name: good})
    fraction = (lo_ok + 0.5,) if integer and abs(lo_ok) < 2**52 else ()  # past 2**52 every float is integral
    for bad in (lo_bad, n["maximum"] + step, "1", True, math.inf, -math.inf, math.nan, [1], *fraction):
        with pytest.raises(ApiError) as err:
            parse(chat, {**body, name: bad})
        assert (err.value.status, err.value.param) == (400, name), bad


PROBES: list[Any] = [
    None, True, False, 0, 1, -1, 1.0, 1.5, 2**70, -(2**70), 1e308, "", "a", "x" * 300,
    [], [1], [1.0], [-1], [2**40], ["a"], [""], [1, "a"], [[1, 2]], [[]], [["a"]], [{}], [MSG],
    {}, {"include_usage": True},
]  # fmt: skip


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_the_schema_accepts_a_value_exactly_when_the_parser_does(chat: bool) -> None:
    schema = request_schema(LIMITS, chat=chat)
    validator = jsonschema_rs.Draft202012Validator(schema)
    disagree = []
    for name in props(schema):
        for value in PROBES:
            body = {**BASE[chat], **NEEDS.get((chat, name), {}), name: value}
            try:
                parse(chat, body)
                parsed = True
            except ApiError:
                parsed = False
            if validator.is_valid(body) != parsed:
                disagree.append((name, value, "schema accepts" if parsed is False else "parser accepts"))
    assert disagree == []


@pytest.mark.parametrize(
    "message",
    [MSG, {"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "assistant", "content": None},
     {"role": "user", "content": [{"type": "image_url"}]}, {"role": "", "content": "a"}, {"content": "a"},
     {"role": "user", "content": 5}, {"role": "user", "content": [{"type": "text"}]}, {"role": 1, "content": "a"},
     {"role": "user", "name": "bob", "content": "a"}],
)  # fmt: skip
def test_messages_the_schema_accepts_are_the_ones_the_parser_does(message: dict[str, Any]) -> None:
    validator = jsonschema_rs.Draft202012Validator(request_schema(LIMITS, chat=True))
    body = {**BASE[True], "messages": [message]}
    try:
        parse_chat(body, LIMITS)
        parsed = True
    except ApiError:
        parsed = False
    assert validator.is_valid(body) == parsed


def test_the_document_is_openapi_with_every_route_and_the_error_format() -> None:
    doc = openapi_document(LIMITS, models=["acme/one"], api_keys=True, max_body_bytes=1000)
    assert doc["openapi"] == OPENAPI_VERSION
    assert set(doc["paths"]) == {
        "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/live", "/metrics", "/openapi.json"
    }  # fmt: skip
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503", "529"} <= set(chat["responses"])
    err = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert err["required"] == ["message", "type", "param", "code"]
    body = ApiError(401, "x", code="invalid_api_key").body()
    assert jsonschema_rs.Draft202012Validator(doc["components"]["schemas"]["Error"]).is_valid(body)
    req = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert req["properties"]["model"]["examples"] == ["acme/one"]
    assert req["properties"]["n"]["anyOf"][0]["maximum"] == LIMITS.max_n
    assert doc["security"] == [{"apiKey": []}] and doc["paths"]["/health"]["get"]["security"] == []
    assert "security" not in openapi_document(LIMITS, models=[], api_keys=False, max_body_bytes=1000)
    # The examples in the document are bodies the parser takes.
    parse_chat(chat["requestBody"]["content"]["application/json"]["example"], LIMITS)
    completion = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    parse_completion(completion["example"], LIMITS)
