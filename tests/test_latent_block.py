"""The one-position latent passes as one static-shape block (engine/model/latent_block.py).

On CPU the block runs eagerly ("static"): the same function that the CUDA graphs capture, with the same bucket
padding. It must give the transformers passes' logits, thoughts and every gradient, and stay exactly causal.
The graph-replay tests run where CUDA is available (benchmarks/gpu/model.sh runs them on the GPU machine).
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.model.schedule import build_schedule
from tests.helpers import CountProducts, align_batch, latent_block_inputs, pad_batch, random_pixels, sample_ids

TOL = 2e-5


def aligned_batch(model, tok, latents=(4, 2, 3), tiles=(1, 2, 0), seed=0):
    """Rows with different latent counts, tile counts and question lengths, first latents in one column."""
    questions = ["What colour?", "Start at the top left cell. Move right twice.", "Move down."]
    rows = [
        sample_ids(tok, model, tiles=t, question=questions[i % 3], n_latents=n)
        for i, (n, t) in enumerate(zip(latents, tiles))
    ]
    ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
    size = model.config.vision_config.image_size[0]
    return ids, mask, random_pixels(sum(tiles), size, seed) if sum(tiles) else None


def run(model, mode, ids, mask, pv, *, bucket=128, final_bucket=32, use_cache=False, layer_ops="auto"):
    model.set_latent_passes(mode, prefix_bucket=bucket, final_bucket=final_bucket)
    model.set_layer_ops(layer_ops)
    try:
        labels = ids.masked_fill(mask == 0, -100)
        model.zero_grad(set_to_none=True)
        out = model(ids, mask, pv, labels=labels, return_inputs_embeds=True, use_cache=use_cache)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out.block_calls = sum(b.calls for b in model._latent_blocks.values())
        out.fused_blocks = [b.fused_ops for b in model._latent_blocks.values() if b.calls]
        return out, grads
    finally:
        model.set_latent_passes("auto")
        model.set_layer_ops("auto")


@pytest.mark.parametrize("bucket,final_bucket,use_cache", [(1, 1, False), (5, 7, False), (128, 32, False), (5, 7, True)])
def test_static_block_matches_transformers_passes(tiny_model, tiny_tok, bucket, final_bucket, use_cache):
    """With use_cache the block stops before the final pass and the transformers cache gets its K/V."""
    ids, mask, pv = aligned_batch(tiny_model, tiny_tok)
    tiny_model._latent_blocks.clear()
    ref, ref_grads = run(tiny_model, "transformers", ids, mask, pv, use_cache=use_cache)
    assert ref.block_calls == 0
    out, grads = run(tiny_model, "static", ids, mask, pv, bucket=bucket, final_bucket=final_bucket, use_cache=use_cache)
    assert out.block_calls == 1, "the aligned batch did not take the block"
    if use_cache:
        for a, b in zip(out.cache.layers, ref.cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=TOL, rtol=0)
            torch.testing.assert_close(a.values, b.values, atol=TOL, rtol=0)
    real = mask.bool()
    assert out.num_passes == ref.num_passes == 5
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=TOL, rtol=0)
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=TOL, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_cache", [False, True])
def test_static_block_with_fused_ops_matches_transformers_passes(tiny_model, tiny_tok, use_cache, monkeypatch):
    """The block's norms, rotary embedding and SwiGLU through the Triton kernels and their backward
    (`GradFusedOps`, interpreted on CPU), the other passes through the layer stack with them
    (`engine.model.stack_pass`): the transformers passes' loss, logits, thoughts, cache and every gradient."""
    from engine.model import fused_ops

    ids, mask, pv = aligned_batch(tiny_model, tiny_tok, seed=1)
    tiny_model._latent_blocks.clear()
    ref, ref_grads = run(tiny_model, "transformers", ids, mask, pv, use_cache=use_cache)
    calls = {}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("rms_norm_grad", "rotary_qk_grad", "silu_mul_grad", "one_query_attention"):
        monkeypatch.setattr(fused_ops, name, counted(getattr(fused_ops, name)))
    out, grads = run(tiny_model, "static", ids, mask, pv, bucket=5, final_bucket=7, use_cache=use_cache, layer_ops="fused")
    assert out.block_calls == 1 and out.fused_blocks == [True]
    # every pass through the fused ops: the block's and the others' (the prefix, and the final one with the
    # cache); per pass and layer one rotary, one SwiGLU and two norms, per pass the final norm
    passes = out.num_passes
    layers = tiny_model.language_model.config.num_hidden_layers
    one_position = _schedule(ids, mask, tiny_model, pv).one_position_passes  # the block's passes
    assert one_position > 0
    assert calls == {"rotary_qk_grad": passes * layers, "silu_mul_grad": passes * layers,
                     "rms_norm_grad": passes * (2 * layers + 1), "one_query_attention": one_position * layers}, calls
    if use_cache:
        for a, b in zip(out.cache.layers, ref.cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=TOL, rtol=0)
            torch.testing.assert_close(a.values, b.values, atol=TOL, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=TOL, rtol=0)
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=TOL, rtol=0)
    assert grads.keys() == ref_grads.keys()
    layer_norm_grads = [n for n in grads if "language_model" in n and "layernorm" in n]
    assert layer_norm_grads and all(grads[n].abs().max() > 0 for n in layer_norm_grads)  # the kernels' dw reached them
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_fused_layer_ops_need_a_kernel_device(tiny_model, monkeypatch):
    from engine.model import fast_paths

    try:
        with pytest.raises(ValueError, match="layer ops must be one of"):
            tiny_model.set_layer_ops("triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 on CPU"):
            tiny_model.set_layer_ops("fused")
        decision = fast_paths.layer_ops(tiny_model, "auto", torch.device("cpu"), torch.float32)
        assert decision.choice == "reference"
        assert fast_paths.stack_passes(tiny_model, torch.device("cpu"), torch.float32).choice == "transformers"
    finally:
        tiny_model.set_layer_ops("auto")


