"""Answer extraction, the official A-OKVQA formulas, and the scoring CLI."""

import json
import unicodedata

import pytest

from engine.eval import aokvqa
from engine.eval.evaluate import answer_length, official_predictions, score_record, summarize
from engine.eval.metrics import (
    answer_matches,
    direct_answer_accuracy,
    direct_answer_score,
    extract_answer,
    multiple_choice_accuracy,
    nearest_choice,
    normalize_answer,
)


def test_extract_answer_takes_text_after_last_marker():
    assert extract_answer("step one\nstep two\n### 1,234") == "1,234"
    assert extract_answer("no marker at all") == "no marker at all"
    assert extract_answer("# a # b ### red ") == "red"
    assert extract_answer("a step ### with a marker\n### C#") == "C#"  # a '#' of the answer stays
    assert extract_answer("### salt, pepper") == "salt, pepper"


def test_normalize_answer():
    assert normalize_answer("  Red   Car. ") == "red car"
    assert normalize_answer("1,000") == normalize_answer("1000") == "1000"  # digit groups only
    assert normalize_answer("Salt, Pepper") == "salt, pepper"


@pytest.mark.parametrize("answer", ["1,000", "salt, pepper", "C#", "Yes.", "A-OK"])
def test_a_generation_that_writes_its_target_scores_one(answer):
    """What the model was trained to write, `... ### <answer>`, is a correct answer, whatever the answer holds."""
    record = {"id": 1, "answer": answer, "direct_answers": [answer] * 10, "difficult_direct_answer": False}
    scored = score_record(record, f"first step\nsecond step\n### {answer}")
    assert scored["correct"] == 1.0 and scored["da_score"] == 1.0


def test_answers_match_in_composed_unicode_and_punctuation_alone_is_an_answer():
    """Qwen2's tokenizer writes what it reads in composed form (NFC): a target written decomposed decodes composed
    and must still match. An answer that is only punctuation must not be matched by an empty one."""
    for decomposed in ("Jose\u0301", "Nguye\u0302\u0303n", "\u1100\u1161\u11a8"):
        composed = unicodedata.normalize("NFC", decomposed)
        assert composed != decomposed
        for mode in ("normalized", "original"):
            assert answer_matches(f"### {composed}", decomposed, mode)
            assert score_record({"id": 1, "answer": decomposed}, f"### {composed}", mode)["correct"] == 1.0
    assert normalize_answer("?") == "?" and normalize_answer("...") == "..."
    assert not answer_matches("### ", "?") and answer_matches("### ?", "?")


@pytest.mark.parametrize("generation, answer, normalized, original", [
    ("a step\n### true", "True", True, False),  # case
    ("### Tom is a wumpus", "Tom is a wumpus.", True, False),  # trailing punctuation
    ("### 1,000", "1000", True, True),  # the original removes every comma, both sides
    ("### salt, pepper", "salt pepper", False, True),
    ("### C#", "C#", True, False),  # the original cuts its generation at the last '#'
    ("### 5", " 5 ", True, True),
])
def test_answer_match_modes(generation, answer, normalized, original):
    """`normalized` (the default) against the original CoCoNuT's own check (`original`), whose figures are the
    paper's."""
    assert answer_matches(generation, answer, "normalized") is normalized
    assert answer_matches(generation, answer, "original") is original
    assert score_record({"id": 1, "answer": answer}, generation, "original")["correct"] == float(original)
    with pytest.raises(ValueError, match="answer match must be one of normalized, original"):
        answer_matches(generation, answer, "exact")


def test_nearest_choice_exact_then_similarity():
    choices = ["red", "green", "blue", "yellow"]
    assert nearest_choice("Green.", choices) == "green"
    assert nearest_choice("yelow", choices) == "yellow"
    with pytest.raises(ValueError):
        nearest_choice("x", [])


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (7, 1.0)])
def test_direct_answer_score_official_formula(matches, expected):
    answers = ["dog"] * matches + ["cat"] * (10 - matches)
    assert direct_answer_score("dog", answers) == pytest.approx(expected)


