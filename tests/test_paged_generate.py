"""Generation over the paged KV cache == generation over transformers' DynamicCache, token for token."""

from __future__ import annotations

import json
import math

import pytest
import torch

import engine.model.generation as generation
from engine.model import fast_paths
import engine.model.paged.runner as paged_runner
from engine.model.layers import layer_stack_unsupported
from engine.model.paged.cache import PoolExhaustedError
from engine.model.paged.runner import PagedRunner
from tests.helpers import pad_batch, random_pixels
from tests.test_generate import prompt_ids

SAME_Q = "What colour is the cell?"
# (tiles, image, question, latents): rows 0, 3, 4 and 5 show image "a"; row 5 repeats row 0 exactly (n samples
# of one question); rows 0 and 3 share the question too, row 4 only the image. Row 6 is mostly left padding.
SPECS = [
    (1, "a", SAME_Q, 3),
    (2, "b", "Start at the top left. Move right.", 1),
    (0, None, "Move down, then left.", 0),
    (1, "a", SAME_Q, 1),
    (1, "a", "Which colour?", 2),
    (1, "a", SAME_Q, 3),
    (0, None, "", 0),  # 3 tokens: no token in pass 0 or in the first latent pass
]


def shared_image_batch(model, tok, specs=SPECS):
    size = model.config.vision_config.image_size[0]
    images = {"a": random_pixels(1, size, 21), "b": random_pixels(2, size, 22)}
    rows = [prompt_ids(tok, model, tiles=t, question=q, n_latents=n) for t, _, q, n in specs]
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[True] * len(rows))
    pixels = torch.cat([images[img] for t, img, _, _ in specs if t])
    return ids, mask, pixels, [t for t, _, _, _ in specs]


@pytest.fixture
def record_logits(monkeypatch):
    """Record the logits every decoding step selects from, for both caches (they share `decode_loop`, so the
    recording goes to whichever cache is generating)."""
    seen: dict[str, list[torch.Tensor]] = {"dynamic": [], "paged": []}
    select = generation.select_next_token

    def wrapped(logits, **kwargs):
        seen[wrapped.current].append(logits.detach().float().clone())
        return select(logits, **kwargs)

    wrapped.current = "dynamic"
    monkeypatch.setattr(generation, "select_next_token", wrapped)
    original_generate = paged_runner.PagedRunner.generate

    def generate(self, *args, **kwargs):
        wrapped.current = "paged"
        try:
            return original_generate(self, *args, **kwargs)
        finally:
            wrapped.current = "dynamic"

    monkeypatch.setattr(paged_runner.PagedRunner, "generate", generate)
    return seen


def assert_same_tokens_and_logits(paged, dynamic, record_logits):
    """Greedy generation (no row ending early) on the paged runner and the dynamic cache: the same tokens, and
    every decode step's logits within 1e-4 (fp32)."""
    assert torch.equal(paged, dynamic), f"paged {paged.tolist()} vs dynamic {dynamic.tolist()}"
    for step, (a, b) in enumerate(zip(record_logits["paged"], record_logits["dynamic"])):
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"decode step {step}: logits differ by {err:.3g}"


@pytest.mark.parametrize(
    "block_size,static_buffers,fused_ops,merged",
    [(4, False, False, False), (16, True, False, False), (1, False, False, False), (16, True, True, True),
     (4, False, True, False)],
)
def test_paged_matches_dynamic_greedy(tiny, record_logits, block_size, static_buffers, fused_ops, merged):
    """fused_ops: the decode fusions (RMSNorm + residual, rotary, SwiGLU) in place of the modules; merged: one
    product for q/k/v and one for gate/up (only with the fused ops)."""
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    probe = model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=-1)
    eos = int(probe[0, 1])  # rows that produce this token stop there; the assert below checks that some run on
    record_logits["dynamic"].clear()
    dynamic = model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=eos)
    runner = PagedRunner(model, block_size=block_size, fused_ops=fused_ops, merged_projections=merged)
    runner.static_buffers_without_graphs = static_buffers  # the CUDA-graph path's bucketed buffers, run eagerly
    paged = runner.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=eos, pad_token_id=model.pad_token_id)
    assert torch.equal(paged, dynamic), f"paged {paged.tolist()} vs dynamic {dynamic.tolist()}"
    assert (dynamic == eos).any(1).any() and not (dynamic == eos).any(1).all(), "some rows must end early, not all"
    assert (runner.merged is not None) == merged, "merged projections are used exactly when asked for"
    assert (runner.head is not None) == merged, "the padded lm_head (tiny vocabulary 519) goes with the weight copies"
    assert len(record_logits["paged"]) >= dynamic.shape[1]
    for step, (a, b) in enumerate(zip(record_logits["paged"], record_logits["dynamic"])):
        if step >= dynamic.shape[1]:
            break
        running = ~(dynamic[:, :step] == eos).any(1)  # an ended row's logits are never used (it emits pad)
        err = (a[running] - b[running]).abs().max().item()
        assert err < 1e-4, f"decode step {step}: logits differ by {err:.3g}"
    stats = runner.stats
    assert stats["duplicate_rows"] == 1
    # row 5 (a duplicate) computes nothing; rows 3 and 4 reuse image blocks of row 0
    assert stats["computed_prompt_tokens"] < stats["prompt_tokens"] - int(mask[5].sum())
    assert runner.cache.num_used_blocks == 0, "every block must be back in the pool after generate"


