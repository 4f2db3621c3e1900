"""``/openapi.json``: an OpenAPI 3.1 description of the routes the frontend serves.

Pure: :func:`openapi_document` builds the document from the request parser's own
field table (:mod:`commutator.frontend.body_fields`, bounds under the frontend's
:class:`~commutator.frontend.protocol.RequestLimits`), the response shapes the
API writes, and the error format of :class:`~commutator.frontend.protocol.ApiError`.
The models served now are given as examples of ``model``, so that a client (or
a fuzzer) reading the document can make requests that succeed.
"""

from __future__ import annotations

from typing import Any

from commutator.frontend.protocol import RequestLimits, fields_of

__all__ = ["OPENAPI_VERSION", "openapi_document", "request_schema"]

OPENAPI_VERSION = "3.1.0"

_NULLABLE_STR = {"type": ["string", "null"]}
_ERROR = {
    "type": "object",
    "description": "OpenAI's error format",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _NULLABLE_STR,
                "code": _NULLABLE_STR,
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": {"type": "integer", "minimum": 0}},
        },
    },
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
}
_CHOICE_COMMON = {
    "index": {"type": "integer", "minimum": 0},
    "logprobs": {"type": ["object", "null"]},
    "finish_reason": _NULLABLE_STR,
}


def _completion_response(chat: bool) -> dict[str, Any]:
    if chat:
        message = {
            "type": "object",
            "properties": {"role": {"const": "assistant"}, "content": _NULLABLE_STR},
            "required": ["role", "content"],
        }
        choice = {"type": "object", "properties": {**_CHOICE_COMMON, "message": message}, "required": ["index"]}
    else:
        choice = {
            "type": "object",
            "properties": {**_CHOICE_COMMON, "text": {"type": "string"}},
            "required": ["index", "text"],
        }
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion" if chat else "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": {"$ref": "#/components/schemas/Usage"},
        },
        "required": ["id", "object", "created", "model", "choices"],
    }


def request_schema(limits: RequestLimits, *, chat: bool) -> dict[str, Any]:
    """The JSON Schema of a chat or completion body, from the parser's field table."""
    fields = fields_of(limits, chat=chat)
    return {
        "type": "object",
        "description": "Fields not listed are ignored. Constraints between fields (min_tokens <= max_tokens,"
        f" prompts x n <= {limits.max_choices_per_request}, top_logprobs needs logprobs, echo not with logprobs)"
        " are checked too (400)",
        "properties": {name: f.json_schema() for name, f in fields.items()},
        "required": [name for name, f in fields.items() if f.required],
        "additionalProperties": True,
    }


def _errors(*statuses: int) -> dict[str, Any]:
    what = {
        400: "Invalid body or value (param names the field)",
        401: "Missing or unknown API key (with --api-keys-file)",
        404: "Unknown model or route",
        405: "Method not allowed on this route",
        408: "The body did not arrive within --http-read-timeout-s",
        413: "Body larger than --max-body-bytes",
        415: "A compressed body (Content-Encoding): send it uncompressed",
        429: "Too many requests in flight here, or the API key's rate limit (Retry-After)",
        500: "The worker failed the request",
        503: "No worker serves the model",
        504: "The request timed out",
        529: "All workers are busy (Retry-After)",
    }
    err = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(s): {"description": what[s], "content": err} for s in statuses}


def _generation(chat: bool, limits: RequestLimits, example: dict[str, Any] | None) -> dict[str, Any]:
    name = "ChatCompletion" if chat else "Completion"
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{name}Request"}}
    if example is not None:
        media["example"] = example
    return {
        "summary": "Chat completion" if chat else "Text completion",
        "operationId": "createChatCompletion" if chat else "createCompletion",
        "requestBody": {"required": True, "content": {"application/json": media}},
        "responses": {
            "200": {
                "description": "The completion; with stream: server-sent events ending in data: [DONE]",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **_errors(400, 401, 404, 405, 408, 413, 415, 429, 500, 503, 504, 529),
        },
    }


def _get(summary: str, op_id: str, content: dict[str, Any], *statuses: int, open_: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "responses": {"200": {"description": summary, "content": content}, **_errors(*statuses)},
    }
    if open_:
        op["security"] = []
    return op


def _health() -> dict[str, Any]:
    op = _get("Ready (200) or draining (503)", "health", {}, open_=True)
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
    op["responses"] = {
        "200": {"description": "ready", "content": body},
        "503": {"description": "draining", "content": body},
    }
    return op


def openapi_document(
    limits: RequestLimits, *, models: list[str], api_keys: bool, max_body_bytes: int
) -> dict[str, Any]:
    """The document: ``models`` served now (examples of ``model``), ``api_keys``: whether a key is needed."""
    model = models[0] if models else "MODEL"
    chat_example = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
    completion_example = {"model": model, "prompt": "Hello", "max_tokens": 8}
    chat_req = request_schema(limits, chat=True)
    completion_req = request_schema(limits, chat=False)
    for req in (chat_req, completion_req):
        if models:
            req["properties"]["model"] = {**req["properties"]["model"], "examples": list(models)}
    json_of = lambda ref: {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}  # noqa: E731
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Commutator OpenAI-compatible API",
            "version": "1",
            "description": f"Bodies up to {max_body_bytes} bytes (413 past it). Errors use OpenAI's format.",
        },
        "paths": {
            "/v1/chat/completions": {"post": _generation(True, limits, chat_example)},
            "/v1/completions": {"post": _generation(False, limits, completion_example)},
            "/v1/models": {"get": _get("The models served now", "listModels", json_of("ModelList"), 401, 429)},
            "/health": {"get": _health()},
            "/live": {"get": _get("The process is up", "live", json_of("Live"), open_=True)},
            "/metrics": {
                "get": _get("Prometheus metrics", "metrics", {"text/plain": {"schema": {"type": "string"}}}, open_=True)
            },
            "/openapi.json": {
                "get": _get(
                    "This document", "openapi", {"application/json": {"schema": {"type": "object"}}}, open_=True
                )
            },
        },
        "components": {
            "schemas": {
                "Error": _ERROR,
                "Usage": _USAGE,
                "ChatCompletionRequest": chat_req,
                "CompletionRequest": completion_req,
                "ChatCompletion": _completion_response(True),
                "Completion": _completion_response(False),
                "ModelList": {
                    "type": "object",
                    "properties": {
                        "object": {"const": "list"},
                        "data": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "object": {"const": "model"},
                                    "created": {"type": "integer"},
                                    "owned_by": {"type": "string"},
                                },
                                "required": ["id", "object", "created", "owned_by"],
                            },
                        },
                    },
                    "required": ["object", "data"],
                },
                "Health": {
                    "type": "object",
                    "properties": {
                        "status": {"enum": ["ready", "draining"]},
                        "models": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["status", "models"],
                },
                "Live": {"type": "object", "properties": {"status": {"const": "live"}}, "required": ["status"]},
            }
        },
    }
    if api_keys:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"apiKey": []}]
    return doc