def test_accuracies_skip_difficult_and_count_missing_as_wrong():
    ann = {
        "q1": {"choices": ["a", "b"], "correct_choice_idx": 1, "direct_answers": ["b"] * 10, "difficult_direct_answer": False},
        "q2": {"choices": ["c", "d"], "correct_choice_idx": 0, "direct_answers": ["c"] * 10, "difficult_direct_answer": True},
        "q3": {"choices": ["e", "f"], "correct_choice_idx": 0, "direct_answers": ["e"] * 2 + ["x"] * 8, "difficult_direct_answer": False},
    }
    mc = {"q1": "b", "q2": "d"}  # q3 missing
    assert multiple_choice_accuracy(mc, ann) == pytest.approx(100 / 3)
    da = {"q1": "b", "q2": "c", "q3": "e"}
    # q2 is difficult: not scored; q1 = 1, q3 = 2/3
    assert direct_answer_accuracy(da, ann) == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_score_record_and_summary():
    record = {"id": "7", "answer": "blue", "choices": ["red", "blue", "green", "white"], "correct_choice_idx": 1,
              "direct_answers": ["blue"] * 10, "difficult_direct_answer": False}
    good = score_record(record, "right: blue\n### blue")
    bad = score_record(record, "### redd")
    assert good["correct"] == 1.0 and good["mc_score"] == 1.0 and good["da_score"] == 1.0
    capital = score_record(record, "### Blue.")  # a match after normalisation, not the official exact one
    assert capital["correct"] == 1.0 and capital["multiple_choice"] == "blue" and capital["da_score"] == 0.0
    assert bad["correct"] == 0.0 and bad["multiple_choice"] == "red" and bad["mc_score"] == 0.0
    good["num_tokens"], bad["num_tokens"] = 4, 6
    summary = summarize([good, bad], seconds=2.0)
    assert summary["val_accuracy"] == 50.0 and summary["tokens_per_answer"] == 5.0 and summary["answers_per_second"] == 1.0
    preds = official_predictions([good, bad])
    assert preds == {"7": {"multiple_choice": "red", "direct_answer": "redd"}}


def test_in_run_direct_answer_score_is_the_official_score_of_the_written_predictions():
    """The in-run DA normalised the direct answers as well as the prediction, and predictions.json held the
    normalised prediction: "1,000" scored 1 in the run and 0 in the official evaluator on the written file."""
    records = [
        {"id": "a", "answer": "1,000", "choices": ["1,000", "2", "3", "4"], "correct_choice_idx": 0,
         "direct_answers": ["1,000"] * 4 + ["many"] * 6, "difficult_direct_answer": False},
        {"id": "b", "answer": "red", "choices": ["red", "blue", "green", "white"], "correct_choice_idx": 0,
         "direct_answers": ["Red"] * 5 + ["red"] * 2 + ["crimson"] * 3, "difficult_direct_answer": False},
        {"id": "c", "answer": "many", "choices": ["many", "few", "none", "one"], "correct_choice_idx": 0,
         "direct_answers": ["many"] * 10, "difficult_direct_answer": False},
    ]
    scored = [score_record(r, f"### {g}") for r, g in zip(records, ["1,000", "Red.", "Many"])]
    for s in scored:
        s["num_tokens"] = 1
    annotations = {r["id"]: {"question_id": r["id"], **{k: r[k] for k in aokvqa.REQUIRED_FIELDS[1:]}} for r in records}
    official = aokvqa.score(annotations, official_predictions(scored), strict=True)
    assert [s["da_score"] for s in scored] == pytest.approx([1.0, 0.0, 0.0])  # exact strings, as officially
    assert official_predictions(scored)["a"]["direct_answer"] == "1,000"
    assert summarize(scored, 1.0)["da_accuracy"] == pytest.approx(official["da_accuracy"]) == pytest.approx(100 / 3)
    assert summarize(scored, 1.0)["val_accuracy"] == 100.0  # the answer match stays normalised on both sides


