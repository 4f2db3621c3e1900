"""KV events in the format vLLM and SGLang publish, turned into ours (pure).

Both engines publish batches ``[ts, events, data_parallel_rank]`` whose events
are tagged structs: ``BlockStored`` (``block_hashes``, ``parent_block_hash``,
``token_ids``, ``block_size``, ``lora_name``, ``extra_keys``, ``medium``, ...),
``BlockRemoved`` (``block_hashes``, ``medium``) and ``AllBlocksCleared``.
:class:`EngineEventConverter` takes them decoded (a struct, or the dict/list
msgpack decodes to) and returns :class:`~commutator.engines.base.KvEventRecord`
values that the worker publishes:

- engine block ids are the engine's own hashes as unsigned 64-bit ints (vLLM
  sends the low 64 bits of its digest, or the digest bytes; bytes are folded
  the same way, so both settings give the same ids);
- local block hashes are recomputed from the event's token ids with DESIGN.md
  4.1's seed: LoRA name and cache salt. A root block takes them from its
  ``extra_keys`` (the LoRA name first if the event has one, then the cache salt);
  a child block inherits the seed of its parent, as vLLM mixes the salt into the
  first block only;
- event ids count from 0 per data-parallel rank, from when the converter was made
  (the engine's start): the router's gap and restart detection works on them;
- only the device tier is indexed (``medium`` GPU or unset; group 0): blocks
  offloaded to CPU or storage are not where a request would find them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from commutator.common.hashing import block_hash_seed, local_block_hashes
from commutator.engines.base import KvCleared, KvEventRecord, KvRemoved, KvStored

__all__ = ["EngineEventConverter", "engine_block_id"]

_U64 = (1 << 64) - 1
_DEVICE_MEDIA = (None, "GPU", "gpu", "cuda", "device")


def engine_block_id(h: int | bytes | str) -> int:
    """An engine's block hash as an unsigned 64-bit id (bytes: the low 64 bits, big-endian)."""
    if isinstance(h, bytes):
        return int.from_bytes(h, "big") & _U64
    if isinstance(h, str):
        return int.from_bytes(h.encode(), "big") & _U64
    return int(h) & _U64


def _field(ev: Any, name: str, default: Any = None) -> Any:
    if isinstance(ev, Mapping):
        return ev.get(name, default)
    return getattr(ev, name, default)


def _kind(ev: Any) -> str:
    if isinstance(ev, Mapping):
        return str(ev.get("type", ""))
    return type(ev).__name__


class EngineEventConverter:
    """One per engine instance. Not thread-safe: call it from one task."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._seeds: dict[int, dict[int, int]] = {}  # dp rank -> engine block id -> hash seed
        self._next: dict[int, int] = {}  # dp rank -> next event id
        self.skipped_other_tiers = 0
        self.skipped_unknown_parent = 0

    def convert_batch(self, batch: Any) -> list[KvEventRecord]:
        """A decoded ``[ts, events, dp_rank]`` (list, or a struct with ``events``/``data_parallel_rank``)."""
        if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
            events = batch[1] if len(batch) > 1 else []
            rank = batch[2] if len(batch) > 2 and batch[2] is not None else 0
        else:
            events = _field(batch, "events", [])
            rank = _field(batch, "data_parallel_rank") or 0
        return self.convert(events, int(rank))

    def convert(self, events: Iterable[Any], dp_rank: int = 0) -> list[KvEventRecord]:
        out: list[KvEventRecord] = []
        seeds = self._seeds.setdefault(dp_rank, {})
        for ev in events:
            kind = _kind(ev)
            if kind == "AllBlocksCleared":
                seeds.clear()
                out.append(self._record(dp_rank, KvCleared()))
                continue
            if _field(ev, "medium") not in _DEVICE_MEDIA or (_field(ev, "group_idx") or 0) != 0:
                self.skipped_other_tiers += 1
                continue
            if kind == "BlockStored":
                data = self._stored(ev, seeds)
                if data is not None:
                    out.append(self._record(dp_rank, data))
            elif kind == "BlockRemoved":
                ids = tuple(engine_block_id(h) for h in _field(ev, "block_hashes", ()))
                for i in ids:
                    seeds.pop(i, None)
                out.append(self._record(dp_rank, KvRemoved(ids)))
        return out

    def lost(self) -> list[KvEventRecord]:
        """Events were lost for good: a Cleared per known rank (the router forgets this worker's blocks,
        which costs cache affinity, never a wrong placement), and every seed is forgotten."""
        out = []
        for rank, seeds in self._seeds.items():
            seeds.clear()
            out.append(self._record(rank, KvCleared()))
        return out or [self._record(0, KvCleared())]

    def _record(self, rank: int, data: KvStored | KvRemoved | KvCleared) -> KvEventRecord:
        eid = self._next.get(rank, 0)
        self._next[rank] = eid + 1
        return KvEventRecord(eid, data, rank)

    def _stored(self, ev: Any, seeds: dict[int, int]) -> KvStored | None:
        ids = [engine_block_id(h) for h in _field(ev, "block_hashes", ())]
        tokens = list(_field(ev, "token_ids", ()))
        bs = int(_field(ev, "block_size", 0) or self.block_size)
        if not ids or len(tokens) < len(ids) * bs:
            return None
        parent_raw = _field(ev, "parent_block_hash")
        parent = engine_block_id(parent_raw) if parent_raw is not None else None
        if parent is not None:
            seed = seeds.get(parent)
            if seed is None:  # stored before we listened, or already evicted: nobody could place it
                self.skipped_unknown_parent += 1
                return None
        else:
            seed = _root_seed(_field(ev, "lora_name"), _field(ev, "extra_keys"))
        local = local_block_hashes(tokens[: len(ids) * bs], bs, seed)
        for i in ids:
            seeds[i] = seed
        return KvStored(parent, tuple(zip(ids, local, strict=True)))


def _root_seed(lora_name: str | None, extra_keys: Sequence[Any] | None) -> int:
    """The hash seed of a root block from its extra keys: LoRA name (if any) first, then the cache salt."""
    salt = ""
    if extra_keys:
        first = extra_keys[0]
        strings = [k for k in (first or ()) if isinstance(k, str)]
        if lora_name and strings and strings[0] == lora_name:
            strings = strings[1:]
        if strings:
            salt = strings[-1]
    return block_hash_seed(lora_name or "", salt)
