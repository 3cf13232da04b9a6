"""Curriculum sequences, labels and stage rules; image tiling and the image-token count."""

import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from engine.data.dataset import (
    CurriculumConfig,
    CurriculumDataset,
    QuestionDataset,
    check_stages,
    max_steps,
    num_latents_for_stage,
    stage_for_epoch,
    tokenize_texts,
)
from engine.data.images import ImageError
from engine.data.records import DataError
from engine.vocab import (
    END_LATENT_TOKEN,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    LATENT_TOKEN,
    START_LATENT_TOKEN,
)

STEPS = ["right: row 0, column 1, red", "down: row 1, column 1, blue", "left: row 1, column 0, green"]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "board.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return str(path)


def make_record(image, i=0, steps=STEPS, answer="green", question="Start at the top-left cell. Move right, down, left. What colour is the cell?"):
    return {"id": f"r{i}", "image": image, "question": question, "steps": None if steps is None else list(steps),
            "answer": answer}


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def expected_sequence(tok, model, record, n_latents, removed, markers=True):
    """The DESIGN.md sequence, spelled out piece by piece: (input_ids, number of unlabelled positions)."""
    ids = [tok.convert_tokens_to_ids(IMAGE_START_TOKEN)]
    ids += [tok.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)] * model.tokens_per_tile
    ids += [tok.convert_tokens_to_ids(IMAGE_END_TOKEN)]
    ids += encode(tok, record["question"] + "\n")
    if markers:
        ids += [tok.convert_tokens_to_ids(START_LATENT_TOKEN)]
    ids += [tok.convert_tokens_to_ids(LATENT_TOKEN)] * n_latents
    if markers:
        ids += [tok.convert_tokens_to_ids(END_LATENT_TOKEN)]
    unlabelled = len(ids)
    for step in record["steps"][removed:]:
        ids += encode(tok, step + "\n")
    ids += encode(tok, "### " + record["answer"]) + [tok.eos_token_id]
    return ids, unlabelled


# Hand-written: (stage, c_thought) -> (steps removed, latents) for a 3-step sample, max_latent_stage 3.
TABLE = {
    (0, 1): (0, 0), (1, 1): (1, 1), (2, 1): (2, 2), (3, 1): (3, 3), (4, 1): (3, 3), (7, 1): (3, 3),
    (0, 2): (0, 0), (1, 2): (1, 2), (2, 2): (2, 4), (3, 2): (3, 6), (4, 2): (3, 6),
}


@pytest.mark.parametrize("stage, c_thought", sorted(TABLE))
def test_sequence_and_labels_per_stage(tiny, image_file, stage, c_thought):
    model, tok, proc = tiny
    record = make_record(image_file)
    removed, n_latents = TABLE[(stage, c_thought)]
    assert num_latents_for_stage(stage, 3, CurriculumConfig(c_thought=c_thought)) == (removed, n_latents)
    ds = CurriculumDataset([record], tok, proc, CurriculumConfig(c_thought=c_thought, max_latent_stage=3), stage)
    sample = ds[0]
    ids, unlabelled = expected_sequence(tok, model, record, n_latents, removed)
    assert sample["input_ids"].tolist() == ids
    assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long
    labels = sample["labels"].tolist()
    assert labels[:unlabelled] == [-100] * unlabelled
    assert labels[unlabelled:] == ids[unlabelled:]
    assert sample["num_latents"] == n_latents == (sample["input_ids"] == model.latent_id).sum()
    assert sample["index"] == 0
    assert sample["pixel_values"].shape == (1, 3, 224, 224) and sample["pixel_values"].dtype == torch.float32
    # The targets read as the remaining steps, then the answer.
    target = tok.decode([t for t in labels if t != -100])
    assert target == "".join(s + "\n" for s in STEPS[removed:]) + "### green" + tok.eos_token


