"""The worker stream over plain TCP (docs/worker-stream.md, "Transports"): its preamble and framing.

A connection starts with the client sending :data:`PREAMBLE`; then each direction is a sequence
of frames, each a 4-byte little-endian length followed by that many bytes of a serialized
protobuf message (client to worker ``MuxClientFrame``, worker to client ``MuxServerFrame``).
A frame longer than :data:`MAX_FRAME_BYTES`, or one that does not parse, is a :class:`FrameError`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol, TypeVar

from google.protobuf.message import DecodeError

__all__ = ["MAX_FRAME_BYTES", "PREAMBLE", "FrameError", "pack", "read_frame"]

PREAMBLE = b"CMUX/1\n"
MAX_FRAME_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct("<I")


class _Message(Protocol):
    def SerializeToString(self) -> bytes: ...

    def ParseFromString(self, data: bytes) -> int: ...


M = TypeVar("M", bound=_Message)


class FrameError(Exception):
    """The peer broke the framing (a frame over the limit, bytes that do not parse)."""


def pack(message: _Message) -> bytes:
    """``message`` as one frame: its length (4 bytes, little-endian), then its bytes."""
    data = message.SerializeToString()
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(data)} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, message: M) -> M | None:
    """Parse the next frame into ``message`` and return it; None when the peer closed the connection
    between frames. Raises :class:`FrameError` for a bad frame and ``ConnectionError`` for a connection
    that ends inside a frame (or fails)."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ConnectionResetError("the connection ended inside a frame header") from None
    (size,) = _LENGTH.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the connection ended inside a frame") from None
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise FrameError(f"frame does not parse: {exc}") from None
    return message
