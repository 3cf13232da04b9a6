"""The built-in InternVL3 geometries (1B/2B/8B) and the meta-device build; tiny models with their shape features
(untied lm_head, 12/2 and 28/4 query/KV heads, q/k/v biases) through the engine's equivalence checks.

Expected sizes. The parameter counts below are computed here, independently of the loader, from the published
configs: the Qwen2.5-0.5B/1.5B/7B config.json (hidden, layers, heads, KV heads, intermediate size; q/k/v biases,
o/MLP without), InternVL3's vocabulary of 151,674 tokens and untied lm_head (OpenGVLab/InternVL3-*: `tie_word_
embeddings: false`), InternViT-300M-448px-V2_5 (1024 wide, 24 layers, 4096 MLP, 14 px patches at 448 px, qkv_bias
true, layer scale) and the MLP projector (LayerNorm(4096), 4096 -> hidden, hidden -> hidden). The totals equal
the sizes the Hugging Face model pages of OpenGVLab/InternVL3-1B / -2B / -8B state: 0.938B, 2.09B and 7.94B
parameters; the language models' non-embedding counts equal Qwen2.5's model cards (0.36B, 1.31B, 6.53B).
"""

from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.model import loading
from engine.model.loading import LATENT_TOKENS, build_random_base, builtin_config
from engine.model.reference import naive_forward
from tests.helpers import align_batch, pad_batch, random_pixels, sample_ids

VOCAB = 151674


def internvit_300m_params() -> int:
    width, layers, mlp, patch, side = 1024, 24, 4096, 14, 448 // 14
    embeddings = 3 * patch * patch * width + width + width + (side * side + 1) * width  # conv, CLS, positions
    attention = 3 * (width * width + width) + width * width + width  # q/k/v with bias, output projection
    layer = attention + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width + 2 * width  # MLP, 2 LN, 2 scales
    return embeddings + layers * layer


def qwen2_layer_params(hidden: int, heads: int, kv_heads: int, mlp: int) -> int:
    head_dim = hidden // heads
    q = hidden * hidden + hidden
    kv = 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim)
    o = hidden * hidden
    return q + kv + o + 3 * hidden * mlp + 2 * hidden


PUBLISHED = {
    # spec: (hidden, layers, heads, kv heads, intermediate, published non-embedding LM count, published total)
    "internvl3-1b-geometry": (896, 24, 14, 2, 4864, 0.36e9, 0.938e9),
    "internvl3-2b-geometry": (1536, 28, 12, 2, 8960, 1.31e9, 2.09e9),
    "internvl3-8b-geometry": (3584, 28, 28, 4, 18944, 6.53e9, 7.94e9),
}


@pytest.mark.parametrize("spec", sorted(PUBLISHED))
def test_geometry_builds_on_meta_with_the_published_sizes(spec):
    hidden, layers, heads, kv_heads, mlp, non_embedding, total = PUBLISHED[spec]
    model, tok, proc = load_model(spec, device="meta")
    base = model.base
    assert all(p.device.type == "meta" for p in base.parameters()), "device='meta' must allocate nothing"
    text = base.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (hidden, layers, heads, kv_heads, mlp, VOCAB)
    assert text.hidden_size // text.num_attention_heads in (64, 128)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    assert base.config.tie_word_embeddings is False and base.lm_head.weight is not base.get_input_embeddings().weight
    attn = base.model.language_model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert base.model.vision_tower.encoder.layer[0].attention.q_proj.bias is not None  # InternViT qkv_bias
    assert proc.tokens_per_tile == model.tokens_per_tile == 256

    layer = qwen2_layer_params(hidden, heads, kv_heads, mlp)
    lm_non_embedding = layers * layer + hidden  # + the final norm
    projector = 2 * 4096 + (4096 * hidden + hidden) + (hidden * hidden + hidden)
    expected = lm_non_embedding + 2 * VOCAB * hidden + projector + internvit_300m_params()
    got = sum(p.numel() for p in base.parameters())
    assert got == expected, f"{spec}: {got:,} parameters, the published configs give {expected:,}"
    assert round(got / 1e9, 2 if total > 1e9 else 3) == total / 1e9
    assert round(lm_non_embedding / 1e9, 2) == non_embedding / 1e9
    assert len(tok) <= VOCAB and model.latent_id < VOCAB


def _constant_init(name: str) -> bool:
    """Parameters whose initialisation is deterministic (norms, biases, layer scales, CLS and position tables)."""
    return not name.endswith("weight") or "norm" in name or "lambda" in name


