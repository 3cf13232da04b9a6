"""Fused input construction (`kernels/latent_inject.py`): kernel against its reference on awkward shapes, strided
inputs, exact bf16, gradients, the fake/compile registration, bad inputs, and the model with the fused path."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import kernels.latent_inject as li
from kernels.latent_inject import image_index_from_ids, latent_inject, latent_inject_reference
from tests.helpers import pad_batch, random_pixels, sample_ids


def make_case(batch, seq_len, hidden, vocab, dtype, *, images=True, latents="some", seed=0):
    """Ids over a prime vocab whose last id is the image token; image positions at random, numbered in row-major
    order; latent positions at random ("some", disjoint from the images), everywhere ("all") or none."""
    g = torch.Generator().manual_seed(seed)
    image_token = vocab - 1
    ids = torch.randint(0, vocab - 1, (batch, seq_len), generator=g)
    ids[:, : min(2, seq_len)] = 3  # repeated ids: their gradients must add up
    case = dict(input_ids=ids, embed_weight=torch.randn(vocab, hidden, generator=g).to(dtype))
    is_image = torch.zeros(batch, seq_len, dtype=torch.bool)
    if images:
        is_image = torch.rand(batch, seq_len, generator=g) < 0.4
        ids[is_image] = image_token
        case["image_index"] = image_index_from_ids(ids, image_token)
        case["image_features"] = torch.randn(int(is_image.sum()), hidden, generator=g).to(dtype)
    if latents != "none":
        mask = torch.ones(batch, seq_len, dtype=torch.bool)
        if latents == "some":
            mask = (torch.rand(batch, seq_len, generator=g) < 0.3) & ~is_image
        case["latent_mask"] = mask
        case["latent_hidden"] = torch.randn(batch, hidden, generator=g).to(dtype)
    return case


def chunks(seq_len):
    mid = seq_len // 2
    return sorted({(0, seq_len), (0, 0), (seq_len, seq_len), (0, 1), (seq_len - 1, seq_len), (mid, mid + 1),
                   (mid, seq_len)})  # fmt: skip


def assert_same_bits(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.flatten(), expected.flatten()
    if a.dtype.is_floating_point:  # bit patterns: a copy is exact, NaN payloads and -0.0 included
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(bits), e.view(bits)
    bad = (a != e).nonzero().flatten()
    assert bad.numel() == 0, f"{what}: {bad.numel()} elements differ, first at flat index {bad[0].item()}"


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("batch,seq_len", [(1, 1), (1, 13), (3, 1), (3, 7), (3, 13)])
@pytest.mark.parametrize("hidden,vocab", [(8, 97), (33, 131), (64, 101)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_exactly(batch, seq_len, hidden, vocab, dtype):
    for kind, images, latents in [("mixed", True, "some"), ("no image", False, "some"),
                                  ("no latent", True, "none"), ("all latent", True, "all"),
                                  ("tokens only", False, "none")]:  # fmt: skip
        case = make_case(batch, seq_len, hidden, vocab, dtype, images=images, latents=latents, seed=batch + seq_len)
        for start, end in chunks(seq_len):
            out = latent_inject(start=start, end=end, padding_idx=0, **case)
            ref = latent_inject_reference(start=start, end=end, padding_idx=0, **case)
            assert_same_bits(out, ref, f"{kind}, chunk [{start}, {end}), B={batch} T={seq_len} H={hidden} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_hidden_size(dtype):
    """H = 896 (Qwen2.5-0.5B) and 769 (not a power of two): the hidden dimension is masked."""
    for hidden in (896, 769):
        case = make_case(2, 7, hidden, 151, dtype, seed=hidden)
        for start, end in [(0, 7), (3, 4)]:
            out = latent_inject(start=start, end=end, **case)
            assert_same_bits(out, latent_inject_reference(start=start, end=end, **case), f"H={hidden} [{start}, {end})")


def test_bf16_copy_keeps_every_bit_pattern():
    """Random 16-bit patterns (NaNs, infinities, subnormals, -0.0): loads, selects and stores only."""
    g = torch.Generator().manual_seed(5)
    case = make_case(3, 9, 40, 53, torch.bfloat16, seed=5)
    for key in ("embed_weight", "image_features", "latent_hidden"):
        t = case[key]
        case[key] = torch.randint(-(2**15), 2**15, t.shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
    assert_same_bits(latent_inject(start=0, end=9, **case), latent_inject_reference(start=0, end=9, **case), "bits")


def test_strided_inputs():
    """Every input a non-contiguous view: ids/index/mask with column stride 2 or column-major, a table that is a
    slice of a wider one and a transposed one, every other image row, the thoughts as hidden[:, -1]."""
    b, t, h, v = 3, 11, 24, 89
    base = make_case(b, t, h, v, torch.float32, seed=7)
    ids = torch.zeros(b, 2 * t, dtype=torch.long)
    ids[:, ::2] = base["input_ids"]
    index = base["image_index"].t().contiguous().t()
    mask = torch.zeros(b, 3 * t, dtype=torch.bool)
    mask[:, ::3] = base["latent_mask"]
    wide = torch.randn(v, h + 5)
    wide[:, :h] = base["embed_weight"]
    features = torch.randn(2 * base["image_features"].shape[0], h)
    features[::2] = base["image_features"]
    hidden_states = torch.randn(b, 4, h)
    hidden_states[:, -1] = base["latent_hidden"]
    views = dict(input_ids=ids[:, ::2], image_index=index, latent_mask=mask[:, ::3], image_features=features[::2],
                 latent_hidden=hidden_states[:, -1])  # fmt: skip
    assert not any(x.is_contiguous() for x in views.values())
    for table in (wide[:, :h], base["embed_weight"].t().contiguous().t()):
        assert not table.is_contiguous()
        for start, end in [(0, t), (4, 5), (4, t)]:
            out = latent_inject(embed_weight=table, start=start, end=end, **views)
            ref = latent_inject_reference(start=start, end=end, **base)
            assert_same_bits(out, ref, f"strided, table strides {table.stride()}, [{start}, {end})")


def test_int32_ids_and_int64_index_give_the_same_values_and_gradients():
    case = make_case(2, 9, 16, 61, torch.float32, seed=9)
    grad_out = torch.randn(2, 7, 16)
    ref = latent_inject_reference(start=2, end=9, **case)
    ref_grads = _grads(latent_inject_reference, case, 2, 9, grad_out, 0)
    case["input_ids"] = case["input_ids"].int()
    case["image_index"] = case["image_index"].long()
    assert_same_bits(latent_inject(start=2, end=9, **case), ref, "int32 ids, int64 index")
    for key, g in _grads(latent_inject, case, 2, 9, grad_out, 0).items():
        torch.testing.assert_close(g, ref_grads[key], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ gradients


def _grads(fn, case, start, end, grad_out, padding_idx):
    leaves = {k: case[k].detach().clone().requires_grad_() for k in ("embed_weight", "image_features", "latent_hidden")
              if k in case}  # fmt: skip
    out = fn(start=start, end=end, padding_idx=padding_idx, **{**case, **leaves})
    out.backward(grad_out)
    return {k: x.grad for k, x in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_backward_matches_reference_autograd(dtype, padding_idx):
    """Embedding rows accumulate over repeated ids (id 3 appears in every row, and is the padding row in one
    variant: no gradient then); image rows and thoughts get the gradient of the positions they fill."""
    case = make_case(3, 13, 24, 67, dtype, seed=11)
    case["input_ids"][:, 5] = 3
    case["latent_mask"][:, 5] = False
    for start, end in [(0, 13), (5, 6), (4, 13), (7, 7)]:
        g = torch.Generator().manual_seed(start + end)
        grad_out = torch.randn(3, end - start, 24, generator=g).to(dtype)
        fused = _grads(latent_inject, case, start, end, grad_out, padding_idx)
        ref = _grads(latent_inject_reference, case, start, end, grad_out, padding_idx)
        for key in ref:
            torch.testing.assert_close(
                fused[key], ref[key], atol=0, rtol=0, msg=lambda m: f"{key} [{start},{end}): {m}"
            )
        if padding_idx is not None:
            assert (fused["embed_weight"][padding_idx] == 0).all()
        elif end - start == 13:
            assert fused["embed_weight"][3].abs().sum() > 0


def test_gradcheck_float64():
    case = make_case(2, 6, 4, 7, torch.float64, seed=13)
    ids, index, mask = case["input_ids"], case["image_index"], case["latent_mask"]
    mask[0, 4] = True  # at least one thought (it wins over an image row there, if any)

    def fn(weight, features, thought):
        return latent_inject(ids, weight, 1, 6, image_index=index, image_features=features, latent_mask=mask,
                             latent_hidden=thought)  # fmt: skip (padding_idx is no true gradient: not here)

    inputs = tuple(case[k].clone().requires_grad_() for k in ("embed_weight", "image_features", "latent_hidden"))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, fast_mode=True)


def test_no_gradient_asked_for_no_gradient_computed():
    case = make_case(2, 7, 8, 31, torch.float32, seed=2)
    thought = case["latent_hidden"].clone().requires_grad_()
    out = latent_inject(start=0, end=7, **{**case, "latent_hidden": thought})
    out.sum().backward()
    assert thought.grad is not None and case["embed_weight"].grad is None


# ------------------------------------------------------------------------------------------------ registration


def test_opcheck_schema_fake_autograd_and_aot():
    """torch.library.opcheck: schema, FakeTensor (register_fake), autograd registration, AOT dispatch."""
    case = make_case(2, 7, 16, 37, torch.float32, seed=3)
    for k in ("embed_weight", "image_features", "latent_hidden"):
        case[k].requires_grad_()
    op = torch.ops.coconut.latent_inject.default
    args = [case["input_ids"], case["embed_weight"], 2, 7, case["image_index"], case["image_features"],
            case["latent_mask"], case["latent_hidden"], 0]  # fmt: skip
    torch.library.opcheck(op, tuple(args))
    args[2:4] = [0, 4]
    args[6:9] = [None, None, -1]  # the first pass: no thoughts
    torch.library.opcheck(op, tuple(args))


def test_fake_tensor_mode_gives_the_shape_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(3, 9, 12, 41, torch.bfloat16, seed=4)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in case.items()}
        out = latent_inject(start=2, end=9, **fake)
    assert out.shape == (3, 7, 12) and out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ bad inputs


def _bad(case, **changes):
    return {**case, **changes}


BAD = [
    ("ids float", lambda c: _bad(c, input_ids=c["input_ids"].float()), "input_ids must be a 2-D"),
    ("ids 1-D", lambda c: _bad(c, input_ids=c["input_ids"][0]), "input_ids must be a 2-D"),
    ("table int", lambda c: _bad(c, embed_weight=c["embed_weight"].long()), "embed_weight must be a 2-D"),
    ("index shape", lambda c: _bad(c, image_index=c["image_index"][:, 1:]), "image_index must be an int32/int64"),
    ("features width", lambda c: _bad(c, image_features=c["image_features"][:, 1:]), "hidden=16"),
    ("features dtype", lambda c: _bad(c, image_features=c["image_features"].double()), "image_features dtype"),
    ("index alone", lambda c: _bad(c, image_features=None), "image_index and image_features go together"),
    ("mask alone", lambda c: _bad(c, latent_hidden=None), "latent_mask and latent_hidden go together"),
    ("mask dtype", lambda c: _bad(c, latent_mask=c["latent_mask"].long()), "latent_mask must be a bool"),
    ("thought shape", lambda c: _bad(c, latent_hidden=c["latent_hidden"][:1]), "latent_hidden must be (batch=2"),
    ("thought dtype", lambda c: _bad(c, latent_hidden=c["latent_hidden"].half()), "latent_hidden dtype"),
    ("padding", lambda c: _bad(c, padding_idx=37), "padding_idx must be None or in [-37, 37)"),
    ("meta device", lambda c: _bad(c, latent_hidden=c["latent_hidden"].to("meta")), "latent_hidden is on meta"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(name, change, message):
    case = change(make_case(2, 7, 16, 37, torch.float32, seed=1))
    for fn in (latent_inject, latent_inject_reference):
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(start=0, end=7, **case)


@pytest.mark.parametrize("start,end", [(-1, 3), (4, 3), (0, 8)])
def test_bad_chunk_raises(start, end):
    case = make_case(2, 7, 16, 37, torch.float32, seed=1)
    with pytest.raises(ValueError, match=rf"0 <= start <= end <= seq_len=7, got start={start}, end={end}"):
        latent_inject(start=start, end=end, **case)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(li, "_is_interpreted", lambda: False)
    case = make_case(1, 3, 8, 11, torch.float32)
    with pytest.raises(RuntimeError, match="runs on CPU only in the interpreter"):
        latent_inject(start=0, end=3, **case)


# ------------------------------------------------------------------------------------------------ the model


@contextlib.contextmanager
def injection(model, mode):
    """Switch the (session-scoped) model's injection path, restoring the previous one afterwards."""
    saved = model._injection_mode
    model.set_injection(mode)
    try:
        yield model
    finally:
        model.set_injection(saved)


