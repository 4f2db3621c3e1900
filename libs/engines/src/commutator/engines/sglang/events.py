"""SGLang's KV events turned into ours (pure).

Checked against ``sgl-project/sglang`` ``python/sglang/srt/disaggregation/kv_events.py``
(commits 612d579 and 006d053, and the 2026 version with ``BlockStoredWithMetadata``)
and ``python/sglang/srt/mem_cache`` ``KVCacheEventMixin._record_store_event``:

- the scheduler of each data-parallel rank publishes on ZMQ PUB multipart frames
  ``(topic, seq as 8-byte big-endian, msgpack payload)``; the payload is an
  array-like ``EventBatch`` ``[ts, events]`` or ``[ts, events, attn_dp_rank]``;
- events are array-like tagged structs, so a plain msgpack decode gives lists:
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id]``
  then, in newer versions, ``medium`` (``"GPU"``, ``"CPU_PINNED"``, ``"DISK"``,
  ``"EXTERNAL"``) and, only for salted requests, a ``{"cache_salt": ...}`` map;
  ``["BlockRemoved", block_hashes]`` (+ ``medium``); ``["AllBlocksCleared"]``;
- one ``BlockStored`` per page: ``block_hashes`` has one id (the first 64 bits of a
  SHA-256 chained over the pages, signed), ``parent_block_hash`` is the previous
  page's id or None for the first page of a sequence, ``token_ids`` are the page's
  tokens (pairs in EAGLE bigram mode: the first of each pair is the token) and
  ``block_size`` is their count (so a trailing partial page says so);
- ``lora_id`` is None in every version checked: the adapter attributes a root page to
  the LoRA adapter and salt of the requests it submitted (:mod:`commutator.engines.seed_hints`).

:class:`SglangKvEvents` turns those into the vLLM-shaped dicts that
:class:`~commutator.engines.engine_events.EngineEventConverter` reads, which
recomputes our local hashes from the token ids. Partial pages are not indexed
(DESIGN.md 4.1: a partial block has no hash), and their later removal is dropped.
A jump in a rank's ZMQ sequence numbers means the subscriber missed events (the
publisher's high-water mark, a slow joiner): the rank's state is then unknown and
a Cleared event tells the router (and the mirror) to start that rank afresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from commutator.engines.base import KvEventRecord
from commutator.engines.engine_events import EngineEventConverter, engine_block_id
from commutator.engines.seed_hints import RootSeedHints

__all__ = ["SglangKvEvents", "normalize_event"]

_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
_REMOVED_FIELDS = ("block_hashes", "medium")


def normalize_event(ev: Any) -> dict[str, Any] | None:
    """One decoded SGLang event (array form, a map, or a struct) as a dict with a ``type``; None if unknown."""
    if isinstance(ev, Mapping):
        return dict(ev)
    if isinstance(ev, Sequence) and not isinstance(ev, str | bytes):
        if not ev:
            return None
        kind, values = str(ev[0]), list(ev[1:])
        out: dict[str, Any] = {"type": kind}
        if values and isinstance(values[-1], Mapping):  # BlockStoredWithMetadata's trailing map
            out["metadata"] = dict(values.pop())
        names: tuple[str, ...] = ()
        if kind == "BlockStored":
            names = _STORED_FIELDS
        elif kind == "BlockRemoved":
            names = _REMOVED_FIELDS
        out.update(zip(names, values, strict=False))
        return out
    kind = type(ev).__name__
    if kind == "BlockStoredWithMetadata":
        kind = "BlockStored"
    names = (*_STORED_FIELDS, "metadata") if kind == "BlockStored" else _REMOVED_FIELDS
    out = {"type": kind}
    for name in names:
        if hasattr(ev, name):
            out[name] = getattr(ev, name)
    meta = out.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        out["metadata"] = {"cache_salt": getattr(meta, "cache_salt", None)}
    return out


def _token(t: Any) -> int:
    return int(t[0]) if isinstance(t, list | tuple) else int(t)


class SglangKvEvents:
    """One per engine. Not thread-safe: call it from one task (or several on one event loop)."""

    def __init__(self, page_size: int, hints: RootSeedHints) -> None:
        self.page_size = page_size
        self.hints = hints
        self.converter = EngineEventConverter(page_size)
        self._next_seq: dict[int, int] = {}
        self._unindexed: dict[int, set[int]] = {}  # dp rank -> engine ids of pages we did not index
        self.sequence_gaps = 0
        self.skipped_partial = 0
        self.skipped_ambiguous = 0

    def convert(self, batch: Any, dp_rank: int = 0, seq: int | None = None) -> list[KvEventRecord]:
        """A decoded ``EventBatch`` of ``dp_rank`` (the subscriber's rank), with its ZMQ sequence number."""
        out: list[KvEventRecord] = []
        if seq is not None:
            expected = self._next_seq.get(dp_rank)
            self._next_seq[dp_rank] = seq + 1
            if expected is not None and seq != expected:
                self.sequence_gaps += 1
                self._unindexed.pop(dp_rank, None)
                out += self.converter.convert([{"type": "AllBlocksCleared"}], dp_rank)
        out += self.converter.convert(self._events(_batch_events(batch), dp_rank), dp_rank)
        return out

    def _events(self, raw: Iterable[Any], rank: int) -> list[dict[str, Any]]:
        unindexed = self._unindexed.setdefault(rank, set())
        out: list[dict[str, Any]] = []
        for item in raw:
            ev = normalize_event(item)
            if ev is None:
                continue
            kind = ev.get("type")
            if kind == "AllBlocksCleared":
                unindexed.clear()
                out.append(ev)
            elif kind == "BlockRemoved":
                ids = [h for h in ev.get("block_hashes") or () if engine_block_id(h) not in unindexed]
                for h in ev.get("block_hashes") or ():
                    unindexed.discard(engine_block_id(h))
                if ids:
                    out.append({**ev, "block_hashes": ids})
            elif kind == "BlockStored":
                stored = self._stored(ev, unindexed)
                if stored is not None:
                    out.append(stored)
        return out

    def _stored(self, ev: dict[str, Any], unindexed: set[int]) -> dict[str, Any] | None:
        hashes = list(ev.get("block_hashes") or ())
        tokens = [_token(t) for t in ev.get("token_ids") or ()]
        size = int(ev.get("block_size") or len(tokens))
        if size != self.page_size or len(tokens) != size * len(hashes) or not hashes:
            self.skipped_partial += 1
            unindexed.update(engine_block_id(h) for h in hashes)
            return None
        meta = ev.get("metadata") or {}
        event_salt = meta.get("cache_salt") if isinstance(meta, Mapping) else None
        stored = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": ev.get("parent_block_hash"),
            "token_ids": tokens,
            "block_size": size,
            "medium": ev.get("medium"),
        }
        if stored["parent_block_hash"] is None:
            pair = self.hints.choose(tokens[:size], event_salt)
            if pair is None:
                self.skipped_ambiguous += 1
                unindexed.update(engine_block_id(h) for h in hashes)
                return None
            lora, salt = pair
            stored["lora_name"] = lora or None
            if salt:
                stored["extra_keys"] = [(lora, salt) if lora else (salt,)]
        return stored


def _batch_events(batch: Any) -> list[Any]:
    if isinstance(batch, Mapping):
        return list(batch.get("events") or ())
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        return list(batch[1]) if len(batch) > 1 and batch[1] is not None else []
    return list(getattr(batch, "events", None) or ())