@pytest.mark.parametrize("tie", [True, False])
def test_meta_materialisation_matches_a_host_build(tie):
    config, _ = builtin_config("tiny", {"tie_word_embeddings": tie})
    host = build_random_base(config, device="cpu", seed=0, on_meta_first=False)
    meta = build_random_base(config, device="cpu", seed=0, on_meta_first=True)
    again = build_random_base(config, device="cpu", seed=0, on_meta_first=True)
    other = build_random_base(config, device="cpu", seed=1, on_meta_first=True)
    h, m = dict(host.named_parameters(remove_duplicate=False)), dict(meta.named_parameters(remove_duplicate=False))
    assert h.keys() == m.keys()
    assert (meta.lm_head.weight is meta.get_input_embeddings().weight) == tie
    assert (host.lm_head.weight is host.get_input_embeddings().weight) == tie
    for name, a in h.items():
        b = m[name]
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), name
        assert torch.isfinite(b).all(), name
        if _constant_init(name):
            assert torch.equal(a, b), f"{name}: deterministic initialisation differs"
        else:  # normal(0, initializer_range) in both, from different RNG streams
            assert abs(b.std().item() - a.std().item()) < 0.1 * a.std().item(), name
            assert abs(b.mean().item()) < 0.2 * a.std().item(), name
    hb, mb = dict(host.named_buffers()), dict(meta.named_buffers())
    assert hb.keys() == mb.keys() and all(torch.equal(hb[n], mb[n]) for n in hb), "buffers (rotary tables) differ"
    same = [torch.equal(a, b) for a, b in zip(meta.parameters(), again.parameters())]
    assert all(same), "a seed must give the same weights"
    assert not all(torch.equal(a, b) for a, b in zip(meta.parameters(), other.parameters()))


def test_load_model_materialises_a_geometry_and_copies_the_latent_rows(monkeypatch):
    """The geometry path of load_model (meta build, materialisation on the device, latent-token rows), at tiny sizes."""
    small_vision = dict(loading.INTERNVIT_300M, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, image_size=224, patch_size=28)
    monkeypatch.setattr(loading, "INTERNVIT_300M", small_vision)
    monkeypatch.setitem(loading.GEOMETRIES, "test-geometry", loading.Geometry("test", 64, 2, 4, 2, 128))
    monkeypatch.setattr(loading, "BUILTIN_SPECS", (*loading.BUILTIN_SPECS, "test-geometry"))
    monkeypatch.setattr(loading, "INTERNVL3_VOCAB_SIZE", 600)
    model, tok, _ = load_model("test-geometry", seed=3)
    base = model.base
    assert base.lm_head.weight is not base.get_input_embeddings().weight
    embed, head = base.get_input_embeddings().weight, base.lm_head.weight
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in base.parameters())
    source = tok.eos_token_id  # "<<" is not one token of the tiny vocabulary
    for token in LATENT_TOKENS:
        i = tok.convert_tokens_to_ids(token)
        assert torch.equal(embed[i], embed[source]) and torch.equal(head[i], head[source]), token
    assert not torch.equal(head[source], embed[source])
    again, _, _ = load_model("test-geometry", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.base.parameters()))


# ---------------------------------------------------------------------- the big models' shape features, tiny
SHAPES = {
    # Qwen2.5-1.5B's 12 query / 2 KV heads and Qwen2.5-7B's 28 / 4, head_dim 16, untied lm_head
    "untied_12q_2kv": dict(text_heads=12, text_kv_heads=2, text_hidden_size=192, text_intermediate_size=128,
                           tie_word_embeddings=False),
    "untied_28q_4kv": dict(text_heads=28, text_kv_heads=4, text_hidden_size=448, text_intermediate_size=128,
                           tie_word_embeddings=False),
}
TOL = 2e-5


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shaped(request):
    """A tiny model with the shape features, biases and norm weights randomised so that a path that drops them
    (or reads another head's slice) cannot agree with the reference by accident."""
    model, tok, _ = load_model("tiny", seed=0, model_overrides=SHAPES[request.param])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    assert model.base.lm_head.weight is not model.base.get_input_embeddings().weight
    model.eval()
    return request.param, model, tok


