"""Attention over the paged KV cache, plugged into the model's own forward.

transformers lets a model's attention layers call a registered function
(``AttentionInterface``) with the query, key and value they computed (after
their projections, norms and rotary embedding). This module registers
:func:`paged_attention` under :data:`ATTENTION_NAME`; the engine loads the
model with ``attn_implementation=ATTENTION_NAME`` and calls its decoder on all
the pass's tokens packed as one row (``[1, tokens]``, with each token's real
position), passing a :class:`PassContext` that says which tokens belong to
which sequence and where their KV lives. For a custom attention name
transformers builds no mask; this function masks itself.

Per layer: the pass's new K/V go into their slots first, then

- a sequence prefilling from position 0 attends causally over its own new tokens;
- a chunk that continues a sequence (a later prefill chunk, or after a prefix-cache
  hit) attends over the cached K/V of its blocks, causally offset;
- sequences decoding one token attend together: their blocks gathered into one
  padded batch, positions past each one's length masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from commutator.engines.hf.kv_cache import PagedKvCache
from torch.nn import functional
from transformers import AttentionInterface

__all__ = ["ATTENTION_NAME", "PassContext", "Segment", "paged_attention"]

ATTENTION_NAME = "commutator_paged"
PASS_KWARG = "commutator_pass"
"""The keyword argument that carries the :class:`PassContext` through the model's forward."""


@dataclass(slots=True)
class Segment:
    """The tokens ``begin:end`` of the packed row: one sequence's positions ``start .. start + end - begin``."""

    begin: int
    end: int
    start: int
    blocks: torch.Tensor | None = None
    """Block ids covering positions ``0 .. start + end - begin`` (only when ``start > 0``)."""
    mask: torch.Tensor | None = None
    """``[new, context]`` causal mask, offset by ``start`` (only for a chunk of several tokens after ``start > 0``)."""


@dataclass(slots=True)
class PassContext:
    cache: PagedKvCache
    slots: torch.Tensor
    """Cache slot of every token of the row."""
    segments: list[Segment]
    """Sequences attended one by one (prefill and continued chunks)."""
    decode_rows: torch.Tensor | None = None
    """Row indices of the sequences decoding one token, attended as one batch."""
    decode_blocks: torch.Tensor | None = None
    """``[decoders, max blocks]`` block tables (padded with block 0)."""
    decode_mask: torch.Tensor | None = None
    """``[decoders, 1, 1, max blocks * block_size]``: True up to each one's length."""

    @classmethod
    def build(cls, cache: PagedKvCache, seqs: list[tuple[int, int, int, list[int]]], slots: list[int]) -> PassContext:
        """From ``(begin, end, start, block ids)`` of each sequence in the packed row."""
        device = cache.device
        bs = cache.geometry.block_size
        segments: list[Segment] = []
        decoders: list[tuple[int, int, list[int]]] = []
        for begin, end, start, blocks in seqs:
            n = end - begin
            length = start + n
            if n == 1 and start > 0:
                decoders.append((begin, length, blocks[: -(-length // bs)]))
                continue
            seg = Segment(begin, end, start)
            if start > 0:
                seg.blocks = torch.tensor(blocks[: -(-length // bs)], dtype=torch.long, device=device)
                cols = torch.arange(length, device=device)
                rows = torch.arange(start, length, device=device)
                seg.mask = cols[None, :] <= rows[:, None]
            segments.append(seg)
        ctx = cls(cache, torch.tensor(slots, dtype=torch.long, device=device), segments)
        if decoders:
            width = max(len(b) for _, _, b in decoders)
            table = [b + [0] * (width - len(b)) for _, _, b in decoders]
            lengths = torch.tensor([length for _, length, _ in decoders], device=device)
            ctx.decode_rows = torch.tensor([row for row, _, _ in decoders], dtype=torch.long, device=device)
            ctx.decode_blocks = torch.tensor(table, dtype=torch.long, device=device)
            positions = torch.arange(width * bs, device=device)
            ctx.decode_mask = (positions[None, :] < lengths[:, None])[:, None, None, :]
        return ctx


def _gather(cache_layer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``[..., blocks]`` block ids -> ``[..., kv_heads, blocks * block_size, head_dim]``."""
    got = cache_layer[blocks]  # [..., n, block_size, kv_heads, head_dim]
    got = got.flatten(-4, -3)  # [..., n * block_size, kv_heads, head_dim]
    return got.transpose(-3, -2)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[1, heads, tokens, head_dim]``, ``key``/``value`` ``[1, kv_heads, tokens, head_dim]``
    -> ``[1, tokens, heads, head_dim]`` (the shape transformers' own attention functions return)."""
    ctx: PassContext | None = kwargs.get(PASS_KWARG)
    if ctx is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the hf engine's passes")
    layer: int = module.layer_idx  # type: ignore[assignment]
    cache = ctx.cache
    cache.write(layer, ctx.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    k_layer, v_layer = cache.k[layer], cache.v[layer]
    q = query[0]  # [heads, tokens, head_dim]
    out = torch.empty_like(q)
    for seg in ctx.segments:
        b, e = seg.begin, seg.end
        qs = q[None, :, b:e]
        if seg.blocks is None:  # a prompt from its first token: only its own new tokens
            o = functional.scaled_dot_product_attention(
                qs, key[:, :, b:e], value[:, :, b:e], is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            length = seg.start + e - b
            ks = _gather(k_layer, seg.blocks)[None, :, :length]
            vs = _gather(v_layer, seg.blocks)[None, :, :length]
            o = functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, scale=scaling, enable_gqa=True)
        out[:, b:e] = o[0]
    if ctx.decode_rows is not None:
        assert ctx.decode_blocks is not None
        qd = q[:, ctx.decode_rows].transpose(0, 1)[:, :, None]  # [decoders, heads, 1, head_dim]
        kd = _gather(k_layer, ctx.decode_blocks)
        vd = _gather(v_layer, ctx.decode_blocks)
        od = functional.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=ctx.decode_mask, scale=scaling, enable_gqa=True
        )
        out[:, ctx.decode_rows] = od[:, :, 0].transpose(0, 1)
    return out.transpose(0, 1)[None], None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