def _dynamic_tokens_and_attention_calls(model, tok, record_logits, monkeypatch, what):
    """The shared-image batch, the dynamic cache's 5 greedy tokens for it (logits recorded), and a list that gets
    ``what(q)`` for every later call of the runner's rotary attention."""
    import engine.model.paged.runner as runner_module

    ids, mask, pixels, _ = shared_image_batch(model, tok)
    record_logits["dynamic"].clear()
    dynamic = model.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)
    calls = []
    real = runner_module.rotary_paged_decode_attention
    monkeypatch.setattr(runner_module, "rotary_paged_decode_attention",
                        lambda q, *a, **k: calls.append(what(q)) or real(q, *a, **k))  # fmt: skip
    return (ids, mask, pixels), dynamic, calls


@pytest.mark.parametrize("inside", [True, False])
def test_rotary_in_attention_keeps_the_tokens(tiny, record_logits, monkeypatch, inside):
    """The one-position steps' rotary embedding and cache write inside the attention kernel: the same greedy tokens
    and logits as the dynamic cache; every decode step's layers take the one kernel (prompts keep the chunk
    attention), and switched off, none does. Switching drops the captured steps."""
    model, tok, _ = tiny
    (ids, mask, pixels), dynamic, calls = _dynamic_tokens_and_attention_calls(model, tok, record_logits, monkeypatch,
                                                                             lambda q: q.shape[0])  # fmt: skip
    runner = PagedRunner(model, block_size=4, fused_ops=True, rotary_in_attention=inside)
    paged = runner.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1, pad_token_id=model.pad_token_id)
    assert_same_tokens_and_logits(paged, dynamic, record_logits)
    layers = model.language_model.config.num_hidden_layers
    if inside:  # every layer of every one-position step (at least the 4 decode steps after the first token)
        assert len(calls) >= 4 * layers and len(calls) % layers == 0, calls
    else:
        assert not calls
    runner.graphs.bucket(1, runner.dtype, runner.device)  # a bucket, as a captured step leaves one
    runner.rotary_in_attention = not inside
    runner.refresh_merged_projections()  # what the next generate call does first
    assert not runner.graphs.buckets, "the captured steps hold the other kernels: dropped"
    runner.graphs.bucket(1, runner.dtype, runner.device)
    runner.refresh_merged_projections()
    assert runner.graphs.buckets, "the same decision again: the graphs stay"
    assert runner.rotary_in_attention is (not inside) and runner.rotary_in_attention_taken is (not inside)


@pytest.mark.parametrize("inside", [True, False])
def test_steps_promise_their_lengths_unless_told_otherwise(tiny, monkeypatch, inside):
    """The one-position steps compute their context lengths before the layers, so every attention launch of a step
    gets ``lengths_before_wait=True`` (with the rotary embedding inside the attention and without); the runner's
    ``attention_options`` can turn it off. Prompt chunks take another kernel."""
    import engine.model.paged.runner as runner_module

    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok, SPECS[:2])
    seen = []
    for name in ("paged_decode_attention", "rotary_paged_decode_attention"):
        real = getattr(runner_module, name)
        monkeypatch.setattr(runner_module, name,
                            lambda *a, real=real, **k: seen.append(k.get("lengths_before_wait")) or real(*a, **k))
    for options, want in (({}, True), ({"lengths_before_wait": False}, False)):
        seen.clear()
        runner = PagedRunner(model, block_size=4, fused_ops=True, rotary_in_attention=inside, attention_options=options)
        runner.generate(ids, mask, pixels, max_new_tokens=3, eos_token_id=-1, pad_token_id=model.pad_token_id)
        assert seen and all(v is want for v in seen), (options, seen)


