"""KV events an adapter has converted, held for the worker's publisher, and mirrored for ``kv_dump``.

Adapters of engines that publish their own KV events (SGLang, TensorRT-LLM, vLLM)
convert them in a background task and :meth:`KvEventBuffer.push` the records;
the worker's publisher awaits :meth:`KvEventBuffer.take` (``Engine.kv_events``).
Every record also goes into a :class:`~commutator.engines.kv_mirror.KvMirror`
(``Engine.kv_dump``). The buffer is bounded: past ``limit`` records the oldest
are dropped and counted; the router sees the gap in event ids and asks for a
dump, which the mirror answers exactly (it saw the dropped records too).
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

    def __init__(self, limit: int = KV_EVENT_BUFFER_LIMIT) -> None:
        self.mirror = KvMirror()
        self._limit = limit
        self._records: list[KvEventRecord] = []
        self._ready = asyncio.Event()
        self.dropped = 0

    def push(self, records: list[KvEventRecord]) -> None:
        if not records:
            return
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

    def dump(self) -> KvDump:
        return self.mirror.dump()
