"""TensorRT-LLM's KV cache events turned into ours (pure).

``LLM.get_kv_cache_events_async(timeout)`` yields dicts made by
``KVCacheEventSerializer`` (``tensorrt_llm/_utils.py``, NVIDIA/TensorRT-LLM ed53795;
the same shapes in ``tests/unittest/llmapi/test_llm_kv_cache_events.py``)::

    {"event_id": int, "window_size": int, "attention_dp_rank": int (only with attention DP),
     "data": {"type": "created", "num_blocks_per_cache_level": [device, host]}
           | {"type": "stored", "parent_hash": int | None,
              "blocks": [{"type": "stored_block", "block_hash": int,
                          "tokens": [{"type": "unique_token", "token_id": int, "token_extra_id": int}],
                          "cache_level": int, "priority": int, "mm_keys": [...] (newer)}]}
           | {"type": "removed", "block_hashes": [int]}
           | {"type": "updated", "block_hash": int, "cache_level": {...}, "priority": {...}}}

- a stored event lists blocks in prefix order; the last one may hold fewer than
  ``tokens_per_block`` tokens (partial reuse): it is not indexed, nor anything after
  it, and its later removal is dropped (the approach of NVIDIA Dynamo's TRT-LLM
  publisher, ``components/src/dynamo/trtllm/publisher.py``);
- ``lora_id`` is not serialized (a TODO in the serializer) and the cache salt is
  never sent: root blocks get their seed from :mod:`commutator.engines.seed_hints`
  (a ``lora_id`` field, if a later version adds one, narrows the choice);
- tokens with a non-zero ``token_extra_id`` (multimodal or prompt-tuning content) or
  a non-integer id would hash differently from plain text: such blocks are not indexed;
- models with several attention windows emit events per window; only the largest
  window (the global-attention layers, learnt from the ``created`` events that come
  first) is indexed; ``updated`` events (priority, cache level) change nothing here;
- ``event_id`` counts per rank; a jump means the engine's bounded event buffer
  (``event_buffer_max_size``) dropped events: the rank is reset with a Cleared event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from commutator.engines.base import KvEventRecord
from commutator.engines.engine_events import EngineEventConverter, engine_block_id
from commutator.engines.seed_hints import RootSeedHints

__all__ = ["TrtllmKvEvents"]


class TrtllmKvEvents:
    """One per engine; call it from one task."""

    def __init__(
        self, tokens_per_block: int, hints: RootSeedHints, lora_names: Callable[[int], str | None] | None = None
    ) -> None:
        self.block_size = tokens_per_block
        self.hints = hints
        self.converter = EngineEventConverter(tokens_per_block)
        self._lora_names = lora_names or (lambda _id: None)
        self._max_window: int | None = None
        self._created_phase = True
        self.device_blocks: int | None = None
        """Blocks per device cache, from the ``created`` event of the largest window."""
        self._last_id: dict[int, int] = {}
        self._unindexed: dict[int, set[int]] = {}
        self.event_gaps = 0
        self.skipped_partial = 0
        self.skipped_ambiguous = 0
        self.skipped_window = 0
        self.skipped_special_tokens = 0

    def convert(self, event: Mapping[str, Any]) -> list[KvEventRecord]:
        data = event.get("data") or {}
        kind = data.get("type")
        rank = int(event.get("attention_dp_rank") or 0)
        window = event.get("window_size")
        if kind == "created":
            if self._created_phase and window is not None and (self._max_window is None or window > self._max_window):
                self._max_window = int(window)
                self.device_blocks = None
            levels = data.get("num_blocks_per_cache_level") or []
            if levels and (window is None or window == self._max_window):
                self.device_blocks = int(levels[0])
            self._note_id(rank, event)
            return []
        self._created_phase = False
        out = self._gap(rank, event)
        if window is not None and self._max_window is not None and window != self._max_window:
            self.skipped_window += 1
            return out
        unindexed = self._unindexed.setdefault(rank, set())
        if kind == "stored":
            stored = self._stored(data, unindexed)
            if stored is not None:
                out += self.converter.convert([stored], rank)
        elif kind == "removed":
            ids = []
            for h in data.get("block_hashes") or ():
                bid = engine_block_id(h)
                if bid in unindexed:
                    unindexed.discard(bid)
                else:
                    ids.append(h)
            if ids:
                out += self.converter.convert([{"type": "BlockRemoved", "block_hashes": ids}], rank)
        return out

    def _note_id(self, rank: int, event: Mapping[str, Any]) -> None:
        eid = event.get("event_id")
        if eid is not None:
            self._last_id[rank] = int(eid)

    def _gap(self, rank: int, event: Mapping[str, Any]) -> list[KvEventRecord]:
        eid = event.get("event_id")
        last = self._last_id.get(rank)
        self._note_id(rank, event)
        if eid is None or last is None or int(eid) == last + 1:
            return []
        self.event_gaps += 1
        self._unindexed.pop(rank, None)
        return self.converter.convert([{"type": "AllBlocksCleared"}], rank)

    def _stored(self, data: Mapping[str, Any], unindexed: set[int]) -> dict[str, Any] | None:
        bs = self.block_size
        hashes: list[Any] = []
        tokens: list[int] = []
        lora: str | None = None  # None: the event does not say (no lora_id field)
        blocks = list(data.get("blocks") or ())
        for i, block in enumerate(blocks):
            toks = block.get("tokens") or ()
            ids: list[Any] = [t.get("token_id") if isinstance(t, Mapping) else t for t in toks]
            plain = all(type(t) is int for t in ids) and all(
                not (isinstance(t, Mapping) and t.get("token_extra_id")) for t in toks
            )
            if len(ids) != bs or not plain or block.get("block_hash") is None:
                if len(ids) != bs:
                    self.skipped_partial += 1
                else:
                    self.skipped_special_tokens += 1
                rest = [b["block_hash"] for b in blocks[i:] if b.get("block_hash") is not None]
                unindexed.update(engine_block_id(h) for h in rest)
                break
            hashes.append(block["block_hash"])
            tokens.extend(int(t) for t in ids)
            if "lora_id" in block:
                lora_id = block["lora_id"]
                lora = (self._lora_names(int(lora_id)) or f"lora-{lora_id}") if lora_id else ""
        if not hashes:
            return None
        parent = data.get("parent_hash")
        stored: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": bs,
        }
        if parent is None:
            pair = self.hints.choose(tokens[:bs], event_lora=lora)
            if pair is None:
                self.skipped_ambiguous += 1
                unindexed.update(engine_block_id(h) for h in hashes)
                return None
            root_lora, salt = pair
            stored["lora_name"] = root_lora or None
            if salt:
                stored["extra_keys"] = [(root_lora, salt) if root_lora else (salt,)]
        return stored