@pytest.mark.parametrize("split_k", [True, False])
def test_split_k_products_keep_the_tokens(tiny, record_logits, split_k):
    """The o and down products as split-K partial sums added by the next norm (several splits forced on the tiny
    model, whose default would be one): the same greedy tokens and logits as the dynamic cache, with every step's
    product returned as partial sums; off, the modules run."""
    from engine.model.fused_ops import SplitKProducts
    from kernels.decode_linear import DecodeLinearConfig

    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    record_logits["dynamic"].clear()
    dynamic = model.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)
    runner = PagedRunner(model, block_size=4, fused_ops=True, split_k_products=split_k)
    ops = runner.ops()
    assert (ops.split_k is not None) == split_k
    returned = []
    if split_k:
        forced = SplitKProducts(runner.device, DecodeLinearConfig(block_n=16, block_k=16, splits=3, num_stages=2))

        class Recorded:  # the forced products, with what each o/down call returned
            def __call__(self, module, x):
                out = forced(module, x)
                returned.append((x.shape[0], None if out is None else (tuple(out.shape), out.dtype)))
                return out

            def product(self, x, weight, bias=None):  # the q/k/v product (`split_k_qkv`): not counted here
                return forced.product(x, weight, bias)

        ops.split_k = Recorded()
    paged = runner.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1, pad_token_id=model.pad_token_id)
    assert_same_tokens_and_logits(paged, dynamic, record_logits)
    layers = model.language_model.config.num_hidden_layers
    steps = [(rows, out) for rows, out in returned if rows <= 64]
    if split_k:  # two products per layer and step, each as (3, rows, hidden) fp32 partial sums
        assert len(steps) >= 2 * layers * 4 and len(steps) % (2 * layers) == 0
        hidden = model.language_model.config.hidden_size
        assert all(out == ((3, rows, hidden), torch.float32) for rows, out in steps), steps[:4]
    else:
        assert not returned


@pytest.mark.parametrize("split_qkv", [True, False])
def test_split_k_qkv_keeps_the_tokens(record_logits, monkeypatch, split_qkv):
    """The q/k/v product of every one-position step as split-K partial sums (three splits forced on the tiny
    model, its q/k/v biases random), summed inside the attention kernel: the same greedy tokens and logits as the
    dynamic cache, every step's attention given (3, rows, heads, head_dim) fp32 partial sums; off, the product's
    values. Prompt chunks keep the product. Switching the option drops the captured steps."""
    from engine import load_model
    from engine.model.fused_ops import SplitKProducts
    from kernels.decode_linear import DecodeLinearConfig

    model, tok, _ = load_model("tiny", seed=0)  # its own copy: the q/k/v biases made nonzero (the first split's)
    model.eval()
    with torch.no_grad():
        for layer in model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.5)
    (ids, mask, pixels), dynamic, given = _dynamic_tokens_and_attention_calls(model, tok, record_logits, monkeypatch,
                                                                             lambda q: (tuple(q.shape), q.dtype))  # fmt: skip
    runner = PagedRunner(model, block_size=4, fused_ops=True, split_k_qkv=split_qkv)
    runner.ops().split_k = SplitKProducts(runner.device, DecodeLinearConfig(block_n=16, block_k=16, splits=3,
                                                                            num_stages=2))  # fmt: skip
    paged = runner.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1, pad_token_id=model.pad_token_id)
    assert_same_tokens_and_logits(paged, dynamic, record_logits)
    assert runner.split_k_qkv_taken is split_qkv
    layers = model.language_model.config.num_hidden_layers
    heads = model.language_model.config.num_attention_heads
    assert len(given) >= 4 * layers and len(given) % layers == 0, len(given)
    if split_qkv:
        assert all(len(shape) == 4 and shape[0] == 3 and shape[2] == heads and dtype == torch.float32
                   for shape, dtype in given), given[:3]  # fmt: skip
    else:
        assert all(len(shape) == 3 and dtype == model.dtype for shape, dtype in given), given[:3]
    runner.graphs.bucket(1, runner.dtype, runner.device)  # a bucket, as a captured step leaves one
    runner.split_k_qkv = not split_qkv
    runner.refresh_merged_projections()
    assert not runner.graphs.buckets, "the captured steps hold the other q/k/v product: dropped"
    assert runner.split_k_qkv_taken is (not split_qkv)
    runner.rotary_in_attention = False  # the partial sums need the one-kernel attention
    runner.refresh_merged_projections()
    assert not runner.split_k_qkv_taken


def test_split_k_qkv_decision_names_what_is_missing(monkeypatch):
    """`fast_paths.split_k_qkv`: on with its three prerequisites, else off naming the first one missing; on CUDA a
    failing self-check of its own turns it off (and only it)."""
    cpu = torch.device("cpu")
    decide = lambda *flags, requested=True: fast_paths.split_k_qkv(requested, *flags, cpu, torch.float32)  # noqa: E731
    assert decide(True, True, True).choice == "on"
    assert decide(True, True, True, requested=False).reason == "asked for"
    assert "rotary" in decide(False, True, True).reason
    assert "split-K" in decide(True, False, True).reason
    assert "merged" in decide(True, True, False).reason
    import kernels.decode_fusions as fusions

    assert fusions.partial_qkv_attention_self_check(cpu, torch.float32) is None
    assert fusions.partial_qkv_attention_self_check(cpu, torch.bfloat16) is None
    real = fusions.rotary_paged_decode_attention
    monkeypatch.setattr(fusions, "rotary_paged_decode_attention",
                        lambda q, *a, **k: real(q, *a, **k) * (1.5 if q.dim() == 4 else 1.0))  # fmt: skip
    assert fusions.partial_qkv_attention_self_check(cpu, torch.float32).startswith("rotary_paged_decode_attention on")
    assert fusions.rotary_attention_self_check(cpu, torch.float32) is None, "the other check does not see it"


