"""The paged runner's attention functions for the decoder-layer stack (`engine.model.layers.Attention`).

Each layer rotates q and k (through the ops table), writes the tokens' K/V at their slots of the paged cache before
it attends, so tokens of one call see each other through the cache, then attends with a paged kernel: one query per
row (`paged_decode_attention`, split-K) for a one-position step, packed chunks (`paged_chunk_attention`, causal
inside the chunk) for a multi-position pass.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.model.paged.cache import PagedKVCache
from kernels.decode_fusions import rotary_kv_write
from kernels.paged_kv import paged_kv_write

# attend(q (N, q_heads, D), key_cache, value_cache) -> (N, q_heads, D)
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# rotate_attend(q, k, v, cos, sin, key_cache, value_cache, slots) -> (N, q_heads, D): rotary, cache write and
# attention in one kernel (`kernels.decode_fusions.rotary_paged_decode_attention`), for one-position steps
RotateAttendFn = Callable[..., torch.Tensor]


class PagedAttention:
    """``attention(index, q, k, v, cos, sin)`` over a `PagedKVCache`: q, k, v are (N, heads, head_dim) packed
    tokens whose K/V go to ``slots`` (N,) (slot -1: written nowhere). ``rotate_attend`` (one-position steps with the
    fused ops): the rotary embedding, the cache write and the attention in one kernel instead of two.
    ``sums_partial_qkv`` (with ``rotate_attend``): q, k, v may come as the q/k/v product's split-K partial sums,
    (splits, N, heads, head_dim) fp32, which that kernel sums (`engine.model.layers.run_layers` asks the ops table
    for them)."""

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, attend: AttendFn, ops,
                 rotate_attend: RotateAttendFn | None = None, sums_partial_qkv: bool = False):  # fmt: skip
        if sums_partial_qkv and rotate_attend is None:
            raise ValueError("sums_partial_qkv needs rotate_attend: only the one-kernel attention sums partial products")
        self.cache, self.slots, self.attend, self.ops = cache, slots, attend, ops
        self.rotate_attend = rotate_attend
        self.sums_partial_qkv = sums_partial_qkv

    def __call__(self, index, q, k, v, cos, sin):
        key_cache, value_cache = self.cache.layer(index)
        if q.dim() == 4:  # split-K partial sums (see the class docstring)
            if not self.sums_partial_qkv:
                raise ValueError(f"q {tuple(q.shape)}: partial sums given to an attention that does not sum them")
            return self.rotate_attend(q, k, v, cos, sin, key_cache, value_cache, self.slots)
        if self.ops.fuses_cache_write and k.dtype == key_cache.dtype:
            if self.rotate_attend is not None and q.dtype == key_cache.dtype:
                return self.rotate_attend(q, k, v, cos, sin, key_cache, value_cache, self.slots)
            q = rotary_kv_write(q, k, v, cos, sin, key_cache, value_cache, self.slots)  # k, v straight to the cache
        else:  # also layers in another dtype than the cache: the write rounds k and v to it
            q, k = self.ops.rotary(q, k, cos, sin)
            paged_kv_write(k, v, key_cache, value_cache, self.slots)
        return self.attend(q, key_cache, value_cache)
