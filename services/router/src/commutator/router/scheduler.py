"""Worker selection: candidates, busy thresholds, hashing, index lookup, policy (pure).

:meth:`Scheduler.route` is the whole routing decision for one request, with
per-stage timings for the metrics; :meth:`Scheduler.track` counts a routed
request's load. The async shell (:mod:`commutator.router.core`) feeds it
workers, load statistics and KV events, and owns the clock.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from commutator.common.hashing import block_hash_seed, local_block_hashes, sequence_hashes
from commutator.router.indexer import ApproxIndexer, KvIndexer, WorkerKey
from commutator.router.load import ActiveLoad
from commutator.router.policies import DirectPolicy, RouteContext, RoutingPolicy

__all__ = ["Outcome", "RouteResult", "Scheduler", "WorkerView"]

log = logging.getLogger(__name__)

_DIRECT = DirectPolicy()


class Outcome(enum.Enum):
    ROUTED = "routed"
    ALL_BUSY = "all_busy"  # every worker over a busy threshold: the frontend answers 529
    NO_WORKERS = "no_workers"  # nobody serves the model: 503


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker rank as the router sees it (from its registration)."""

    key: WorkerKey
    address: str
    model: str
    block_size: int
    kv_capacity_blocks: int


@dataclass(slots=True)
class RouteResult:
    outcome: Outcome
    worker: WorkerView | None = None
    overlap_blocks: int = 0
    prompt_blocks: int = 0
    isl: int = 0
    block_size: int = 0
    seq_hashes: Sequence[int] = ()
    hash_s: float = 0.0
    match_s: float = 0.0
    select_s: float = 0.0
    costs: list[float] | None = field(default=None, repr=False)
    arm: int | None = None  # adaptive routing: the arm it was routed with (see RouteContext.arm)
    contested: bool = False  # adaptive routing: whether the arms disagreed

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the chosen worker has to compute (its cached prefix excluded)."""
        return max(0, self.isl - self.overlap_blocks * self.block_size)

    @property
    def predicted_hit_blocks(self) -> int:
        """Prompt blocks the chosen worker should report cached: its overlap, at most all but the last
        block (an engine computes a prompt's last token whatever it has cached, so it never counts
        that block as a hit)."""
        bs = self.block_size
        return min(self.overlap_blocks, (self.isl - 1) // bs) if bs and self.isl else 0


class Scheduler:
    def __init__(
        self,
        policy: RoutingPolicy,
        indexer: KvIndexer | ApproxIndexer | None,
        *,
        busy_kv_usage: float = 0.0,
        busy_prefill_tokens: int = 0,
        block_size: int = 0,
    ) -> None:
        self.policy = policy
        self.indexer = indexer
        self.busy_kv_usage = busy_kv_usage
        self.busy_prefill_tokens = busy_prefill_tokens
        self.fixed_block_size = block_size
        self.workers: dict[WorkerKey, WorkerView] = {}
        self.kv_usage: dict[WorkerKey, float] = {}
        self.load = ActiveLoad()
        self.inhibited: set[int] = set()
        """Worker ids that failed a connection: kept out of routing until discovery drops them
        or they answer a health check again (:meth:`inhibit`, :meth:`lift`)."""
        self._by_model: dict[str, list[WorkerKey]] = {}
        self._all: list[WorkerKey] = []

    # -- the worker set -------------------------------------------------------------------
    def add_worker(self, view: WorkerView) -> None:
        self.workers[view.key] = view
        self._rebuild()

    def remove_worker(self, worker_id: int) -> None:
        """A worker left discovery: forget it, its index entries and its load, at once."""
        for key in [k for k in self.workers if k[0] == worker_id]:
            del self.workers[key]
            self.kv_usage.pop(key, None)
        if self.indexer is not None:
            self.indexer.remove_worker(worker_id)
        self.load.drop_worker(worker_id)
        self.inhibited.discard(worker_id)
        self._rebuild()

    def inhibit(self, worker_id: int) -> bool:
        """Keep a worker out of routing (it could not be reached). False if it already was, or is unknown."""
        if worker_id in self.inhibited or not any(k[0] == worker_id for k in self.workers):
            return False
        self.inhibited.add(worker_id)
        self._rebuild()
        return True

    def lift(self, worker_id: int) -> bool:
        """Route to an inhibited worker again. False if it was not inhibited."""
        if worker_id not in self.inhibited:
            return False
        self.inhibited.discard(worker_id)
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        by_model: dict[str, list[WorkerKey]] = {}
        routable: list[WorkerKey] = []
        for key, view in sorted(self.workers.items()):
            if key[0] in self.inhibited:
                continue
            by_model.setdefault(view.model, []).append(key)
            routable.append(key)
        self._by_model = by_model
        self._all = routable

    def update_usage(self, key: WorkerKey, used_blocks: int, total_blocks: int) -> None:
        if key in self.workers and total_blocks > 0:
            self.kv_usage[key] = used_blocks / total_blocks

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def candidates(self, model: str) -> list[WorkerKey]:
        """The routable worker ranks of ``model`` (every model's when empty), inhibited ones left out."""
        if model:
            return self._by_model.get(model, [])
        return self._all

    def _busy(self, key: WorkerKey) -> bool:
        if self.busy_kv_usage > 0 and self.kv_usage.get(key, 0.0) >= self.busy_kv_usage:
            return True
        return self.busy_prefill_tokens > 0 and self.load.prefill_tokens.get(key, 0) >= self.busy_prefill_tokens

    # -- routing ----------------------------------------------------------------------------
    def hash_prompt(
        self, token_ids: Sequence[int], block_size: int, lora_name: str = "", cache_salt: str = ""
    ) -> list[int]:
        return sequence_hashes(local_block_hashes(token_ids, block_size, block_hash_seed(lora_name, cache_salt)))

    def route(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str = "",
        cache_salt: str = "",
        requested: WorkerKey | None = None,
    ) -> RouteResult:
        """Choose a worker. Raises ``ValueError`` for token ids that are not uint32."""
        t0 = time.perf_counter()
        all_candidates = self.candidates(model)
        if not all_candidates:
            return RouteResult(Outcome.NO_WORKERS)
        if self.busy_kv_usage > 0 or self.busy_prefill_tokens > 0:
            candidates = [c for c in all_candidates if not self._busy(c)]
            if not candidates:
                return RouteResult(Outcome.ALL_BUSY)
        else:
            candidates = all_candidates
        bs = self.fixed_block_size or self.workers[candidates[0]].block_size
        isl = len(token_ids)
        ctx = RouteContext(isl=isl, block_size=bs, load=self.load, requested=requested)
        seq: Sequence[int] = ()
        t1 = t2 = t0
        needs_hashes = self.policy.needs_overlap or isinstance(self.indexer, ApproxIndexer)
        if needs_hashes:
            seq = self.hash_prompt(token_ids, bs, lora_name, cache_salt)
            t1 = time.perf_counter()
            if self.indexer is not None:
                ctx.overlaps = self.indexer.find_matches_seq(seq)
            if self.policy.needs_overlap:
                ctx.active_overlaps = self.load.active_overlap(seq)
            t2 = time.perf_counter()
        # A caller that names a worker gets it (if it is a candidate), whatever the mode.
        choice = _DIRECT.choose(ctx, candidates) if requested is not None else self.policy.choose(ctx, candidates)
        t3 = time.perf_counter()
        if choice is None:
            return RouteResult(Outcome.NO_WORKERS, hash_s=t1 - t0 if needs_hashes else 0.0)
        return RouteResult(
            Outcome.ROUTED,
            worker=self.workers[choice],
            overlap_blocks=ctx.overlaps.get(choice, 0),
            prompt_blocks=isl // bs,
            isl=isl,
            block_size=bs,
            seq_hashes=seq,
            hash_s=(t1 - t0) if needs_hashes else 0.0,
            match_s=(t2 - t1) if needs_hashes else 0.0,
            select_s=t3 - (t2 if needs_hashes else t0),
            costs=ctx.costs,
            arm=ctx.arm,
            contested=ctx.contested,
        )

    def track(self, request_id: str, result: RouteResult, now: float, owner: int = 0) -> bool:
        """Count a routed request's load (and, in approximate mode, remember where its prompt went)."""
        assert result.worker is not None
        if isinstance(self.indexer, ApproxIndexer) and result.seq_hashes:
            self.indexer.insert(result.worker.key, result.seq_hashes, now)
        return self.load.add(
            request_id,
            result.worker.key,
            result.prefill_tokens,
            result.seq_hashes,
            -(-result.isl // result.block_size) if result.block_size else 0,
            now,
            owner,
        )

    def overlaps(
        self, token_ids: Sequence[int], block_size: int, lora_name: str = "", cache_salt: str = ""
    ) -> dict[WorkerKey, int]:
        if self.indexer is None:
            return {}
        return self.indexer.find_matches_seq(self.hash_prompt(token_ids, block_size, lora_name, cache_salt))
