"""The paged KV cache: per layer one K and one V tensor indexed by the block pool's block ids.

Layout: ``k[layer]`` and ``v[layer]`` are ``[num_blocks, block_size, kv_heads, head_dim]``;
token ``p`` of a sequence lives in block ``blocks[p // block_size]`` at offset
``p % block_size`` (its *slot* is ``block * block_size + offset``). The block pool
(:mod:`commutator.engines.mocker.block_pool`) owns the ids; this module only stores.

Export format (:meth:`PagedKvCache.export_blocks`): the given blocks, for every
layer in order, K then V, each block ``[block_size, kv_heads, head_dim]`` in the
cache's dtype, native byte order; ``bytes_per_block * len(blocks)`` bytes. Two
engines with the same model, dtype and block size exchange blocks byte for byte.

Layout for transfers that address the memory (:meth:`PagedKvCache.layout`, NIXL): the
``2 * num_layers`` tensors, in the order layer 0 K, layer 0 V, layer 1 K, ..., are the regions of
a :class:`~commutator.engines.base.KvLayout`; each is contiguous, so block ``b`` of a region is
the ``block_size * kv_heads * head_dim * element size`` bytes at ``data_ptr() + b * that``.

The cache starts zeroed: attention may read positions past a sequence's end
(masked out), and masked garbage that is NaN would still poison the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from commutator.engines.base import KvLayout

__all__ = ["CacheGeometry", "PagedKvCache"]


@dataclass(frozen=True, slots=True)
class CacheGeometry:
    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block in every layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * elem


class PagedKvCache:
    """K and V tensors of every layer. Used from the engine's model thread only."""

    def __init__(self, geometry: CacheGeometry, num_blocks: int, device: torch.device) -> None:
        g = geometry
        self.geometry = g
        self.num_blocks = num_blocks
        self.device = device
        shape = (num_blocks, g.block_size, g.kv_heads, g.head_dim)
        self.k = [torch.zeros(shape, dtype=g.dtype, device=device) for _ in range(g.num_layers)]
        self.v = [torch.zeros(shape, dtype=g.dtype, device=device) for _ in range(g.num_layers)]

    def layout(self) -> KvLayout:
        """Where the blocks are (the layout above); the zeroing has finished on the device when it returns."""
        g = self.geometry
        regions = [t for layer in range(g.num_layers) for t in (self.k[layer], self.v[layer])]
        assert all(t.is_contiguous() for t in regions)
        device_id = 0
        if self.device.type == "cuda":
            device_id = regions[0].get_device()
            # A transfer writes behind the device's back: the zeroing kernels must not land after it.
            torch.cuda.synchronize(device_id)
        return KvLayout(
            device=self.device.type,
            device_id=device_id,
            regions=tuple(t.data_ptr() for t in regions),
            block_bytes=regions[0][0].numel() * regions[0].element_size(),
            num_blocks=self.num_blocks,
        )

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key``/``value`` (``[tokens, kv_heads, head_dim]``) at ``slots`` (one per token)."""
        g = self.geometry
        self.k[layer].view(-1, g.kv_heads, g.head_dim).index_copy_(0, slots, key)
        self.v[layer].view(-1, g.kv_heads, g.head_dim).index_copy_(0, slots, value)

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        bad = next((b for b in block_ids if not 0 <= b < self.num_blocks), None)
        if bad is not None:
            raise ValueError(f"block id {bad} is outside the cache [0, {self.num_blocks})")
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def export_blocks(self, block_ids: Sequence[int]) -> bytes:
        """The K/V of ``block_ids`` in every layer (the export format above)."""
        ids = self._ids(block_ids)
        parts = [t.index_select(0, ids) for layer in range(len(self.k)) for t in (self.k[layer], self.v[layer])]
        data = torch.stack(parts).contiguous().view(torch.uint8).cpu()
        return data.numpy().tobytes()

    def import_blocks(self, block_ids: Sequence[int], data: bytes) -> None:
        """Write exported K/V (from an engine with the same geometry) into ``block_ids``."""
        g = self.geometry
        expected = g.bytes_per_block * len(block_ids)
        if len(data) != expected:
            raise ValueError(
                f"{len(data)} bytes of KV for {len(block_ids)} blocks; this cache takes {g.bytes_per_block}"
                " bytes per block (same model, dtype and block size on both sides)"
            )
        ids = self._ids(block_ids)
        if not block_ids:
            return
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        shape = (2 * g.num_layers, len(block_ids), g.block_size, g.kv_heads, g.head_dim)
        blocks = raw.view(g.dtype).view(shape).to(self.device)
        for layer in range(g.num_layers):
            self.k[layer].index_copy_(0, ids, blocks[2 * layer])
            self.v[layer].index_copy_(0, ids, blocks[2 * layer + 1])