@pytest.mark.parametrize("layer_ops", ["reference", "fused"])
def test_static_block_is_causal(tiny_model, tiny_tok, layer_ops):
    """Changing every token after the last latent must not move any output at or before the latents."""
    ids, mask, pv = aligned_batch(tiny_model, tiny_tok, latents=(4, 4, 4), seed=3)
    last_latent = int((ids == tiny_model.latent_id).nonzero()[:, 1].max())
    changed = ids.clone()
    after = torch.zeros_like(mask, dtype=torch.bool)
    after[:, last_latent + 1 :] = True
    after &= mask.bool()
    g = torch.Generator().manual_seed(0)
    changed[after] = torch.randint(5, 60, (int(after.sum()),), generator=g)
    tiny_model.set_latent_passes("static")
    tiny_model.set_layer_ops(layer_ops)
    try:  # gradients on: a training forward (with fused ops, the prefix pass runs through the layer stack)
        a = tiny_model(ids, mask, pv, return_inputs_embeds=True)
        b = tiny_model(changed, mask, pv, return_inputs_embeds=True)
    finally:
        tiny_model.set_latent_passes("auto")
        tiny_model.set_layer_ops("auto")
    before = mask.bool() & ~after
    assert (a.logits[before] - b.logits[before]).abs().max() == 0
    assert (a.inputs_embeds[before] - b.inputs_embeds[before]).abs().max() == 0
    assert (a.logits[after] - b.logits[after]).abs().max() > 0  # the change itself is visible


def test_unaligned_batch_takes_the_transformers_passes(tiny_model, tiny_tok):
    rows = [sample_ids(tiny_tok, tiny_model, tiles=1, question=q, n_latents=n) for q, n in (("A?", 3), ("Longer question?", 2))]
    ids, mask = pad_batch(rows, tiny_tok.pad_token_id, left=[False, False])  # right padding: latents not aligned
    pv = random_pixels(2, tiny_model.config.vision_config.image_size[0], 0)
    tiny_model._latent_blocks.clear()
    ref, ref_grads = run(tiny_model, "transformers", ids, mask, pv)
    out, grads = run(tiny_model, "static", ids, mask, pv)
    assert out.block_calls == 0  # the layout does not allow it
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)


def _schedule(ids, mask, model, pixel_values=None):
    return build_schedule(
        ids, mask, latent_id=model.latent_id, image_token_id=model.image_token_id,
        tokens_per_tile=model.tokens_per_tile, num_tiles=None if pixel_values is None else len(pixel_values),
    )[0]


def test_one_position_passes_of_each_layout(tiny_model, tiny_tok):
    L = tiny_model.latent_id
    row = sample_ids(tiny_tok, tiny_model, tiles=0, n_latents=3)
    ids, mask = align_batch([row, row], tiny_tok.pad_token_id, L)
    assert _schedule(ids, mask, tiny_model).one_position_passes == 2
    assert _schedule(ids, mask, tiny_model).with_min_passes(6).one_position_passes == 0  # lockstep cuts
    one = sample_ids(tiny_tok, tiny_model, tiles=0, n_latents=1)
    ids1, mask1 = align_batch([one], tiny_tok.pad_token_id, L)
    assert _schedule(ids1, mask1, tiny_model).one_position_passes == 0  # a single latent: no one-position pass
    gap = list(row)
    first = gap.index(L)
    gap[first + 1] = tiny_tok.convert_tokens_to_ids("a") if "a" in tiny_tok.get_vocab() else 10  # latents not contiguous
    idsg, maskg = align_batch([gap], tiny_tok.pad_token_id, L)
    assert _schedule(idsg, maskg, tiny_model).one_position_passes == 0
    # a row that is padding in a latent column (right padding of a short row) rules the block out
    short = sample_ids(tiny_tok, tiny_model, tiles=0, n_latents=0, markers=False, tail="")
    idsp, maskp = pad_batch([row, short], tiny_tok.pad_token_id, left=[False, False])
    assert not maskp[1, first : first + 3].all()
    assert _schedule(idsp, maskp, tiny_model).one_position_passes == 0


