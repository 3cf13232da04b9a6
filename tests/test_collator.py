"""The latent-aligning collator and the generation collator, and the batch == each row alone equivalence."""

import pytest
import torch
from PIL import Image

from engine.data.collator import GenerationCollator, MultimodalCollator
from engine.data.dataset import CurriculumConfig, CurriculumDataset, QuestionDataset

PAD, LATENT = 0, 9


def sample(ids, labels=None, tiles=0, num_latents=None, index=0):
    ids = torch.tensor(ids)
    return {
        "input_ids": ids,
        "labels": torch.tensor(labels) if labels is not None else ids.clone(),
        "pixel_values": torch.full((tiles, 3, 2, 2), float(index)) if tiles else None,
        "num_latents": int((ids == LATENT).sum()) if num_latents is None else num_latents,
        "index": index,
    }


def test_alignment_positions_and_padding_by_hand():
    rows = [
        sample([1, 2, 3, 9, 9, 4, 5], [-100, -100, -100, -100, -100, 4, 5], tiles=1, index=0),
        sample([1, 2, 9, 6], [-100, -100, -100, 6], tiles=2, index=1),
        sample([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5], index=2),  # no latent: not shifted
    ]
    batch = MultimodalCollator(PAD, LATENT)(rows)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 9, 9, 4, 5],
        [0, 1, 2, 9, 6, 0, 0],
        [1, 2, 3, 4, 5, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 6],
        [0, 0, 1, 2, 3, 0, 0],
        [0, 1, 2, 3, 4, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, -100, -100, 4, 5],
        [-100, -100, -100, -100, 6, -100, -100],
        [-100, -100, 3, 4, 5, -100, -100],
    ]
    assert batch["num_latents"].tolist() == [2, 1, 0]
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]  # row order, one entry per tile
    for key in ("input_ids", "attention_mask", "position_ids", "labels", "num_latents"):
        assert batch[key].dtype == torch.long, key


def test_no_latents_is_plain_right_padding_and_no_images_gives_none():
    batch = MultimodalCollator(PAD, LATENT)([sample([1, 2, 3]), sample([4, 5])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]
    assert batch["pixel_values"] is None


def test_generation_collator_left_pads():
    rows = [
        {"input_ids": torch.tensor([1, 2, 9, 9]), "pixel_values": None, "num_latents": 2, "record": {"id": "a"}},
        {"input_ids": torch.tensor([3, 9]), "pixel_values": torch.zeros(1, 3, 2, 2), "num_latents": 1, "record": {"id": "b"}},
    ]
    batch = GenerationCollator(PAD)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9], [0, 0, 3, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["pixel_values"].shape == (1, 3, 2, 2)
    assert batch["num_latents"].tolist() == [2, 1] and [r["id"] for r in batch["records"]] == ["a", "b"]


def test_empty_batch_and_mismatched_labels_are_errors():
    with pytest.raises(ValueError, match="empty"):
        MultimodalCollator(PAD, LATENT)([])
    with pytest.raises(ValueError, match="labels length"):
        MultimodalCollator(PAD, LATENT)([sample([1, 2, 3], [1, 2])])


# ---------------------------------------------------------------------- with the tiny model
STEPS = ["right: row 0, column 1, red", "down: row 1, column 1, blue", "left: row 1, column 0, green"]


@pytest.fixture
def mixed_samples(tiny, tmp_path):
    """Rows mixing stages, latent counts (0 to 6), question lengths, images and a text-only row."""
    _, tok, proc = tiny
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (32 + 16 * i, 32), colour).save(paths[-1])

    def rec(i, image, question, steps=STEPS):
        return {"id": f"r{i}", "image": image, "question": question, "steps": list(steps), "answer": "green"}

    specs = [
        (rec(0, paths[0], "Start at the top-left cell. Move right. What colour is the cell?"), CurriculumConfig(), 0),
        (rec(1, paths[1], "What colour is the cell?"), CurriculumConfig(), 3),
        (rec(2, paths[2], "Start at the bottom-right cell. Move up, up, left, down. What colour?"), CurriculumConfig(c_thought=2), 4),
        (rec(3, None, "Move down."), CurriculumConfig(), 1),
        (rec(4, paths[0], "Which colour?"), CurriculumConfig(cot=True), 2),
    ]
    return [CurriculumDataset([r], tok, proc, config, stage)[0] for r, config, stage in specs]


def test_batch_equals_each_row_alone(tiny, mixed_samples):
    model, tok, _ = tiny
    latents = [s["num_latents"] for s in mixed_samples]
    assert sorted(latents) == [0, 0, 1, 3, 6]
    batch = MultimodalCollator(tok.pad_token_id, model.latent_id)(mixed_samples)

    # Every row with latents has its first latent on one column; the others start at column 0.
    columns = set()
    for b, s in enumerate(mixed_samples):
        real = batch["attention_mask"][b].bool()
        assert torch.equal(batch["input_ids"][b, real], s["input_ids"])
        assert torch.equal(batch["labels"][b, real], s["labels"])
        assert (batch["labels"][b, ~real] == -100).all() and (batch["input_ids"][b, ~real] == tok.pad_token_id).all()
        assert batch["position_ids"][b, real].tolist() == list(range(len(s["input_ids"])))
        assert (batch["position_ids"][b, ~real] == 0).all()
        hits = (batch["input_ids"][b] == model.latent_id).nonzero().flatten()
        if s["num_latents"]:
            columns.add(int(hits[0]))
        else:
            assert batch["attention_mask"][b, 0] == 1
    assert len(columns) == 1

    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                    position_ids=batch["position_ids"])
        assert out.num_passes == max(latents) + 1
        weighted, count = 0.0, 0
        for b, s in enumerate(mixed_samples):
            alone = model(s["input_ids"][None], None, s["pixel_values"], s["labels"][None])
            real = batch["attention_mask"][b].bool()
            torch.testing.assert_close(out.logits[b, real], alone.logits[0], rtol=0, atol=1e-5, msg=f"row {b}")
            n = int((s["labels"][1:] != -100).sum())
            weighted += float(alone.loss) * n
            count += n
    torch.testing.assert_close(float(out.loss), weighted / count, rtol=1e-5, atol=1e-6)


def test_generation_batch_equals_rows_alone(tiny, tmp_path):
    model, tok, proc = tiny
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 40), (70 * i, 100, 50)).save(paths[-1])
    records = [
        {"id": "a", "image": paths[0], "question": "What colour is the cell?", "steps": STEPS, "answer": "red"},
        {"id": "b", "image": paths[1], "question": "Start at the top-left cell. Move down.", "steps": STEPS[:1], "answer": "red"},
        {"id": "c", "image": None, "question": "Move up.", "steps": STEPS[:2], "answer": "red"},
    ]
    ds = QuestionDataset(records, tok, proc, CurriculumConfig(c_thought=2), 2)
    batch = GenerationCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch["num_latents"].tolist() == [4, 2, 4]
    tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=4, eos_token_id=-1)
    for i in range(3):
        s = ds[i]
        alone = model.generate(s["input_ids"][None], None, s["pixel_values"], max_new_tokens=4, eos_token_id=-1)
        assert torch.equal(tokens[i], alone[0]), f"row {i}"
