"""Active-load accounting per worker (DESIGN.md 4.4). Pure: time is passed in.

A request counts on its worker from routing until it ends:

- its *prefill tokens* (prompt minus the worker's cached prefix) until its
  first token (``prefill_done``);
- its *blocks* until it is freed (end, error, cancel), or force-expired after
  a timeout if nobody ever frees it.

Blocks are counted once per worker however many requests share them: full
prompt blocks by sequence hash with reference counts, plus each request's
unshareable partial last block. Because a sequence hash stands for a block
*and its whole prefix*, the blocks a new request shares with a worker's
running requests are always a leading run of its prompt, found with the same
masked-AND walk as the KV index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from commutator.router.indexer import WorkerKey, _MaskTable

__all__ = ["ActiveLoad", "ActiveRequest"]


@dataclass(slots=True)
class ActiveRequest:
    worker: WorkerKey
    prefill_tokens: int
    seq_hashes: Sequence[int]
    extra_blocks: int  # blocks beyond the shared full blocks (the partial last block)
    added_at: float
    prefill_done: bool = False
    owner: int = 0  # router that routed it (0: this one), for replica sync


class ActiveLoad:
    def __init__(self) -> None:
        self.requests: dict[str, ActiveRequest] = {}
        self.prefill_tokens: dict[WorkerKey, int] = {}
        self.active_blocks: dict[WorkerKey, int] = {}
        self.active_requests: dict[WorkerKey, int] = {}
        self._refs: dict[WorkerKey, dict[int, int]] = {}
        self._active = _MaskTable()  # sequence hash -> workers where the block is active

    def add(
        self,
        request_id: str,
        worker: WorkerKey,
        prefill_tokens: int,
        seq_hashes: Sequence[int],
        total_blocks: int,
        now: float,
        owner: int = 0,
    ) -> bool:
        """Count a routed request; False (nothing changed) if the id is already active."""
        if request_id in self.requests:
            return False
        refs = self._refs.setdefault(worker, {})
        slot = self._active.slot_for(worker)
        bit = self._active.bits[slot]
        table = self._active.table
        new_unique = 0
        for sh in seq_hashes:
            r = refs.get(sh, 0)
            if r == 0:
                new_unique += 1
                m = table.get(sh)
                table[sh] = bit if m is None else (m | bit)
            refs[sh] = r + 1
        extra = max(0, total_blocks - len(seq_hashes))
        self.requests[request_id] = ActiveRequest(worker, prefill_tokens, seq_hashes, extra, now, owner=owner)
        self.prefill_tokens[worker] = self.prefill_tokens.get(worker, 0) + prefill_tokens
        self.active_blocks[worker] = self.active_blocks.get(worker, 0) + new_unique + extra
        self.active_requests[worker] = self.active_requests.get(worker, 0) + 1
        return True

    def prefill_done(self, request_id: str) -> bool:
        """The request produced its first token: its prompt no longer loads prefill."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if not req.prefill_done:
            req.prefill_done = True
            self.prefill_tokens[req.worker] -= req.prefill_tokens
        return True

    def free(self, request_id: str) -> bool:
        """The request ended: drop everything it counted. False if it was not active."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        w = req.worker
        if not req.prefill_done:
            self.prefill_tokens[w] -= req.prefill_tokens
        refs = self._refs[w]
        table = self._active.table
        clear = ~self._active.bits[self._active.slots[w]]
        freed = 0
        for sh in req.seq_hashes:
            r = refs[sh] - 1
            if r:
                refs[sh] = r
            else:
                del refs[sh]
                freed += 1
                m = table[sh] & clear
                if m:
                    table[sh] = m
                else:
                    del table[sh]
        self.active_blocks[w] -= freed + req.extra_blocks
        self.active_requests[w] -= 1
        return True

    def expire(self, now: float, timeout_s: float) -> list[str]:
        """Free requests added more than ``timeout_s`` ago (their end was never reported)."""
        old = [rid for rid, r in self.requests.items() if now - r.added_at > timeout_s]
        for rid in old:
            self.free(rid)
        return old

    def free_owner(self, owner: int) -> int:
        """Free every request another router added (it left)."""
        gone = [rid for rid, r in self.requests.items() if r.owner == owner]
        for rid in gone:
            self.free(rid)
        return len(gone)

    def drop_worker(self, worker_id: int) -> int:
        """Forget the requests of a worker that left (their streams fail anyway)."""
        gone = [rid for rid, r in self.requests.items() if r.worker[0] == worker_id]
        for rid in gone:
            self.free(rid)
        for key in [k for k in self.active_blocks if k[0] == worker_id]:
            self.active_blocks.pop(key, None)
            self.prefill_tokens.pop(key, None)
            self.active_requests.pop(key, None)
            self._refs.pop(key, None)
            self._active._release_slot(key)
        return len(gone)

    def active_overlap(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """Per worker, how many leading prompt blocks are already active there."""
        return self._active.find_matches_seq(seq_hashes)