def test_set_latent_passes_rejects_bad_values(tiny_model):
    with pytest.raises(ValueError, match="latent passes mode"):
        tiny_model.set_latent_passes("graphs")
    with pytest.raises(ValueError, match="prefix_bucket"):
        tiny_model.set_latent_passes("static", prefix_bucket=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs the model on CUDA"):
            tiny_model.set_latent_passes("cuda_graph")
    tiny_model.set_latent_passes("auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_block_matches_transformers_passes(tiny):
    from engine import load_model

    model = load_model("tiny", seed=0)[0].cuda().train()
    tok = tiny[1]
    for seed in range(3):  # first call captures, later calls replay with new data
        ids, mask, pv = aligned_batch(model, tok, seed=seed)
        ids, mask = ids.cuda(), mask.cuda()
        pv = None if pv is None else pv.cuda()
        ref, ref_grads = run(model, "transformers", ids, mask, pv)
        out, grads = run(model, "cuda_graph", ids, mask, pv)
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-4, rtol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert sum(b.captures for (graphed, *_), b in model._latent_blocks.items() if graphed) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_backward_after_another_replay_raises(tiny):
    from engine import load_model

    model = load_model("tiny", seed=0)[0].cuda().train()
    model.set_latent_passes("cuda_graph")
    ids, mask, pv = aligned_batch(model, tiny[1])
    ids, mask, pv = ids.cuda(), mask.cuda(), pv.cuda()
    labels = ids.masked_fill(mask == 0, -100)
    first = model.compute_loss(ids, mask, pv, labels)
    model.compute_loss(ids, mask, pv, labels)
    with pytest.raises(RuntimeError, match="replayed by another forward"):
        first.backward()


@pytest.mark.parametrize("final_columns,staged", [(0, False), (3, False), (3, True)])
def test_graph_body_differentiates_the_parameters_through_aliases(tiny_model, final_columns, staged):
    """What the CUDA graphs capture: the block on aliases of the parameters (of their staged copies with `staged`);
    its gradients, in `wrt` order, must be the parameters' own gradients (a wrong name-to-parameter map would swap
    them)."""
    from engine.model.latent_block import LatentBlock, backward_into_slots, latent_block

    lm = tiny_model.language_model
    config = lm.config
    g = torch.Generator().manual_seed(0)
    batch, columns, prefix, hidden = 3, 4 + final_columns, 9, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    inputs = (
        torch.randn(batch, hidden, generator=g, requires_grad=True),
        torch.randn(batch, columns, hidden, generator=g, requires_grad=True),
        torch.tensor([[True, True, False, True] + [True] + [False] * (final_columns - 1)][:1] * batch)[:, :columns],
        torch.arange(prefix, prefix + columns).repeat(batch, 1),
        torch.rand(batch, prefix + columns, generator=g) > 0.2,
        torch.randn(config.num_hidden_layers, 2, batch, config.num_key_value_heads, prefix, head_dim, generator=g,
                    requires_grad=True),
    )
    inputs[4][:, prefix:] = True
    block = LatentBlock(lm, use_cuda_graphs=False)
    params = block._params()
    outputs = latent_block(lm, *inputs, final_columns=final_columns)
    cotangents = [torch.randn(o.shape, generator=g) for o in outputs]
    expected = torch.autograd.grad(outputs, [inputs[0], inputs[1], inputs[5], *params], cotangents)
    read = [p.detach().clone() for p in params] if staged else None
    run, wrt = block.graph_body(params, inputs, final_columns, read)
    got = torch.autograd.grad(run(), wrt, cotangents)
    assert len(got) == len(expected) == 3 + len(params)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"gradient {i}: {m}")
    # what the captured backward runs: the weights' gradients left in the block's shared slots
    slots = block.gradient_slots(read if staged else params)
    into_slots = backward_into_slots(run(), cotangents, wrt[:3], wrt[3:], slots)
    assert all(a is b for a, b in zip(into_slots[3:], slots))
    for i, (a, b) in enumerate(zip(into_slots, expected)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"gradient {i} through the slots: {m}")
    storage = read if staged else params
    assert all(w.data_ptr() == t.data_ptr() for w, t in zip(wrt[3:], storage))  # aliases share the storage
    if staged:  # the staged copies, not the parameters, are what the block reads
        with torch.no_grad():
            for t in read:
                t.mul_(0.5)
        changed = torch.autograd.grad(run(), wrt, cotangents)
        assert any(not torch.allclose(a, b) for a, b in zip(changed, got))


def test_staged_weights_keep_their_addresses_and_follow_the_parameters(tiny_model):
    """ZeRO-3 gathers the weights into fresh memory at every call: the staged copies stay where the graphs read
    them and take the values of the parameters as they are at each call; a change of shape re-allocates them."""
    from engine.model.latent_block import LatentBlock

    lm = copy.deepcopy(tiny_model.language_model)
    block = LatentBlock(lm, use_cuda_graphs=False, staged_weights=True)
    params = block._params()
    first = block._stage(params)
    addresses = [t.data_ptr() for t in first]
    assert all(t.data_ptr() != p.data_ptr() and torch.equal(t, p) for t, p in zip(first, params))
    with torch.no_grad():
        for p in params:  # re-created elsewhere with new values, as a gather after an optimizer step would
            p.data = p.data * 1.5 + 0.25
    second = block._stage(params)
    assert [t.data_ptr() for t in second] == addresses
    assert all(torch.equal(t, p) for t, p in zip(second, params))
    params[0].data = params[0].data[:1].clone()  # another shape: new buffers
    third = block._stage(params)
    assert third[0].shape == params[0].shape and torch.equal(third[0], params[0])
    block.release()
    assert block._staged is None


def test_backward_into_slots_frees_each_gradient_once_it_is_in_its_slot():
    """The captured backward's gradients of the weights: summed over every use of a weight, copied into its slot
    and freed there and then (a gradient left on the weight would stay in the graph's memory for every captured
    shape); an unused weight gets None and its slot is left as it was; the inputs' gradients are returned."""
    from engine.model.latent_block import backward_into_slots

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    weights = [torch.randn(6, 6, generator=g, requires_grad=True) for _ in range(3)]
    unused = torch.randn(5, generator=g, requires_grad=True)
    held = []  # how many weights hold a gradient whenever one is computed

    def forward():
        h = x
        for w in weights:
            h = torch.tanh(h @ w) + h @ w.t()  # each weight used twice: its gradient is a sum
        return (h, h.sum(-1))

    outputs = forward()
    cotangents = [torch.randn(o.shape, generator=g) for o in outputs]
    expected = torch.autograd.grad(outputs, [x, *weights], cotangents)
    for w in weights:
        w.register_hook(lambda grad: held.append(sum(v.grad is not None for v in weights)) or grad)
    slots = [torch.full_like(w, float("nan")) for w in weights] + [torch.full_like(unused, 7.0)]
    got = backward_into_slots(forward(), cotangents, [x], [*weights, unused], slots)
    assert len(got) == 1 + len(weights) + 1 and got[-1] is None
    assert torch.equal(slots[-1], torch.full_like(unused, 7.0))
    assert all(a is b for a, b in zip(got[1:-1], slots))
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"gradient {i}: {m}")
    assert all(t.grad is None for t in (x, *weights, unused))
    assert held and max(held) == 0  # no earlier weight still held its gradient when the next one was computed


@pytest.mark.parametrize("layer_ops", ["reference", "fused"])
def test_staged_weights_take_the_gradients_in_place(tiny_model, layer_ops):
    """With staged weights the gradient slots are the staged buffers: the captured backward overwrites each weight
    with its gradient once autograd has summed it. On the block's real body (both op tables) every gradient must
    equal the one computed with separate slots: a weight read again after its slot was written would change
    them."""
    from engine.model.latent_block import LatentBlock, backward_into_slots

    lm = copy.deepcopy(tiny_model.language_model)
    inputs = latent_block_inputs(lm, columns=6)
    block = LatentBlock(lm, use_cuda_graphs=False, staged_weights=True, fused_ops=layer_ops == "fused")
    params = block._params()
    read = block._stage(params)
    slots = block.gradient_slots(read)
    assert all(a is b for a, b in zip(slots, read))  # one copy of the weights in all
    run, wrt = block.graph_body(params, inputs, final_columns=2, read=read)
    outputs = run()
    cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(5)) for o in outputs]
    expected = torch.autograd.grad(outputs, wrt, cotangents)
    weights = [t.clone() for t in read]
    got = backward_into_slots(run(), cotangents, wrt[:3], wrt[3:], slots)
    assert all(a is b for a, b in zip(got[3:], read))
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"gradient {i}: {m}")
    assert any(not torch.equal(t, w) for t, w in zip(read, weights))  # the weights were overwritten
    block._staging.holds_weights = False
    block._stage(params)  # the next forward stages them again
    assert all(torch.equal(t, p) for t, p in zip(read, params)) and block._staging.holds_weights


