"""Batched latent generation: batch == row by row == the step-by-step (batch-1, recompute) reference."""

from __future__ import annotations

import pytest
import torch

from engine.model.generation import GenerationError, select_next_token
from engine.model.reference import naive_generate
from tests.helpers import pad_batch, random_pixels


def prompt_ids(tok, model, *, tiles, question, n_latents):
    text = "<img>" + "<IMG_CONTEXT>" * (model.tokens_per_tile * tiles) + "</img>" if tiles else ""
    text += question + "\n<|start-latent|>" + "<|latent|>" * n_latents + "<|end-latent|>"
    return tok(text).input_ids


def prompts(model, tok):
    specs = [
        dict(tiles=1, question="What colour is the cell?", n_latents=3),
        dict(tiles=2, question="Start at the top left. Move right.", n_latents=1),
        dict(tiles=0, question="Move down, then left.", n_latents=0),
        dict(tiles=1, question="Which colour?", n_latents=2),
    ]
    rows = [prompt_ids(tok, model, **{k: s[k] for k in ("tiles", "question", "n_latents")}) for s in specs]
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[True] * len(rows))
    tiles = [s["tiles"] for s in specs]
    pv = random_pixels(sum(tiles), model.config.vision_config.image_size[0], 11)
    return ids, mask, pv, tiles


def test_batch_equals_row_by_row_and_reference(tiny_model, tiny_tok):
    model = tiny_model
    ids, mask, pv, tiles = prompts(model, tiny_tok)
    # Pick as eos a token the model actually produces, so rows stop at different lengths.
    probe = model.generate(ids, mask, pv, max_new_tokens=6, eos_token_id=-1)
    eos = int(probe[0, 2])
    batch = model.generate(ids, mask, pv, max_new_tokens=6, eos_token_id=eos)
    ref = naive_generate(model, ids, mask, pv, max_new_tokens=6, eos_token_id=eos, tiles_per_row=tiles)
    start = 0
    for b in range(ids.shape[0]):
        row_ids = ids[b, mask[b].bool()][None]
        row_pv = pv[start : start + tiles[b]] if tiles[b] else None
        start += tiles[b]
        alone = model.generate(row_ids, None, row_pv, max_new_tokens=6, eos_token_id=eos)
        n = alone.shape[1]
        assert torch.equal(batch[b, :n], alone[0]), f"row {b}: batch {batch[b].tolist()} vs alone {alone[0].tolist()}"
        assert (batch[b, n:] == model.pad_token_id).all()
    assert torch.equal(batch, ref), f"batched {batch.tolist()} vs step-by-step reference {ref.tolist()}"
    ended = (batch == eos).any(1)
    assert ended.any(), "eos should end at least one row early in this test"


def test_generation_follows_the_thoughts(tiny_model, tiny_tok):
    """Other pixels -> other thoughts -> (almost surely) other first-step logits."""
    ids, mask, pv, _ = prompts(tiny_model, tiny_tok)
    batch = tiny_model.prepare(ids, mask, pv)
    h1, _, _ = tiny_model.run_passes(batch)
    other = random_pixels(pv.shape[0], pv.shape[-1], 12)
    h2, _, _ = tiny_model.run_passes(tiny_model.prepare(ids, mask, other))
    assert (h1[:, -1] - h2[:, -1]).abs().amax() > 1e-5


def test_right_padded_prompts_are_rejected(tiny_model, tiny_tok):
    ids, mask, pv, _ = prompts(tiny_model, tiny_tok)
    right_ids, right_mask = pad_batch(
        [ids[b, mask[b].bool()].tolist() for b in range(ids.shape[0])], tiny_tok.pad_token_id
    )
    with pytest.raises(GenerationError, match=r"left-padded.*rows \["):
        tiny_model.generate(right_ids, right_mask, pv, max_new_tokens=2)


