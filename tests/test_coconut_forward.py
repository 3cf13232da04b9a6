"""The causal iterative forward: equality with the naive reference, causality, gradients, bad input."""

from __future__ import annotations

import random

import pytest
import torch

from engine.model.fullpass_baseline import fullpass_forward
from engine.model.reference import naive_forward
from engine.model.schedule import BatchLayoutError
from tests.helpers import pad_batch, random_pixels, sample_ids

TOL = 1e-5


def mixed_batch(model, tok, seed=0):
    """Rows with different image tile counts, latent counts and positions, left and right padding, one row
    without latents and one without an image."""
    specs = [
        dict(tiles=1, question="What colour?", n_latents=3, left=False),
        dict(tiles=2, question="Start at the top left cell. Move right twice.", n_latents=0, left=True),
        dict(tiles=1, question="Which colour is the last cell of the walk?", n_latents=1, left=True),
        dict(tiles=0, question="Move down.", n_latents=2, left=False),
    ]
    rows = [sample_ids(tok, model, tiles=s["tiles"], question=s["question"], n_latents=s["n_latents"]) for s in specs]
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[s["left"] for s in specs])
    tiles = sum(s["tiles"] for s in specs)
    size = model.config.vision_config.image_size[0]
    return ids, mask, random_pixels(tiles, size, seed)


def single_row(model, tok, n_latents=4, tiles=1, seed=1):
    ids = torch.tensor([sample_ids(tok, model, tiles=tiles, n_latents=n_latents)])
    size = model.config.vision_config.image_size[0]
    return ids, torch.ones_like(ids), random_pixels(tiles, size, seed) if tiles else None


def real_positions(mask):
    return mask.bool()


@pytest.mark.parametrize("n_latents", [0, 1, 4])
def test_single_row_matches_naive_reference(tiny_model, tiny_tok, n_latents):
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents)
    out = tiny_model(ids, mask, pv, return_inputs_embeds=True)
    ref = naive_forward(tiny_model, ids, mask, pv)
    torch.testing.assert_close(out.logits, ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(out.inputs_embeds, ref.inputs_embeds, atol=TOL, rtol=0)
    assert out.num_passes == n_latents + 1


def test_mixed_batch_matches_naive_reference_and_single_rows(tiny_model, tiny_tok):
    ids, mask, pv = mixed_batch(tiny_model, tiny_tok)
    out = tiny_model(ids, mask, pv, return_inputs_embeds=True)
    ref = naive_forward(tiny_model, ids, mask, pv)
    real = real_positions(mask)
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=TOL, rtol=0)
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=TOL, rtol=0)
    assert torch.isfinite(out.logits).all(), "padding positions must not produce NaN/inf"
    # Each row alone gives the same logits on its real positions.
    tiles = [1, 2, 1, 0]
    start = 0
    for b in range(ids.shape[0]):
        row_ids = ids[b, mask[b].bool()][None]
        row_pv = pv[start : start + tiles[b]] if tiles[b] else None
        start += tiles[b]
        alone = tiny_model(row_ids, None, row_pv)
        torch.testing.assert_close(out.logits[b, mask[b].bool()], alone.logits[0], atol=TOL, rtol=0)


def test_without_latents_equals_plain_internvl(tiny_model, tiny_tok):
    rows = [
        sample_ids(tiny_tok, tiny_model, tiles=1, question="What colour?", markers=False),
        sample_ids(tiny_tok, tiny_model, tiles=2, question="Move right, then down. Which colour?", markers=False),
    ]
    ids, mask = pad_batch(rows, tiny_tok.pad_token_id, left=[True, False])
    pv = random_pixels(3, tiny_model.config.vision_config.image_size[0], 3)
    out = tiny_model(ids, mask, pv)
    from engine.model.schedule import position_ids_from_mask

    plain = tiny_model.base(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=position_ids_from_mask(mask))
    real = real_positions(mask)
    torch.testing.assert_close(out.logits[real], plain.logits[real], atol=TOL, rtol=0)
    assert out.num_passes == 1