def test_split_k_products_follow_the_option_and_the_modules(tiny):
    """Decided again at every call: a hook added to a down product, or the option switched off, sends the products
    back to the modules (and drops the graphs that held the split ones); the tokens stay those of the modules."""
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    want = model.generate(ids, mask, pixels, max_new_tokens=3, eos_token_id=-1)
    runner = PagedRunner(model, block_size=4, fused_ops=True)
    run = lambda: runner.generate(ids, mask, pixels, max_new_tokens=3, eos_token_id=-1, pad_token_id=model.pad_token_id)  # noqa: E731
    assert torch.equal(run(), want) and runner.ops().split_k is not None
    down = model.language_model.layers[0].mlp.down_proj
    seen = []
    handle = down.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        assert torch.equal(run(), want)
        assert runner.ops().split_k is None and seen, "a hooked product runs its module, and its hook sees it"
    finally:
        handle.remove()
    assert torch.equal(run(), want) and runner.ops().split_k is not None, "the hook gone, the split products return"
    runner.split_k_products = False
    assert torch.equal(run(), want) and runner.ops().split_k is None


def test_merged_projections_follow_weight_updates(tiny):
    """The runner is cached across calls (evaluation during training): weights updated in place between two
    generate calls must reach the merged q/k/v and gate/up copies, in the same buffers (the graphs' addresses)."""
    import copy

    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    runner = PagedRunner(model, block_size=4, fused_ops=True)
    kwargs = dict(max_new_tokens=4, eos_token_id=-1)
    before = runner.generate(ids, mask, pixels, **kwargs)
    assert torch.equal(before, model.generate(ids, mask, pixels, **kwargs))
    pointers = [(m.qkv_weight.data_ptr(), m.gate_up_weight.data_ptr()) for m in runner.merged]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an optimizer step, in place, on exactly the merged projections
        for layer in runner.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                         layer.mlp.up_proj):
                proj.weight.add_(torch.randn(proj.weight.shape, generator=g) * proj.weight.std())
            layer.self_attn.k_proj.bias.add_(1.0)
        head = model.base.lm_head.weight
        head.add_(torch.randn(head.shape, generator=g) * head.std())
    head_pointer = runner.head.weight.data_ptr()
    after_dynamic = model.generate(ids, mask, pixels, **kwargs)
    assert not torch.equal(after_dynamic, before), "the update must change the tokens for this test to mean anything"
    assert torch.equal(runner.generate(ids, mask, pixels, **kwargs), after_dynamic)
    assert pointers == [(m.qkv_weight.data_ptr(), m.gate_up_weight.data_ptr()) for m in runner.merged]
    assert runner.head.weight.data_ptr() == head_pointer
    # a projection replaced by a new module (not updated in place): the runner must rebuild from the new one
    for layer in runner.layers:
        for owner, name in ((layer.self_attn, "q_proj"), (layer.mlp, "up_proj")):
            old = getattr(owner, name)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
            with torch.no_grad():
                new.weight.copy_(torch.randn(old.weight.shape, generator=g) * 4 * old.weight.std())
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            setattr(owner, name, new)
    replaced_dynamic = model.generate(ids, mask, pixels, **kwargs)
    assert not torch.equal(replaced_dynamic, after_dynamic)
    assert torch.equal(runner.generate(ids, mask, pixels, **kwargs), replaced_dynamic)


@pytest.mark.parametrize("bias", [False, True])
def test_padded_vocab_projection_gives_the_heads_logits(bias):
    """The lm_head padded to 64-row multiples: the module's logits over the real vocabulary (a strided view), after
    in-place updates too; heads it cannot or need not pad are named."""
    from engine.model.fused_ops import PaddedVocabProjection, padded_head_unsupported

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 131, bias=bias)
    proj = PaddedVocabProjection(head)
    assert proj.weight.shape == (192, 24) and proj.weight[131:].abs().max() == 0
    hidden = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(proj(hidden), head(hidden), atol=1e-6, rtol=1e-6)
        head.weight.mul_(-2)
        if bias:
            head.bias.add_(1)
        proj.refresh()
        out = proj(hidden)
        torch.testing.assert_close(out, head(hidden), atol=1e-6, rtol=1e-6)
    assert out.shape == (5, 131) and out.argmax(-1).tolist() == head(hidden).argmax(-1).tolist()
    assert proj.matches(head) and not proj.matches(torch.nn.Linear(24, 131))
    head.bias = None if bias else torch.nn.Parameter(torch.zeros(131))
    assert not proj.matches(head), "a bias added or removed needs a new copy"
    assert "multiple of 64" in padded_head_unsupported(torch.nn.Linear(24, 128))
    assert "not a plain" in padded_head_unsupported(type("Adapter", (torch.nn.Linear,), {})(24, 131))
    assert padded_head_unsupported(head) is None