class _BosTokenizer:
    """The tiny tokenizer as a Llama-style one, which starts every text it encodes with its bos token."""

    def __init__(self, tok, bos: int):
        self._tok, self.bos_token_id = tok, bos

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        out = self._tok(texts, add_special_tokens=False, **kwargs)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [self.bos_token_id] + ids if ids and isinstance(ids[0], int) else [[self.bos_token_id] + i for i in ids]
        return out

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_tokenizer_that_writes_a_bos_token_starts_every_sequence_with_it(tiny, image_file):
    """The original encodes its questions with the tokenizer's special tokens; the sequences here had no bos
    with a Llama-style tokenizer (Qwen2's writes none, so InternVL3's sequences are unchanged)."""
    model, tok, proc = tiny
    bos = tok.convert_tokens_to_ids("<<")  # any ordinary id stands for the bos token
    records = [make_record(image_file, 0), make_record(None, 1)]
    config = CurriculumConfig(c_thought=1, max_latent_stage=3)
    plain = CurriculumDataset(records, tok, proc, config, 1)
    with_bos = CurriculumDataset(records, _BosTokenizer(tok, bos), proc, config, 1)
    for a, b in zip(plain, with_bos):
        assert b["input_ids"].tolist() == [bos] + a["input_ids"].tolist()
        assert b["labels"].tolist() == [-100] + a["labels"].tolist()
    assert with_bos[0]["input_ids"][1] == tok.convert_tokens_to_ids(IMAGE_START_TOKEN)  # before the image
    prompts = QuestionDataset(records, _BosTokenizer(tok, bos), proc, config, 1)
    assert [p["input_ids"][0].item() for p in prompts] == [bos, bos]
    assert [p["input_ids"][0].item() for p in QuestionDataset(records, tok, proc, config, 1)] != [bos, bos]


def test_markers_surround_zero_latents_at_stage_0(tiny, image_file):
    model, tok, proc = tiny
    ids = CurriculumDataset([make_record(image_file)], tok, proc, CurriculumConfig(), 0)[0]["input_ids"].tolist()
    start = ids.index(model.start_latent_id)
    assert ids[start + 1] == model.end_latent_id and model.latent_id not in ids


def test_samples_with_fewer_steps_than_the_stage(tiny, image_file):
    model, tok, proc = tiny
    short = make_record(image_file, steps=STEPS[:1], answer="red")
    for stage, pad, want in [(2, False, 1), (2, True, 2), (3, False, 1), (5, False, 1), (5, True, 3)]:
        config = CurriculumConfig(max_latent_stage=3, pad_latent_to_max=pad, c_thought=2)
        sample = CurriculumDataset([short], tok, proc, config, stage)[0]
        assert sample["num_latents"] == 2 * want, (stage, pad)
        ids, unlabelled = expected_sequence(tok, model, short, 2 * want, removed=1)
        assert sample["input_ids"].tolist() == ids
        assert tok.decode(sample["labels"][unlabelled:].tolist()) == "### red" + tok.eos_token


def test_pad_latent_to_max_does_not_change_full_samples(tiny, image_file):
    _, tok, proc = tiny
    record = make_record(image_file)
    for stage in range(5):
        a = CurriculumDataset([record], tok, proc, CurriculumConfig(pad_latent_to_max=True), stage)[0]
        b = CurriculumDataset([record], tok, proc, CurriculumConfig(pad_latent_to_max=False), stage)[0]
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_no_cot_and_cot(tiny, image_file):
    model, tok, proc = tiny
    record = make_record(image_file)
    for stage in (0, 2, 5):
        no_cot = CurriculumDataset([record], tok, proc, CurriculumConfig(no_cot=True), stage)[0]
        ids, unlabelled = expected_sequence(tok, model, record, 0, removed=3, markers=False)
        assert no_cot["input_ids"].tolist() == ids and no_cot["num_latents"] == 0
        assert tok.decode(no_cot["labels"][unlabelled:].tolist()) == "### green" + tok.eos_token
        cot = CurriculumDataset([record], tok, proc, CurriculumConfig(cot=True), stage)[0]
        ids, unlabelled = expected_sequence(tok, model, record, 0, removed=0, markers=False)
        assert cot["input_ids"].tolist() == ids
        for special in (model.start_latent_id, model.end_latent_id, model.latent_id):
            assert special not in cot["input_ids"].tolist() and special not in no_cot["input_ids"].tolist()
    assert [stage_for_epoch(e, 2, CurriculumConfig(cot=True)) for e in range(5)] == [0] * 5
    assert [stage_for_epoch(e, 2, CurriculumConfig(no_cot=True)) for e in range(5)] == [0] * 5
    assert [stage_for_epoch(e, 2, CurriculumConfig()) for e in range(7)] == [0, 0, 1, 1, 2, 2, 3]


