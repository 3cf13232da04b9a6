"""The paged cache's host bookkeeping: block pool, reference counts, prefix sharing, fork and copy-on-write."""

from __future__ import annotations

import pytest
import torch

from engine.model.paged.cache import BlockAllocator, PagedKVCache, PoolExhaustedError, image_digest, prefix_block_hashes
from kernels.paged_kv import paged_decode_attention, paged_kv_write



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


