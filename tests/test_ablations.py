"""The paper's ablations as switches: each changes exactly what it names.

- `pause_as_thought` (`MultimodalCoconut.thought_feedback = False`): the thought positions take the `<|latent|>`
  token's own embedding; nothing earlier reaches them, in training and in both generation caches.
- `no_thoughts`: the stages remove the same steps, with no thoughts and no markers in their place.
- `no_curriculum`: stage 0, then the final stage.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.data.dataset import CurriculumConfig, CurriculumDataset, QuestionDataset, num_latents_for_stage, stage_for_epoch
from engine.model.schedule import position_ids_from_mask
from engine.training.config import ConfigError, config_from_dict
from tests.helpers import align_batch, pad_batch, random_pixels, sample_ids

TOL = 1e-5


@pytest.fixture
def pause_model(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.thought_feedback = False
    return model


def _batch(model, tok, question="Start at the top-left cell. Move right, down.", n_latents=3, seed=0):
    rows = [
        sample_ids(tok, model, question=question, n_latents=n_latents),
        sample_ids(tok, model, question="Move left.", n_latents=1),
    ]
    ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
    pv = random_pixels(2, model.config.vision_config.image_size[0], seed)
    return ids, mask, pv


def _latent_inputs(model, ids, mask, pv):
    with torch.no_grad():
        out = model(ids, mask, pv, return_inputs_embeds=True)
    latent = ids == model.latent_id
    return out.inputs_embeds[latent], out


def test_pause_inputs_do_not_depend_on_earlier_positions(tiny_model, pause_model, tiny_tok):
    ids, mask, pv = _batch(tiny_model, tiny_tok)
    other_ids, _, _ = _batch(tiny_model, tiny_tok, question="Start at the top-left cell. Move down, left.")
    assert other_ids.shape == ids.shape and not torch.equal(other_ids, ids)
    other_pv = random_pixels(2, tiny_model.config.vision_config.image_size[0], seed=7)
    pause_row = tiny_model.base.get_input_embeddings().weight[tiny_model.latent_id]

    base, _ = _latent_inputs(tiny_model, ids, mask, pv)
    # Default: the thoughts follow an earlier token and the image.
    assert (base - _latent_inputs(tiny_model, other_ids, mask, pv)[0]).abs().max() > 1e-3
    assert (base - _latent_inputs(tiny_model, ids, mask, other_pv)[0]).abs().max() > 1e-3
    # Pause: every thought position holds the latent token's embedding, whatever came before.
    for variant in ((ids, mask, pv), (other_ids, mask, pv), (ids, mask, other_pv)):
        paused, out = _latent_inputs(pause_model, *variant)
        assert torch.equal(paused, pause_row.expand_as(paused))
        assert out.num_passes == 1


def test_pause_inputs_ignore_a_perturbed_hidden_state(tiny_model, pause_model, tiny_tok):
    """Add noise to the last-layer hidden state of the position before the first thought: with feedback the
    thought inputs move, without they stay bit-identical."""
    ids, mask, pv = _batch(tiny_model, tiny_tok)
    first_latent = int((ids[0] == tiny_model.latent_id).nonzero()[0])

    def run(model, noise):
        def hook(module, args, output):
            # the final norm's output over the chunk that ends right before the first thought
            if output.shape[1] >= first_latent and noise:
                output = output.clone()
                output[:, first_latent - 1] += noise
            return output

        handle = model.language_model.norm.register_forward_hook(hook)
        try:
            return _latent_inputs(model, ids, mask, pv)[0]
        finally:
            handle.remove()

    assert (run(tiny_model, 0.0) - run(tiny_model, 5.0)).abs().max() > 1e-3
    assert torch.equal(run(pause_model, 0.0), run(pause_model, 5.0))


def test_pause_forward_is_the_plain_model_on_the_same_tokens(pause_model, tiny_tok):
    ids, mask, pv = _batch(pause_model, tiny_tok)
    with torch.no_grad():
        out = pause_model(ids, mask, pv)
        plain = pause_model.base(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=position_ids_from_mask(mask))
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], plain.logits[real], atol=TOL, rtol=0)


def test_pause_generation_on_both_caches_follows_the_plain_model(tiny_model, pause_model, tiny_tok):
    rows = [sample_ids(tiny_tok, pause_model, n_latents=3, tail="")[:-1], sample_ids(tiny_tok, pause_model, n_latents=1, tail="")[:-1]]
    ids, mask = pad_batch(rows, tiny_tok.pad_token_id, left=[True, True])
    pv = random_pixels(2, pause_model.config.vision_config.image_size[0], 3)
    dynamic = pause_model.generate(ids, mask, pv, max_new_tokens=6, kv_cache="dynamic")
    paged = pause_model.generate(ids, mask, pv, max_new_tokens=6, kv_cache="paged")
    assert torch.equal(dynamic, paged)
    # Greedy decoding of the plain model, token by token, from the same prompt.
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for step in range(dynamic.shape[1]):
            logits = pause_model.base(
                input_ids=seq, attention_mask=seq_mask, pixel_values=pv, position_ids=position_ids_from_mask(seq_mask)
            ).logits[:, -1]
            token = logits.argmax(-1)
            live = (dynamic[:, step] != pause_model.pad_token_id) | (token == pause_model.pad_token_id)
            assert torch.equal(token[live], dynamic[live, step]), step
            seq = torch.cat([seq, token[:, None]], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
    # With feedback the same prompts give other first logits (the thoughts differ).
    with torch.no_grad():
        fed = tiny_model(ids, mask, pv).logits[:, -1]
        paused = pause_model(ids, mask, pv).logits[:, -1]
    assert (fed - paused).abs().max() > 1e-3


# ---------------------------------------------------------------------- no_thoughts
STEPS = ["right: row 0, column 1, red", "down: row 1, column 1, blue", "left: row 1, column 0, green"]


def _record(image, i=0, steps=STEPS):
    return {"id": f"r{i}", "image": image, "question": "Start at the top-left cell. Move right, down, left. What colour is the cell?",
            "steps": list(steps), "answer": "green"}


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "board.png"
    Image.new("RGB", (64, 64), (30, 200, 30)).save(path)
    return str(path)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 5])
def test_no_thoughts_drops_the_same_steps_without_thoughts(tiny, image_file, stage):
    model, tok, proc = tiny
    records = [_record(image_file), _record(image_file, 1, STEPS[:1])]
    thoughts = CurriculumDataset(records, tok, proc, CurriculumConfig(c_thought=2), stage)
    bare = CurriculumDataset(records, tok, proc, CurriculumConfig(c_thought=2, no_thoughts=True), stage)
    specials = {model.latent_id, model.start_latent_id, model.end_latent_id}
    for i in range(len(records)):
        a, b = thoughts[i], bare[i]
        assert b["num_latents"] == 0 and not specials & set(b["input_ids"].tolist())
        # Same targets (the remaining steps and the answer), same prompt once the thoughts and markers are gone.
        assert a["labels"][a["labels"] != -100].tolist() == b["labels"][b["labels"] != -100].tolist()
        kept = [t for t in a["input_ids"].tolist() if t not in specials]
        assert kept == b["input_ids"].tolist()
        removed, _ = num_latents_for_stage(stage, len(records[i]["steps"]), CurriculumConfig(no_thoughts=True))
        assert removed == min(stage, len(records[i]["steps"]))
    prompts = QuestionDataset(records, tok, proc, CurriculumConfig(no_thoughts=True), stage)
    assert prompts.num_latents == [0, 0]
    assert not specials & set(prompts[0]["input_ids"].tolist())


# ---------------------------------------------------------------------- no_curriculum and the final stage
def test_final_stage_and_no_curriculum_schedule():
    config = CurriculumConfig(max_latent_stage=3)
    assert config.final_stage(3) == 3 and config.final_stage(2) == 3 and config.final_stage(5) == 4
    assert CurriculumConfig(cot=True).final_stage(5) == 0
    # The curriculum, then the final stage for every epoch past it (a longer final stage).
    assert [stage_for_epoch(e, 2, config, 3) for e in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert [stage_for_epoch(e, 2, config) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    jump = CurriculumConfig(max_latent_stage=3, no_curriculum=True)
    assert [stage_for_epoch(e, 2, jump, 3) for e in range(8)] == [0, 0, 3, 3, 3, 3, 3, 3]
    assert [stage_for_epoch(e, 1, jump, 4) for e in range(4)] == [0, 4, 4, 4]
    with pytest.raises(ValueError, match="no_curriculum needs final_stage"):
        stage_for_epoch(3, 2, jump)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"no_thoughts": True, "cot": True}, "exclusive"),
        ({"no_thoughts": True, "no_cot": True}, "exclusive"),
        ({"no_curriculum": True, "cot": True}, "no_curriculum"),
    ],
)
def test_curriculum_switches_validate(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurriculumConfig(**kwargs)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"no_thoughts": True, "cot": True}, "exclusive"),
        ({"pause_as_thought": True, "no_cot": True}, "pause_as_thought"),
        ({"pause_as_thought": True, "no_thoughts": True}, "pause_as_thought"),
        ({"no_curriculum": True, "no_cot": True}, "no_curriculum"),
    ],
)
def test_train_config_switches_validate(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)
    assert config_from_dict({"no_thoughts": True}).coconut is False
    assert config_from_dict({"pause_as_thought": True, "no_curriculum": True}).coconut is True
    # the original's special-token run: its latent curriculum without the Coconut wrapper, i.e. pause as thought
    assert config_from_dict({"coconut": False}).pause_as_thought is True
    assert config_from_dict({"coconut": False, "cot": True}).pause_as_thought is False
    assert config_from_dict({}).pause_as_thought is False


def test_trainer_wires_the_switches(tmp_path):
    from engine.training.trainer import Trainer

    def trainer(**overrides):
        values = dict(name="t", save_path=str(tmp_path / "runs"), model_id="tiny",
                      model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
                      synthetic={"n_train": 8, "n_val": 2, "hops": 2, "seed": 3}, max_latent_stage=2,
                      epochs_per_stage=2, num_epochs=9, device="cpu", zero_stage=0)
        values.update(overrides)
        t = Trainer(config_from_dict(values))
        t.setup()
        return t

    plain = trainer()
    assert plain.model.thought_feedback is True and plain.final_stage == 2
    assert [plain.stage_for_epoch(e) for e in range(9)] == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert trainer(pause_as_thought=True).model.thought_feedback is False
    assert trainer(coconut=False).model.thought_feedback is False  # the original's key for the same run
    jump = trainer(no_curriculum=True)
    assert [jump.stage_for_epoch(e) for e in range(9)] == [0, 0, 2, 2, 2, 2, 2, 2, 2]
    bare = trainer(no_thoughts=True)
    assert bare.curriculum.no_thoughts and not bare.curriculum.use_markers


def test_the_final_stage_counts_the_validation_records_steps(tmp_path):
    """Training records of at most max_latent_stage steps capped the curriculum there, so a validation record with
    more steps kept them as targets of its validation loss at every later epoch (the original removes them all)."""
    import json

    from engine.data.dataset import CurriculumDataset
    from engine.training.trainer import Trainer

    def record(i, steps):
        return {"id": f"r{i}", "image": None, "question": f"q{i}?", "steps": [f"s{j}" for j in range(steps)], "answer": "a"}

    for name, records in (("train", [record(i, 2) for i in range(4)]), ("val", [record(9, 4)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    t = Trainer(config_from_dict(dict(
        name="t", save_path=str(tmp_path / "runs"), model_id="tiny", device="cpu", zero_stage=0,
        model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
        train_path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"), max_latent_stage=2,
        epochs_per_stage=1, num_epochs=5,
    )))
    t.setup()
    # training's sequences stop changing at stage 2 (what reset_optimizer follows); the validation goes on to 3
    assert [t.stage_for_epoch(e) for e in range(5)] == [0, 1, 2, 2, 2]
    assert [t.validation_stage(e) for e in range(5)] == [0, 1, 2, 3, 3]
    val = CurriculumDataset(t.val_records, t.tokenizer, t.image_processor, t.curriculum, t.validation_stage(4))[0]
    labelled = t.tokenizer.decode(val["input_ids"][val["labels"] != -100])
    assert "s2" not in labelled and "s3" not in labelled


def test_resume_at_an_epoch_schedules_the_lr_over_the_epochs_it_trains(tmp_path):
    """resume=N starts a fresh run at epoch N (the original's meaning): a decaying schedule ends at its last epoch."""
    from engine.training.trainer import Trainer

    def lr_factors(resume):
        values = dict(name=f"r{resume}", save_path=str(tmp_path / "runs"), model_id="tiny",
                      model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
                      synthetic={"n_train": 8, "n_val": 2, "hops": 2, "seed": 3}, max_latent_stage=2, batch_size_training=4,
                      epochs_per_stage=1, num_epochs=4, device="cpu", zero_stage=0, lr_schedule="linear", resume=resume)
        t = Trainer(config_from_dict(values))
        t.setup()
        steps = t.steps_per_epoch(len(t.train_records))
        t.prepare_training()
        factor = t.engine.lr_scheduler.lr_lambdas[0]
        return [factor(s) for s in range(steps * (4 - resume))], steps

    full, steps = lr_factors(0)
    late, _ = lr_factors(2)
    assert len(full) == 4 * steps and len(late) == 2 * steps
    assert late[0] == pytest.approx(1.0) and late[-1] == pytest.approx(1 / (2 * steps))  # decays over 2 epochs
    assert full[2 * steps - 1] == pytest.approx(0.5 + 1 / (4 * steps))  # halfway over 4
