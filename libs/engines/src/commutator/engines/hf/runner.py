"""The model side of the hf engine: load the model, run one pass, sample.

Everything here runs on the engine's one model thread (torch work never runs
on the event loop). A pass gets plain :class:`SeqWork` items, copied from the
scheduler's sequences on the loop before the pass starts, so the scheduler is
never read from this thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from commutator.engines.base import TokenLogprob
from commutator.engines.hf.attention import ATTENTION_NAME, PASS_KWARG, PassContext
from commutator.engines.hf.kv_cache import CacheGeometry, PagedKvCache
from commutator.engines.hf.sampling import SampleSpec, sample

__all__ = ["ModelRunner", "SeqWork", "default_cpu_threads"]


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a pass."""

    tokens: list[int]
    """The tokens to compute now."""
    start: int
    """Position of ``tokens[0]`` (tokens before it are in the cache)."""
    blocks: list[int]
    """The sequence's block ids, covering at least ``start + len(tokens)`` positions."""
    sample: SampleSpec | None = None
    """Set when the pass ends with this sequence choosing a token."""


def default_cpu_threads() -> int:
    """All cores this process may use but one, which the event loop (gRPC, streaming) keeps.

    torch's own default (every core) oversubscribes them: its OpenMP threads spin while the loop
    runs, and a tiny model decodes about 50 times slower on a busy 2-core machine.
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


class ModelRunner:
    """A loaded causal LM, its paged KV cache, and passes over both."""

    def __init__(self, model: torch.nn.Module, cache: PagedKvCache) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        self._decoder = model.get_decoder()  # type: ignore[operator]
        self._lm_head = model.get_output_embeddings()  # type: ignore[operator]

    @classmethod
    def load(
        cls,
        model_path: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        geometry: CacheGeometry,
        num_blocks: int,
        threads: int = 0,
    ) -> ModelRunner:
        """Load the weights onto ``device`` with the paged attention and allocate the cache."""
        from transformers import AutoModelForCausalLM

        if threads > 0:
            torch.set_num_threads(threads)
        elif device.type == "cpu":
            torch.set_num_threads(default_cpu_threads())
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, attn_implementation=ATTENTION_NAME)
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stubs miss this overload
        model.eval()
        return cls(model, PagedKvCache(geometry, num_blocks, device))

    def run(self, works: Sequence[SeqWork]) -> list[tuple[int, TokenLogprob | None]]:
        """Compute the pass (every token's KV into the cache) and sample one token per ``work.sample``."""
        bs = self.cache.geometry.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[tuple[int, int, int, list[int]]] = []
        rows: list[int] = []
        specs: list[SampleSpec] = []
        for w in works:
            begin = len(ids)
            ids.extend(w.tokens)
            end = len(ids)
            span = range(w.start, w.start + len(w.tokens))
            positions.extend(span)
            blocks = w.blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in span)
            seqs.append((begin, end, w.start, blocks))
            if w.sample is not None:
                rows.append(end - 1)
                specs.append(w.sample)
        dev = self.device
        with torch.inference_mode():
            ctx = PassContext.build(self.cache, seqs, slots)
            out = self._decoder(
                input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
                use_cache=False,
                **{PASS_KWARG: ctx},
            )
            if not rows:
                return []
            hidden = out.last_hidden_state[0, rows]
            logits = self._lm_head(hidden).float()
            return sample(logits, specs)

    def export_blocks(self, block_ids: Sequence[int]) -> bytes:
        return self.cache.export_blocks(block_ids)

    def import_blocks(self, block_ids: Sequence[int], data: bytes) -> None:
        self.cache.import_blocks(block_ids, data)
