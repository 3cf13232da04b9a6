"""Paged chunk (prefill) attention against its reference: causal inside the chunk, arbitrary visible lengths."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_chunk_attention import paged_chunk_attention, paged_chunk_attention_reference
from kernels.paged_kv import paged_decode_attention_reference
from tests.helpers import assert_close, random_pool, random_tables



@pytest.mark.parametrize(
    "block_size,cached,chunk,heads",
    [
        (4, [0, 3, 16, 9], [5, 0, 1, 7], (4, 2)),  # an empty chunk, a fresh sequence, an exact block boundary
        (1, [2, 0], [3, 11], (2, 2)),
        (16, [17, 1, 0], [13, 2, 19], (14, 2)),  # chunks spanning several 16-query tiles with GQA 7
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_attention_is_causal_inside_the_chunk(block_size, cached, chunk, heads, dtype):
    q_heads, kv_heads = heads
    head_dim = 16
    totals = [c + n for c, n in zip(cached, chunk)]
    blocks_per_row = max(1, -(-max(totals) // block_size))
    num_blocks = blocks_per_row * len(chunk) + 1
    key_cache, value_cache = random_pool(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = random_tables(len(chunk), blocks_per_row, num_blocks)
    starts = [0]
    for n in chunk:
        starts.append(starts[-1] + n)
    visible = torch.tensor([c + i + 1 for c, n in zip(cached, chunk) for i in range(n)], dtype=torch.int32)
    q = torch.randn(starts[-1], q_heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    query_start = torch.tensor(starts, dtype=torch.int32)
    out = paged_chunk_attention(
        q, key_cache, value_cache, tables, query_start, visible, max_query_len=max(chunk), block_m=16, block_n=16
    )
    ref = paged_chunk_attention_reference(q, key_cache, value_cache, tables, query_start, visible)
    assert_close(out, ref, dtype, "chunk vs reference")
    # causal: query i of a chunk equals one-query decode attention over cached + i + 1 positions
    rows = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor(chunk))
    dec = paged_decode_attention_reference(q, key_cache, value_cache, tables[rows], visible)
    assert_close(ref, dec, torch.float32, "chunk reference vs per-query decode reference")


def test_chunk_attention_with_arbitrary_visible_lengths():
    key_cache, value_cache = random_pool(8, 4, 1, 16, torch.float32)
    tables = torch.tensor([[3, 1, 6, 0], [2, 5, 7, 4]], dtype=torch.int32)
    visible = torch.tensor([9, 2, 14, 1, 16, 5], dtype=torch.int32)  # not monotonic inside a sequence
    query_start = torch.tensor([0, 3, 6], dtype=torch.int32)
    q = torch.randn(6, 3, 16)
    out = paged_chunk_attention(q, key_cache, value_cache, tables, query_start, visible, max_query_len=3, block_m=16)
    ref = paged_chunk_attention_reference(q, key_cache, value_cache, tables, query_start, visible)
    assert_close(out, ref, torch.float32, "chunk vs reference")


