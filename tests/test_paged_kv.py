"""Paged KV kernels: the write kernel and paged decode attention against their references."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels.paged_chunk_attention import paged_chunk_attention
from kernels.paged_kv import (
    HOPPER_SHARED_BYTES,
    SHARED_HEADROOM_BYTES,
    choose_num_splits,
    default_block_n,
    gather_kv,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_kv_write,
    paged_kv_write_reference,
    pipeline_stages,
    programmatic_launch_supported,
)
from tests.helpers import assert_close, random_pool, random_tables


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
        wide = paged_decode_attention(*args, num_splits=num_splits, block_n=16, dot_in_cache_dtype=False)
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


def test_launch_defaults_follow_the_geometry_and_the_shared_memory(monkeypatch):
    """Tiles of 128 tokens when the programs fit one per SM or heads are at most 64 wide, else 64, halved until two
    fit the shared memory; as many pipelined tiles as it holds, 5 at most; no splits off the GPU."""
    import kernels.paged_kv as paged_kv

    # the CPU counts as one SM with the H100/H200's shared memory: one program fits it, two do not
    assert default_block_n(64, 2, 2, "cpu") == 128 and default_block_n(24, 2, 2, "cpu") == 128
    assert default_block_n(128, 2, 1, "cpu") == 128 and default_block_n(128, 2, 2, "cpu") == 64
    assert pipeline_stages(128, 64, 2, "cpu") == 5  # 16 KB tiles
    assert pipeline_stages(128, 128, 2, "cpu") == 5  # 32 KB tiles: 5 ran in 140 KB on the H200
    assert pipeline_stages(128, 128, 4, "cpu") == 3  # fp32 caches: 64 KB tiles
    assert default_block_n(256, 4, 1, "cpu") == 64  # 128 KB tiles would not double-buffer
    budget = HOPPER_SHARED_BYTES - SHARED_HEADROOM_BYTES
    for head_dim, size, programs in itertools.product((16, 64, 80, 128, 256), (2, 4), (1, 2)):
        block_n = default_block_n(head_dim, size, programs, "cpu")
        stages = pipeline_stages(block_n, head_dim, size, "cpu")
        tile = block_n * max(16, 1 << (head_dim - 1).bit_length()) * size
        assert 2 <= stages <= 5 and stages * tile <= budget, (head_dim, size, programs)
    # a GPU with less shared memory (99 KB per block, as sm_86/89 parts) gets shallower pipelines or smaller tiles
    monkeypatch.setattr(paged_kv, "shared_memory_bytes", lambda device: 99 * 1024)
    assert pipeline_stages(128, 128, 2, "cpu") == 2 and default_block_n(128, 4, 1, "cpu") == 64
    assert choose_num_splits(64, 2, 1300, "cpu") == 1
    assert not programmatic_launch_supported("cpu")


def test_programmatic_launch_only_on_nvidia_hopper_and_compiled(monkeypatch):
    import kernels.paged_kv as paged_kv

    monkeypatch.setattr(paged_kv, "_INTERPRETED", False)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, expected in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert programmatic_launch_supported("cuda:0") is expected, capability
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports gfx94x as capability 9.4
    assert not programmatic_launch_supported("cuda:0")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(paged_kv, "_INTERPRETED", True)
    assert not programmatic_launch_supported("cuda:0")
    assert not programmatic_launch_supported("cpu")


def test_defaults_match_the_explicit_settings_they_stand_for():
    """The default launch (16-bit dots, tile, pipeline depth and splits chosen by the launcher) on a bf16 cache
    equals the same settings given explicitly, is within bf16 tolerance of the reference, and differs from fp32 dot
    operands (the interpreter shows the probabilities' rounding)."""
    key_cache, value_cache = random_pool(30, 16, 2, 64, torch.bfloat16)
    tables = random_tables(3, 10, 30)
    lens = torch.tensor([150, 1, 77], dtype=torch.int32)
    q = torch.randn(3, 14, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    args = (q, key_cache, value_cache, tables, lens)
    out = paged_decode_attention(*args)
    block_n = default_block_n(64, 2, 3 * 2, "cpu")
    explicit = paged_decode_attention(*args, num_splits=1, block_n=block_n,
                                      num_stages=pipeline_stages(block_n, 64, 2, "cpu"), dot_in_cache_dtype=True,
                                      programmatic_launch=False)
    assert torch.equal(out, explicit)
    assert_close(out, paged_decode_attention_reference(*args), torch.bfloat16, "defaults vs reference")
    assert not torch.equal(out, paged_decode_attention(*args, dot_in_cache_dtype=False))


def test_lengths_before_wait_changes_no_value():
    """The runner's promise (the lengths not written by the kernel just before) only moves the length's load before
    the programmatic-launch wait: the same output, split or not (on the CPU the wait does not exist; the GPU test
    below checks the compiled kernel)."""
    key_cache, value_cache = random_pool(30, 16, 2, 64, torch.float32)
    tables = random_tables(3, 10, 30)
    lens = torch.tensor([150, 1, 0], dtype=torch.int32)
    q = torch.randn(3, 14, 64, generator=torch.Generator().manual_seed(5))
    args = (q, key_cache, value_cache, tables, lens)
    ref = paged_decode_attention_reference(*args)
    for splits in (1, 3):
        want = paged_decode_attention(*args, num_splits=splits, block_n=32)
        assert torch.equal(paged_decode_attention(*args, num_splits=splits, block_n=32, lengths_before_wait=True), want)
        assert_close(want, ref, torch.float32, f"{splits} split(s) vs reference")


@pytest.mark.skipif(not torch.cuda.is_available() or not programmatic_launch_supported("cuda"),
                    reason="needs a GPU with programmatic dependent launch (without it both variants are one kernel)")
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)])
@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("rotary", [False, True])
def test_gpu_lengths_before_wait_bit_identical(dtype, head_dim, num_splits, rotary):
    """On the GPU with programmatic launch: the kernel that loads the lengths before its wait gives the same output
    (and, with the rotary embedding inside, the same caches) bit for bit as the one that loads them after, eagerly
    and replayed from a graph in which a kernel writing q runs just before it, after the lengths, tables and q
    changed; and the replayed output is the reference's. Ragged rows and a padding row."""
    from kernels.decode_fusions import rotary_paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(7)
    block_size, rows, q_heads, kv_heads, longest = 16, 65, 14, 2, 1400
    per_row = -(-longest // block_size)
    num_blocks = rows * per_row
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(dtype)  # noqa: E731
    pool_shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache, value_cache = r(*pool_shape), r(*pool_shape)
    source = r(rows, q_heads + 2 * kv_heads, head_dim)
    lens = torch.zeros(rows, dtype=torch.int32, device="cuda")
    tables = torch.zeros(rows, per_row, dtype=torch.int32, device="cuda")
    slots = torch.zeros(rows, dtype=torch.long, device="cuda")
    angle = torch.rand(rows, head_dim // 2, device="cuda", generator=g) * 6
    cos, sin = torch.cat([angle, angle], -1).cos().to(dtype), torch.cat([angle, angle], -1).sin().to(dtype)

    def new_inputs():
        lens.copy_(torch.randint(1, longest, (rows,), device="cuda", generator=g).to(torch.int32))
        lens[3] = 0
        tables.copy_(torch.randperm(num_blocks, device="cuda", generator=g).view(rows, per_row).to(torch.int32))
        last = (lens - 1).clamp(min=0).long()
        slots.copy_(tables[torch.arange(rows, device="cuda"), last // block_size].long() * block_size
                    + last % block_size)  # fmt: skip
        slots[lens == 0] = -1
        source.normal_(generator=g)

    def step(before_wait, caches):
        qkv = source * 1  # a kernel writing q (and the new k, v) just before the attention, as the q/k/v product
        q, k, v = qkv[:, :q_heads], qkv[:, q_heads : q_heads + kv_heads], qkv[:, q_heads + kv_heads :]
        options = dict(num_splits=num_splits, lengths_before_wait=before_wait)
        if rotary:
            return rotary_paged_decode_attention(q, k, v, cos, sin, *caches, slots, tables, lens, **options)
        return paged_decode_attention(q, *caches, tables, lens, **options)

    new_inputs()
    caches = {flag: (key_cache.clone(), value_cache.clone()) for flag in (False, True)}
    outs = {flag: step(flag, caches[flag]) for flag in (False, True)}
    assert torch.equal(outs[True], outs[False])
    assert all(torch.equal(a, b) for a, b in zip(caches[True], caches[False]))
    graphs = {}
    for flag in (False, True):
        for _ in range(2):  # compiled before capture
            step(flag, caches[flag])
        graphs[flag] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[flag]):
            outs[flag] = step(flag, caches[flag])
    new_inputs()
    for flag in (False, True):
        caches[flag][0].copy_(key_cache)
        caches[flag][1].copy_(value_cache)
        graphs[flag].replay()
    torch.cuda.synchronize()
    assert torch.equal(outs[True], outs[False])
    assert all(torch.equal(a, b) for a, b in zip(caches[True], caches[False]))
    if not rotary:  # against the reference on the replayed inputs
        q = source[:, :q_heads]
        assert_close(outs[True], paged_decode_attention_reference(q, *caches[True], tables, lens), dtype, "replayed")


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
