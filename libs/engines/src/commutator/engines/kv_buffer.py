"""KV events an engine emitted, held for the worker's publisher (and, for adapters, mirrored).

Engines :meth:`KvEventBuffer.push` their records; the worker's publisher awaits
:meth:`KvEventBuffer.take` (``Engine.kv_events``). The buffer is bounded: past
``limit`` records the oldest are dropped and counted, and the router sees the gap
in event ids and asks the worker for a dump. Adapters of engines that publish
their own KV events (vLLM, SGLang, TensorRT-LLM) and cannot dump their cache
pass ``mirror=True``: every record also goes into a
:class:`~commutator.engines.kv_mirror.KvMirror`, which answers that dump exactly
(it saw the dropped records too). The mocker and hf engines dump from their
block pool and keep no mirror.
"""

from __future__ import annotations

import asyncio
import logging

from commutator.engines.base import KvDump, KvEventRecord
from commutator.engines.kv_mirror import KvMirror

__all__ = ["KV_EVENT_BUFFER_LIMIT", "KvEventBuffer"]

log = logging.getLogger(__name__)

KV_EVENT_BUFFER_LIMIT = 100_000


class KvEventBuffer:
    """Single event loop; ``take`` has one caller at a time (the worker's publisher)."""

    def __init__(self, limit: int = KV_EVENT_BUFFER_LIMIT, *, mirror: bool = False) -> None:
        self.mirror: KvMirror | None = KvMirror() if mirror else None
        self._limit = limit
        self._records: list[KvEventRecord] = []
        self._ready = asyncio.Event()
        self.dropped = 0

    def push(self, records: list[KvEventRecord]) -> None:
        if not records:
            return
        if self.mirror is not None:
            self.mirror.apply_all(records)
        buf = self._records
        buf.extend(records)
        if len(buf) > self._limit:
            drop = len(buf) - self._limit
            del buf[:drop]
            self.dropped += drop
            log.warning("KV event buffer full: dropped %d events (the router will resync this worker)", drop)
        self._ready.set()

    async def take(self) -> list[KvEventRecord]:
        """Wait for, then take, every record pushed since the last call."""
        while not self._records:
            self._ready.clear()
            await self._ready.wait()
        out, self._records = self._records, []
        return out

    def dump(self) -> KvDump | None:
        """The mirrored cache state (``None`` without a mirror)."""
        return self.mirror.dump() if self.mirror is not None else None

    def reset_mirror(self) -> None:
        """Events were lost for good: the mirror starts over (from the Cleared the adapter pushes next)."""
        if self.mirror is not None:
            self.mirror = KvMirror()
