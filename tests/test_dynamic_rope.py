"""A dynamic-NTK rotary embedding (what InternVL3's published language-model configs carry) in the fast paths.

Below its original max_position_embeddings it is the default rope, but transformers decides that on the host, at
every call, from the positions: the fast paths (the latent block, the paged runner's table and CUDA graphs) were
switched off for it. They now run it through `layers.rotary_cos_sin` while the positions stay in that range, and
leave it to the transformers passes past it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.model.layers import rope_at_default, rope_default_limit, rotary_cos_sin, rotary_host_dependent
from tests.test_latent_block import aligned_batch, run

LIMIT = 96  # the tiny model's max_position_embeddings here: the aligned batch fits, a long prompt does not
TOL = 2e-5


@pytest.fixture(scope="module")
def dynamic_model():
    from engine import load_model

    model, tok, _ = load_model("tiny", seed=0, model_overrides={"max_position_embeddings": LIMIT})
    lm = model.language_model
    config = copy.deepcopy(lm.config)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    lm.rotary_emb = type(lm.rotary_emb)(config=config)
    model.eval()
    return model, tok


def test_a_dynamic_rope_is_its_default_one_within_its_range(dynamic_model):
    model, _ = dynamic_model
    lm, x = model.language_model, torch.zeros(1, 3, 8)
    assert rope_default_limit(lm) == LIMIT and rotary_host_dependent(lm) is None
    assert rotary_host_dependent(lm, max_positions=LIMIT) is None
    assert "past 96 positions (97 asked for)" in rotary_host_dependent(lm, max_positions=LIMIT + 1)
    inside = torch.arange(LIMIT)[None]
    want = lm.rotary_emb(x, inside)
    got = rotary_cos_sin(lm, x, inside)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lm.rotary_emb(x, torch.arange(2 * LIMIT)[None])  # an eager call past the range grows the frequencies
    shorter = inside[:, : LIMIT // 2]
    try:
        grown = rotary_cos_sin(lm, x, shorter)  # not the default any more: transformers' call, which puts them back
        assert torch.equal(grown[0], want[0][:, : LIMIT // 2])
    finally:
        lm.rotary_emb(x, shorter)


def test_the_latent_block_runs_a_dynamic_rope_as_the_transformers_passes_do(dynamic_model):
    model, tok = dynamic_model
    ids, mask, pv = aligned_batch(model, tok)
    assert ids.shape[1] <= LIMIT
    model._latent_blocks.clear()
    ref, ref_grads = run(model, "transformers", ids, mask, pv)
    out, grads = run(model, "static", ids, mask, pv, bucket=5, final_bucket=7)  # refused for this rope before
    assert out.block_calls == 1
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def long_batch(model, tok):
    ids, mask, pv = aligned_batch(model, tok)
    pad = LIMIT + 8 - ids.shape[1]  # real tokens in front: positions past the range
    long_ids = torch.cat([torch.full((ids.shape[0], pad), tok.pad_token_id), ids], 1)
    long_mask = torch.cat([torch.ones(ids.shape[0], pad, dtype=mask.dtype), mask], 1)
    return long_ids, long_mask, pv


@pytest.mark.parametrize("layer_ops", ["reference", "fused"])
def test_positions_past_the_range_take_the_transformers_passes(dynamic_model, layer_ops):
    """The latent block and the stack passes (with the fused layer ops) both stand aside: computed without
    transformers' update they would use the default frequencies where it rescales them."""
    model, tok = dynamic_model
    long_ids, long_mask, pv = long_batch(model, tok)
    model._latent_blocks.clear()
    ref, _ = run(model, "transformers", long_ids, long_mask, pv, layer_ops="reference")
    out, _ = run(model, "static", long_ids, long_mask, pv, layer_ops=layer_ops)
    assert out.block_calls == 0  # the block stood aside for this forward
    torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=0)


def test_a_forward_after_a_longer_one_gets_the_default_rope_back(dynamic_model):
    """A forward past the range grows transformers' frequencies (another buffer). The next one within the range puts
    them back before the block runs, and releases graphs captured over the old buffer."""
    model, tok = dynamic_model
    lm = model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.rotary_emb.config)  # fresh: its buffer is not yet the original's
    ids, mask, pv = aligned_batch(model, tok)
    ref, _ = run(model, "transformers", ids, mask, pv)
    run(model, "static", ids, mask, pv)  # the block's first call
    buffer = model.language_model.rotary_emb.inv_freq.data_ptr()  # what graphs captured now would read
    run(model, "transformers", *long_batch(model, tok))  # grows the rope
    assert not rope_at_default(model.language_model.rotary_emb)
    released = []
    original = type(model).release_latent_graphs
    model.release_latent_graphs = lambda: (released.append(1), original(model))
    try:
        out, _ = run(model, "static", ids, mask, pv)
    finally:
        del model.release_latent_graphs
    rotary = model.language_model.rotary_emb
    assert rope_at_default(rotary) and out.block_calls >= 1
    assert rotary.inv_freq.data_ptr() != buffer and released  # graphs over the old buffer are captured again
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)


def test_the_paged_runner_tabulates_a_dynamic_rope_within_its_range(dynamic_model):
    from engine.model.paged.runner import PagedRunner
    from tests.test_generate import prompts

    model, tok = dynamic_model
    ids, mask, pv, _ = prompts(model, tok)
    want = model.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=-1)
    with PagedRunner(model) as runner:
        assert runner.rotary.tabulated
        assert torch.equal(runner.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=-1), want)
    assert not PagedRunner(model, max_model_len=2 * LIMIT).rotary.tabulated
    x = torch.zeros(1, 1, 8)
    model.language_model.rotary_emb(x, torch.arange(2 * LIMIT)[None])  # grown by a longer eager call
    with PagedRunner(model) as runner:  # its table is the default rope's all the same
        assert torch.equal(runner.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=-1), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_graphs_capture_a_dynamic_rope(dynamic_model):
    """The captured latent block and the paged runner's captured steps with the dynamic rope give the transformers
    passes' loss and gradients and the dynamic cache's tokens."""
    from engine.model.paged.runner import PagedRunner
    from tests.test_generate import prompts

    model = copy.deepcopy(dynamic_model[0]).cuda().train()
    tok = dynamic_model[1]
    for seed in range(2):  # the first call captures, the second replays with new data
        ids, mask, pv = aligned_batch(model, tok, seed=seed)
        ids, mask, pv = ids.cuda(), mask.cuda(), pv.cuda()
        ref, ref_grads = run(model, "transformers", ids, mask, pv)
        out, grads = run(model, "cuda_graph", ids, mask, pv)
        assert out.block_calls >= 1
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert sum(b.captures for (graphed, *_), b in model._latent_blocks.items() if graphed) == 1
    model.eval()
    ids, mask, pv, _ = prompts(model, tok)
    ids, mask, pv = ids.cuda(), mask.cuda(), pv.cuda()
    want = model.generate(ids, mask, pv, max_new_tokens=6, eos_token_id=-1)
    with PagedRunner(model) as runner:
        assert torch.equal(runner.generate(ids, mask, pv, max_new_tokens=6, eos_token_id=-1), want)
        assert runner.graphs.captures > 0