def test_max_new_tokens_zero_and_shape(tiny_model, tiny_tok):
    ids, mask, pv, _ = prompts(tiny_model, tiny_tok)
    out = tiny_model.generate(ids, mask, pv, max_new_tokens=0)
    assert out.shape == (ids.shape[0], 0)
    out = tiny_model.generate(ids, mask, pv, max_new_tokens=5, eos_token_id=-1)
    assert out.shape == (ids.shape[0], 5) and out.dtype == torch.long


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(64, 50)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = select_next_token(logits, do_sample=True, temperature=0.7, top_k=5, generator=g1)
    b = select_next_token(logits, do_sample=True, temperature=0.7, top_k=5, generator=g2)
    assert torch.equal(a, b)
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, None]).any(1).all(), "a sampled token fell outside the top-k"
    c = select_next_token(logits, do_sample=True, top_p=1e-6, generator=g1)
    assert torch.equal(c, logits.argmax(-1)), "top_p -> 0 must reduce to greedy"
    with pytest.raises(ValueError, match="temperature"):
        select_next_token(logits, do_sample=True, temperature=0.0)


@pytest.mark.parametrize("kv_cache", ["dynamic", "paged"])
def test_tiles_of_another_size_or_type_are_refused(tiny_model, tiny_tok, kv_cache):
    """Tiles of another size give the vision tower another number of patches: more feature rows than image tokens
    were silently cut to fit (the image of a row then ignored), fewer failed in the scatter or, in the fused
    injection kernel, were read past their end."""
    model = tiny_model
    ids, mask, pv, tiles = prompts(model, tiny_tok)
    size = pv.shape[-1]
    for bad in (random_pixels(pv.shape[0], 2 * size, 3), random_pixels(pv.shape[0], size // 2, 3),
                pv[:, :, :, : size // 2], pv.to(torch.uint8)):  # fmt: skip
        with pytest.raises(ValueError, match=rf"pixel_values must be .*\(total_tiles, 3, {size}, {size}\)|normalised"):
            model.generate(ids, mask, bad, max_new_tokens=2, kv_cache=kv_cache)


def test_prompt_ids_and_options_of_the_wrong_kind_are_refused(tiny_model, tiny_tok):
    from engine.model.generation import GenerationOptions, generate

    model = tiny_model
    ids, mask, pv, _ = prompts(model, tiny_tok)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, tokens\)"):
        model.generate(ids[0], mask[0], None, max_new_tokens=2)
    out_of_range = ids.clone()
    out_of_range[0, -1] = model.base.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model.generate(out_of_range, mask, pv, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.generate(ids, mask[:, 1:], pv, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        GenerationOptions(max_new_tokens=2.5)
    with pytest.raises(TypeError, match="options must be a GenerationOptions"):
        generate(model, ids, mask, pv, {"max_new_tokens": 2})


@pytest.mark.parametrize("option", ["num_splits", "num_blocks", "max_model_len", "max_graph_batch"])
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_paged_runner_sizes_out_of_range_are_refused(tiny_model, option, value):
    """num_splits=0 launched an empty attention grid and decoded garbage; num_blocks=0 and max_model_len=0 quietly
    meant 'automatic'."""
    from engine.model.paged.runner import PagedRunner

    with pytest.raises(ValueError, match=rf"{option} must be None or an integer >= 1"):
        PagedRunner(tiny_model, **{option: value})


@pytest.mark.parametrize("kv_cache", ["dynamic", "paged"])
def test_a_mask_of_other_values_than_0_and_1_is_refused(tiny_model, tiny_tok, kv_cache):
    """Its values would count as positions (a mask of 2s puts the tokens at 1, 3, 5, ...) and the paged cache
    would read slots nobody wrote."""
    ids, mask, pv, _ = prompts(tiny_model, tiny_tok)
    with pytest.raises(GenerationError, match=r"only 0 \(padding\) and 1 \(token\), got values in \[0.0, 2.0\]"):
        tiny_model.generate(ids, mask * 2, pv, max_new_tokens=2, kv_cache=kv_cache)
    as_float = tiny_model.generate(ids, mask.float(), pv, max_new_tokens=2, eos_token_id=-1, kv_cache=kv_cache)
    assert torch.equal(as_float, tiny_model.generate(ids, mask, pv, max_new_tokens=2, eos_token_id=-1, kv_cache=kv_cache))


def test_options_that_would_fail_mid_generation_are_refused_up_front():
    from engine.model.generation import GenerationOptions

    with pytest.raises(ValueError, match="temperature must be > 0 when sampling, got nan"):
        GenerationOptions(do_sample=True, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        GenerationOptions(top_k=2.0)
    with pytest.raises(ValueError, match=r"eos_token_id must be one token id .*\(several end ids are not supported"):
        GenerationOptions(eos_token_id=[3, 4])
    with pytest.raises(ValueError, match="pad_token_id must be one token id"):
        GenerationOptions(pad_token_id=torch.tensor([1, 2]))
    assert GenerationOptions(eos_token_id=torch.tensor(7)).eos_token_id == 7  # one id as a tensor: read once


def test_a_generated_special_token_is_fed_as_a_token_on_every_path(tiny_model, tiny_tok):
    """The original CoCoNuT embeds every new token, a generated <|latent|> or <IMG_CONTEXT> too: thoughts come from
    the prompt only. The reference recomputed the whole sequence and made such a token a thought (or an image slot)."""
    from engine.model.paged.runner import PagedRunner

    model = tiny_model
    ids, mask, pv, tiles = prompts(model, tiny_tok)
    row_ids, row_pv = ids[:1, mask[0].bool()], pv[: tiles[0]]
    for forced in (model.latent_id, model.image_token_id):
        calls = []

        def first_token_is(module, args, out, forced=forced):
            calls.append(1)
            if len(calls) == 1:  # the first new token of each call
                out = out.clone()
                out[..., forced] = out.abs().amax() * 10 + 10
            return out

        handle = model.base.lm_head.register_forward_hook(first_token_is)
        try:
            got = {}
            for name, run in (
                ("dynamic", lambda: model.generate(row_ids, None, row_pv, max_new_tokens=5, eos_token_id=-1)),
                ("paged", lambda: PagedRunner(model).generate(row_ids, None, row_pv, max_new_tokens=5, eos_token_id=-1)),
                ("reference", lambda: naive_generate(model, row_ids, None, row_pv, max_new_tokens=5, eos_token_id=-1)),
            ):
                calls.clear()
                got[name] = run()
        finally:
            handle.remove()
        assert int(got["reference"][0, 0]) == forced
        assert torch.equal(got["dynamic"], got["reference"]) and torch.equal(got["paged"], got["reference"]), got


def test_reference_without_a_pad_id_pads_with_0_as_generate_does(tiny_model, tiny_tok):
    ids, mask, pv, tiles = prompts(tiny_model, tiny_tok)
    pad, eos = tiny_model.pad_token_id, tiny_model.eos_token_id
    try:
        tiny_model.pad_token_id = None
        probe = tiny_model.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=-1)
        stop = int(probe[0, 1])  # row 0 ends at its second token, the others later or never
        got = naive_generate(tiny_model, ids, mask, pv, max_new_tokens=4, eos_token_id=stop, tiles_per_row=tiles)
        assert torch.equal(got, tiny_model.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=stop))
    finally:
        tiny_model.pad_token_id, tiny_model.eos_token_id = pad, eos


@pytest.mark.parametrize("kv_cache", ["dynamic", "paged"])
def test_generation_runs_in_eval_mode_and_gives_the_mode_back(tiny_model, tiny_tok, kv_cache):
    """A model left in train mode decoded with dropout on the dynamic cache (the paged runner's layers have none)."""
    import copy

    model = copy.deepcopy(tiny_model)
    for layer in model.language_model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids, mask, pv, _ = prompts(model, tiny_tok)
    want = model.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=-1, kv_cache=kv_cache)
    model.train()
    model.base.model.vision_tower.eval()  # a part kept in eval mode stays so
    for _ in range(2):
        assert torch.equal(model.generate(ids, mask, pv, max_new_tokens=4, eos_token_id=-1, kv_cache=kv_cache), want)
    assert model.training and model.language_model.layers[0].training and not model.base.model.vision_tower.training


def test_ranks_in_lockstep_refuse_a_prompt_too_long_together(tiny_model, tiny_tok, monkeypatch):
    """Under ZeRO-3 one rank raising alone would leave the others waiting in a collective."""
    from engine.model.generation import GenerationOptions, generate

    ids, mask, pv, _ = prompts(tiny_model, tiny_tok)
    others_too_long = GenerationOptions(max_new_tokens=2, step_sync=lambda local_ok: False)
    with pytest.raises(GenerationError, match="another rank's prompts need more positions"):
        generate(tiny_model, ids, mask, pv, others_too_long)
    asked = []
    all_fit = GenerationOptions(max_new_tokens=2, eos_token_id=-1, step_sync=lambda flag: asked.append(flag) or flag)
    assert generate(tiny_model, ids, mask, pv, all_fit).shape == (ids.shape[0], 2)
    assert asked[0] is True  # this rank's prompts fit: it said so before decoding
