"""Liger-Kernel in the engine (engine/model/liger.py, MultimodalCoconut.set_liger_kernels).

On CPU, Liger's fused linear cross-entropy and RoPE kernels run under the Triton interpreter and are compared with
the engine's own paths (the chunked lm_head loss, transformers' rotary function). Its RMSNorm and SwiGLU kernels do
not run in the interpreter of triton 3.9 (their scalar arguments reach the kernel as Python floats:
"'float' object has no attribute 'to'"), so on CPU their wiring is tested with stand-ins of the same signature, and
the kernels themselves where CUDA is. Without the optional package the kernel tests are skipped; the wiring and the
configuration tests run anyway."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import engine.model.liger as liger
from engine import load_model
from engine.training.config import ConfigError, config_from_dict
from tests.helpers import align_batch, random_pixels, sample_ids

CUDA = torch.cuda.is_available()
SMALL = {"text_hidden_size": 48, "text_layers": 2, "text_heads": 6, "text_kv_heads": 2, "text_intermediate_size": 80,
         "tie_word_embeddings": False}


def have_liger() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


needs_liger = pytest.mark.skipif(not have_liger(), reason="the optional liger-kernel package is not installed")


@pytest.fixture
def model_and_batch():
    model, tok, _ = load_model("tiny", seed=0, model_overrides=SMALL)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms that are not all ones, so that a norm that drops its weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model.set_latent_passes("transformers")
    rows = [sample_ids(tok, model, tiles=t, question=q, n_latents=n)
            for t, q, n in ((1, "What colour?", 2), (1, "Move right twice.", 2), (0, "Move down.", 1))]
    ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
    labels = ids.masked_fill((mask == 0) | (ids == model.latent_id), -100)
    pv = random_pixels(2, model.config.vision_config.image_size[0], 0)
    yield model, (ids, mask, pv, labels)
    model.set_liger_kernels([])  # rope is process-wide: never leave it on for other tests


def loss_and_grads(model, batch, pieces):
    model.set_liger_kernels(pieces)
    ids, mask, pv, labels = batch
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, pv, labels=labels, return_logits=False, return_inputs_embeds=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.hidden_states.detach(), grads


def assert_same(a, b, atol):
    (loss_a, hidden_a, grads_a), (loss_b, hidden_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    torch.testing.assert_close(hidden_a, hidden_b, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys() and "base.lm_head.weight" in grads_a
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_a[name], g, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_liger
def test_fused_linear_cross_entropy_equals_the_chunked_loss(model_and_batch):
    model, batch = model_and_batch
    reference = loss_and_grads(model, batch, [])
    model.loss_chunk_tokens = 5  # the reference in several recomputed chunks
    chunked = loss_and_grads(model, batch, [])
    fused = loss_and_grads(model, batch, ["fused_linear_cross_entropy"])
    assert_same(chunked, reference, atol=1e-6)
    assert_same(fused, reference, atol=2e-6)
    assert model._liger_pieces == {"fused_linear_cross_entropy"}


@needs_liger
def test_rope_equals_transformers_and_is_switched_off_again(model_and_batch):
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.apply_rotary_pos_emb
    model, batch = model_and_batch
    reference = loss_and_grads(model, batch, [])
    with_rope = loss_and_grads(model, batch, ["rope"])
    assert modeling_qwen2.apply_rotary_pos_emb is not original  # process-wide, as documented
    assert_same(with_rope, reference, atol=1e-6)
    model.set_liger_kernels([])
    assert modeling_qwen2.apply_rotary_pos_emb is original


@needs_liger
@pytest.mark.parametrize("rows,columns", [(3, 1), (1, 1), (3, 4)])
def test_rope_keeps_one_position_chunks_exact(rows, columns):
    """Values and gradients of the rope piece equal transformers' on every chunk shape the engine uses, one-position
    chunks of several rows included (liger-kernel 0.8.5's own backward is wrong there: see engine/model/liger.py)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    positions = torch.arange(columns)[None] + torch.tensor([[0], [3], [5]])[:rows]
    cos, sin = Qwen2RotaryEmbedding(config)(torch.zeros(rows, columns, 48), positions)
    g = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(rows, columns, 6, 8, generator=g), torch.randn(rows, columns, 2, 8, generator=g)
    weights_q = torch.randn(rows, 6, columns, 8, generator=g)
    weights_k = torch.randn(rows, 2, columns, 8, generator=g)
    results = []
    liger._set_rope(True)
    try:
        for fn in (liger.liger_rotary_pos_emb, apply_rotary_pos_emb):
            q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            # as transformers' attention: projections viewed as (B, T, H, D) and transposed to (B, H, T, D)
            out_q, out_k = fn((q * 1).transpose(1, 2), (k * 1).transpose(1, 2), cos, sin)
            grads = torch.autograd.grad((out_q * weights_q).sum() + (out_k * weights_k).sum(), (q, k))
            results.append((out_q.detach(), out_k.detach(), *grads))
    finally:
        liger._set_rope(False)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def fake_functional(calls: dict):
    """Stand-ins with the signatures engine/model/liger.py calls, computing what Liger's kernels compute."""

    def liger_rms_norm(x, weight, eps, offset, casting_mode, in_place):
        assert (offset, casting_mode, in_place) == (0.0, "llama", False)
        calls["rms_norm"] = calls.get("rms_norm", 0) + 1
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def liger_swiglu(a, b):
        calls["swiglu"] = calls.get("swiglu", 0) + 1
        return F.silu(a) * b

    return types.SimpleNamespace(liger_rms_norm=liger_rms_norm, liger_swiglu=liger_swiglu)


def test_norm_and_mlp_patches_are_per_instance_and_reversible(model_and_batch, monkeypatch):
    """The wiring of rms_norm and swiglu (the kernels themselves: test_kernels_on_cuda)."""
    calls: dict[str, int] = {}
    monkeypatch.setattr(liger, "liger_functional", lambda: fake_functional(calls))
    model, batch = model_and_batch
    other, _, _ = load_model("tiny", seed=0, model_overrides=SMALL)
    reference = loss_and_grads(model, batch, [])
    patched = loss_and_grads(model, batch, ["rms_norm", "swiglu"])
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        passes = model(*batch[:3]).num_passes  # (the stand-ins count these calls too)
    calls.clear()
    loss_and_grads(model, batch, ["rms_norm", "swiglu"])
    assert passes == 3 and calls == {"rms_norm": passes * (2 * layers + 1), "swiglu": passes * layers}, \
        "every norm and MLP of the language model, once per pass"
    assert_same(patched, reference, atol=1e-6)
    lm = model.language_model
    assert "forward" in vars(lm.norm) and "forward" in vars(lm.layers[0].mlp)
    assert not any("forward" in vars(m) for m in other.language_model.modules()), "other models stay untouched"
    assert not any("forward" in vars(m) for m in model.base.model.vision_tower.modules())
    model.set_liger_kernels(["swiglu"])
    assert "forward" not in vars(lm.norm) and "forward" in vars(lm.layers[1].mlp)
    model.set_liger_kernels([])
    assert not any("forward" in vars(m) for m in lm.modules()), "the class forwards are back"
    again = loss_and_grads(model, batch, [])
    assert_same(again, reference, atol=0)


def test_missing_package_and_bad_pieces(model_and_batch, monkeypatch):
    import sys

    model, _ = model_and_batch
    with pytest.raises(ValueError, match="unknown Liger kernel"):
        model.set_liger_kernels(["rms_norm", "flash"])
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'multimodal-coconut\[liger\]'"):
        model.set_liger_kernels(["rms_norm"])
    assert not any("forward" in vars(m) for m in model.language_model.modules()), "nothing half-applied"
    model.set_liger_kernels([])  # switching everything off needs no package


def test_config_key():
    base = dict(model_id="tiny", device="cpu")
    assert config_from_dict(base).liger_pieces == ()
    assert config_from_dict(dict(base, liger_kernels=True)).liger_pieces == liger.LIGER_KERNELS
    assert config_from_dict(dict(base, liger_kernels=["rope", "rms_norm", "rope"])).liger_pieces == ("rope", "rms_norm")
    with pytest.raises(ConfigError, match="unknown piece.*valid: fused_linear_cross_entropy, rms_norm, swiglu, rope"):
        config_from_dict(dict(base, liger_kernels=["rmsnorm"]))
    with pytest.raises(ConfigError, match="fused_linear_cross_entropy needs zero_stage <= 2"):
        config_from_dict(dict(base, liger_kernels=True, zero_stage=3))
    config_from_dict(dict(base, liger_kernels=["rms_norm", "swiglu", "rope"], zero_stage=3))
    with pytest.raises(ConfigError, match="liger_kernels' expects"):
        config_from_dict(dict(base, liger_kernels="all"))


@needs_liger
def test_bench_measures_the_liger_variant_at_equal_numerics(tmp_path):
    from tests.test_bench_train_step import run_variants

    rows = run_variants(tmp_path, ["adamw_fused"], ["default"], ["none", "fused_linear_cross_entropy"])
    fused = rows[-1]
    assert fused["liger"] == "fused_linear_cross_entropy"
    assert abs(fused["probe_loss_diff"]) < 1e-5 and abs(fused["loss_diff"]) < 1e-4


def _max_errors(result, reference) -> list[float]:
    (loss, hidden, grads), (ref_loss, ref_hidden, ref_grads) = result, reference
    errors = [(loss.float() - ref_loss.float()).abs().item(), (hidden.float() - ref_hidden.float()).abs().max().item()]
    return errors + [(grads[n].float() - g.float()).abs().max().item() for n, g in sorted(ref_grads.items())]


@needs_liger
@pytest.mark.skipif(not CUDA, reason="Liger's RMSNorm and SwiGLU kernels need a GPU (the interpreter cannot run them)")
@pytest.mark.parametrize("pieces", [["rms_norm"], ["swiglu"], ["rope"], ["fused_linear_cross_entropy"],
                                    list(liger.LIGER_KERNELS)], ids="+".join)
def test_kernels_on_cuda(pieces):
    """fp32: equal to the engine's paths to rounding. bf16: no further from the fp32 reference than the engine's own
    bf16 paths are (at most twice their error, plus 1e-3). The one-position latent passes run through transformers,
    so every piece also sees one-position chunks of several rows. Run with TRITON_INTERPRET=0 (tests/conftest.py
    sets it to 1 when unset)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels would run interpreted (set TRITON_INTERPRET=0 on the GPU)")
    results = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model, tok, _ = load_model("tiny", seed=0, model_overrides=SMALL, device="cuda", dtype=dtype)
            model.set_latent_passes("transformers")
            rows = [sample_ids(tok, model, tiles=1, question=q, n_latents=2) for q in ("What colour?", "Move right.")]
            ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
            labels = ids.masked_fill((mask == 0) | (ids == model.latent_id), -100)
            pv = random_pixels(2, model.config.vision_config.image_size[0], 0).to(dtype)
            batch = [t.cuda() for t in (ids, mask, pv, labels)]
            results[dtype] = (loss_and_grads(model, batch, []), loss_and_grads(model, batch, pieces))
    finally:
        liger._set_rope(False)
    reference, fp32_liger = results[torch.float32]
    assert_same(fp32_liger, reference, atol=1e-5)
    bf16_torch, bf16_liger = results[torch.bfloat16]
    for got, own in zip(_max_errors(bf16_liger, reference), _max_errors(bf16_torch, reference)):
        assert got <= 2 * own + 1e-3, f"{pieces}: bf16 error {got:.3g} vs the engine's own bf16 error {own:.3g}"