def test_weight_copies_follow_the_runner_settings_and_a_replaced_head(tiny):
    """The padded lm_head and merged projections are dropped (with the graphs that read them) when the runner stops
    using them, and a replaced lm_head module is padded anew: the runner keeps matching the dynamic cache."""
    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    ids, mask, pixels, _ = shared_image_batch(model, tok, SPECS[:3])
    kwargs = dict(max_new_tokens=3, eos_token_id=-1)
    runner = PagedRunner(model, block_size=4, fused_ops=True)
    runner.generate(ids, mask, pixels, **kwargs)
    old_head = runner.head
    assert old_head is not None and runner.merged is not None
    drops = []
    real_drop = runner.graphs.drop
    runner.graphs.drop = lambda: (drops.append(1), real_drop())[1]
    new = torch.nn.Linear(model.base.lm_head.in_features, model.base.lm_head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(torch.randn(new.weight.shape, generator=torch.Generator().manual_seed(5)))
    model.base.lm_head = new
    assert torch.equal(runner.generate(ids, mask, pixels, **kwargs), model.generate(ids, mask, pixels, **kwargs))
    assert runner.head is not old_head and runner.head.source is new and runner.head.bias is not None and drops
    runner.merged_projections = False
    drops.clear()
    assert torch.equal(runner.generate(ids, mask, pixels, **kwargs), model.generate(ids, mask, pixels, **kwargs))
    assert runner.head is None and runner.merged is None and runner.ops().merged is None and drops


def test_merged_projections_off_for_wrapped_projections(tiny):
    import copy

    model = copy.deepcopy(tiny[0])

    class Adapter(torch.nn.Linear):  # a subclass, as an adapter or a quantized linear would be
        pass

    old = model.language_model.layers[1].mlp.up_proj
    adapter = Adapter(old.in_features, old.out_features, bias=False)
    adapter.load_state_dict(old.state_dict())
    model.language_model.layers[1].mlp.up_proj = adapter
    runner = PagedRunner(model, block_size=4, fused_ops=True)
    runner.refresh_merged_projections()
    assert runner.merged is None and runner.ops().merged is None, "a wrapped projection must not be merged"
    tok = tiny[1]
    ids, mask, pixels, _ = shared_image_batch(model, tok, SPECS[:3])
    kwargs = dict(max_new_tokens=3, eos_token_id=-1)
    assert torch.equal(runner.generate(ids, mask, pixels, **kwargs), model.generate(ids, mask, pixels, **kwargs))


def test_runner_builds_for_an_mlp_without_gate_and_up(tiny):
    """Layers the fused path does not know (here an fc1/fc2 MLP) run through their modules: the runner must
    neither fail to build nor try to merge projections that do not exist."""
    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]

    class PlainMLP(torch.nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    hidden = model.language_model.config.hidden_size
    model.language_model.layers[0].mlp = PlainMLP(hidden)
    assert "gate/up/down" in layer_stack_unsupported(model.language_model, fused_ops=True)
    with pytest.raises(NotImplementedError, match="gate/up/down"):
        PagedRunner(model, block_size=4, fused_ops=True)
    runner = PagedRunner(model, block_size=4)
    runner.refresh_merged_projections()
    assert runner.merged is None
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    kwargs = dict(max_new_tokens=3, eos_token_id=-1)
    assert torch.equal(runner.generate(ids, mask, pixels, **kwargs), model.generate(ids, mask, pixels, **kwargs))


def test_paged_matches_dynamic_sampled(tiny):
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    out = {}
    for kv_cache in ("dynamic", "paged"):
        g = torch.Generator().manual_seed(7)
        out[kv_cache] = model.generate(
            ids, mask, pixels, max_new_tokens=5, eos_token_id=-1, do_sample=True, temperature=0.15, generator=g,
            kv_cache=kv_cache,
        )
    assert torch.equal(out["paged"], out["dynamic"]), f"{out['paged'].tolist()} vs {out['dynamic'].tolist()}"
    assert len(set(out["dynamic"][0].tolist())) > 1, "sampling should vary the tokens of a row"


def test_a_seeded_generator_goes_on_alike_on_both_caches_after_the_rows_end(tiny):
    """The paged runner checks for the end every few steps; sampling past it drew from the caller's generator, so
    the next sampled call with that generator gave other tokens than the dynamic cache's."""
    model, tok, _ = tiny
    ids = torch.tensor([tok("Move down, then left.\n").input_ids])
    options = dict(do_sample=True, temperature=2.0)
    first = model.generate(ids, None, None, max_new_tokens=1, eos_token_id=-1, generator=torch.Generator().manual_seed(0),
                           **options)  # fmt: skip
    eos = int(first[0, 0])  # the row ends at its first token: the runner would have stepped on
    calls = {}
    for kv_cache in ("dynamic", "paged"):
        g = torch.Generator().manual_seed(0)
        calls[kv_cache] = [model.generate(ids, None, None, max_new_tokens=8, eos_token_id=eos, generator=g,
                                          kv_cache=kv_cache, **options).tolist() for _ in range(3)]  # fmt: skip
    assert calls["paged"] == calls["dynamic"]
    assert calls["dynamic"][0] == [[eos]] and calls["dynamic"][1] != calls["dynamic"][0]


def test_sharing_on_and_off_give_the_same_tokens_with_fewer_blocks(tiny):
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    result = {}
    for sharing in (False, True):
        runner = PagedRunner(model, block_size=4, enable_prefix_sharing=sharing)
        tokens = runner.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
        result[sharing] = (tokens, dict(runner.stats))
    (off, stats_off), (on, stats_on) = result[False], result[True]
    assert torch.equal(on, off)
    assert stats_off["computed_prompt_tokens"] == stats_off["prompt_tokens"]
    assert stats_on["computed_prompt_tokens"] < stats_off["computed_prompt_tokens"]
    assert stats_on["blocks_after_prompt"] < stats_off["blocks_after_prompt"]
    assert stats_on["peak_blocks"] < stats_off["peak_blocks"]


def test_batch_of_one_equals_batch(tiny):
    model, tok, _ = tiny
    specs = SPECS[:4]
    ids, mask, pixels, tiles = shared_image_batch(model, tok, specs)
    batch = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1, kv_cache="paged")
    start = 0
    for b in range(ids.shape[0]):
        row_ids = ids[b, mask[b].bool()][None]
        row_pixels = pixels[start : start + tiles[b]] if tiles[b] else None
        start += tiles[b]
        alone = model.generate(row_ids, None, row_pixels, max_new_tokens=4, eos_token_id=-1, kv_cache="paged")
        assert torch.equal(batch[b], alone[0]), f"row {b}: batch {batch[b].tolist()} vs alone {alone[0].tolist()}"


