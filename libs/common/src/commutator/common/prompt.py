"""Prompts on the wire: ``GenerateRequest.token_ids`` or ``GenerateRequest.token_bytes``.

A prompt travels either as the repeated ``token_ids`` field or as ``token_bytes``, the same ids as
little-endian uint32 values (docs/worker-stream.md, "Prompts as bytes"). Reading a protobuf
repeated field makes a Python int per token (about 35 µs per thousand ids, 400 µs for a 12,000-token
prompt); ``token_bytes`` is one copy of bytes, and an ``array('I')`` over it serves as a sequence of
ints, hashes block by block (DESIGN.md 4.1 hashes the same little-endian bytes) and converts to a
list in one C call where an engine wants one.

A worker that reads ``token_bytes`` says so in discovery (``InstanceInfo.token_bytes``); a router
sending to one that does not moves the prompt to ``token_ids`` (:func:`with_token_ids`).

Pure module: no I/O.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable, Sequence

from commutator.common.hashing import tokens_to_bytes
from commutator.v1 import common_pb2

__all__ = [
    "TokenArray",
    "from_le_bytes",
    "prompt_ids",
    "prompt_len",
    "to_le_bytes",
    "token_array",
    "with_token_ids",
]

TokenArray = array.array
"""Token ids held as C uint32 values (``array('I')``): a sequence of ints, and a buffer of 4 bytes each."""

_CODE = "I"
if array.array(_CODE).itemsize != 4:  # pragma: no cover - every platform Python supports has a 4-byte C int
    raise ImportError("array('I') is not 4 bytes on this platform; token ids need uint32 storage")
_NATIVE_LE = sys.byteorder == "little"


def token_array(ids: Iterable[int] = ()) -> array.array[int]:
    """``ids`` as an ``array('I')``, in one C loop. Raises ``ValueError`` for an id that is not an
    integer in [0, 2^32) (a bool counts as the integer it is; callers that must refuse JSON's
    ``true`` check for it)."""
    try:
        return array.array(_CODE, ids)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2^32): {exc}") from None


def from_le_bytes(data: bytes) -> array.array[int]:
    """The token ids of ``token_bytes``. Raises ``ValueError`` when its length is not a multiple of 4."""
    if len(data) % 4:
        raise ValueError(f"token_bytes has {len(data)} bytes, not a whole number of 4-byte token ids")
    out = array.array(_CODE)
    out.frombytes(data)
    if not _NATIVE_LE:  # pragma: no cover - no big-endian machine in CI
        out.byteswap()
    return out


def to_le_bytes(ids: Sequence[int]) -> bytes:
    """``ids`` as ``token_bytes`` (:func:`commutator.common.hashing.tokens_to_bytes`: a copy of an
    ``array('I')``'s buffer, else one C call over the ints). Raises ``ValueError`` for an id that is
    not an integer in [0, 2^32)."""
    return tokens_to_bytes(ids)


def prompt_ids(request: common_pb2.GenerateRequest) -> Sequence[int]:
    """The prompt of ``request``: an ``array('I')`` over ``token_bytes``, else the ``token_ids`` field.
    Raises ``ValueError`` when both are set or ``token_bytes`` is not whole ids."""
    data = request.token_bytes
    if data:
        if len(request.token_ids):
            raise ValueError("set one of token_ids and token_bytes, not both")
        return from_le_bytes(data)
    return request.token_ids


def prompt_len(request: common_pb2.GenerateRequest) -> int:
    """The number of prompt tokens of ``request`` (without reading them)."""
    data = request.token_bytes
    return len(data) // 4 if data else len(request.token_ids)


def with_token_ids(request: common_pb2.GenerateRequest) -> common_pb2.GenerateRequest:
    """``request`` with its prompt in ``token_ids`` (for a receiver that does not read ``token_bytes``):
    ``request`` itself when it is there already, else a copy."""
    if not request.token_bytes:
        return request
    out = common_pb2.GenerateRequest()
    out.CopyFrom(request)
    out.ClearField("token_bytes")
    out.token_ids.extend(from_le_bytes(request.token_bytes))
    return out