def model_batch(model, tok, seed=0):
    """Rows with 1, 2 and 0 image tiles, 3, 1, 0 and 2 latents, left and right padding."""
    specs = [
        dict(tiles=1, n=3, left=False, q="What colour?"),
        dict(tiles=2, n=1, left=True, q="Move right twice."),
        dict(tiles=1, n=0, left=True, q="Which cell?"),
        dict(tiles=0, n=2, left=False, q="Move down."),
    ]
    rows = [sample_ids(tok, model, tiles=s["tiles"], question=s["q"], n_latents=s["n"]) for s in specs]
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[s["left"] for s in specs])
    pv = random_pixels(sum(s["tiles"] for s in specs), model.config.vision_config.image_size[0], seed)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return ids, mask, pv, labels


def _run(model, ids, mask, pv, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, pv, labels=labels, return_inputs_embeds=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def test_model_fused_matches_reference_values_and_gradients(tiny, monkeypatch):
    model, tok, _ = tiny
    ids, mask, pv, labels = model_batch(model, tok)
    with injection(model, "reference"):
        ref, ref_grads = _run(model, ids, mask, pv, labels)
    launches = []
    launch = li.latent_inject_forward
    monkeypatch.setattr(li, "latent_inject_forward", lambda *a, **k: launches.append(a[2:4]) or launch(*a, **k))
    with injection(model, "fused"):
        assert model._injection_hook() is not None
        out, grads = _run(model, ids, mask, pv, labels)
    assert out.num_passes == ref.num_passes > 2
    assert len(launches) == out.num_passes, f"one kernel per pass, got chunks {launches}"
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.inputs_embeds, ref.inputs_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in ("base.model.language_model.embed_tokens.weight", "base.model.multi_modal_projector.linear_1.weight"):
        assert name in grads, f"{name} got no gradient (have {sorted(grads)[:5]}...)"
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_model_base_embeddings_and_prepare(tiny):
    model, tok, _ = tiny
    ids, mask, pv, _ = model_batch(model, tok, seed=1)
    with injection(model, "reference"):
        batch = model.prepare(ids, mask, pv)
        assert batch.image_index is None  # the PyTorch path does not need it
        ref = model.base_embeddings(batch)
    with injection(model, "fused"):
        fused = model.base_embeddings(batch)  # a batch prepared on the other path: the index is built on use
        assert batch.image_index is not None
        assert (batch.image_index >= 0).sum() == batch.image_features.shape[0]
        assert model.prepare(ids, mask, pv).image_index is not None
    assert_same_bits(fused, ref, "base_embeddings")


def test_set_injection_modes(tiny, monkeypatch):
    model = tiny[0]
    with injection(model, "auto"):
        assert model._injection_hook() is None, "auto must stay on the PyTorch path on CPU"
    with pytest.raises(ValueError, match=r"\('auto', 'fused', 'reference'\), got 'triton'"):
        model.set_injection("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA, or TRITON_INTERPRET=1"):
        model.set_injection("fused")
    assert model._injection_mode != "fused"


# ------------------------------------------------------------------------------------------------ the benchmark


def test_benchmark_report_smoke(tmp_path):
    """`python -m benchmarks.bench_latent_inject --out DIR --smoke`: every section of the GPU report runs on CPU
    and its numerics checks hold (the same code runs at full size on a GPU)."""
    import json

    from benchmarks import bench_latent_inject

    assert bench_latent_inject.main(["--out", str(tmp_path), "--smoke"]) == 0
    report = json.loads((tmp_path / "bench_latent_inject.json").read_text())
    assert not report["errors"] and report["numerics"]["all_ok"] and report["schedule"]["ok"]
    assert report["bandwidth"]["rows"] and report["bandwidth"]["sweep"]
    assert "Numerics" in (tmp_path / "bench_latent_inject.md").read_text()
