"""Which LoRA adapter and cache salt a root block was stored under, when the engine's events do not say (pure).

DESIGN.md 4.1 seeds a request's local block hashes with its LoRA name and cache
salt. vLLM's KV events carry both (``lora_name``, ``extra_keys``); SGLang's and
TensorRT-LLM's do not, or only in some versions: SGLang sets ``lora_id`` to None
in every version checked and adds the salt (``metadata.cache_salt``) only in
recent ones; TensorRT-LLM leaves ``lora_id`` out of its serialized events and
never sends the salt. Their adapters therefore note, for every request they
submit, the tokens of its first full block together with its LoRA name and salt
(:meth:`RootSeedHints.begin`), and ask, for each root block an event stores,
which (LoRA, salt) pairs were in flight (or finished within ``grace_s``) with
exactly those first-block tokens (:meth:`RootSeedHints.choose`):

- one pair: that one (the usual case; base requests are noted too, as ``("", "")``);
- none: the base pair, with the event's own salt if it carried one;
- several different pairs (two tenants' requests share a first block at the same
  moment): ``None``, and the adapter skips the stored event rather than guess. The
  router then does not learn those blocks (and their children, whose parent it
  does not know): a missed cache hit, never a wrong one.

Children inherit the seed of their parent (EngineEventConverter), so only root
blocks need this.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from commutator.common.clock import Clock, SystemClock

__all__ = ["RootSeedHints", "SeedPair"]

SeedPair = tuple[str, str]
"""``(lora_name, cache_salt)``; empty strings for none."""


class RootSeedHints:
    """Not thread-safe: call it from the event loop only."""

    def __init__(
        self, block_size: int, *, clock: Clock | None = None, grace_s: float = 10.0, max_entries: int = 65536
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._clock = clock or SystemClock()
        self._grace = grace_s
        self._max = max_entries
        self._ids = itertools.count()
        # first-block tokens -> handle -> (pair, expiry or None while in flight)
        self._by_key: dict[tuple[int, ...], dict[int, tuple[SeedPair, float | None]]] = {}
        self._keys: dict[int, tuple[int, ...]] = {}  # handle -> first-block tokens
        self._entries = 0

    def __len__(self) -> int:
        return self._entries

    def begin(self, token_ids: Sequence[int], lora_name: str = "", cache_salt: str = "") -> int | None:
        """Note a request being submitted; returns a handle for :meth:`end` (None: no full block)."""
        if len(token_ids) < self.block_size:
            return None
        if self._entries >= self._max:
            self._purge_all()
        key = tuple(token_ids[: self.block_size])
        handle = next(self._ids)
        self._by_key.setdefault(key, {})[handle] = ((lora_name or "", cache_salt or ""), None)
        self._keys[handle] = key
        self._entries += 1
        return handle

    def end(self, handle: int | None) -> None:
        """The request finished; its blocks' events may still be on their way for ``grace_s``."""
        if handle is None:
            return
        key = self._keys.get(handle)
        if key is None:
            return
        entries = self._by_key[key]
        pair, _ = entries[handle]
        entries[handle] = (pair, self._clock.monotonic() + self._grace)

    def choose(
        self, root_tokens: Sequence[int], event_salt: str | None = None, event_lora: str | None = None
    ) -> SeedPair | None:
        """The (LoRA, salt) pair a root block with these tokens was stored under; None when ambiguous.

        ``event_salt`` / ``event_lora`` are what the event itself said, if the engine
        sends them (then only requests that match are candidates).
        """
        key = tuple(root_tokens[: self.block_size])
        entries = self._by_key.get(key)
        pairs: set[SeedPair] = set()
        if entries:
            self._purge_key(key, entries)
            pairs = {pair for pair, _ in entries.values()}
        if event_lora is not None:
            pairs = {p for p in pairs if p[0] == event_lora}
        if event_salt is not None:
            pairs = {p for p in pairs if p[1] == event_salt}
        if not pairs and (event_lora is not None or event_salt is not None):
            return (event_lora or "", event_salt or "")
        if not pairs:
            return ("", "")
        if len(pairs) == 1:
            return next(iter(pairs))
        return None

    def _purge_key(self, key: tuple[int, ...], entries: dict[int, tuple[SeedPair, float | None]]) -> None:
        now = self._clock.monotonic()
        for handle in [h for h, (_, exp) in entries.items() if exp is not None and exp <= now]:
            del entries[handle]
            del self._keys[handle]
            self._entries -= 1
        if not entries:
            del self._by_key[key]

    def _purge_all(self) -> None:
        for key, entries in list(self._by_key.items()):
            self._purge_key(key, entries)
