"""The worker stream over plain TCP (docs/worker-stream.md, "Transports"): its preamble and framing.

A connection starts with the client sending :data:`PREAMBLE`; then each direction is a sequence
of frames, each a 4-byte little-endian length followed by that many bytes of a serialized
protobuf message (client to worker ``MuxClientFrame``, worker to client ``MuxServerFrame``).
A frame longer than :data:`MAX_FRAME_BYTES`, or one that does not parse, is a :class:`FrameError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol, TypeVar

from google.protobuf.message import DecodeError

__all__ = ["MAX_FRAME_BYTES", "PREAMBLE", "FrameError", "cut_frames", "pack"]

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


def cut_frames(buf: bytearray, parse: Callable[[bytes], M], deliver: Callable[[M], None]) -> None:
    """Cut the complete frames at the start of ``buf``, parse each with ``parse`` and hand it to ``deliver``,
    in order; the bytes of the frames handed over are removed from ``buf`` (also when ``deliver``
    raises), an incomplete frame stays for the next call. Raises :class:`FrameError` for a frame over
    the limit or one that does not parse. Both ends of the stream cut their frames with it as the
    bytes arrive (in ``data_received``, no task between)."""
    pos, n = 0, len(buf)
    try:
        while n - pos >= 4:
            (size,) = _LENGTH.unpack_from(buf, pos)
            if size > MAX_FRAME_BYTES:
                raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte limit")
            if n - pos - 4 < size:
                break
            try:
                frame = parse(bytes(buf[pos + 4 : pos + 4 + size]))
            except DecodeError as exc:
                raise FrameError(f"frame does not parse: {exc}") from None
            pos += 4 + size
            deliver(frame)
    finally:
        if pos:
            del buf[:pos]
