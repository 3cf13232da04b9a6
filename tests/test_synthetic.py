"""The synthetic grid-walk task: deterministic, well-formed, and answerable from pixels + question only."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.records import DataError, load_records, read_jsonl, validate_record
from engine.data.synthetic import PALETTE, answer_from_image, generate_synthetic, main, solve


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    info = generate_synthetic(out, n_train=120, n_val=30, seed=5, hops=3)
    return out, info


def test_counts_and_record_format(dataset):
    out, info = dataset
    assert info["train"] == out / "train.jsonl" and info["val"] == out / "val.jsonl"
    assert len(list((out / "images").glob("*.png"))) == 150
    for split, n in (("train", 120), ("val", 30)):
        raw = read_jsonl(out / f"{split}.jsonl")
        assert len(raw) == n
        for line, record in enumerate(raw, 1):
            validate_record(record, f"{split}:{line}")
            assert len(record["steps"]) == 3
            assert len(record["choices"]) == 4 == len(set(record["choices"]))
            assert record["choices"][record["correct_choice_idx"]] == record["answer"]
            assert record["direct_answers"] == [record["answer"]] * 10
            assert record["difficult_direct_answer"] is False
        records = load_records(out / f"{split}.jsonl")
        assert all(Path(r["image"]).is_file() for r in records)
    train_keys = {(r["question"], (out / r["image"]).read_bytes()) for r in read_jsonl(out / "train.jsonl")}
    assert not any((r["question"], (out / r["image"]).read_bytes()) in train_keys for r in read_jsonl(out / "val.jsonl"))


def test_answerable_from_pixels_and_question(dataset):
    out, _ = dataset
    for record in load_records(out / "train.jsonl") + load_records(out / "val.jsonl"):
        steps, answer = solve(record["image"], record["question"])
        assert (steps, answer) == (record["steps"], record["answer"]), record["id"]
        assert answer_from_image(np.asarray(Image.open(record["image"])), record["question"]) == record["answer"]


def test_the_question_alone_does_not_give_the_answer(dataset):
    out, _ = dataset
    answers = defaultdict(set)
    for record in read_jsonl(out / "train.jsonl"):
        answers[record["question"]].add(record["answer"])
    assert max(len(a) for a in answers.values()) >= 3
    counts = defaultdict(int)
    for record in read_jsonl(out / "train.jsonl"):
        counts[record["answer"]] += 1
    assert len(counts) == 4 and min(counts.values()) >= 15  # 4 colours in use, none rare


def test_cells_are_uniform_blocks_aligned_to_visual_tokens(dataset):
    out, _ = dataset
    record = read_jsonl(out / "train.jsonl")[0]
    pixels = np.asarray(Image.open(out / record["image"]))
    assert pixels.shape == (224, 224, 3)
    palette = {tuple(rgb) for _, rgb in PALETTE}
    for r in range(4):
        for c in range(4):
            block = pixels[56 * r : 56 * (r + 1), 56 * c : 56 * (c + 1)].reshape(-1, 3)
            assert (block == block[0]).all() and tuple(block[0]) in palette


def test_deterministic_per_seed(tmp_path):
    a = generate_synthetic(tmp_path / "a", n_train=20, n_val=5, seed=1, hops=2)
    b = generate_synthetic(tmp_path / "b", n_train=20, n_val=5, seed=1, hops=2)
    c = generate_synthetic(tmp_path / "c", n_train=20, n_val=5, seed=2, hops=2)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert (tmp_path / "a/images/train_000000.png").read_bytes() != (tmp_path / "c/images/train_000000.png").read_bytes()
    assert all(len(r["steps"]) == 2 for r in read_jsonl(a["train"]))


def test_atomic_and_replacing(tmp_path):
    out = tmp_path / "data"
    generate_synthetic(out, n_train=4, n_val=2, seed=0)
    generate_synthetic(out, n_train=6, n_val=2, seed=0)  # an older synthetic set is replaced
    assert len(read_jsonl(out / "train.jsonl")) == 6 and len(list((out / "images").iterdir())) == 8
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        generate_synthetic(foreign, n_train=4, n_val=2)
    assert files(foreign) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]  # no temporary directory left


@pytest.mark.parametrize(
    "kwargs, message",
    [({"hops": 0}, "hops"), ({"grid": 1}, "grid"), ({"num_colors": 1}, "num_colors"), ({"n_train": -1}, "n_train")],
)
def test_bad_settings(tmp_path, kwargs, message):
    settings = dict(n_train=2, n_val=1) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "x", **settings)
    assert not (tmp_path / "x").exists()


def test_cli_and_options(tmp_path):
    info = main(["--out", str(tmp_path / "cli"), "--n-train", "8", "--n-val", "3", "--seed", "4", "--hops", "4",
                 "--num-colors", "6", "--fixed-start"])
    records = load_records(info["train"])
    assert len(records) == 8 and len(load_records(info["val"])) == 3
    assert all(len(r["steps"]) == 4 and r["question"].startswith("Start at the top-left cell.") for r in records)
    for r in records:
        assert solve(r["image"], r["question"]) == (r["steps"], r["answer"])


def test_text_is_short_for_the_tiny_tokenizer(dataset, tiny_tok):
    out, _ = dataset
    record = read_jsonl(out / "train.jsonl")[0]
    assert len(tiny_tok(record["question"] + "\n").input_ids) <= 24
    assert all(len(tiny_tok(s + "\n").input_ids) <= 14 for s in record["steps"])


def test_ensure_synthetic_reuses_only_the_same_settings(tmp_path):
    from engine.data.synthetic import SyntheticSettings, ensure_synthetic, read_settings

    out = tmp_path / "data"
    small = SyntheticSettings(n_train=4, n_val=2, hops=2)
    assert ensure_synthetic(out, small) is True
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    assert ensure_synthetic(out, small) is False and (out / "train.jsonl").stat().st_mtime_ns == stamp
    other = SyntheticSettings(n_train=4, n_val=2, hops=3)
    assert ensure_synthetic(out, other) is True and read_settings(out) == other
    assert all(len(r["steps"]) == 3 for r in read_jsonl(out / "train.jsonl"))
    (out / "val.jsonl").unlink()  # incomplete: generated again
    assert ensure_synthetic(out, other) is True and (out / "val.jsonl").is_file()