def test_a_backward_after_another_stages_the_weights_again():
    """Two shapes' forwards, then their backwards: the first backward leaves its gradients in the staged buffers
    (they are the slots), so the second stages the weights again before its replay, from the parameters."""
    from engine.model.latent_block import _Graphs, _GraphedBlockFunction, _LentGradients, _StagedWeights

    weight = torch.nn.Parameter(torch.full((3,), 2.0))
    staged = _StagedWeights([torch.empty(3)], _LentGradients())
    staged.refresh([weight])
    buffer = staged.buffers[0]

    def fake_graphs() -> _Graphs:  # its backward reads the staged weight, then leaves the gradient (twice it) there
        outputs = (torch.zeros(2, 1, 4), torch.zeros(1, 2, 2, 1, 1, 4))
        return _Graphs(inputs=tuple(t.clone() for t in _FAKE_ARGS), outputs=outputs,
                       grad_outputs=tuple(torch.zeros_like(o) for o in outputs), grad_inputs=(None, None, None, buffer),
                       forward_graph=_Replay(lambda: None), backward_graph=_Replay(lambda: buffer.mul_(2.0)),
                       lent=staged.lent, staged=staged)

    args = _FAKE_ARGS
    first = _GraphedBlockFunction.apply(fake_graphs(), *args, weight)
    second = _GraphedBlockFunction.apply(fake_graphs(), *args, weight)
    second[0].sum().backward()
    assert not staged.holds_weights
    first[0].sum().backward()  # without staging again it would read the first backward's gradient (4), not 2
    assert torch.equal(weight.grad, torch.full((3,), 8.0)), weight.grad  # 4 + 4
    third = _GraphedBlockFunction.apply(fake_graphs(), *args, weight)  # a forward after a backward: staged again
    assert staged.holds_weights and torch.equal(buffer, weight.detach())
    del third


def test_graphs_that_do_not_fit_give_way_to_the_eager_block(tiny_model, monkeypatch, caplog):
    """Capturing a shape runs out of memory (the graphs keep buffers the eager block does not): the call still
    returns the eager block's result, with a warning, the graphs' buffers are dropped, and the shape stays eager."""
    from engine.model.latent_block import LatentBlock

    lm = tiny_model.language_model
    block = LatentBlock(lm, use_cuda_graphs=True, bucket=8, final_bucket=4)
    eager = LatentBlock(lm, use_cuda_graphs=False, bucket=8, final_bucket=4)
    attempts = []

    def out_of_memory(*args, **kwargs):
        attempts.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(block, "_capture", out_of_memory)
    inputs = latent_block_inputs(lm, columns=6)
    with caplog.at_level("WARNING"):
        got = block(*inputs, final_columns=3)
    expected = eager(*inputs, final_columns=3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(attempts) == 1 and len(block._eager_shapes) == 1
    assert block._staged is None and block._gradient_slots is None and not block._graphs
    assert "batch 3, prefix bucket 16" in block.graphs_unfit and "12.00 GiB" in block.graphs_unfit
    assert "do not fit" in caplog.text
    block(*inputs, final_columns=3)
    assert len(attempts) == 1  # no second try


def test_graphs_that_would_not_fit_the_step_give_way_to_the_eager_block(tiny_model, monkeypatch):
    """With staged weights (ZeRO-3) the first calls with gradients run eagerly, so that the step's peak is known; a
    capture is then kept only while that peak plus what the graphs keep (the staged weights and slots allocated for
    them, the new pool whole and the older pools' free blocks) fits in `GRAPHS_MEMORY_SHARE` of the device;
    otherwise that shape runs eagerly, giving the eager result, and the shapes captured before stay."""
    import types

    from engine.model import latent_block as lb

    lm = tiny_model.language_model
    block = lb.LatentBlock(lm, use_cuda_graphs=True, staged_weights=True, bucket=8, final_bucket=4)
    total, pool = 10**9, 3 * 10**6
    limit = int(lb.GRAPHS_MEMORY_SHARE * total)
    older = types.SimpleNamespace(pool_reserved=7 * 10**6, pool_allocated=5 * 10**6)
    newest = types.SimpleNamespace(pool_reserved=pool, pool_allocated=5)
    block._graphs.update(older=older, newest=newest)
    counted = pool + 2 * 10**6  # the newest pool whole, the older one's free blocks
    for peak, fresh, fits in ((limit - counted - 100, 100, True), (limit - counted - 100, 101, False)):
        if fits:
            block._check_fit((0, peak, total), fresh)
        else:
            with pytest.raises(lb.GraphsDoNotFit, match="exceed 95%"):
                block._check_fit((0, peak, total), fresh)
    block._check_fit(None, 10**12)  # off CUDA: nothing to check
    block._graphs.clear()

    captures = []
    fake = types.SimpleNamespace(pool_reserved=pool, pool_allocated=5)
    monkeypatch.setattr(block, "_capture", lambda *args: captures.append(args) or fake)
    monkeypatch.setattr(lb, "memory_in_use", lambda _device: (0, limit - pool + 1, total))  # no room for the pool
    inputs = latent_block_inputs(lm, columns=6)
    expected = lb.LatentBlock(lm, use_cuda_graphs=False, bucket=8, final_bucket=4)(*inputs, final_columns=3)
    with torch.no_grad():  # a validation before training: measures nothing, captures nothing
        block(*inputs, final_columns=3)
    assert block._measuring_calls == 0 and not captures
    measuring = block.measuring_calls
    assert measuring == lb.EAGER_STEPS_BEFORE_STAGED_GRAPHS >= 1  # one forward per step
    for call in range(measuring + 2):
        said = block.describe()
        if call < measuring:
            assert said == "eager, measuring the step before the graphs", said
        elif call == measuring:
            assert said == "graphs, none captured yet", said
        else:
            assert said.startswith("eager for 1 shape(s) whose graphs did not fit (batch 3, prefix bucket 16"), said
        got = block(*inputs, final_columns=3)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert len(captures) == (0 if call < measuring else 1)  # the first calls measure; the next tries; no more
    assert not block._graphs and block._gradient_slots is None and block._staged is None
    assert "exceed 95%" in block.graphs_unfit

    # Released, the block starts over: it measures again, then captures the shapes that fit; one that does not
    # fit runs eagerly beside them.
    block.release()
    assert block.graphs_unfit is None and block.calls == 0 and not block._eager_shapes
    monkeypatch.setattr(lb, "memory_in_use", lambda _device: (0, 0, total))
    monkeypatch.setattr(lb, "_GraphedBlockFunction", types.SimpleNamespace(apply=lambda graphs, *args: "replayed"))
    for call in range(measuring):
        block(*inputs, final_columns=3)
    assert not captures[1:]
    assert block(*inputs, final_columns=3) == "replayed" and len(captures) == 2
    assert block.describe() == "graphs, 1 shape(s)"
    monkeypatch.setattr(lb, "memory_in_use", lambda _device: (0, limit - pool + 1, total))
    wider = latent_block_inputs(lm, columns=6, batch=5)
    got = block(*wider, final_columns=3)
    eager_wider = lb.LatentBlock(lm, use_cuda_graphs=False, bucket=8, final_bucket=4)(*wider, final_columns=3)
    for a, b in zip(got, eager_wider):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(captures) == 3 and len(block._graphs) == 1 and block._gradient_slots is not None
    assert block(*inputs, final_columns=3) == "replayed"  # the first shape's graphs stayed
    assert block.describe().startswith("graphs, 1 shape(s); eager for 1 shape(s) whose graphs did not fit (batch 5")

    # The eager calls' activations stand for the pool before a first capture: too many, and no capture is tried
    # nor are the staged weights and slots allocated.
    block = lb.LatentBlock(lm, use_cuda_graphs=True, staged_weights=True, bucket=8, final_bucket=4)
    captures.clear()
    monkeypatch.setattr(block, "_capture", lambda *args: captures.append(args) or fake)
    allocated = iter(range(0, 10**12, 10**8))  # every reading 100 MB more: each eager call keeps 100 MB
    weights = sum(p.numel() * p.element_size() for p in block._params())
    peak = limit - weights - 10**8 + 1  # one copy of the weights: the staged ones, also the slots
    monkeypatch.setattr(lb, "memory_in_use", lambda _device: (next(allocated), peak, total))
    stages = []
    monkeypatch.setattr(block, "_stage", lambda params: stages.append(params) or params)
    for call in range(measuring + 1):
        block(*inputs, final_columns=3)
    assert block._eager_activation_bytes == 10**8
    assert not captures and not stages and block._gradient_slots is None and len(block._eager_shapes) == 1
    assert "exceed 95%" in block.graphs_unfit


class _Replay:
    def __init__(self, fn):
        self.replay = fn


_FAKE_ARGS = (torch.zeros(2, 4), torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool),
              torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), torch.zeros(1, 2, 2, 1, 1, 4))