def _perturb_after(ids, mask, p, tok, rng, protect):
    """Replace every real, unprotected token after column p by a random ordinary token."""
    new = ids.clone()
    vocab = list(range(3, 300))  # ordinary BPE tokens of the tiny tokenizer
    for b in range(ids.shape[0]):
        for t in range(p + 1, ids.shape[1]):
            if mask[b, t] and int(ids[b, t]) not in protect:
                new[b, t] = rng.choice(vocab)
    return new


def test_causality_random_cut_points(tiny_model, tiny_tok):
    """Perturbing tokens after column p leaves logits and thoughts at columns <= p unchanged."""
    ids, mask, pv = mixed_batch(tiny_model, tiny_tok, seed=5)
    protect = {tiny_model.image_token_id, tiny_model.latent_id}  # keep tile counts and latent layout valid
    base_out = tiny_model(ids, mask, pv, return_inputs_embeds=True)
    rng = random.Random(0)
    cut_points = rng.sample(range(1, ids.shape[1] - 1), 12) + list(base_out and tiny_model.prepare(ids, mask, pv).schedule.latent_positions)
    for p in cut_points:
        new_ids = _perturb_after(ids, mask, p, tiny_tok, rng, protect)
        if torch.equal(new_ids, ids):
            continue
        out = tiny_model(new_ids, mask, pv, return_inputs_embeds=True)
        keep = mask.bool().clone()
        keep[:, p + 1 :] = False
        torch.testing.assert_close(out.logits[keep], base_out.logits[keep], atol=0, rtol=0, msg=f"logits leak at cut {p}")
        torch.testing.assert_close(
            out.inputs_embeds[keep], base_out.inputs_embeds[keep], atol=0, rtol=0, msg=f"thoughts leak at cut {p}"
        )


def test_fullpass_baseline_leaks(tiny_model, tiny_tok):
    """The same causality check fails for the flawed 'full pass then refine' baseline."""
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=3)
    last_latent = int((ids[0] == tiny_model.latent_id).nonzero().max())
    rng = random.Random(1)
    new_ids = _perturb_after(ids, mask, last_latent, tiny_tok, rng, {tiny_model.image_token_id})
    a = fullpass_forward(tiny_model, ids, mask, pv)
    b = fullpass_forward(tiny_model, new_ids, mask, pv)
    thoughts = ids[0] == tiny_model.latent_id
    leak = (a.inputs_embeds[0, thoughts] - b.inputs_embeds[0, thoughts]).abs().max()
    assert leak > 1e-4, "the flawed baseline's thoughts should depend on tokens after them"
    # ... while the engine's thoughts do not move at all.
    ea = tiny_model(ids, mask, pv, return_inputs_embeds=True)
    eb = tiny_model(new_ids, mask, pv, return_inputs_embeds=True)
    assert torch.equal(ea.inputs_embeds[0, thoughts], eb.inputs_embeds[0, thoughts])


def test_thoughts_depend_on_the_image(tiny_model, tiny_tok):
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=3)
    other = random_pixels(1, tiny_model.config.vision_config.image_size[0], 99)
    a = tiny_model(ids, mask, pv, return_inputs_embeds=True)
    b = tiny_model(ids, mask, other, return_inputs_embeds=True)
    thoughts = ids[0] == tiny_model.latent_id
    diff = (a.inputs_embeds[0, thoughts] - b.inputs_embeds[0, thoughts]).abs().amax(-1)
    assert (diff > 1e-5).all(), f"every thought must change with the image, got max diffs {diff.tolist()}"