def test_uniform_prob_is_deterministic_and_mixes_stages(tiny, image_file):
    _, tok, proc = tiny
    records = [make_record(image_file, i) for i in range(60)]
    config = CurriculumConfig(uniform_prob=0.5, max_latent_stage=3)

    def stages(seed, epoch, recs=records):
        ds = CurriculumDataset(recs, tok, proc, config, 1, seed=seed, epoch=epoch)
        return [ds[i]["num_latents"] for i in range(len(ds))]

    first = stages(0, 0)
    assert first == stages(0, 0)
    assert first[:20] == stages(0, 0, records[:20])  # a sample's draw depends on its index only
    assert first != stages(0, 1) and first != stages(1, 0)
    counts = Counter(first)
    assert counts[1] > 60 * 0.5  # the scheduled stage, plus the draws that land on it
    assert len(counts) == 4 and set(counts) == {0, 1, 2, 3}
    never = CurriculumDataset(records, tok, proc, CurriculumConfig(uniform_prob=0.0), 2)
    assert set(never.num_latents) == {2}
    always = CurriculumDataset(records, tok, proc, CurriculumConfig(uniform_prob=1.0), 2)
    assert len(set(always.sample_stages)) == 4


def test_uniform_prob_mixes_from_its_first_stage(tiny, image_file):
    """Stage 0 stays a plain chain of thought by default (`uniform_prob_from_stage` 1); 0 mixes it as the original
    does; a later first stage leaves the stages before it unmixed."""
    _, tok, proc = tiny
    records = [make_record(image_file, i) for i in range(40)]

    def stages(stage, **kwargs):
        return set(CurriculumDataset(records, tok, proc, CurriculumConfig(uniform_prob=1.0, **kwargs), stage).sample_stages)

    assert stages(0) == {0}
    assert stages(1) == {0, 1, 2, 3}
    assert stages(0, uniform_prob_from_stage=0) == {0, 1, 2, 3}
    assert stages(1, uniform_prob_from_stage=2) == {1} and len(stages(2, uniform_prob_from_stage=2)) == 4
    # the w/o curriculum ablation: mixing would train it on intermediate stages after all
    assert stages(3, no_curriculum=True) == {3}
    with pytest.raises(ValueError, match="uniform_prob_from_stage must be an integer >= 0"):
        CurriculumConfig(uniform_prob_from_stage=-1)


def test_overlong_drop_and_error(tiny, image_file, caplog):
    _, tok, proc = tiny
    long_question = "What colour is the cell? " * 20
    records = [make_record(image_file, 0), make_record(image_file, 1, question=long_question), make_record(image_file, 2)]
    full = CurriculumDataset(records, tok, proc, CurriculumConfig(max_length=4096), 0)
    short_len, long_len = full.lengths[0], full.lengths[1]
    assert short_len < long_len
    limit = (short_len + long_len) // 2
    ds = CurriculumDataset(records, tok, proc, CurriculumConfig(max_length=limit), 0)
    assert len(ds) == 2 and ds.num_dropped == 1 and ds.dropped_ids == ["r1"]
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 2]
    assert all(len(ds[i]["input_ids"]) <= limit for i in range(len(ds)))
    with pytest.raises(DataError, match=rf"'r1'.*{long_len} tokens.*max_length={limit}"):
        CurriculumDataset(records, tok, proc, CurriculumConfig(max_length=limit, overlong="error"), 0)
    # Later stages are shorter (steps become thoughts): the long sample fits again at stage 4.
    later = CurriculumDataset(records, tok, proc, CurriculumConfig(max_length=limit + 40), 4)
    assert later.num_dropped == 0