def _fake_graphs(slot: torch.Tensor, lent, value: float, staged=None):
    """Graphs whose backward leaves ``value`` in the shared gradient ``slot`` (lending through ``lent``)."""
    from engine.model.latent_block import _Graphs

    outputs = (torch.zeros(2, 1, 4), torch.zeros(1, 2, 2, 1, 1, 4))
    return _Graphs(inputs=tuple(t.clone() for t in _FAKE_ARGS), outputs=outputs,
                   grad_outputs=tuple(torch.zeros_like(o) for o in outputs), grad_inputs=(None, None, None, slot),
                   forward_graph=_Replay(lambda: None), backward_graph=_Replay(lambda: slot.fill_(value)), lent=lent,
                   staged=staged)


def test_two_replays_in_one_backward_keep_each_ones_gradients():
    """Two replays of graphs that share the gradient slot in one autograd graph: the first backward's weight
    gradient must survive the second replay until autograd sums them (handing out the slot itself, the second
    replay would overwrite the first's gradient before the sum)."""
    from engine.model.latent_block import _GraphedBlockFunction, _LentGradients

    weight, slot, lent = torch.ones(3, requires_grad=True), torch.zeros(3), _LentGradients()
    first = _GraphedBlockFunction.apply(_fake_graphs(slot, lent, 1.0), *_FAKE_ARGS, weight)
    second = _GraphedBlockFunction.apply(_fake_graphs(slot, lent, 10.0), *_FAKE_ARGS, weight)
    (first[0].sum() + second[0].sum()).backward()
    assert torch.equal(weight.grad, torch.full((3,), 11.0)), weight.grad  # 10 + 1, not 1 + 1