def test_gradients_reach_vision_projector_and_thoughts(tiny_model, tiny_tok):
    model = tiny_model
    ids, mask, pv = single_row(model, tiny_tok, n_latents=3)
    labels = ids.clone()
    end_latent = int((ids[0] == model.end_latent_id).nonzero()[0])
    labels[0, : end_latent + 1] = -100  # loss only on the text after the thoughts
    captured = []

    def keep_inputs(module, args, kwargs):
        emb = kwargs["inputs_embeds"]
        emb.retain_grad()
        captured.append(emb)

    handle = model.language_model.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        model.zero_grad(set_to_none=True)
        loss = model.compute_loss(ids, mask, pv, labels)
        loss.backward()
    finally:
        handle.remove()
    vision = [p.grad for p in model.base.model.vision_tower.parameters() if p.grad is not None]
    projector = [p.grad for p in model.base.model.multi_modal_projector.parameters() if p.grad is not None]
    assert vision and any(g.abs().sum() > 0 for g in vision), "no gradient reached the vision tower"
    assert projector and any(g.abs().sum() > 0 for g in projector), "no gradient reached the projector"
    # Passes 1.. start with a thought in column 0; each one must receive gradient.
    thought_grads = [c.grad[0, 0].abs().sum().item() for c in captured[1:]]
    assert len(thought_grads) == 3 and all(g > 0 for g in thought_grads), thought_grads
    model.zero_grad(set_to_none=True)


