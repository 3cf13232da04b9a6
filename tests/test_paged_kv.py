"""Paged KV cache: write kernel, paged decode/chunk attention against their references, the block pool, sharing."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_kv import (
    BlockAllocator,
    PagedKVCache,
    PoolExhaustedError,
    gather_kv,
    image_digest,
    paged_chunk_attention,
    paged_chunk_attention_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_kv_write,
    paged_kv_write_reference,
    prefix_block_hashes,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: output rounding (8 bits) of O(1) values


def random_pool(num_blocks, block_size, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def random_tables(rows, blocks_per_row, num_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_blocks, generator=g)[:blocks_per_row] for _ in range(rows)]).int()


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    err = (actual.float() - expected.float()).abs()
    worst = err.argmax().item()
    assert err.max() <= tol, f"{what}: max error {err.max():.3g} > {tol} at flat index {worst} of {tuple(err.shape)}"


# ----------------------------------------------------------------------------------------------- write kernel


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_matches_reference_and_skips_padding(block_size, num_tokens, dtype):
    kv_heads, head_dim, num_blocks = 2, 16, 64 // block_size + 3
    key_cache, value_cache = random_pool(num_blocks, block_size, kv_heads, head_dim, dtype)
    g = torch.Generator().manual_seed(1)
    key = torch.randn(num_tokens, kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(num_tokens, kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1  # padding tokens
    k1, v1 = key_cache.clone(), value_cache.clone()
    paged_kv_write(key, value, k1, v1, slots)
    k2, v2 = key_cache.clone(), value_cache.clone()
    paged_kv_write_reference(key, value, k2, v2, slots)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # padding slots changed nothing: every slot not written still holds the original content
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat = k1.reshape(-1, kv_heads, head_dim)
    assert torch.equal(flat[~written], key_cache.reshape(-1, kv_heads, head_dim)[~written])


def test_write_rounds_to_the_cache_dtype_and_accepts_strided_inputs():
    key_cache, value_cache = random_pool(4, 4, 2, 16, torch.bfloat16)
    fused = torch.randn(5, 2, 32)  # key and value as halves of one projection: strided views
    key, value = fused[..., :16], fused[..., 16:]
    slots = torch.tensor([0, 5, -1, 15, 9])
    k1, v1 = key_cache.clone(), value_cache.clone()
    paged_kv_write(key, value, k1, v1, slots)
    k2, v2 = key_cache.clone(), value_cache.clone()
    paged_kv_write_reference(key, value, k2, v2, slots)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ----------------------------------------------------------------------------------------------- decode attention

DECODE_CASES = [
    # block_size, context lengths (1, primes, exact block boundaries), (q_heads, kv_heads), head_dim
    (1, [1, 7, 13], (2, 2), 16),
    (4, [4, 1, 17], (4, 2), 16),
    (16, [16, 33, 1], (14, 2), 16),
    (16, [31, 32, 5], (7, 1), 64),
]


@pytest.mark.parametrize("block_size,context,heads,head_dim", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa_on_the_gathered_cache(block_size, context, heads, head_dim, dtype):
    q_heads, kv_heads = heads
    blocks_per_row = -(-max(context) // block_size)
    num_blocks = blocks_per_row * len(context) + 2
    key_cache, value_cache = random_pool(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = random_tables(len(context), blocks_per_row, num_blocks)
    lens = torch.tensor(context, dtype=torch.int32)
    q = torch.randn(len(context), q_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = paged_decode_attention(q, key_cache, value_cache, tables, lens, num_splits=1, block_n=16)
    ref = paged_decode_attention_reference(q, key_cache, value_cache, tables, lens)
    assert_close(out, ref, dtype, "decode vs reference")
    # The reference itself against torch SDPA on the gathered cache (enable_gqa), row by row.
    for b, n in enumerate(context):
        k = gather_kv(key_cache, tables[b], n).float().transpose(0, 1)[None]  # (1, Hkv, n, D)
        v = gather_kv(value_cache, tables[b], n).float().transpose(0, 1)[None]
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[b].float()[None, :, None], k, v, enable_gqa=True)
        assert_close(ref[b], sdpa[0, :, 0], dtype, f"reference vs SDPA row {b}")


@pytest.mark.parametrize("block_size,context,heads,head_dim", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_with_dots_in_the_cache_dtype(block_size, context, heads, head_dim, num_splits):
    """dot_in_cache_dtype: bf16 operands (q and the probabilities rounded to bf16), fp32 accumulation; within the
    bf16 tolerance of the reference. On an fp32 cache the option changes nothing."""
    q_heads, kv_heads = heads
    blocks_per_row = -(-max(context) // block_size)
    num_blocks = blocks_per_row * len(context) + 1
    tables = random_tables(len(context), blocks_per_row, num_blocks)
    lens = torch.tensor(context, dtype=torch.int32)
    for dtype in (torch.bfloat16, torch.float32):
        key_cache, value_cache = random_pool(num_blocks, block_size, kv_heads, head_dim, dtype)
        q = torch.randn(len(context), q_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
        args = (q, key_cache, value_cache, tables, lens)
        out = paged_decode_attention(*args, num_splits=num_splits, block_n=16, dot_in_cache_dtype=True)
        assert_close(out, paged_decode_attention_reference(*args), dtype, f"{dtype} dots in the cache dtype")
        wide = paged_decode_attention(*args, num_splits=num_splits, block_n=16)
        if dtype == torch.float32:
            assert torch.equal(out, wide)
        elif max(context) > 1:  # the probabilities were rounded to bf16: the option really took effect
            assert not torch.equal(out, wide)


@pytest.mark.parametrize("block_size,context", [(4, [1, 29, 64, 37]), (16, [80, 3, 49, 16])])
def test_split_k_equals_no_split(block_size, context):
    q_heads, kv_heads, head_dim = 4, 2, 16
    blocks_per_row = -(-max(context) // block_size)
    num_blocks = blocks_per_row * len(context)
    key_cache, value_cache = random_pool(num_blocks, block_size, kv_heads, head_dim, torch.float32)
    tables = random_tables(len(context), blocks_per_row, num_blocks)
    lens = torch.tensor(context, dtype=torch.int32)
    q = torch.randn(len(context), q_heads, head_dim)
    whole = paged_decode_attention(q, key_cache, value_cache, tables, lens, num_splits=1, block_n=16)
    for splits in (2, 3, 7):  # 7 splits of 16-token tiles leave some splits empty for the short rows
        split = paged_decode_attention(q, key_cache, value_cache, tables, lens, num_splits=splits, block_n=16)
        assert_close(split, whole, torch.float32, f"{splits} splits vs 1")


def test_decode_zero_context_rows_give_zeros():
    key_cache, value_cache = random_pool(4, 4, 2, 16, torch.float32)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    q = torch.randn(2, 4, 16)
    for splits in (1, 2):
        out = paged_decode_attention(q, key_cache, value_cache, tables, lens, num_splits=splits, block_n=16)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()
        ref = paged_decode_attention_reference(q, key_cache, value_cache, tables, lens)
        assert_close(out[1], ref[1], torch.float32, f"row 1 with {splits} splits")


# ----------------------------------------------------------------------------------------------- chunk attention


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


# ----------------------------------------------------------------------------------------------- the pool


def make_cache(num_blocks=16, block_size=4, sharing=True, layers=2):
    return PagedKVCache(
        num_layers=layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=2,
        head_dim=16,
        enable_prefix_sharing=sharing,
    )


def test_allocator_refcounts_and_free_list():
    alloc = BlockAllocator(4, 16)
    a, b = alloc.allocate(2)
    assert alloc.num_free == 2 and alloc.ref_counts[a] == 1
    alloc.share(a)
    alloc.release(a)
    assert alloc.num_free == 2, "a block with references left must stay allocated"
    alloc.release(a)
    assert alloc.num_free == 3 and alloc.ref_counts[a] == 0
    with pytest.raises(ValueError, match="already free"):
        alloc.release(a)
    with pytest.raises(ValueError, match="is free"):
        alloc.share(a)
    alloc.register(b, b"h")
    assert alloc.lookup(b"h") == b
    alloc.release(b)
    assert alloc.lookup(b"h") is None, "a freed block must leave the hash table"


def test_pool_exhaustion_raises_with_the_documented_message():
    cache = make_cache(num_blocks=4, block_size=4)
    cache.add_sequence(0)
    cache.reserve(0, 10)  # 3 blocks
    cache.add_sequence(1)
    with pytest.raises(PoolExhaustedError, match=r"2 block\(s\) of 4 tokens needed, 1 free of 4.*num_blocks >= 5"):
        cache.reserve(1, 5)
    assert cache.num_used_blocks == 3 and cache.tables[1] == [], "a failed reserve must allocate nothing"
    cache.free_all()
    assert cache.num_free_blocks == 4


def fill_sequence(cache, seq, start, end, seed):
    """Write deterministic K/V for positions [start, end) of `seq` (a function of the position and `seed`)."""
    g = torch.Generator().manual_seed(seed)
    full_k = torch.randn(64, 2, 16, generator=g)
    full_v = torch.randn(64, 2, 16, generator=g)
    slots = torch.tensor([cache.slot(seq, p) for p in range(start, end)])
    for layer in range(cache.num_layers):
        key_cache, value_cache = cache.layer(layer)
        paged_kv_write(full_k[start:end] + layer, full_v[start:end] + layer, key_cache, value_cache, slots)


def test_prefix_sharing_on_and_off_give_identical_attention_with_fewer_blocks():
    block_size, prompt = 4, list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    digest = image_digest(torch.ones(1, 3, 8, 8))
    results = {}
    for sharing in (False, True):
        cache = make_cache(block_size=block_size, sharing=sharing)
        lengths = [len(prompt) + 2, len(prompt) + 5]  # two rows: the same image and prompt, different tails
        shared = []
        for seq, n in enumerate(lengths):
            shared.append(cache.add_sequence(seq, prompt[:-1], seed=digest))
            cache.reserve(seq, n)
        for seq, n in enumerate(lengths):
            # K/V as a function of the position only: what two rows with the same prompt compute
            fill_sequence(cache, seq, shared[seq], n, seed=0)
        tables = cache.block_table([0, 1])
        q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(5))
        lens = torch.tensor(lengths, dtype=torch.int32)
        key_cache, value_cache = cache.layer(1)
        out = paged_decode_attention(q, key_cache, value_cache, tables, lens)
        results[sharing] = (out, cache.num_used_blocks, shared)
    out_off, used_off, shared_off = results[False]
    out_on, used_on, shared_on = results[True]
    assert shared_off == [0, 0] and shared_on == [0, 8], "row 1 should reuse the 2 full prompt blocks of row 0"
    assert used_on == used_off - 2
    assert torch.equal(out_on, out_off)


def test_sharing_needs_the_same_image_and_the_same_tokens():
    cache = make_cache(block_size=4)
    img_a, img_b = image_digest(torch.zeros(1, 3, 4, 4)), image_digest(torch.ones(1, 3, 4, 4))
    prompt = list(range(12))
    cache.add_sequence(0, prompt, seed=img_a)
    cache.reserve(0, 12)
    assert cache.add_sequence(1, prompt, seed=img_b) == 0, "another image must not share"
    other = prompt[:5] + [999] + prompt[6:]  # differs inside block 1
    assert cache.add_sequence(2, other, seed=img_a) == 4, "only the blocks before the first difference are shared"
    assert cache.add_sequence(3, prompt, seed=img_a) == 12
    assert cache.allocator.ref_counts[cache.tables[0][0]] == 3
    for seq in (1, 2, 3, 0):
        cache.free_sequence(seq)
    assert cache.num_used_blocks == 0
    assert cache.add_sequence(4, prompt, seed=img_a) == 0, "blocks freed at refcount 0 must not be found again"
    assert prefix_block_hashes(prompt, 4, img_a)[:1] == prefix_block_hashes(other, 4, img_a)[:1]


def test_fork_copies_the_shared_partial_block_on_write():
    cache = make_cache(block_size=4)
    cache.add_sequence(0)
    cache.reserve(0, 6)  # blocks: one full, one holding positions 4, 5
    fill_sequence(cache, 0, 0, 6, seed=1)
    cache.fork(0, 1)
    full, partial = cache.tables[0]
    assert cache.tables[1] == [full, partial] and cache.allocator.ref_counts[partial] == 2
    before = cache.key[:, partial].clone()
    changed = cache.reserve(1, 7)  # the child writes position 6 into the shared partial block: copy first
    new = cache.tables[1][1]
    assert changed == [(1, new)] and new != partial
    assert cache.tables[1][0] == full, "full blocks stay shared"
    assert cache.allocator.ref_counts[partial] == 1 and cache.allocator.ref_counts[full] == 2
    assert torch.equal(cache.key[:, new, :2], before[:, :2])
    assert torch.equal(cache.value[:, new, :2], cache.value[:, partial, :2])
    fill_sequence(cache, 1, 6, 7, seed=2)
    assert torch.equal(cache.key[:, partial], before), "the parent's block must not see the child's write"
    assert cache.reserve(0, 7) == [], "the parent now owns its partial block alone: no copy"
    cache.free_all()
    assert cache.num_used_blocks == 0


def test_image_digest_follows_the_pixels():
    a = torch.randn(2, 3, 8, 8)
    assert image_digest(a) == image_digest(a.clone())
    b = a.clone()
    b[1, 2, 7, 7] += 1e-3
    assert image_digest(a) != image_digest(b)
    assert image_digest(None) == b""
    assert image_digest(a.bfloat16()) != image_digest(a)


@pytest.mark.parametrize("q_shape", [(2, 4, 8), (2, 3, 16), (2, 16)])  # head_dim, GQA multiple, rank
def test_attention_entry_points_name_a_query_that_does_not_fit_the_cache(q_shape):
    key_cache, value_cache = random_pool(4, 4, 2, 16, torch.float32)
    q = torch.randn(q_shape)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"does not fit the cache \(4, 4, 2, 16\)"):
        paged_decode_attention(q, key_cache, value_cache, tables, torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"does not fit the cache \(4, 4, 2, 16\)"):
        paged_chunk_attention(q, key_cache, value_cache, tables, torch.tensor([0, 1, 2], dtype=torch.int32),
                              torch.ones(2, dtype=torch.int32), max_query_len=1)


@pytest.mark.parametrize("options,needle", [(dict(block_n=8), "block_n"), (dict(block_n=48), "block_n"),
                                            (dict(num_warps=3), "num_warps")])
def test_decode_attention_names_bad_launch_settings(options, needle):
    key_cache, value_cache = random_pool(4, 4, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match=needle):
        paged_decode_attention(q, key_cache, value_cache, torch.zeros(2, 1, dtype=torch.int32),
                               torch.ones(2, dtype=torch.int32), **options)