def test_lent_gradients_are_views_until_somebody_keeps_one():
    """The weights' gradients that autograd only sums into ``.grad`` leave the graphed backward as views of the
    shared slot, not copies, and are never copied when autograd consumes them in that backward; ``.grad`` never
    lives in the slot, hooks or no hooks. Gradients somebody receives (`torch.autograd.grad`, a tensor hook, a
    backward building a graph) leave as copies, so what they keep, views included, holds its values through the
    next replay."""
    from engine.model.latent_block import _GraphedBlockFunction, _LentGradients

    slot, lent = torch.zeros(3), _LentGradients()
    shares_slot = lambda t: t.untyped_storage().data_ptr() == slot.untyped_storage().data_ptr()  # noqa: E731
    block = lambda weight, value: _GraphedBlockFunction.apply(_fake_graphs(slot, lent, value), *_FAKE_ARGS,  # noqa: E731
                                                              weight)[0]

    weight = torch.ones(3, requires_grad=True)  # another use after the block: autograd sums the two
    (block(weight, 5.0).sum() + (weight * 2.0).sum()).backward()
    assert torch.equal(weight.grad, torch.full((3,), 7.0)) and not shares_slot(weight.grad)
    lent_as_view = len(lent._held) == 1 and shares_slot(lent._held[0])  # lent, not copied
    assert lent_as_view
    assert lent.reclaim() == 0  # nobody holds it any more: nothing to copy

    weight = torch.ones(3, requires_grad=True)  # the block's is the only use: autograd keeps it as .grad
    block(weight, 3.0).sum().backward()
    assert torch.equal(weight.grad, torch.full((3,), 3.0)) and not shares_slot(weight.grad)
    (captured,) = torch.autograd.grad(block(weight, 4.0).sum(), [weight])
    assert torch.equal(captured, torch.full((3,), 4.0)) and not shares_slot(captured)  # handed over: a copy
    kept = captured[:2]
    block(weight, 9.0).sum().backward()
    assert torch.equal(slot, torch.full((3,), 9.0)) and torch.equal(kept, torch.full((2,), 4.0))
    assert torch.equal(weight.grad, torch.full((3,), 12.0))  # 3 + 9

    hooked, seen = torch.ones(3, requires_grad=True), []
    hooked.register_hook(lambda grad: seen.append(grad.view(-1)))
    block(hooked, 6.0).sum().backward()
    block(weight, 1.0).sum().backward()  # the slot takes another replay's values
    assert torch.equal(seen[0], torch.full((3,), 6.0)) and torch.equal(hooked.grad, torch.full((3,), 6.0))

    building = torch.ones(3, requires_grad=True)
    output = block(building, 2.0)
    (grad,) = torch.autograd.grad((output * output).sum(), [building], create_graph=True)
    built = grad.detach()
    block(weight, 7.0).sum().backward()
    assert torch.equal(built, torch.full((3,), 2.0)) and not shares_slot(built)  # a graph-building backward's

    for hook in ("post_accumulate", "accumulator"):  # DDP and DeepSpeed hook the accumulation; autograd then
        # expects one more reference when it decides whether it may take the tensor over as .grad
        weight = torch.ones(3, requires_grad=True)
        if hook == "post_accumulate":
            weight.register_post_accumulate_grad_hook(lambda p: None)
        else:
            accumulator = weight.view_as(weight).grad_fn.next_functions[0][0]
            accumulator.register_hook(lambda *grads: None)
        block(weight, 2.0).sum().backward()
        assert torch.equal(weight.grad, torch.full((3,), 2.0)) and not shares_slot(weight.grad), hook


def test_held_views_are_found_after_many_rounds():
    """The Python reference count that finds a held view is compared with that of a tensor held the same way, at
    each reclaim: the check holds however often the interpreter has run (and specialised) it."""
    from engine.model.latent_block import _LentGradients

    slot, lent = torch.zeros(4), _LentGradients()
    for round_ in range(50):
        views = lent.lend([slot])
        kept = views[0] if round_ % 7 == 3 else None
        del views
        slot.fill_(float(round_))
        assert lent.reclaim() == (kept is not None), round_
        if kept is not None:
            slot.fill_(-1.0)
            assert torch.equal(kept, torch.full((4,), float(round_))), round_


def test_staging_the_weights_copies_out_lent_gradients():
    """With staged weights the slots are the staged buffers: a forward staging the weights again writes them, so
    a gradient still held from the last backward is copied out first."""
    from engine.model.latent_block import _GraphedBlockFunction, _LentGradients, _StagedWeights

    weight = torch.nn.Parameter(torch.full((3,), 2.0))
    lent = _LentGradients()
    staged = _StagedWeights([torch.empty(3)], lent)
    slot = staged.buffers[0]
    output = _GraphedBlockFunction.apply(_fake_graphs(slot, lent, 6.0, staged), *_FAKE_ARGS, weight)[0]
    (captured,) = torch.autograd.grad(output.sum(), [weight])
    assert not staged.holds_weights and torch.equal(captured, torch.full((3,), 6.0))
    _GraphedBlockFunction.apply(_fake_graphs(slot, lent, 6.0, staged), *_FAKE_ARGS, weight)  # stages the weights
    assert staged.holds_weights and torch.equal(slot, weight.detach())
    assert torch.equal(captured, torch.full((3,), 6.0))


def test_staged_graphs_are_kept_to_a_share_of_the_device(tiny_model, monkeypatch):
    """Under ZeRO-3 the graphs keep the staged weights, which are also the gradient slots: one whole copy of the
    block's weights, whatever the number of captured shapes. `auto` graphs them only while it fits in a quarter of
    the device."""
    import types

    from engine.model import latent_block as lb

    lm = tiny_model.language_model
    weights = lb.block_weight_bytes(lm)
    layers = [*lm.layers[: lm.config.num_hidden_layers], lm.norm]
    assert weights == sum(p.numel() * p.element_size() for m in layers for p in m.parameters()) > 0
    need = weights
    cuda = torch.device("cuda", 0)
    for total, fits in ((need * 4, True), (need * 4 - 8, False)):
        device = types.SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device, _d=device: _d)
        reason = lb.staged_graphs_unsupported(lm, cuda)
        assert (reason is None) == fits, reason
    assert "GiB" in reason
    assert lb.staged_graphs_unsupported(lm, torch.device("cpu")) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("layer_ops", ["reference", "fused"])
