"""The record format and its JSON-lines files."""

import json

import pytest

from engine.data.records import DataError, load_records, read_jsonl, validate_record, write_jsonl


def record(i, **overrides):
    r = {
        "id": f"q{i}",
        "image": f"images/{i}.png",
        "question": "What colour is the cell?",
        "steps": ["right: row 0, column 1, red", "down: row 1, column 1, blue"],
        "answer": "blue",
        "choices": ["red", "blue", "green", "yellow"],
        "correct_choice_idx": 1,
        "direct_answers": ["blue"] * 10,
        "difficult_direct_answer": False,
    }
    r.update(overrides)
    return r


def test_round_trip_and_image_paths(tmp_path):
    records = [record(0), record(1, image=str(tmp_path / "abs.png")), record(2, image=None, answer="ünïcode")]
    path = write_jsonl(tmp_path / "sub" / "data.jsonl", records)
    assert read_jsonl(path) == records
    loaded = load_records(path)
    assert [r["id"] for r in loaded] == ["q0", "q1", "q2"]
    assert loaded[0]["image"] == str((tmp_path / "sub" / "images" / "0.png").absolute())
    assert loaded[1]["image"] == str(tmp_path / "abs.png")
    assert loaded[2]["image"] is None and loaded[2]["answer"] == "ünïcode"
    other = load_records(path, image_root=tmp_path / "elsewhere")
    assert other[0]["image"] == str((tmp_path / "elsewhere" / "images" / "0.png").absolute())
    assert not list((tmp_path / "sub").glob(".*tmp"))  # no temporary file left behind


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(record(0)) + "\n\n   \n" + json.dumps(record(1)) + "\n")
    assert [r["id"] for r in load_records(path)] == ["q0", "q1"]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record(0)) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3"):
        read_jsonl(path)


def test_a_line_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record(0)).encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text"):
        read_jsonl(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record(0)).encode() + b"\n")  # a byte-order mark is fine
    assert [r["id"] for r in read_jsonl(path)] == ["q0"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no records in .*empty.jsonl"):
        load_records(path)


def test_missing_field_names_id_and_line(tmp_path):
    bad = record(7)
    del bad["question"]
    path = write_jsonl(tmp_path / "d.jsonl", [record(0), bad])
    with pytest.raises(DataError, match=r"d\.jsonl:2.*'q7'.*question"):
        load_records(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": "one step"}, "steps"),
        ({"steps": ["ok", 3]}, "steps"),
        ({"answer": None}, "answer"),
        ({"answer": ""}, "answer"),
        ({"question": "  "}, "question"),
        ({"correct_choice_idx": 4}, "correct_choice_idx"),
        ({"choices": None, "correct_choice_idx": 0}, "correct_choice_idx"),
        ({"direct_answers": "blue"}, "direct_answers"),
        ({"difficult_direct_answer": "no"}, "difficult_direct_answer"),
        ({"id": None}, "id"),
        ({"image": 5}, "image"),
        ({"image": "   "}, "'image' must be a path string"),
        ({"image": "http://example.com/a.png"}, "is a URL"),
        ({"image": "s3://bucket/a.png"}, "is a URL"),
        ({"image": "data:image/png;base64,AAAA"}, "is a URL"),
    ],
)
def test_validate_record_rejects(overrides, message):
    with pytest.raises(DataError, match=message) as info:
        validate_record(record(3, **overrides), "file.jsonl:9")
    assert "file.jsonl:9" in str(info.value)


def test_windows_drive_paths_are_paths_not_urls():
    for image in ("C:/images/a.png", "C:\\images\\a.png", "img:1.png"):
        validate_record(record(3, image=image), "file.jsonl:9")


def test_answer_may_be_missing_for_test_split(tmp_path):
    no_answer = record(0, answer=None, correct_choice_idx=None, direct_answers=None)
    del no_answer["difficult_direct_answer"]
    path = write_jsonl(tmp_path / "test.jsonl", [no_answer])
    with pytest.raises(DataError, match="answer"):
        load_records(path)
    loaded = load_records(path, need_answer=False)
    assert loaded[0]["answer"] is None and loaded[0]["difficult_direct_answer"] is None


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [record(0), record(1), record(0)])
    with pytest.raises(DataError, match=r"d\.jsonl:3.*duplicate id.*first seen at .*d\.jsonl:1\)"):
        load_records(path)


def test_the_original_coconut_json_array_is_read_as_it_is(tmp_path):
    """The original CoCoNuT's data files (GSM8k, ProntoQA, ProsQA: one JSON array, no ids, no images) were refused
    as 'invalid JSON' on their first line; their records now get their position as id and no image."""
    path = tmp_path / "gsm_train.json"
    original = [{"question": "Tom has 3 apples and buys 4 more. How many?", "steps": ["<<3+4=7>>"], "answer": "7"},
                {"question": "What is 2 times 5?", "steps": [], "answer": "10"}]
    path.write_text(json.dumps(original, indent=2))  # pretty-printed, as the original's files are
    records = load_records(path)
    assert [(r["id"], r["image"], r["question"], r["steps"], r["answer"]) for r in records] == [
        (0, None, original[0]["question"], ["<<3+4=7>>"], "7"), (1, None, original[1]["question"], [], "10")]
    path.write_text(json.dumps([original[0], ["not", "a", "record"]]))
    with pytest.raises(DataError, match=r"gsm_train\.json: entry 1: expected a JSON object, got list"):
        load_records(path)
    path.write_text(json.dumps([original[0], {**original[1], "steps": "one string"}]))
    with pytest.raises(DataError, match=r"gsm_train\.json: entry 1: record 1: .steps' must be a list of strings"):
        load_records(path)
    path.write_text("[" + json.dumps(original[0]) + ",")
    with pytest.raises(DataError, match=r"gsm_train\.json: invalid JSON \(.* at line 1, column"):
        load_records(path)