def test_answer_length_counts_up_to_first_eos():
    import torch

    assert answer_length(torch.tensor([5, 6, 0, 0]), eos_token_id=0) == 3
    assert answer_length(torch.tensor([5, 6, 7]), eos_token_id=0) == 3


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_prints_official_accuracies_last_line_json(tmp_path, capsys):
    annotations = [
        {"question_id": "a", "choices": ["x", "y"], "correct_choice_idx": 0, "direct_answers": ["x"] * 10, "difficult_direct_answer": False},
        {"question_id": "b", "choices": ["u", "v"], "correct_choice_idx": 1, "direct_answers": ["v"] * 3 + ["u"] * 7, "difficult_direct_answer": False},
    ]
    preds = {"a": {"multiple_choice": "x", "direct_answer": "x"}, "b": {"multiple_choice": "uu", "direct_answer": "u"}}
    annotations.append({"question_id": "c", "choices": ["p", "q"], "correct_choice_idx": 0, "direct_answers": ["p"] * 10,
                        "difficult_direct_answer": True})
    preds["c"] = {"multiple_choice": "p", "direct_answer": "zz"}
    rc = aokvqa.main(["--annotations", _write(tmp_path, "ann.json", annotations), "--predictions", _write(tmp_path, "p.json", preds)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    # b's "uu" is not one of its choices: it scores 0 (officially); DA: a=1, b: 7 matches of "u" -> 1, c difficult
    assert result == {"mc_accuracy": pytest.approx(200 / 3), "da_accuracy": 100.0}
    assert lines[0].endswith("(3 questions)") and lines[1].endswith("(2 questions)")  # each setting's own count


def test_cli_rejects_bad_predictions_and_test_split(tmp_path, capsys):
    ann = _write(tmp_path, "ann.json", [{"question_id": "a", "choices": ["x"], "correct_choice_idx": None, "direct_answers": None}])
    preds = _write(tmp_path, "p.json", {"a": {"multiple_choice": "x", "direct_answer": "x"}})
    assert aokvqa.main(["--annotations", ann, "--predictions", preds]) == 2
    assert "question_id 'a'" in capsys.readouterr().err
    good_ann = _write(tmp_path, "ann2.json", [{"question_id": "a", "choices": ["x"], "correct_choice_idx": 0, "direct_answers": ["x"] * 10, "difficult_direct_answer": False}])
    bad_preds = _write(tmp_path, "p2.json", {"a": "x"})
    assert aokvqa.main(["--annotations", good_ann, "--predictions", bad_preds]) == 2
    assert "multiple_choice and/or direct_answer" in capsys.readouterr().err
    assert aokvqa.main(["--annotations", str(tmp_path / "missing.json"), "--predictions", bad_preds]) == 2
    assert "missing.json" in capsys.readouterr().err


# ---------------------------------------------------------------------- the official evaluator's rules
ANNOTATIONS = [
    {"question_id": "q1", "choices": ["golf", "tennis", "soccer", "chess"], "correct_choice_idx": 1,
     "direct_answers": ["tennis"] * 10, "difficult_direct_answer": False},
    {"question_id": "q2", "choices": ["red", "blue", "green", "white"], "correct_choice_idx": 2,
     "direct_answers": ["green"] * 2 + ["lime"] * 8, "difficult_direct_answer": False},
    {"question_id": "q3", "choices": ["cat", "dog", "bird", "fish"], "correct_choice_idx": 0,
     "direct_answers": ["cat"] * 10, "difficult_direct_answer": True},
    {"question_id": "q4", "choices": ["one", "two", "three", "four"], "correct_choice_idx": 3,
     "direct_answers": ["four"] * 10, "difficult_direct_answer": False},
]


def _score(tmp_path, capsys, preds, *flags):
    rc = aokvqa.main(["--annotations", _write(tmp_path, "ann.json", ANNOTATIONS),
                      "--predictions", _write(tmp_path, "p.json", preds), *flags])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out.strip().splitlines()[-1]) if rc == 0 else None), captured.err


def test_multiple_choice_values_that_are_not_choices_score_zero_as_officially(tmp_path, capsys):
    """The official non-strict mode compares strings: 'Tennis.' is not the choice 'tennis' and scores 0 (the
    former nearest-choice default scored it 1). --map-to-choices is the explicit way to map free text."""
    preds = {"q1": {"multiple_choice": "Tennis."}, "q2": {"multiple_choice": "green"},
             "q3": {"multiple_choice": "catt"}, "q4": {"multiple_choice": "three"}}
    rc, result, err = _score(tmp_path, capsys, preds)
    assert rc == 0 and result == {"mc_accuracy": 25.0, "da_accuracy": None}  # q2 only; no DA field: not scored
    assert "2 multiple_choice values are not one of" in err
    rc, mapped, _ = _score(tmp_path, capsys, preds, "--map-to-choices")
    assert mapped == {"mc_accuracy": 75.0, "da_accuracy": None}  # Tennis. -> tennis, catt -> cat
    rc, _, err = _score(tmp_path, capsys, preds, "--strict")
    assert rc == 2 and "is not one of" in err
    # mapped first, then checked: the official remapping runs before the strict evaluation
    rc, mapped_strict, _ = _score(tmp_path, capsys, preds, "--strict", "--map-to-choices")
    assert rc == 0 and mapped_strict == mapped


def test_a_file_without_a_scored_field_is_an_error_and_unknown_keys_are_named(tmp_path, capsys):
    """A typo in the field names left every setting unscored and passed --strict with exit status 0."""
    for flags in ((), ("--strict",)):
        rc, _, err = _score(tmp_path, capsys, {"q1": {"mc": "tennis", "da": "tennis"}, "q2": {}}, *flags)
        assert rc == 2 and "none of the 2 predictions has a multiple_choice or direct_answer field" in err
        assert "'da', 'mc'" in err
    rc, result, err = _score(tmp_path, capsys, {q: {"multiple_choice": c, "multiple_choice_answer": c}
                                                for q, c in (("q1", "tennis"), ("q2", "green"))})
    assert rc == 0 and result["mc_accuracy"] == 50.0 and "not scored: ['multiple_choice_answer']" in err
    rc, _, err = _score(tmp_path, capsys, {})
    assert rc == 2 and "holds no prediction" in err