def test_staged_graphs_follow_parameters_re_created_at_every_call(tiny, layer_ops):
    """The graphed block with staged weights, its parameters re-created at new addresses with new values before
    every call (what ZeRO-3's gathers and an optimizer step do), equals the eager block, from one capture."""
    from engine import load_model
    from engine.model.latent_block import EAGER_STEPS_BEFORE_STAGED_GRAPHS, LatentBlock

    lm = load_model("tiny", seed=0)[0].cuda().train().language_model
    fused = layer_ops == "fused"
    graphed = LatentBlock(lm, use_cuda_graphs=True, staged_weights=True, fused_ops=fused, bucket=8, final_bucket=4)
    eager = LatentBlock(lm, use_cuda_graphs=False, fused_ops=fused, bucket=8, final_bucket=4)
    params = graphed._params()
    for step in range(EAGER_STEPS_BEFORE_STAGED_GRAPHS + 3):  # the first calls run eagerly
        with torch.no_grad():
            for p in params:
                p.data = (p.data * (1.0 - 0.01 * step)).clone()
        prev, embeds, is_latent, positions, allowed, prefix_kv = latent_block_inputs(lm, columns=6, seed=step)
        is_latent[:, 4:] = False  # of the final chunk's columns only the first can hold a thought
        inputs = (prev, embeds, is_latent, positions, allowed, prefix_kv)
        args = [t.cuda().detach().requires_grad_(t.requires_grad) for t in inputs]
        cotangent = torch.randn(3, 6, lm.config.hidden_size, generator=torch.Generator().manual_seed(step)).cuda()
        results = []
        for block in (eager, graphed):
            hidden, latent_kv = block(*args, final_columns=3)
            grads = torch.autograd.grad((hidden * cotangent).sum() + latent_kv.square().sum(),
                                        [args[0], args[1], args[5], *params])
            results.append((hidden, latent_kv, grads))
        (h0, kv0, g0), (h1, kv1, g1) = results
        torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv1, kv0, atol=1e-5, rtol=1e-4)
        for i, (a, b) in enumerate(zip(g1, g0)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m: f"gradient {i} at step {step}: {m}")
    assert graphed.captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_shapes_share_the_gradient_slots(tiny):
    """Two captured shapes leave the weights' gradients in the same slots, and each still equals the eager block."""
    from engine import load_model
    from engine.model.latent_block import LatentBlock, block_weight_bytes

    lm = load_model("tiny", seed=0)[0].cuda().train().language_model
    graphed = LatentBlock(lm, use_cuda_graphs=True, staged_weights=True, bucket=8, final_bucket=4)
    eager = LatentBlock(lm, use_cuda_graphs=False, bucket=8, final_bucket=4)
    params = graphed._params()
    from engine.model.latent_block import EAGER_STEPS_BEFORE_STAGED_GRAPHS

    # after the eager calls, the third replays the first shape after the second's
    for step, batch_size in enumerate([3] * EAGER_STEPS_BEFORE_STAGED_GRAPHS + [3, 5, 3]):
        prev, embeds, is_latent, positions, allowed, prefix_kv = latent_block_inputs(lm, columns=6, seed=step,
                                                                                     batch=batch_size)
        is_latent[:, 4:] = False
        args = [t.cuda().detach().requires_grad_(t.requires_grad)
                for t in (prev, embeds, is_latent, positions, allowed, prefix_kv)]
        results = []
        for block in (eager, graphed):
            hidden, latent_kv = block(*args, final_columns=3)
            results.append(torch.autograd.grad(hidden.square().sum() + latent_kv.square().sum(), [*params]))
        for i, (a, b) in enumerate(zip(*results)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=lambda m: f"gradient {i}, call {step}: {m}")
    assert graphed.captures == 2
    assert all(a is b for a, b in zip(graphed._gradient_slots, graphed._staged))  # the staged weights take them
    # both shapes' forwards, then one backward through both: the second backward to run finds the staged weights
    # overwritten by the first's gradients and stages them again
    results = []
    for block in (eager, graphed):
        loss = 0
        for seed, batch_size in ((7, 3), (8, 5)):
            inputs = latent_block_inputs(lm, columns=6, seed=seed, batch=batch_size)
            inputs[2][:, 4:] = False
            args = [t.cuda().detach().requires_grad_(t.requires_grad) for t in inputs]
            hidden, latent_kv = block(*args, final_columns=3)
            loss = loss + hidden.square().sum() + latent_kv.square().sum()
        results.append(torch.autograd.grad(loss, [*params]))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=lambda m: f"gradient {i}, two forwards: {m}")
    assert graphed.captures == 2
    slots = [t.data_ptr() for t in graphed._gradient_slots]
    for graphs in graphed._graphs.values():
        assert [g.data_ptr() for g in graphs.grad_inputs[3:]] == slots
        assert graphs.pool_reserved >= graphs.pool_allocated > 0  # their activations' pool, measured
        # what the pool still holds (outputs, the inputs' gradients) is less than one copy of the weights, which
        # each shape's graphs held before the slots
        assert graphs.pool_allocated < block_weight_bytes(lm), (graphs.pool_allocated, block_weight_bytes(lm))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_backward_into_slots_holds_one_gradient_at_a_time():
    """Captured in a CUDA graph, the backward of eight 4 MB weights peaks at a few weights' worth of memory
    beyond its slots (autograd.grad would hold all eight gradients at its end): the memory each captured shape
    of the latent block keeps."""
    from engine.model.latent_block import backward_into_slots

    torch.manual_seed(0)
    weights = [(torch.randn(1024, 1024, device="cuda") / 32).requires_grad_() for _ in range(8)]
    x = torch.randn(4, 1024, device="cuda", requires_grad=True)
    slots = [torch.empty_like(w) for w in weights]
    one = weights[0].numel() * weights[0].element_size()

    def forward():
        h = x
        for w in weights:
            h = torch.tanh(h @ w)
        return (h,)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        backward_into_slots(forward(), [torch.ones(4, 1024, device="cuda")], [x], weights, slots)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    expected = torch.autograd.grad(forward(), [x, *weights], [torch.full((4, 1024), 0.5, device="cuda")])
    graph = torch.cuda.CUDAGraph()
    cotangent = torch.full((4, 1024), 0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        got = backward_into_slots(forward(), [cotangent], [x], weights, slots)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 3 * one, f"the captured backward peaked at {peak / one:.1f} weights' worth"
    for t in slots:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"gradient {i}: {m}")


def test_a_copied_model_gets_its_own_block(tiny_model, tiny_tok):
    import copy

    ids, mask, pv = aligned_batch(tiny_model, tiny_tok)
    tiny_model.set_latent_passes("static")
    try:
        tiny_model(ids, mask, pv)
        twin = copy.deepcopy(tiny_model)
        (block,) = twin._latent_blocks.values()
        assert block.lm is twin.language_model  # not the original's modules
        assert block._graphs == {}
    finally:
        tiny_model.set_latent_passes("auto")


def test_the_model_says_how_its_latent_blocks_ran(tiny_model, tiny_tok):
    """`latent_blocks_described`: each block called since it was built or released, eager here (static on CPU);
    nothing once released, nor for the transformers passes."""
    ids, mask, pv = aligned_batch(tiny_model, tiny_tok)
    try:
        tiny_model.set_latent_passes("static")
        tiny_model(ids, mask, pv)
        assert tiny_model.latent_blocks_described() == "eager"
        tiny_model.release_latent_graphs()
        assert tiny_model.latent_blocks_described() == ""
        tiny_model.set_latent_passes("transformers")
        tiny_model(ids, mask, pv)
        assert tiny_model.latent_blocks_described() == ""
    finally:
        tiny_model.set_latent_passes("auto")