def test_kv_cache_argument_and_empty_generation(tiny):
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok, SPECS[:2])
    with pytest.raises(ValueError, match=r"kv_cache must be one of \('dynamic', 'paged'\), got 'static'"):
        model.generate(ids, mask, pixels, max_new_tokens=2, kv_cache="static")
    out = model.generate(ids, mask, pixels, max_new_tokens=0, kv_cache="paged")
    assert out.shape == (2, 0) and out.dtype == torch.long


def test_a_fixed_pool_that_is_too_small_raises(tiny):
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok, SPECS[:2])
    runner = PagedRunner(model, block_size=16, num_blocks=3)
    with pytest.raises(PoolExhaustedError, match=r"block\(s\) of 16 tokens needed, \d+ free of 3"):
        runner.generate(ids, mask, pixels, max_new_tokens=2)
    assert runner.cache.num_used_blocks == 0


def test_context_fit_separates_the_fixed_cost_from_the_streaming_rate():
    from benchmarks.bench_paged_kv import fit_fixed_and_streaming

    # 100 us whatever the context, then 1,000 bytes per token at 2 GB/s (0.5 us per token)
    fit = fit_fixed_and_streaming([(n, 100 + 0.5 * n) for n in (100, 400, 1600)], bytes_per_token=1000)
    assert math.isclose(fit["fixed_us"], 100) and math.isclose(fit["us_per_token"], 0.5)
    assert math.isclose(fit["streaming_gbs"], 2.0)