def test_either_field_may_be_omitted_and_missing_questions_score_zero(tmp_path, capsys):
    preds = {"q1": {"direct_answer": "tennis"}, "q2": {"direct_answer": "green", "multiple_choice": "green"},
             "q4": {"direct_answer": "4"}}
    rc, result, err = _score(tmp_path, capsys, preds)
    # DA over q1, q2, q4 (q3 is difficult): 1 + 2/3 + 0; MC over all 4 questions: only q2 has one, correct
    assert rc == 0 and result["da_accuracy"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert result["mc_accuracy"] == 25.0
    # each setting counts its own questions: MC lacks q1, q3, q4 of 4; every DA question (q1, q2, q4) has one
    assert "3 of the 4 questions scored for multiple_choice have no multiple_choice prediction" in err
    assert "direct_answer have no" not in err
    rc, _, err = _score(tmp_path, capsys, preds, "--strict")  # strict: every question needs each given field
    assert rc == 2 and "no multiple_choice prediction" in err


def test_extra_ids_are_reported_and_no_matching_id_is_an_error(tmp_path, capsys):
    preds = {"q1": {"multiple_choice": "tennis", "direct_answer": "tennis"}, "zz": {"multiple_choice": "x"}}
    rc, result, err = _score(tmp_path, capsys, preds)
    assert rc == 0 and result["mc_accuracy"] == 25.0 and "1 predictions are for question ids not in" in err
    assert "'zz'" in err
    rc, _, err = _score(tmp_path, capsys, {"a1": {"multiple_choice": "x"}, "a2": {"direct_answer": "y"}})
    assert rc == 2 and "none of the 2 predictions" in err


@pytest.mark.parametrize("field, value", [("multiple_choice", 3), ("direct_answer", None), ("direct_answer", ["x"])])
def test_non_string_answers_are_named_errors(tmp_path, capsys, field, value):
    rc, _, err = _score(tmp_path, capsys, {"q1": {field: value}})
    assert rc == 2 and f"question 'q1': {field} must be a string" in err and "Traceback" not in err


def test_score_matches_the_official_formulas_on_complete_predictions():
    """Complete predictions (both fields, valid choices): the numbers the official script prints."""
    annotations = {a["question_id"]: a for a in ANNOTATIONS}
    preds = {"q1": {"multiple_choice": "tennis", "direct_answer": "tennis"},
             "q2": {"multiple_choice": "blue", "direct_answer": "green"},
             "q3": {"multiple_choice": "cat", "direct_answer": "dog"},
             "q4": {"multiple_choice": "four", "direct_answer": "four"}}
    result = aokvqa.score(annotations, preds, strict=True)
    assert result["mc_accuracy"] == pytest.approx(75.0)  # q1, q3, q4 of 4
    assert result["da_accuracy"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)  # q3 is difficult: not scored


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("direct_answers", "tennis", "direct_answers must be a list of strings"),  # would match per character
        ("difficult_direct_answer", "false", "difficult_direct_answer must be true or false"),  # would drop q1
        ("choices", "golf", "choices must be a non-empty list of strings"),  # would match substrings
        ("choices", [], "choices must be a non-empty list of strings"),
        ("correct_choice_idx", 9, "correct_choice_idx must be an index into its 4 choices"),
        ("correct_choice_idx", "1", "correct_choice_idx must be an index"),
        ("correct_choice_idx", True, "correct_choice_idx must be an index"),
        ("question_id", ["q1"], "question_id must be a string"),
    ],
)
def test_annotations_of_the_wrong_type_are_named_errors(tmp_path, capsys, field, value, message):
    """A malformed annotation would be scored wrong without a word: it is an error naming the record and field."""
    annotations = [dict(a) for a in ANNOTATIONS]
    annotations[0][field] = value
    rc = aokvqa.main(["--annotations", _write(tmp_path, "ann.json", annotations),
                      "--predictions", _write(tmp_path, "p.json", {"q2": {"multiple_choice": "green"}})])
    err = capsys.readouterr().err
    assert rc == 2 and "record 0" in err and message in err and "Traceback" not in err


def test_a_question_annotated_twice_is_an_error(tmp_path, capsys):
    annotations = ANNOTATIONS + [dict(ANNOTATIONS[0], correct_choice_idx=0)]
    rc = aokvqa.main(["--annotations", _write(tmp_path, "ann.json", annotations),
                      "--predictions", _write(tmp_path, "p.json", {"q1": {"multiple_choice": "golf"}})])
    err = capsys.readouterr().err
    assert rc == 2 and "record 4: question_id 'q1' is annotated twice" in err


def test_the_library_module_run_as_a_command_says_what_to_run(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "engine.eval.evaluate"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a command" in result.stderr and "engine.eval.aokvqa" in result.stderr