def test_loss_only_path_matches_logits_path(tiny_model, tiny_tok):
    ids, mask, pv = mixed_batch(tiny_model, tiny_tok, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    full = tiny_model(ids, mask, pv, labels=labels)
    lean = tiny_model.compute_loss(ids, mask, pv, labels)
    torch.testing.assert_close(lean, full.loss, atol=1e-5, rtol=1e-5)
    tiny_model.loss_chunk_tokens, old = 7, tiny_model.loss_chunk_tokens  # several chunks
    try:
        chunked = tiny_model.compute_loss(ids, mask, pv, labels)
    finally:
        tiny_model.loss_chunk_tokens = old
    torch.testing.assert_close(chunked, full.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_with_an_aligned_vocabulary_is_the_same_loss(tiny_model, bias):
    """The loss's products on the head's weight padded to 64-row multiples (CUDA's path for odd vocabularies, here
    on CPU): the same loss and the same gradients for the hidden states, the weight and the bias."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden = tiny_model.base.lm_head.weight.shape
    assert vocab % 64, "the tiny vocabulary must be odd for this test to pad anything"
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    h = torch.randn(23, hidden, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (23,), generator=g)
    results = []
    for pad_vocab in (False, True):
        tiny_model.loss_chunk_tokens, old = 7, tiny_model.loss_chunk_tokens  # several recomputed chunks
        try:
            loss = tiny_model._chunked_loss(h, y, head, pad_vocab=pad_vocab)
        finally:
            tiny_model.loss_chunk_tokens = old
        results.append((loss.detach(), torch.autograd.grad(loss, [h, *head.parameters()])))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert len(got_grads) == (3 if bias else 2)
    for a, b in zip(got_grads, want_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_left_padded_training_gradients_are_finite(tiny_model, tiny_tok):
    ids, mask, pv = mixed_batch(tiny_model, tiny_tok, seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    tiny_model.zero_grad(set_to_none=True)
    tiny_model.compute_loss(ids, mask, pv, labels).backward()
    for name, p in tiny_model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    tiny_model.zero_grad(set_to_none=True)


def test_eager_backend_matches_sdpa(tiny_model, tiny_tok):
    ids, mask, pv = mixed_batch(tiny_model, tiny_tok, seed=6)
    sdpa = tiny_model(ids, mask, pv)
    tiny_model.set_attention_backend("eager")
    try:
        eager = tiny_model(ids, mask, pv)
    finally:
        tiny_model.set_attention_backend("sdpa")
    real = mask.bool()
    torch.testing.assert_close(eager.logits[real], sdpa.logits[real], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="attn_implementation"):
        tiny_model.set_attention_backend("xformers-nonexistent")


# ---------------------------------------------------------------------- bad input
def test_too_few_or_too_many_image_tokens(tiny_model, tiny_tok):
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=1, tiles=1)
    with pytest.raises(BatchLayoutError, match=r"pixel_values holds 2 tiles.*ask for 1"):
        tiny_model(ids, mask, torch.cat([pv, pv]))
    broken = ids.clone()
    first_img = int((ids[0] == tiny_model.image_token_id).nonzero()[0])
    broken[0, first_img] = 50  # one image token fewer
    with pytest.raises(BatchLayoutError, match=r"row 0 has 15 <IMG_CONTEXT> tokens, not a multiple of the 16"):
        tiny_model(broken, mask, pv)
    with pytest.raises(BatchLayoutError, match="no pixel_values"):
        tiny_model(ids, mask, None)


def test_latent_at_position_zero_or_after_padding(tiny_model, tiny_tok):
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=1, tiles=0)
    bad = ids.clone()
    bad[0, 0] = tiny_model.latent_id
    with pytest.raises(BatchLayoutError, match=r"row 0: <\|latent\|> at position 0 has no real token before it"):
        tiny_model(bad, mask)
    two = torch.cat([ids, ids])
    two_mask = torch.ones_like(two)
    two[1, 3] = tiny_model.latent_id
    two_mask[1, :3] = 0  # row 1's first real token is the latent
    with pytest.raises(BatchLayoutError, match=r"row 1: <\|latent\|> at position 3"):
        tiny_model(two, two_mask)


def test_latent_inside_image_span(tiny_model, tiny_tok):
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=1, tiles=1)
    img = (ids[0] == tiny_model.image_token_id).nonzero().flatten()
    bad = ids.clone()
    bad[0, int(img[5])] = tiny_model.latent_id
    # 15 image tokens remain: the tile check fires first; put one image token back after the span.
    bad[0, int(img[-1]) + 1] = tiny_model.image_token_id
    with pytest.raises(BatchLayoutError, match=r"row 0: <\|latent\|> at position \d+ lies inside the image span"):
        tiny_model(bad, mask, pv)


def _first_latent_error(ids, mask, latent_id, image_id):
    """The latent checks one latent at a time, in row-major order: what build_schedule must report."""
    for row in range(ids.shape[0]):
        for col in range(ids.shape[1]):
            if ids[row, col] != latent_id:
                continue
            if col == 0 or not mask[row, col - 1]:
                return f"row {row}: <|latent|> at position {col} has no real token"
            if not mask[row, col]:
                return f"row {row}: <|latent|> at position {col} is masked out"
    for row in range(ids.shape[0]):
        image_cols = (ids[row] == image_id).nonzero().flatten().tolist()
        for col in range(ids.shape[1]):
            if image_cols and ids[row, col] == latent_id and image_cols[0] <= col <= image_cols[-1]:
                span = f"[{image_cols[0]}, {image_cols[-1]}]"
                return f"row {row}: <|latent|> at position {col} lies inside the image span {span}"
    return None


def test_latent_checks_name_the_first_bad_latent_on_random_layouts():
    """build_schedule checks the latents as whole-batch masks; on random layouts (latents anywhere, padding
    anywhere, image spans with latents inside) it names the same latent, for the same reason, as checking them
    one at a time."""
    from engine.model.schedule import build_schedule

    g = torch.Generator().manual_seed(0)
    latent_id, image_id, seen = 9, 7, set()
    for _ in range(300):
        rows, cols = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(0, 4, (rows, cols), generator=g)
        ids[torch.rand(rows, cols, generator=g) < 0.2] = latent_id
        ids[torch.rand(rows, cols, generator=g) < 0.15] = image_id
        mask = (torch.rand(rows, cols, generator=g) > 0.15).long()
        expected = _first_latent_error(ids, mask, latent_id, image_id)
        try:  # one token per tile: every image-token count is a whole number of tiles
            build_schedule(ids, mask, latent_id=latent_id, image_token_id=image_id, tokens_per_tile=1,
                           num_tiles=int((ids == image_id).sum()))  # fmt: skip
            got = None
        except BatchLayoutError as error:
            got = str(error)
        assert (got is None) == (expected is None) and (got is None or got.startswith(expected)), (ids, mask, got)
        kinds = ("no real token", "masked out", "inside the image span")
        seen.add(None if expected is None else next(k for k in kinds if k in expected))
    assert seen == {None, *kinds}  # valid batches and each kind of error occurred


def test_mismatched_shapes(tiny_model, tiny_tok):
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=1)
    with pytest.raises(BatchLayoutError, match="attention_mask shape"):
        tiny_model(ids, mask[:, :-1], pv)
    with pytest.raises(ValueError, match="labels shape"):
        tiny_model(ids, mask, pv, labels=ids[:, :-2])
    with pytest.raises(ValueError, match="pixel_values must be"):
        tiny_model(ids, mask, pv[0])
    with pytest.raises(ValueError, match="position_ids shape"):
        tiny_model(ids, mask, pv, position_ids=torch.zeros(1, 3, dtype=torch.long))


def test_lockstep_passes_change_nothing_but_the_pass_count(tiny_model, tiny_tok):
    """ZeRO-3 ranks run the same pass count; the logits, the loss and every gradient must stay the same."""
    ids, mask, pv = single_row(tiny_model, tiny_tok, n_latents=2)
    labels = ids.clone()
    calls = []
    handle = tiny_model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        grads, outs = [], []
        for min_passes in (0, 6, ids.shape[1] + 3):  # the last one is longer than the sequence: zero passes pad
            tiny_model.zero_grad(set_to_none=True)
            calls.clear()
            out = tiny_model(ids, mask, pv, labels, min_passes=min_passes)
            out.loss.backward()
            outs.append(out)
            grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
            assert len(calls) == max(3, min_passes) and out.num_passes == max(3, min_passes)
    finally:
        handle.remove()
        tiny_model.zero_grad(set_to_none=True)
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out.logits, outs[0].logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, outs[0].loss, atol=1e-6, rtol=1e-6)
        assert grad.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(grad[name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_lockstep_cuts_avoid_latents_and_keep_names():
    from engine.model.schedule import PassSchedule

    sched = PassSchedule(starts=(0, 5, 6), seq_len=9, latent_positions=(5, 6), max_latents_per_row=2)
    padded = sched.with_min_passes(6)
    assert padded.starts == (0, 4, 5, 6, 7, 8) and padded.lockstep_starts == (4, 7, 8)
    assert padded.latent_positions == sched.latent_positions
    assert sched.with_min_passes(3) is sched
    assert sched.with_min_passes(100).num_passes == 9  # one pass per position at most
    names = [padded.pass_name(i) for i in range(padded.num_passes)]
    assert names == ["coconut/prefix_pass", "coconut/lockstep_pass", "coconut/latent_pass_1",
                     "coconut/latent_pass_2", "coconut/lockstep_pass", "coconut/lockstep_pass"]


def test_loss_and_schedule_read_the_batch_from_its_host_copy(tiny_model, tiny_tok):
    """With the batch's host copies (what the trainer's `batch_to_device` keeps), the schedule reads the ids and mask
    and the loss the labelled positions from them, not from the device tensors: device tensors poisoned after the
    copy's record (no latents; no labels) give the host copies' schedule and loss. The forward with host copies
    gives the plain batch's loss and gradients; a device tensor written after the copy is read itself again."""
    from engine.model.schedule import build_schedule
    from engine.utils.device import host_copy, host_values, remember_host_copy

    ids, mask, pv = mixed_batch(tiny_model, tiny_tok, seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    params = [p for p in tiny_model.parameters() if p.requires_grad]

    def with_host_copy(t, host=None):
        device_tensor = t.clone()
        remember_host_copy(device_tensor, t if host is None else host)
        return device_tensor

    def schedule(ids_, mask_):
        return build_schedule(ids_, mask_, latent_id=tiny_model.latent_id, image_token_id=tiny_model.image_token_id,
                              tokens_per_tile=tiny_model.tokens_per_tile, num_tiles=int(pv.shape[0]))

    no_latents = ids.masked_fill(ids == tiny_model.latent_id, tiny_tok.pad_token_id)
    assert schedule(no_latents, mask)[0].num_passes == 1
    poisoned_ids = with_host_copy(no_latents, host=ids)
    assert torch.equal(host_values(poisoned_ids), ids)
    assert schedule(poisoned_ids, mask)[0] == schedule(ids, mask)[0] and schedule(ids, mask)[0].num_passes > 1

    hidden = torch.randn(*ids.shape, 16, requires_grad=True)
    head = tiny_model.base.lm_head
    hidden_grads = []
    for labels_ in (labels, with_host_copy(torch.full_like(labels, -100), host=labels)):
        tiny_model.base.lm_head = torch.nn.Linear(16, head.out_features, bias=False)
        torch.manual_seed(0)
        torch.nn.init.normal_(tiny_model.base.lm_head.weight)
        try:
            loss = tiny_model.lm_loss(hidden, labels_)
            hidden.grad = None
            loss.backward()
            hidden_grads.append((loss.detach(), hidden.grad.clone()))
        finally:
            tiny_model.base.lm_head = head
    torch.testing.assert_close(hidden_grads[1], hidden_grads[0], atol=0, rtol=0)
    assert hidden_grads[0][1].abs().sum() > 0

    def loss_and_grads(*batch):
        tiny_model.zero_grad(set_to_none=True)
        loss = tiny_model.compute_loss(*batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads(ids, mask, pv, labels)
    loss, grads = loss_and_grads(with_host_copy(ids), with_host_copy(mask), pv, with_host_copy(labels))
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)
    assert len(grads) == len(plain_grads)
    for ours, theirs in zip(grads, plain_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)

    written = with_host_copy(labels)
    written[0, -1] = 7  # written after the copy: its host copy no longer stands for it
    assert host_copy(written) is None
    assert torch.equal(host_values(written), written)
    assert host_copy(written[:, 1:]) is None  # a view has none
    with pytest.raises(ValueError, match="host copy"):
        remember_host_copy(ids.clone(), ids[:, 1:])


def test_batch_to_device_keeps_host_copies_where_the_device_differs():
    """`batch_to_device` keeps each tensor's host copy when it moves to another device (what the schedule and the
    loss read), and none when the batch stays where it is."""
    from engine.training.data import batch_to_device
    from engine.utils.device import host_copy

    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.full((2, 3), -100), "name": "row"}
    same = batch_to_device(batch, torch.device("cpu"))
    assert same["name"] == "row" and all(host_copy(same[k]) is None for k in ("input_ids", "labels"))
    # another device: the meta device on any machine (no values to read back), CUDA where there is one
    for device in ["meta"] + (["cuda"] if torch.cuda.is_available() else []):
        moved = batch_to_device(batch, torch.device(device), non_blocking=True)
        for key in ("input_ids", "labels"):
            assert moved[key].device.type == device and host_copy(moved[key]) is batch[key]


def test_a_batch_without_images_can_run_the_vision_path_at_weight_zero(tiny):
    """ZeRO over ranks whose batches mix image and text-only records: a rank whose batch had no image skipped the
    vision tower, so its gradient buckets (ZeRO-2) or parameter gathers (ZeRO-3) did not pair up with the others'.
    With vision_every_batch the loss is unchanged and every vision parameter gets a (zero) gradient."""
    import copy

    model, tok, _ = tiny
    model = copy.deepcopy(model)
    ids = torch.tensor([tok("a text-only question\nits answer").input_ids])
    vision = [p for n, p in model.named_parameters() if "vision" in n or "multi_modal_projector" in n]
    assert vision
    losses = {}
    for every_batch in (False, True):
        model.zero_grad(set_to_none=True)
        model.vision_every_batch = every_batch
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[every_batch] = loss.item()
        grads = [p.grad for p in vision]
        if every_batch:
            assert all(g is not None and not g.any() for g in grads)
        else:
            assert all(g is None for g in grads)
    assert losses[True] == losses[False]
    with torch.no_grad():  # nothing to pair without gradients (ZeRO-3's gathers aside): no blank tile
        assert model.prepare(ids).image_anchor is None
        model.base.model.multi_modal_projector.linear_2.bias[0] = float("inf")  # a broken tower: still a zero
    assert model.prepare(ids).image_anchor.item() == 0.0