def test_check_stages_and_max_steps(image_file):
    records = [make_record(image_file, 0, steps=STEPS[:2]), make_record(image_file, 1, steps=STEPS[:1])]
    assert max_steps(records) == 2 and max_steps([]) == 0
    check_stages(records, CurriculumConfig(max_latent_stage=2))
    with pytest.raises(DataError, match=r"max_latent_stage=3.*\(2\)"):
        check_stages(records, CurriculumConfig(max_latent_stage=3))
    check_stages(records, CurriculumConfig(max_latent_stage=3, cot=True))  # cot never uses latent stages


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"c_thought": 0}, "c_thought"),
        ({"max_latent_stage": -1}, "max_latent_stage"),
        ({"uniform_prob": 1.5}, "uniform_prob"),
        ({"cot": True, "no_cot": True}, "exclusive"),
        ({"max_length": 0}, "max_length"),
        ({"overlong": "truncate"}, "overlong"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurriculumConfig(**kwargs)


def test_bad_image_is_named_not_skipped(tiny, tmp_path):
    from engine import load_model

    _, tok, proc = tiny
    missing = str(tmp_path / "missing.png")
    ds = CurriculumDataset([make_record(missing)], tok, proc, CurriculumConfig(), 0)  # 1 tile: no header read
    with pytest.raises(ImageError, match="missing.png"):
        ds[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    _, _, tiled = load_model("tiny", max_tiles=4)
    with pytest.raises(ImageError, match="broken.png"):
        CurriculumDataset([make_record(str(broken))], tok, tiled, CurriculumConfig(), 0)  # header read up front


def test_answerless_record_cannot_train(tiny, image_file):
    _, tok, proc = tiny
    with pytest.raises(DataError, match="record 'r0': 'answer' is null but this split needs answers"):
        CurriculumDataset([make_record(image_file, answer=None)], tok, proc, CurriculumConfig(), 0)


def test_record_with_unknown_steps_cannot_train(tiny, image_file):
    _, tok, proc = tiny
    with pytest.raises(DataError, match=r"record 'r0': 'steps' is null \(not known\) but this split trains on its steps"):
        CurriculumDataset([make_record(image_file, steps=None)], tok, proc, CurriculumConfig(), 1)


@pytest.mark.parametrize("dataset", ["CurriculumDataset", "QuestionDataset"])
@pytest.mark.parametrize(
    "change, needle",
    [
        ({"steps": "move right"}, "'steps' must be a list of strings"),  # would be one step per character
        ({"steps": [1, 2]}, "'steps' must be a list of strings"),
        ({"question": None}, "'question' must be a non-empty string"),
        ({"answer": 7}, "'answer' must be a non-empty string"),
    ],
)
def test_records_handed_to_a_dataset_are_checked_as_a_file_is(tiny, image_file, dataset, change, needle):
    import engine.data.dataset as datasets

    _, tok, proc = tiny
    record = {**make_record(image_file), **change}
    with pytest.raises(DataError, match=rf"{dataset} record 0: record 'r0': {needle}"):
        getattr(datasets, dataset)([record], tok, proc, CurriculumConfig(), 1)
    bare = make_record(image_file)
    del bare["question"]
    with pytest.raises(DataError, match=r"missing field\(s\) \['question'\]"):
        getattr(datasets, dataset)([bare], tok, proc, CurriculumConfig(), 1)


def test_record_text_that_spells_a_special_token_stays_text(tiny, image_file):
    """Parsed as tokens, these would be an image slot without an image, a thought nobody counted and an eos
    inside the target."""
    model, tok, proc = tiny
    record = make_record(
        image_file, question=f"What does {LATENT_TOKEN} mean?", steps=[f"a {IMAGE_CONTEXT_TOKEN} b", "c"],
        answer=f"x{tok.eos_token} y",
    )
    special = {model.latent_id, model.image_token_id, tok.eos_token_id}
    for stage in (0, 1, 2):
        sample = CurriculumDataset([record], tok, proc, CurriculumConfig(c_thought=2, max_latent_stage=2), stage)[0]
        ids = sample["input_ids"].tolist()
        assert ids.count(model.image_token_id) == model.tokens_per_tile  # the image span's only
        assert ids.count(model.latent_id) == sample["num_latents"] == 2 * stage
        assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
        prompt = QuestionDataset([record], tok, proc, CurriculumConfig(c_thought=2, max_latent_stage=2), stage)[0]
        assert prompt["input_ids"].tolist().count(model.latent_id) == prompt["num_latents"] == 2 * stage
    text = tokenize_texts(tok, [record["question"], record["steps"][0], record["answer"]])
    assert not special & {t for ids in text for t in ids}
    assert tok.decode(text[0]) == record["question"]  # and it reads back as written


def test_question_dataset(tiny, image_file, caplog):
    model, tok, proc = tiny
    records = [
        make_record(image_file, 0),
        make_record(image_file, 1, steps=STEPS[:1]),
        make_record(None, 2, steps=None, answer=None),  # steps not known (a test split): the stage's usual thoughts
        make_record(None, 3, steps=[]),  # no steps: no thoughts, as its training sequence has none
    ]
    for config, stage, want in [
        (CurriculumConfig(c_thought=2), 2, [4, 2, 4, 0]),
        (CurriculumConfig(c_thought=1), 5, [3, 1, 3, 0]),
        (CurriculumConfig(c_thought=2, pad_latent_to_max=True), 1, [2, 2, 2, 2]),
        (CurriculumConfig(cot=True), 2, [0, 0, 0, 0]),
        (CurriculumConfig(no_cot=True), 2, [0, 0, 0, 0]),
    ]:
        ds = QuestionDataset(records, tok, proc, config, stage)
        assert ds.num_latents == want
        if not config.pad_latent_to_max and stage > 0 and config.use_markers:
            train = CurriculumDataset([records[3]], tok, proc, config, stage)
            assert train.num_latents == [want[3]]  # generation and training agree for the step-less record
        engine_log = logging.getLogger("coconut")
        engine_log.addHandler(caplog.handler)
        try:
            caplog.clear()
            QuestionDataset(records, tok, proc, config, stage)
        finally:
            engine_log.removeHandler(caplog.handler)
        said = "1 of 4 records have no steps ([]), so they get no thoughts" in caplog.text
        assert said == (want[0] > 0 and want[3] == 0)  # said only where the step-less record loses thoughts
        for i, record in enumerate(records):
            sample = ds[i]
            assert sample["record"] is record and sample["num_latents"] == want[i]
            ids = sample["input_ids"].tolist()
            question = encode(tok, record["question"] + "\n")
            if config.use_markers:
                tail = [model.start_latent_id] + [model.latent_id] * want[i] + [model.end_latent_id]
            else:
                tail = []
            assert ids[len(ids) - len(tail) - len(question):] == question + tail
            if record["image"] is None:
                assert sample["pixel_values"] is None and model.image_token_id not in ids
            else:
                assert ids.count(model.image_token_id) == model.tokens_per_tile


# ---------------------------------------------------------------------- tiling
SIZES = [(224, 224), (448, 224), (224, 448), (672, 224), (500, 300), (1000, 1000), (90, 600)]  # (width, height)


def test_tile_counts_and_image_tokens_match_the_model(tiny, tmp_path):
    from engine import load_model
    from engine.data.collator import MultimodalCollator

    model, tok, _ = tiny
    _, _, proc = load_model("tiny", max_tiles=6)
    assert proc.tokens_per_tile == model.tokens_per_tile
    records = []
    for i, (w, h) in enumerate(SIZES):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (w, h), (i * 30, 90, 200)).save(path)
        records.append(make_record(str(path), i))
    ds = CurriculumDataset(records, tok, proc, CurriculumConfig(), 1)
    tiles = []
    for i, (w, h) in enumerate(SIZES):
        sample = ds[i]
        n = sample["pixel_values"].shape[0]
        assert n == proc.num_tiles_for_size(h, w)
        assert int((sample["input_ids"] == model.image_token_id).sum()) == model.tokens_per_tile * n
        tiles.append(n)
    # InternVL tiling: a square image is one tile; a 2:1 image is 2 tiles plus the thumbnail; never over max.
    assert tiles[0] == 1 and tiles[1] == 3 and tiles[2] == 3
    assert all(t <= proc.max_tiles + 1 for t in tiles) and len(set(tiles)) >= 4
    # The model checks that every row's image tokens match its tiles.
    batch = MultimodalCollator(tok.pad_token_id, model.latent_id)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == sum(tiles[:3])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                    position_ids=batch["position_ids"])
    assert torch.isfinite(out.loss)