def test_gradient_accumulation_stretches_the_measuring_to_whole_steps(tiny_model, tiny_tok):
    """The trainer's gradient accumulation reaches the block: the eager calls before staged graphs span as many
    whole steps as without it (`forwards_per_step`), and a change rebuilds the blocks."""
    from engine.model.latent_block import EAGER_STEPS_BEFORE_STAGED_GRAPHS
    from engine.training.config import TrainConfig
    from engine.training.model_setup import configure_model

    ids, mask, pv = aligned_batch(tiny_model, tiny_tok)
    try:
        configure_model(tiny_model, TrainConfig(latent_passes="static", gradient_accumulation_steps=3))
        tiny_model(ids, mask, pv)
        (block,) = [b for b in tiny_model._latent_blocks.values() if b.calls]
        assert block.measuring_calls == 3 * EAGER_STEPS_BEFORE_STAGED_GRAPHS
        tiny_model.set_latent_passes("static", forwards_per_step=1)
        assert not tiny_model._latent_blocks
        with pytest.raises(ValueError, match="forwards_per_step"):
            tiny_model.set_latent_passes("static", forwards_per_step=0)
    finally:
        tiny_model.set_latent_passes("auto")


def test_block_backward_writes_the_prefix_and_column_gradients_once(tiny_model):
    """The gradients of the prefix cache and of the column inputs are each assembled by one stack of their pieces'
    gradients: no operator of the backward makes another tensor of their full size (indexing the pieces out made
    a zero-filled full-size gradient per piece, then summed them: ~15 ms of fills and adds at the 1B geometry)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.model.latent_block import latent_block

    class FullSizeOutputs(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.made = shapes, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
                self.made.append((str(func), tuple(out.shape)))
            return out

    lm = tiny_model.language_model
    config = lm.config
    g = torch.Generator().manual_seed(0)
    batch, columns, final_columns, prefix, hidden = 3, 5, 2, 9, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    prev = torch.randn(batch, hidden, generator=g, requires_grad=True)
    embeds = torch.randn(batch, columns, hidden, generator=g, requires_grad=True)
    prefix_kv = torch.randn(config.num_hidden_layers, 2, batch, config.num_key_value_heads, prefix, head_dim,
                            generator=g, requires_grad=True)  # fmt: skip
    is_latent = torch.tensor([[True, True, False, True, False]] * batch)
    positions = torch.arange(prefix, prefix + columns).repeat(batch, 1)
    allowed = torch.ones(batch, prefix + columns, dtype=torch.bool)
    outputs = latent_block(lm, prev, embeds, is_latent, positions, allowed, prefix_kv, final_columns=final_columns)
    cotangents = [torch.randn(o.shape, generator=g) for o in outputs]
    with FullSizeOutputs({tuple(prefix_kv.shape), tuple(embeds.shape)}) as log:
        grads = torch.autograd.grad(outputs, [embeds, prefix_kv], cotangents)
    assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in grads)
    assert sorted(shape for _, shape in log.made) == sorted([tuple(embeds.shape), tuple(prefix_kv.shape)]), log.made


def test_block_merges_each_layers_projections_once_for_all_passes(tiny_model, monkeypatch):
    """With the fused ops the block concatenates each layer's q/k/v and gate/up weights once and runs two products
    per layer and pass where the modules run five; outputs and every gradient (inputs and parameters) equal the
    unmerged block's (fp32)."""
    from engine.model import fused_ops
    from engine.model.latent_block import latent_block

    lm = tiny_model.language_model
    layers, columns = lm.config.num_hidden_layers, 4
    inputs = latent_block_inputs(lm, columns=columns)
    params = [p for p in lm.parameters() if p.requires_grad]
    results = {}
    for merge in (True, False):
        if not merge:
            monkeypatch.setattr(fused_ops, "training_merge_unsupported", lambda layers: "switched off for the comparison")
        with CountProducts() as counter:
            outputs = latent_block(lm, *inputs, fused_ops=True)
        cotangents = [torch.ones_like(o) for o in outputs]
        grads = torch.autograd.grad(outputs, [inputs[0], inputs[1], inputs[5], *params], cotangents, allow_unused=True)
        results[merge] = (outputs, grads, counter.products)
    (merged_out, merged_grads, merged_products), (plain_out, plain_grads, plain_products) = results[True], results[False]
    assert plain_products == layers * columns * 7 and merged_products == layers * columns * 4
    for a, b in zip(merged_out, plain_out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for i, (a, b) in enumerate(zip(merged_grads, plain_grads)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"gradient {i}: {m}")


def test_training_merge_is_refused_for_large_or_partitioned_weights(tiny_model, monkeypatch):
    from engine.model import fused_ops

    layers = list(tiny_model.language_model.layers)
    assert fused_ops.training_merge_unsupported(layers) is None
    monkeypatch.setattr(fused_ops, "MERGED_COPY_LIMIT", 1000)
    assert "merged copies would take" in fused_ops.training_merge_unsupported(layers)
    monkeypatch.undo()
    layers[0].self_attn.q_proj.weight.ds_id = 7  # as DeepSpeed ZeRO-3 marks a partitioned parameter
    try:
        assert fused_ops.training_merge_unsupported(layers) == "ZeRO-3 partitions the weights"
    finally:
        del layers[0].self_attn.q_proj.weight.ds_id


def test_a_layer_with_mixed_projection_biases_keeps_separate_products(tiny_model):
    """q with a bias, k and v without: that layer's q/k/v are not concatenated (the others are), and the block
    computes what the unmerged block computes."""
    import copy

    from engine.model.fused_ops import GradFusedOps

    model = copy.deepcopy(tiny_model)
    lm = model.language_model
    lm.layers[0].self_attn.k_proj.bias = None
    lm.layers[0].self_attn.v_proj.bias = None
    h = torch.randn(3, 2, lm.config.hidden_size, generator=torch.Generator().manual_seed(4))
    merged, plain = GradFusedOps(lm, merge_projections=True), GradFusedOps(lm)
    for index, layer in enumerate(lm.layers):
        with CountProducts() as counter:
            got = merged.qkv(index, layer.self_attn, h)
        assert counter.products == (3 if index == 0 else 1)
        for a, b in zip(got, plain.qkv(index, layer.self_attn, h)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