def test_gpu_report_dry_run_on_cpu(tmp_path):
    """The GPU report (run once, later, on an H100) goes through every section at tiny sizes on the CPU."""
    from benchmarks import bench_paged_kv

    assert bench_paged_kv.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench_paged_kv.json").read_text())
    assert not payload["errors"], payload["errors"]
    assert payload["numerics"] and all(r["ok"] for r in payload["numerics"])
    for section in ("decode_attention", "decode_step"):
        rows = payload[section]["rows"]
        assert rows and not [r for r in rows if "error" in r], [r.get("trace", r) for r in rows if "error" in r]
    step = payload["decode_step"]
    assert step["agreement"]["all_tokens"] == 1.0, "fp32 paged and dynamic generation must agree"
    assert step["sharing"]["on"]["blocks_after_prompt"] < step["sharing"]["off"]["blocks_after_prompt"]
    rounds = step["sharing"]["on"]["rounds_ms"], step["sharing"]["off"]["rounds_ms"]  # alternating rounds
    assert len(rounds[0]) == len(rounds[1]) >= 5 and step["sharing"]["x_unshared"] > 0
    assert "## 3. Whole decode step" in (tmp_path / "bench_paged_kv.md").read_text()
    pages = payload["decode_attention"]["best_by_page_size"]
    assert set(pages) == {"8"} and pages["8"]["block_size"] == 8  # the page-size sweep ran (JSON keys are strings)
    names = [r["name"] for r in payload["decode_attention"]["rows"]]
    for ablation in ("dot_in_cache_dtype=False", "programmatic_launch=False", "lengths_before_wait=False"):
        assert any(ablation in n for n in names), f"the default without {ablation.split('=')[0]} must be timed"
    fit = payload["decode_attention"]["context_fit"]  # the fixed and streaming parts of the time (CPU: noise)
    assert {"fixed_us_per_layer", "us_per_token", "streaming_gbs"} <= set(fit) and math.isfinite(fit["us_per_token"])
    if payload["decode_attention"]["best_any_page_size"]["name"] != payload["decode_attention"]["default"]["name"]:
        assert any("attention {" in r["name"] for r in step["rows"]), "the step with the sweep's best attention config"
    settings = step["settings_ab"]  # the split products on and off in one runner, alternating (fused ops forced)
    # the length before the wait takes effect with programmatic launch only: never on the CPU
    setting = lambda split, rotary, qkv: dict(split_products=split, rotary_in_attention=rotary,  # noqa: E731
                                              split_qkv=qkv, lengths_before_wait=False)
    assert settings["taken"] == {"default": setting(True, True, True),
                                 "without split products": setting(False, True, False),
                                 "rotary outside the attention": setting(True, False, False),
                                 "q/k/v product whole": setting(True, True, False),
                                 "attention's lengths read after its wait": setting(True, True, True)}
    diff = settings["max_abs_logit_diff_vs_default"]  # fp32 dry run: the same logits up to summation order
    assert diff["default"] == 0 and all(v < 1e-4 for v in diff.values()), diff
    assert all(len(t) == settings["rounds"] and all(v > 0 for v in t) for t in settings["us"].values())
    assert settings["x_default"]["default"] == 1.0
    breakdown = step["kernel_breakdown"]
    assert breakdown["total_us_per_step"] > 0 and breakdown["top"]
    assert abs(sum(k["pct"] for k in breakdown["by_kind"]) - 100) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_rows_are_the_modules_values(tiny, dtype):
    """The runner's cos/sin table gives bit for bit what the model's rotary embedding computes per call."""
    model = tiny[0]
    runner = PagedRunner(model, block_size=4, max_model_len=300)
    x = torch.zeros(5, model.language_model.config.hidden_size, dtype=dtype)
    positions = torch.tensor([0, 1, 17, 255, 299])
    cos, sin = runner.rotary(x, positions)
    want_cos, want_sin = model.language_model.rotary_emb(x, positions[None])
    assert cos.dtype == dtype and torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])
    assert runner.rotary.table is not None and runner.rotary.table.shape[1] == 300


def test_gpu_report_fails_a_figure_below_its_floor(tmp_path, monkeypatch):
    """A time below its workload's floor is physically impossible: the report must flag it, not print it."""
    from benchmarks import bench_paged_kv

    monkeypatch.setattr(bench_paged_kv, "copy_bandwidth_gbs", lambda device: 1e-4)  # every floor becomes enormous
    assert bench_paged_kv.main(["--smoke", "--out", str(tmp_path), "--sections", "step"]) == 1
    payload = json.loads((tmp_path / "bench_paged_kv.json").read_text())
    flagged = [r for r in payload["decode_step"]["rows"] if "below the physical floor" in r.get("error", "")]
    assert flagged and all(r["name"] in payload["errors"] for r in flagged)
    assert any(r["name"].startswith("generate(kv_cache='paged')") for r in flagged), "the generate rows are checked"


def test_step_graphs_drop_graphs_keeps_the_static_buffers():
    """`StepGraphs.drop_graphs` (a step whose kernels changed): every bucket's graphs and the pool are forgotten, the
    buckets and their static buffers (the addresses the next capture reads) kept; `drop` forgets the buckets too."""
    from engine.model.paged.graphs import StepGraphs

    graphs = StepGraphs(hidden=8, table_width=4)
    small, large = graphs.bucket(3, torch.float32, torch.device("cpu")), graphs.bucket(9, torch.float32, "cpu")
    small.graphs[True] = ("graph", torch.zeros(1))
    large.graphs[False] = ("graph", torch.zeros(1))
    graphs.pool = "a pool"
    tables = small.block_tables
    graphs.drop_graphs()
    assert graphs.pool is None and not small.graphs and not large.graphs
    assert graphs.bucket(3, torch.float32, "cpu") is small and small.block_tables is tables
    graphs.drop()
    assert graphs.bucket(3, torch.float32, "cpu") is not small


