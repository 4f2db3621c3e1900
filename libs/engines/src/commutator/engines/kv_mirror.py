"""The cache state an engine's own KV events describe (pure).

Engines such as vLLM, SGLang and TensorRT-LLM publish KV events but offer no
dump of their prefix cache. Their adapters pass every event they emit through
a :class:`KvMirror`, which keeps, per data-parallel rank, the engine block id ->
sequence hash map those events imply (DESIGN.md 4.3, the same semantics as the
router's index), so the worker can answer ``DumpKvState`` and a router that lost
events recovers the worker exactly. The mirror is exact as long as it saw every
event since the engine started (it lives in the same process, so it does).
"""

from __future__ import annotations

from commutator.common.hashing import extend_sequence_hash
from commutator.engines.base import KvCleared, KvDump, KvEventRecord, KvRemoved, KvStored

__all__ = ["KvMirror"]


class KvMirror:
    def __init__(self) -> None:
        self._blocks: dict[int, dict[int, int]] = {}  # dp rank -> engine block id -> sequence hash
        self._next: dict[int, int] = {}  # dp rank -> next event id

    def apply(self, rec: KvEventRecord) -> None:
        blocks = self._blocks.setdefault(rec.dp_rank, {})
        self._next[rec.dp_rank] = rec.event_id + 1
        data = rec.data
        if isinstance(data, KvStored):
            prev = None
            if data.parent_hash is not None:
                prev = blocks.get(data.parent_hash)
                if prev is None:
                    return  # the parent is unknown here too: the router skips this event as well
            for engine_id, local in data.blocks:
                prev = extend_sequence_hash(prev, local)
                blocks[engine_id] = prev
        elif isinstance(data, KvRemoved):
            for engine_id in data.block_hashes:
                blocks.pop(engine_id, None)
        elif isinstance(data, KvCleared):
            blocks.clear()

    def apply_all(self, records: list[KvEventRecord]) -> None:
        for rec in records:
            self.apply(rec)

    def dump(self) -> KvDump:
        out = [(rank, engine_id, seq) for rank, blocks in self._blocks.items() for engine_id, seq in blocks.items()]
        return out, dict(self._next)

    def blocks(self, dp_rank: int = 0) -> int:
        return len(self._blocks.get(dp_rank, ()))
