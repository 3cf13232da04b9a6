"""A-OKVQA preparation on a small fixture with the official field names and COCO image layout."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.data.prepare_aokvqa import main, prepare_aokvqa, split_sentences
from engine.data.records import DataError, load_records, read_jsonl

RATIONALES = [
    "The man holds a racket. Rackets are used in tennis.",
    "He is on a court!",
    "Tennis is played with rackets.",
]


def entry(qid, image_id, split="train"):
    e = {
        "split": split,
        "image_id": image_id,
        "question_id": qid,
        "question": f"What sport is played in picture {image_id}?",
        "choices": ["golf", "tennis", "soccer", "chess"],
    }
    if split != "test":
        e.update(
            correct_choice_idx=1,
            direct_answers=["tennis"] * 9 + ["badminton"],
            difficult_direct_answer=False,
            rationales=list(RATIONALES),
        )
    return e


def make_fixture(root: Path, split="train", n=3, missing_images=()):
    aokvqa = root / "aokvqa"
    coco = root / "coco" / f"{split}2017"
    aokvqa.mkdir(parents=True, exist_ok=True)
    coco.mkdir(parents=True, exist_ok=True)
    entries = [entry(f"{split}q{i}", 1000 + i, split) for i in range(n)]
    for e in entries:
        if e["image_id"] not in missing_images:
            Image.new("RGB", (8, 6), (10 * e["image_id"] % 255, 0, 0)).save(coco / f"{e['image_id']:012d}.jpg")
    (aokvqa / f"aokvqa_v1p0_{split}.json").write_text(json.dumps(entries))
    return aokvqa, root / "coco", entries


def test_train_records(tmp_path):
    aokvqa, coco, entries = make_fixture(tmp_path)
    out = tmp_path / "out" / "train.jsonl"
    counts = prepare_aokvqa(aokvqa, coco, "train", out, progress=False)
    assert counts == {"total": 3, "written": 3, "skipped": 0}
    records = load_records(out)
    for rec, e in zip(records, entries):
        assert rec["id"] == e["question_id"]
        image = Path(rec["image"])
        assert image.is_absolute() and image == (coco / "train2017" / f"{e['image_id']:012d}.jpg").absolute()
        assert rec["steps"] == RATIONALES
        assert rec["answer"] == "tennis" == e["choices"][e["correct_choice_idx"]]
        assert rec["choices"] == e["choices"] and rec["correct_choice_idx"] == 1
        assert rec["direct_answers"] == e["direct_answers"] and rec["difficult_direct_answer"] is False
        assert rec["question"] == e["question"]


def test_first_sentences_mode(tmp_path):
    aokvqa, coco, _ = make_fixture(tmp_path, n=1)
    out = tmp_path / "fs.jsonl"
    prepare_aokvqa(aokvqa, coco, "train", out, rationales="first-sentences", progress=False)
    (rec,) = read_jsonl(out)
    assert rec["steps"] == ["The man holds a racket.", "Rackets are used in tennis."]
    assert split_sentences("A b. C d? E f! G") == ["A b.", "C d?", "E f!", "G"]


def test_missing_image_names_record_and_path(tmp_path):
    aokvqa, coco, _ = make_fixture(tmp_path, missing_images=(1001,))
    out = tmp_path / "train.jsonl"
    out.write_text("previous contents\n")
    with pytest.raises(DataError, match=r"'trainq1'.*000000001001\.jpg"):
        prepare_aokvqa(aokvqa, coco, "train", out, progress=False)
    assert out.read_text() == "previous contents\n"  # an existing output is untouched on failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aokvqa", "coco", "train.jsonl"]  # no temporary left


def test_skip_bad_counts(tmp_path, caplog):
    aokvqa, coco, _ = make_fixture(tmp_path, n=4, missing_images=(1000, 1002))
    out = tmp_path / "train.jsonl"
    counts = prepare_aokvqa(aokvqa, coco, "train", out, skip_bad=True, progress=False)
    assert counts == {"total": 4, "written": 2, "skipped": 2}
    assert [r["id"] for r in read_jsonl(out)] == ["trainq1", "trainq3"]


def test_missing_field_names_record(tmp_path):
    aokvqa, coco, entries = make_fixture(tmp_path)
    del entries[2]["rationales"]
    (aokvqa / "aokvqa_v1p0_train.json").write_text(json.dumps(entries))
    out = tmp_path / "train.jsonl"
    with pytest.raises(DataError, match=r"'trainq2'.*rationales"):
        prepare_aokvqa(aokvqa, coco, "train", out, progress=False)
    assert not out.exists()
    assert prepare_aokvqa(aokvqa, coco, "train", out, skip_bad=True, progress=False)["skipped"] == 1


def test_unreadable_json_names_file(tmp_path):
    aokvqa, coco, _ = make_fixture(tmp_path)
    (aokvqa / "aokvqa_v1p0_train.json").write_text('[{"question_id": ')
    with pytest.raises(DataError, match="aokvqa_v1p0_train.json"):
        prepare_aokvqa(aokvqa, coco, "train", tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_test_split_has_no_answers(tmp_path):
    aokvqa, coco, _ = make_fixture(tmp_path, split="test", n=2)
    out = tmp_path / "test.jsonl"
    prepare_aokvqa(aokvqa, coco, "test", out, progress=False)
    with pytest.raises(DataError, match="answer"):
        load_records(out)
    records = load_records(out, need_answer=False)
    assert [r["answer"] for r in records] == [None, None]
    assert all(r["steps"] is None and r["choices"] for r in records)  # not known, which is not "no steps"
    assert Path(records[0]["image"]).parent.name == "test2017"


def test_limit_and_verify_images(tmp_path):
    aokvqa, coco, _ = make_fixture(tmp_path, n=3)
    (coco / "train2017" / "000000001001.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "train.jsonl"
    assert prepare_aokvqa(aokvqa, coco, "train", out, limit=1, progress=False)["written"] == 1
    prepare_aokvqa(aokvqa, coco, "train", out, progress=False)  # existence check only: passes
    with pytest.raises(DataError, match=r"'trainq1'.*cannot be decoded"):
        prepare_aokvqa(aokvqa, coco, "train", out, verify_images=True, progress=False)


def test_cli(tmp_path):
    aokvqa, coco, _ = make_fixture(tmp_path, split="val", n=2)
    out = tmp_path / "val.jsonl"
    argv = ["--aokvqa-dir", str(aokvqa), "--coco-dir", str(coco), "--split", "val", "--out", str(out), "--no-progress"]
    assert main(argv)["written"] == 2
    out.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "engine.data.prepare_aokvqa", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(load_records(out)) == 2
    assert "wrote 2 val records" in result.stderr
    with pytest.raises(DataError, match="aokvqa_v1p0_train.json"):  # no train annotations in the fixture
        main([*argv, "--split", "train"])


def test_verify_images_decodes_fully_so_a_truncated_jpeg_fails(tmp_path):
    """A JPEG cut in half keeps a valid header: PIL's verify() accepts it, a full decode does not."""
    import numpy as np

    aokvqa, coco, _ = make_fixture(tmp_path, n=3)
    noise = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    jpeg = coco / "train2017" / "000000001002.jpg"
    Image.fromarray(noise).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    with Image.open(jpeg) as img:
        img.verify()  # what the option used to check: passes
    out = tmp_path / "train.jsonl"
    with pytest.raises(DataError, match=r"'trainq2' \(entry 2\).*000000001002\.jpg cannot be decoded"):
        prepare_aokvqa(aokvqa, coco, "train", out, verify_images=True, progress=False)
    assert not out.exists()
    counts = prepare_aokvqa(aokvqa, coco, "train", out, verify_images=True, skip_bad=True, progress=False)
    assert counts == {"total": 3, "written": 2, "skipped": 1}