def test_paged_attention_refuses_partial_sums_it_cannot_sum():
    """Only the one-kernel attention sums the q/k/v product's partial sums: asking for them without it, or giving
    them to an attention that was not told, is an error, not a wrong result."""
    from engine.model.layers import ReferenceOps
    from engine.model.paged.attention import PagedAttention
    from engine.model.paged.cache import PagedKVCache

    cache = PagedKVCache(num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32,
                         device=torch.device("cpu"))  # fmt: skip
    slots = torch.tensor([0, 1])
    attend = lambda q, kc, vc: q  # noqa: E731
    with pytest.raises(ValueError, match="rotate_attend"):
        PagedAttention(cache, slots, attend, ReferenceOps.__new__(ReferenceOps), sums_partial_qkv=True)
    attention = PagedAttention(cache, slots, attend, ReferenceOps.__new__(ReferenceOps), rotate_attend=attend)
    partial = torch.zeros(3, 2, 2, 8)
    with pytest.raises(ValueError, match="does not sum them"):
        attention(0, partial, partial[:, :, :1], partial[:, :, :1], torch.zeros(2, 8), torch.zeros(2, 8))


@pytest.mark.parametrize("static_buffers", [False, True])
def test_a_runner_serves_calls_in_and_out_of_inference_mode(tiny, static_buffers):
    """The pool, the step buffers and the merged weights outlive a call: made as inference tensors in a call under
    torch.inference_mode, they could not be written by a later call outside it (the copy-on-write of a repeated
    row, the buffers' reset)."""
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)  # rows 0 and 5 alike: a shared block copied on write
    want = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
    runner = PagedRunner(model)
    runner.static_buffers_without_graphs = static_buffers
    with torch.inference_mode():
        first = runner.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
    second = runner.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
    with torch.inference_mode():
        third = runner.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
    for got in (first, second, third):
        assert torch.equal(got, want)


def test_a_fixed_pool_that_runs_out_names_a_size_that_serves_the_call(tiny):
    """The shortfall of the request that failed would only move the failure to the next row."""
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok)
    with pytest.raises(PoolExhaustedError, match=r"num_blocks >= (\d+)") as failure:
        PagedRunner(model, block_size=4, num_blocks=3).generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=-1)
    enough = failure.value.enough
    got = PagedRunner(model, block_size=4, num_blocks=enough).generate(ids, mask, pixels, max_new_tokens=6,
                                                                       eos_token_id=-1)
    assert torch.equal(got, model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=-1))


def test_both_caches_hold_a_prompt_to_the_last_position(tiny, monkeypatch):
    """The last new token is returned, never fed: a row needs length + max_new_tokens - 1 positions, on either
    cache (the paged one asked for one more; the dynamic one never checked)."""
    model, tok, _ = tiny
    ids, mask, pixels, _ = shared_image_batch(model, tok, SPECS[:2])
    longest = int(mask.sum(1).max())
    limit = longest + 3  # 4 new tokens fit exactly
    monkeypatch.setattr(model.base.config.get_text_config(), "max_position_embeddings", limit)
    runner = PagedRunner(model, max_model_len=limit)
    fits = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
    assert torch.equal(runner.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1), fits)
    with pytest.raises(ValueError, match=rf"need more than max_model_len={limit}"):
        runner.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)
    with pytest.raises(ValueError, match=rf"need {limit + 1} positions, more than the model's max_position_embeddings"):
        model.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_runner_serves_calls_in_and_out_of_inference_mode(tiny):
    """The same on the GPU, where the steps replay CUDA graphs whose buffers a call under inference mode made."""
    import copy

    model = copy.deepcopy(tiny[0]).cuda()
    ids, mask, pixels, _ = shared_image_batch(model, tiny[1])
    ids, mask, pixels = ids.cuda(), mask.cuda(), pixels.cuda()
    want = model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=-1)
    with PagedRunner(model) as runner:
        with torch.inference_mode():
            first = runner.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=-1)
        second = runner.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=-1)
        with torch.inference_mode():
            third = runner.generate(ids[:3], mask[:3], pixels[:3], max_new_tokens=6, eos_token_id=-1)
        assert runner.graphs.captures > 0  # the steps did replay graphs
    for got in (first, second):
        assert torch.equal(got, want)
    assert torch.equal(third, model.generate(ids[:3], mask[:3], pixels[:3], max_new_tokens=6, eos_token_id=-1))