def test_causal_forward_matches_the_naive_reference(shaped):
    name, model, tok = shaped
    specs = [(1, "What colour?", 3, False), (2, "Start at the top left cell. Move right twice.", 0, True),
             (1, "Which colour is the last cell?", 1, True), (0, "Move down.", 2, False)]
    rows = [sample_ids(tok, model, tiles=t, question=q, n_latents=n) for t, q, n, _ in specs]
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[s[3] for s in specs])
    pv = random_pixels(sum(s[0] for s in specs), model.config.vision_config.image_size[0], 0)
    out = model(ids, mask, pv, return_inputs_embeds=True)
    ref = naive_forward(model, ids, mask, pv)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=TOL, rtol=0)


def _train_pass(model, mode, ids, mask, pv):
    model.set_latent_passes(mode, prefix_bucket=5, final_bucket=7)
    try:
        model.zero_grad(set_to_none=True)
        out = model(ids, mask, pv, labels=ids.masked_fill(mask == 0, -100), return_inputs_embeds=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out.block_calls = sum(b.calls for b in model._latent_blocks.values())  # before the reset drops the blocks
        return out, grads
    finally:
        model.set_latent_passes("auto")


def test_static_latent_block_matches_the_transformers_passes(shaped):
    name, model, tok = shaped
    questions = ["What colour?", "Start at the top left cell. Move right twice.", "Move down."]
    rows = [sample_ids(tok, model, tiles=t, question=q, n_latents=n) for q, n, t in zip(questions, (4, 2, 3), (1, 2, 0))]
    ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
    pv = random_pixels(3, model.config.vision_config.image_size[0], 1)
    model.train()
    try:
        ref, ref_grads = _train_pass(model, "transformers", ids, mask, pv)
        out, grads = _train_pass(model, "static", ids, mask, pv)
    finally:
        model.eval()
    assert ref.block_calls == 0 and out.block_calls == 1, "the aligned batch did not take the block"
    real = mask.bool()
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=TOL, rtol=0)
    assert grads.keys() == ref_grads.keys() and "base.lm_head.weight" in grads
    for param, g in ref_grads.items():
        torch.testing.assert_close(grads[param], g, atol=TOL, rtol=1e-4, msg=lambda m: f"{name} {param}: {m}")


@pytest.mark.parametrize("fused_ops,merged", [(False, False), (True, True)])
def test_paged_runner_matches_the_dynamic_cache(shaped, fused_ops, merged):
    from engine.model.paged.runner import PagedRunner

    name, model, tok = shaped
    specs = [(1, "What colour is the cell?", 3), (2, "Start at the top left. Move right.", 1), (0, "Move down.", 0)]
    rows = []
    for tiles, question, n in specs:
        text = ("<img>" + "<IMG_CONTEXT>" * (model.tokens_per_tile * tiles) + "</img>" if tiles else "") + question
        rows.append(tok(text + "\n<|start-latent|>" + "<|latent|>" * n + "<|end-latent|>").input_ids)
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[True] * len(rows))
    pv = random_pixels(3, model.config.vision_config.image_size[0], 2)
    dynamic = model.generate(ids, mask, pv, max_new_tokens=5, eos_token_id=-1)
    runner = PagedRunner(model, block_size=4, fused_ops=fused_ops, merged_projections=merged)
    paged = runner.generate(ids, mask, pv, max_new_tokens=5, eos_token_id=-1, pad_token_id=model.pad_token_id)
    assert torch.equal(paged, dynamic), f"{name}: paged {paged.tolist()} vs dynamic {dynamic.tolist()}"
    assert runner.cache.num_used_blocks == 0


def test_check_same_architecture_knows_every_builtin_spec(tmp_path):
    from engine.training.config import ConfigError, TrainConfig
    from engine.training.model_setup import check_same_architecture

    eight, _, _ = load_model("internvl3-8b-geometry", device="meta")
    check_same_architecture(eight, TrainConfig(model_id="internvl3-8b-geometry", device="cpu"), tmp_path)
    with pytest.raises(ConfigError, match=r"text_config.hidden_size: model_id 'internvl3-2b-geometry' has 1536, "
                                          r"checkpoint has 3584"):
        check_same_architecture(eight, TrainConfig(model_id="internvl3-2b-geometry", device="cpu"), tmp_path)
    untied, _, _ = load_model("tiny", model_overrides={"tie_word_embeddings": False})
    with pytest.raises(ConfigError, match="tie_word_embeddings: model_id 'tiny' has True, checkpoint has False"):
        check_same_architecture(untied, TrainConfig(model_id="tiny", device="cpu"), tmp_path)