def test_duplicate_question_ids_name_both_entries(tmp_path):
    aokvqa, coco, entries = make_fixture(tmp_path, n=4)
    entries[3]["question_id"] = entries[1]["question_id"]
    (aokvqa / "aokvqa_v1p0_train.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"question_id 'trainq1' appears twice: entry 1 and entry 3"):
        prepare_aokvqa(aokvqa, coco, "train", tmp_path / "train.jsonl", progress=False)
    # the first copy skipped (its image missing) under --skip-bad: the second one was written without a word
    entries[1]["image_id"] = 999_999
    (aokvqa / "aokvqa_v1p0_train.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"question_id 'trainq1' appears twice: entry 1 and entry 3"):
        prepare_aokvqa(aokvqa, coco, "train", tmp_path / "train.jsonl", skip_bad=True, progress=False)


@pytest.mark.parametrize("image_id", [1000.7, True, -3, "12a"])
def test_an_image_id_that_is_not_an_integer_is_named(tmp_path, image_id):
    """int(1000.7) would point the record at image 1000 without a word."""
    aokvqa, coco, entries = make_fixture(tmp_path)
    entries[1]["image_id"] = image_id
    (aokvqa / "aokvqa_v1p0_train.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=rf"record 'trainq1': image_id {re.escape(repr(image_id))} is not a non-negative"):
        prepare_aokvqa(aokvqa, coco, "train", tmp_path / "out.jsonl", progress=False)


def test_cli_checks_limit_and_out_before_converting(tmp_path, capsys):
    aokvqa, coco, _ = make_fixture(tmp_path)
    base = ["--aokvqa-dir", str(aokvqa), "--coco-dir", str(coco), "--split", "train", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "o.jsonl"), "--limit", "0"])
    assert exit_info.value.code == 2 and "--limit must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:  # a traceback after the conversion before
        main([*base, "--out", str(tmp_path / "a_file" / "o.jsonl")])
    assert exit_info.value.code == 2 and "--out: cannot create the folder" in capsys.readouterr().err
