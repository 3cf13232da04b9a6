"""The decode step's split-K products (`kernels/decode_linear.py`) and their consumer, `rms_norm` on partial sums,
against PyTorch, on awkward shapes (Triton interpreter on CPU; the GPU cases need CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels.decode_fusions import rms_norm, rms_norm_reference
from kernels.decode_linear import (
    MAX_BLOCK_M,
    DecodeLinearConfig,
    decode_linear,
    decode_linear_config,
    decode_linear_partials,
    decode_linear_reference,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _operands(rows, out_features, in_features, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype).to(device)
    w = torch.randn(out_features, in_features, generator=g).to(dtype).to(device)
    b = torch.randn(out_features, generator=g).to(dtype).to(device)
    return x, w, b


@pytest.mark.parametrize(
    "rows,out_features,in_features,config",
    [
        (1, 33, 70, DecodeLinearConfig(block_n=16, block_k=16, splits=1, num_stages=2)),
        (5, 15, 130, DecodeLinearConfig(block_n=16, block_k=32, splits=3, num_stages=2)),
        (17, 40, 7, DecodeLinearConfig(block_n=32, block_k=16, splits=2, num_stages=2)),  # a split past the end
        (MAX_BLOCK_M + 6, 17, 48, DecodeLinearConfig(block_n=16, block_k=16, splits=5, num_stages=2)),  # two M tiles
        (3, 24, 0, DecodeLinearConfig(block_n=16, block_k=16, splits=2, num_stages=2)),  # an empty reduction
    ],
)
def test_partials_sum_to_the_product(rows, out_features, in_features, config):
    x, w, _ = _operands(rows, out_features, in_features)
    partials = decode_linear_partials(x, w, config)
    assert partials.shape == (config.splits, rows, out_features) and partials.dtype == torch.float32
    want = x.double() @ w.double().T
    torch.testing.assert_close(partials.double().sum(0), want, atol=1e-4, rtol=1e-5)
    steps = -(-in_features // config.block_k)
    if config.splits > 1 and steps >= config.splits:  # every split holds a share: dropping one would show
        assert all(partials[s].abs().max() > 0 for s in range(config.splits))


@pytest.mark.parametrize("splits", [1, 3])
def test_partials_with_a_bias_sum_to_the_biased_product(splits):
    """The first split starts from the bias, the others do not: the sum is x @ w.T + b exactly once."""
    x, w, b = _operands(5, 21, 96)
    config = DecodeLinearConfig(block_n=16, block_k=32, splits=splits, num_stages=2)
    partials = decode_linear_partials(x, w, config, bias=b)
    torch.testing.assert_close(partials.sum(0), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    no_bias = decode_linear_partials(x, w, config)
    torch.testing.assert_close(partials[0] - no_bias[0], b.expand_as(no_bias[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(partials[1:], no_bias[1:])  # the bias in split 0 only
    with pytest.raises(ValueError, match=r"bias must be \(21,\)"):
        decode_linear_partials(x, w, config, bias=b[:20])


def test_strided_inputs_and_a_split_view():
    """A column slice of a merged product (unit column stride, wide row stride, read in place) and a weight of
    non-unit column stride (copied first)."""
    x, w, _ = _operands(6, 20, 80)
    wide = torch.randn(6, 200)
    wide[:, 50:130] = x
    config = DecodeLinearConfig(block_n=16, block_k=16, splits=3, num_stages=2)
    got = decode_linear_partials(wide[:, 50:130], w.T.contiguous().T, config).sum(0)
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_linear_matches_the_module_with_bias(dtype):
    x, w, b = _operands(9, 50, 96, dtype)
    config = DecodeLinearConfig(block_n=16, block_k=32, splits=2, num_stages=2)
    got, want = decode_linear(x, w, b, config), decode_linear_reference(x.float(), w.float(), b.float())
    assert got.dtype == dtype and got.shape == (9, 50)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)  # 16-bit output rounding
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
def test_rms_norm_adds_summed_partials(dtype, splits):
    """The consumer: norm(residual + sum of partials rounded as a product), and the new residual stream."""
    x, w, _ = _operands(7, 48, 160, dtype, seed=1)
    residual = torch.randn(7, 48).to(dtype)
    norm_weight = (torch.rand(48) + 0.5).to(dtype)
    partials = decode_linear_partials(x, w, DecodeLinearConfig(block_n=16, block_k=16, splits=splits, num_stages=2))
    out, summed = rms_norm(partials, norm_weight, 1e-6, residual=residual, partial_sums=True)
    want_out, want_summed = rms_norm_reference(partials, norm_weight, 1e-6, residual=residual, partial_sums=True)
    assert out.dtype == dtype and summed.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    torch.testing.assert_close(summed.float(), want_summed.float(), **tol)
    torch.testing.assert_close(out.float(), want_out.float(), **tol)
    plain_out, plain_summed = rms_norm_reference(F.linear(x, w), norm_weight, 1e-6, residual=residual)
    torch.testing.assert_close(summed.float(), plain_summed.float(), **tol)  # what the module path computes
    torch.testing.assert_close(out.float(), plain_out.float(), **tol)


def test_rms_norm_takes_partial_sums_only_when_told():
    residual = torch.randn(3, 8)
    with pytest.raises(ValueError, match="float32"):
        rms_norm(torch.randn(2, 3, 8).half(), torch.ones(8).half(), 1e-6, residual=residual.half(), partial_sums=True)
    with pytest.raises(ValueError, match="without one"):
        rms_norm(torch.randn(2, 3, 8), torch.ones(8), 1e-6, partial_sums=True)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.randn(2, 4, 8), torch.ones(8), 1e-6, residual=residual, partial_sums=True)
    with pytest.raises(ValueError, match=r"\(rows, width\)"):  # 3-D without the flag: not taken for partial sums
        rms_norm(torch.randn(2, 3, 8), torch.ones(8), 1e-6, residual=residual)


def test_bad_operands_are_named():
    x, w, _ = _operands(2, 8, 16)
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        decode_linear_partials(x, w[:, :8], DecodeLinearConfig())
    with pytest.raises(ValueError, match="dtype"):
        decode_linear_partials(x.double(), w.double(), DecodeLinearConfig())
    with pytest.raises(ValueError, match="share"):
        decode_linear_partials(x.half(), w, DecodeLinearConfig())
    with pytest.raises(ValueError, match="power of two"):
        DecodeLinearConfig(block_n=24)
    with pytest.raises(ValueError, match="splits"):
        DecodeLinearConfig(splits=0)


@pytest.mark.parametrize("rows,out_features,in_features", [(1, 896, 4864), (64, 896, 896), (64, 9728, 896),
                                                          (8, 3584, 18944), (100, 50, 30), (1, 1, 1)])  # fmt: skip
@pytest.mark.parametrize("sm_count,element_size,shared_bytes", [(1, 2, 227 << 10), (78, 4, 99 << 10), (132, 2, 227 << 10),
                                                              (132, 4, 227 << 10)])  # fmt: skip
def test_the_default_settings_fill_the_device_without_empty_splits(rows, out_features, in_features, sm_count,
                                                                   element_size, shared_bytes):  # fmt: skip
    from kernels.paged_kv import SHARED_HEADROOM_BYTES

    config = decode_linear_config(rows, out_features, in_features, sm_count, element_size, shared_bytes)
    block_m = min(max(1 << (max(rows, 1) - 1).bit_length(), 16), MAX_BLOCK_M)
    stage = (block_m + config.block_n) * config.block_k * element_size
    assert config.num_stages == 1 or config.num_stages * stage <= shared_bytes - SHARED_HEADROOM_BYTES, "fits"
    tiles = -(-out_features // config.block_n) * -(-rows // MAX_BLOCK_M)
    steps = -(-in_features // config.block_k)
    assert 1 <= config.splits <= steps, "no split without a reduction step of its own"
    per_split = -(-steps // config.splits)
    assert (config.splits - 1) * per_split < steps, "the last split has steps of its own: none is all zeros"
    assert config.splits == 1 or tiles * config.splits <= sm_count, "no more programs than SMs from splitting"
    if 2 * tiles <= sm_count and steps >= 2:
        assert config.splits >= 2, "a narrow output leaves SMs idle without splits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_here_and_fails_on_a_wrong_kernel(dtype, monkeypatch):
    import kernels.decode_linear as decode_linear

    assert decode_linear.decode_linear_self_check("cpu", dtype) is None
    real = decode_linear.decode_linear_partials
    monkeypatch.setattr(decode_linear, "decode_linear_partials", lambda x, w, c, **k: real(x, w, c, **k)[:1].repeat(c.splits, 1, 1))
    assert "decode_linear" in decode_linear.decode_linear_self_check("cpu", dtype)


def test_split_k_products_take_steps_and_leave_prompts_to_the_module():
    from engine.model.fused_ops import SplitKProducts, split_k_unsupported

    products = SplitKProducts(torch.device("cpu"), DecodeLinearConfig(block_n=16, block_k=16, splits=2, num_stages=2))
    linear = nn.Linear(32, 24, bias=False)
    x = torch.randn(5, 32)
    step = products(linear, x)
    assert step is not None and step.shape == (2, 5, 24)
    torch.testing.assert_close(step.sum(0), linear(x).detach(), atol=1e-5, rtol=1e-5)
    assert products(linear, torch.randn(MAX_BLOCK_M + 1, 32)) is None, "a prompt chunk: the module's GEMM"
    assert products(linear, torch.randn(2, 3, 32)) is None
    assert products(linear, torch.randn(5, 32).double()) is None

    class Layer(nn.Module):
        def __init__(self, bias=False):
            super().__init__()
            self.self_attn, self.mlp = nn.Module(), nn.Module()
            self.self_attn.o_proj = nn.Linear(8, 8, bias=bias)
            self.mlp.down_proj = nn.Linear(16, 8, bias=False)

    assert split_k_unsupported([Layer(), Layer()]) is None
    assert "has a bias" in split_k_unsupported([Layer(), Layer(bias=True)])
    hooked = Layer()
    hooked.mlp.down_proj.register_forward_hook(lambda *a: None)
    assert "hooks" in split_k_unsupported([hooked])
    wrapped = Layer()
    wrapped.mlp.down_proj = nn.Sequential(nn.Linear(16, 8))
    assert "Sequential" in split_k_unsupported([wrapped])

    from engine.model import fast_paths

    decide = lambda layers, requested=True, fused=True: fast_paths.split_k_products(  # noqa: E731
        layers, requested, fused, torch.device("cpu"), torch.float32)
    assert decide([Layer()]).choice == "on"
    assert decide([Layer()], requested=False).reason == "asked for"
    assert decide([Layer()], fused=False).reason == "the layers do not use the fused ops"
    assert decide([hooked]).choice == "off" and "hooks" in decide([hooked]).reason


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("shape", [(896, 4864), (896, 896), (1152, 896), (9728, 896), (3584, 18944)])
def test_gpu_default_settings_match_cublas(rows, shape):
    out_features, in_features = shape
    x, w, _ = _operands(rows, out_features, in_features, torch.bfloat16, "cuda")
    w = w * in_features**-0.5
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    config = decode_linear_config(rows, out_features, in_features, sm_count)
    got = decode_linear_partials(x, w, config).sum(0)
    want = F.linear(x.float(), w.float())
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp32 sums of bf16 products: summation order only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 100])
def test_gpu_default_settings_compile_for_every_dtype(dtype, rows):
    """The depth follows the shared memory: fp32 tiles twice the bytes still compile (fp32 products in full fp32)."""
    from kernels.paged_kv import shared_memory_bytes

    x, w, _ = _operands(rows, 896, 4864, dtype, "cuda", seed=4)
    w = w * 4864**-0.5
    props = torch.cuda.get_device_properties(0)
    config = decode_linear_config(rows, 896, 4864, props.multi_processor_count, x.element_size(),
                                  shared_memory_bytes(torch.device("cuda")))  # fmt: skip
    got = decode_linear_partials(x, w, config).sum(0)
    want = F.linear(x.double(), w.double()).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@needs_cuda
def test_gpu_programmatic_launch_changes_nothing():
    """The split-K kernel and the norm launched while their predecessor finishes wait for its writes: a chain of
    product -> norm -> product (the second reading the first norm's output) equals the chain launched plainly, bit
    for bit, eagerly and replayed from a graph."""
    from kernels.paged_kv import programmatic_launch_supported

    if not programmatic_launch_supported("cuda"):
        pytest.skip("programmatic launch needs Hopper or later")
    x, w, _ = _operands(64, 896, 896, torch.bfloat16, "cuda", seed=5)
    w = w * 896**-0.5
    residual = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.ones(896, device="cuda", dtype=torch.bfloat16)
    config = decode_linear_config(64, 896, 896, torch.cuda.get_device_properties(0).multi_processor_count)

    def chain(pdl):
        h, s = rms_norm(decode_linear_partials(x, w, config, programmatic_launch=pdl), norm_weight, 1e-6,
                        residual=residual, partial_sums=True, programmatic_launch=pdl)  # fmt: skip
        return rms_norm(decode_linear_partials(h, w, config, programmatic_launch=pdl), norm_weight, 1e-6,
                        residual=s, partial_sums=True, programmatic_launch=pdl)  # fmt: skip

    want = chain(False)
    for a, b in zip(chain(True), want):
        assert torch.equal(a, b)
    chain(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(True)
    graph.replay()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_cuda
def test_gpu_graph_replay_recomputes_from_new_inputs():
    x, w, _ = _operands(64, 896, 4864, torch.bfloat16, "cuda")
    residual = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.ones(896, device="cuda", dtype=torch.bfloat16)
    config = decode_linear_config(64, 896, 4864, torch.cuda.get_device_properties(0).multi_processor_count)
    step = lambda: rms_norm(decode_linear_partials(x, w, config), norm_weight, 1e-6, residual=residual, partial_sums=True)  # noqa: E731
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, summed = step()
    x.normal_()
    graph.replay()
    want_out, want_summed = rms_norm_reference(F.linear(x, w), norm_weight, 1e-6, residual=residual)
    torch.testing.assert_close(summed.float(), want_summed.float(), atol=0.5, rtol=2e-2)
    torch.testing.assert_close(out.float(), want_out.float(), atol=5e-2, rtol=2e-2)


def _paged_rows(rows, k_heads, head_dim, block_size=16, longest=1400, seed=6):
    """A paged cache of ``rows`` ragged rows (the middle one a padding row when there are several), their tables, lengths and new tokens' slots, and
    rotary tables: the inputs of a one-position step's attention on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(1, longest, (rows,), device="cuda", generator=g).to(torch.int32)
    if rows > 1:
        lens[rows // 2] = 0  # a padding row
    per_row = -(-longest // block_size)
    tables = torch.randperm(rows * per_row, device="cuda", generator=g).view(rows, per_row).to(torch.int32)
    last = (lens - 1).clamp(min=0).long()
    slots = tables[torch.arange(rows, device="cuda"), last // block_size].long() * block_size + last % block_size
    slots[lens == 0] = -1
    cache = lambda: torch.randn(rows * per_row, block_size, k_heads, head_dim, device="cuda", generator=g).bfloat16()  # noqa: E731
    angle = torch.rand(rows, head_dim // 2, device="cuda", generator=g) * 6
    cos, sin = torch.cat([angle, angle], -1).cos().bfloat16(), torch.cat([angle, angle], -1).sin().bfloat16()
    return dict(key_cache=cache(), value_cache=cache(), slots=slots, block_tables=tables, context_lens=lens), cos, sin


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("hidden,q_heads,k_heads,head_dim", [(896, 14, 2, 64), (1536, 12, 2, 128), (3584, 28, 4, 128)])
def test_gpu_qkv_partial_sums_in_the_attention_match_the_product(rows, hidden, q_heads, k_heads, head_dim):
    """The q/k/v product (with its bias) as split-K partial sums summed inside the rotary attention, at the
    InternVL3 1B/2B/8B geometries and the runner's default settings: the output and the caches of cuBLAS's
    product followed by the same attention on bf16 q/k/v, up to bf16 rounding of another summation order; eagerly
    and replayed from a graph after x changed."""
    from kernels.decode_fusions import rotary_paged_decode_attention

    width = (q_heads + 2 * k_heads) * head_dim
    x, w, b = _operands(rows, width, hidden, torch.bfloat16, "cuda", seed=7)
    w = w * hidden**-0.5
    paged, cos, sin = _paged_rows(rows, k_heads, head_dim)
    sizes = [q_heads * head_dim, k_heads * head_dim, k_heads * head_dim]
    # the runner's settings: 7 splits at 1B, 4 at 2B, 1 at 8B (72 column tiles already fill the SMs)
    config = decode_linear_config(rows, width, hidden, torch.cuda.get_device_properties(0).multi_processor_count)

    def attend(q, k, v, caches):
        heads = lambda t, n: t.unflatten(-1, (n, head_dim))  # noqa: E731
        return rotary_paged_decode_attention(heads(q, q_heads), heads(k, k_heads), heads(v, k_heads), cos, sin,
                                             *caches, paged["slots"], paged["block_tables"], paged["context_lens"])  # fmt: skip

    def dense():
        caches = paged["key_cache"].clone(), paged["value_cache"].clone()
        return attend(*F.linear(x, w, b).split(sizes, -1), caches), caches

    caches = paged["key_cache"].clone(), paged["value_cache"].clone()
    split = lambda: attend(*decode_linear_partials(x, w, config, bias=b).split(sizes, -1), caches)  # noqa: E731
    for replay in (False, True):
        if replay:
            split()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = split()
            x.normal_()
            for cache, source in zip(caches, (paged["key_cache"], paged["value_cache"])):
                cache.copy_(source)
            graph.replay()
        else:
            got = split()
        want, want_caches = dense()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
        for a, c in zip(caches, want_caches):
            torch.testing.assert_close(a.float(), c.float(), atol=3e-2, rtol=3e-2)
        if rows > 1:
            assert torch.equal(got[rows // 2], torch.zeros_like(got[rows // 2]))


@needs_cuda
@pytest.mark.parametrize("rows", [1, 64])
def test_gpu_layer_chain_with_programmatic_launch_is_the_plain_chain(rows):
    """A whole layer of the runner's step at the 1B geometry, every kernel that can launched while its predecessor
    finishes (the norms and SwiGLU letting the next product launch as soon as they have waited, the q/k/v partial
    sums summed in the attention): bit for bit the same chain launched plainly, eagerly and replayed from a graph."""
    from kernels.decode_fusions import rotary_paged_decode_attention, silu_mul
    from kernels.paged_kv import programmatic_launch_supported

    if not programmatic_launch_supported("cuda"):
        pytest.skip("programmatic launch needs Hopper or later")
    hidden, q_heads, k_heads, head_dim, inter = 896, 14, 2, 64, 4864
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cuda").manual_seed(8)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()  # noqa: E731
    qkv_w, qkv_b = r((q_heads + 2 * k_heads) * head_dim, hidden, scale=hidden**-0.5), r((q_heads + 2 * k_heads) * head_dim)
    o_w, gate_up_w = r(hidden, q_heads * head_dim, scale=hidden**-0.5), r(2 * inter, hidden, scale=hidden**-0.5)
    down_w, norm_w = r(hidden, inter, scale=inter**-0.5), r(hidden).abs() + 0.5
    x, residual = r(rows, hidden), r(rows, hidden)
    paged, cos, sin = _paged_rows(rows, k_heads, head_dim, seed=9)
    sizes = [q_heads * head_dim, k_heads * head_dim, k_heads * head_dim]
    config = lambda n, k: decode_linear_config(rows, n, k, sm)  # noqa: E731

    def layer(pdl, caches):
        h, s = rms_norm(decode_linear_partials(x, down_w[:, :hidden], config(hidden, hidden), programmatic_launch=pdl),
                        norm_w, 1e-6, residual=residual, partial_sums=True, programmatic_launch=pdl)  # fmt: skip
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in decode_linear_partials(
            h, qkv_w, config(qkv_w.shape[0], hidden), programmatic_launch=pdl, bias=qkv_b).split(sizes, -1))
        o = rotary_paged_decode_attention(q, k, v, cos, sin, *caches, paged["slots"], paged["block_tables"],
                                          paged["context_lens"], programmatic_launch=pdl, lengths_before_wait=pdl)  # fmt: skip
        h, s = rms_norm(decode_linear_partials(o.flatten(1), o_w, config(hidden, q_heads * head_dim),
                                               programmatic_launch=pdl),
                        norm_w, 1e-6, residual=s, partial_sums=True, programmatic_launch=pdl)  # fmt: skip
        gate, up = F.linear(h, gate_up_w).split(inter, -1)
        product = silu_mul(gate, up, programmatic_launch=pdl)
        return rms_norm(decode_linear_partials(product, down_w, config(hidden, inter), programmatic_launch=pdl),
                        norm_w, 1e-6, residual=s, partial_sums=True, programmatic_launch=pdl)  # fmt: skip

    fresh = lambda: (paged["key_cache"].clone(), paged["value_cache"].clone())  # noqa: E731
    want_caches = fresh()
    want = layer(False, want_caches)
    caches = fresh()
    for a, b in zip(layer(True, caches), want):
        assert torch.equal(a, b)
    assert torch.equal(caches[0], want_caches[0]) and torch.equal(caches[1], want_caches[1])
    graph = torch.cuda.CUDAGraph()
    caches = fresh()
    with torch.cuda.graph(graph):
        got = layer(True, caches)
    for cache, source in zip(caches, (paged["key_cache"], paged["value_cache"])):
        cache.copy_(source)
    graph.replay()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(caches[0], want_caches[0]) and torch.equal(caches[1], want_caches[1])
