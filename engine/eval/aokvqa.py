"""Score A-OKVQA predictions as the official evaluator does (allenai/aokvqa `evaluation/eval_predictions.py`).

    python -m engine.eval.aokvqa --annotations aokvqa_v1p0_val.json --predictions preds.json

`preds.json` is the official format: `{question_id: {"multiple_choice": str, "direct_answer": str}}`. Either
field may be left out, as the official README allows; a setting with no prediction at all is not scored (its
accuracy is null), as the official script prints nothing for it. By default the scores are the official
non-strict ones:

- multiple choice, over every annotated question: 1 when the prediction is `choices[correct_choice_idx]`
  (exact string); a value that is not one of the choices, or no prediction, scores 0;
- direct answer, over the questions whose `difficult_direct_answer` is false:
  `min(1, #direct_answers equal to the prediction / 3)`; no prediction scores 0.

`--strict` is the official strict mode: every question a setting scores needs a prediction in that setting and a
multiple-choice value must be one of the choices (else an error). `--map-to-choices` maps a multiple-choice value
that is not one of the choices to the nearest choice first (not official, nor the official GloVe remapping; for
free-text answers), so the strict check sees the mapped values. Predictions for ids that are not annotated are
ignored and reported, as are keys other than the two fields; a file in which no prediction matches an annotated
id, or none has either field, is an error.
The last line printed is a JSON object `{"mc_accuracy": ..., "da_accuracy": ...}` (percentages, or null).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.data.records import answer_fields_problem
from engine.eval.metrics import direct_answer_accuracy, multiple_choice_accuracy, nearest_choice

REQUIRED_FIELDS = ("question_id", "choices", "correct_choice_idx", "direct_answers", "difficult_direct_answer")
PREDICTION_FIELDS = ("multiple_choice", "direct_answer")


class PredictionError(ValueError):
    pass


def load_annotations(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of A-OKVQA records")
    out = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        missing = [f for f in REQUIRED_FIELDS if rec.get(f) is None and f != "difficult_direct_answer"]
        if "difficult_direct_answer" not in rec:
            missing.append("difficult_direct_answer")
        if missing:
            raise ValueError(
                f"{path}: record {i} (question_id {rec.get('question_id')!r}) lacks {missing}; "
                "the test split has no answers and cannot be scored"
            )
        problem = _annotation_problem(rec)
        if problem:
            raise ValueError(f"{path}: record {i} (question_id {rec['question_id']!r}): {problem}")
        qid = str(rec["question_id"])
        if qid in out:
            raise ValueError(f"{path}: record {i}: question_id {rec['question_id']!r} is annotated twice")
        out[qid] = rec
    return out


def _annotation_problem(rec: dict) -> str | None:
    """What is wrong with the types of an annotation's scored fields (None when nothing): its id, then the answer
    fields as the record format checks them, every one required."""
    if not isinstance(rec["question_id"], (str, int)) or isinstance(rec["question_id"], bool):
        return f"question_id must be a string, got {type(rec['question_id']).__name__}"
    return answer_fields_problem(rec, required=True)


def load_predictions(path: str | Path) -> dict[str, dict]:
    """The predictions of a file in the official format; a value of the wrong type is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PredictionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PredictionError(f"{path} must be a JSON object {{question_id: {{multiple_choice, direct_answer}}}}")
    for qid, pred in data.items():
        if not isinstance(pred, dict):
            raise PredictionError(
                f"{path}: prediction for question {qid!r} must be an object with keys multiple_choice and/or "
                f"direct_answer, got {pred!r}"
            )
        for field in PREDICTION_FIELDS:
            if field in pred and not isinstance(pred[field], str):
                raise PredictionError(
                    f"{path}: prediction for question {qid!r}: {field} must be a string, got {pred[field]!r} "
                    f"({type(pred[field]).__name__})"
                )
    return {str(k): v for k, v in data.items()}


def score(annotations: dict[str, dict], predictions: dict[str, dict], *, strict: bool = False,
          map_to_choices: bool = False) -> dict:
    """Accuracies (%) as the official evaluator computes them (None for a setting with no prediction), and counts:
    questions, questions without a prediction, predictions for ids not annotated, MC values not among the choices."""
    if not predictions:
        raise PredictionError("the predictions file holds no prediction (an empty object)")
    unknown = sorted({k for p in predictions.values() for k in p if k not in PREDICTION_FIELDS})
    if not any(f in p for p in predictions.values() for f in PREDICTION_FIELDS):
        raise PredictionError(
            f"none of the {len(predictions)} predictions has a {' or '.join(PREDICTION_FIELDS)} field"
            + (f" (their keys: {unknown[:5]})" if unknown else "")
        )
    extra = sorted(q for q in predictions if q not in annotations)
    if len(extra) == len(predictions):
        raise PredictionError(
            f"none of the {len(predictions)} predictions is for an annotated question (prediction ids such as "
            f"{extra[:3]}; annotated ids such as {sorted(annotations)[:3]}): wrong annotation file or split?"
        )
    mc_preds = {q: p["multiple_choice"] for q, p in predictions.items() if "multiple_choice" in p}
    da_preds = {q: p["direct_answer"] for q, p in predictions.items() if "direct_answer" in p}
    not_a_choice = [q for q, mc in mc_preds.items() if q in annotations and mc not in annotations[q]["choices"]]
    if map_to_choices:  # before the strict check, as the official remapping runs before its evaluation
        for q in not_a_choice:
            mc_preds[q] = nearest_choice(mc_preds[q], annotations[q]["choices"])
    da_questions = [q for q, a in annotations.items() if a.get("difficult_direct_answer") is False]
    # each setting's questions without a prediction, for a setting that has predictions (one without is not scored)
    lacking = {
        name: [q for q in needed if q not in preds] if preds else []
        for name, preds, needed in (("multiple_choice", mc_preds, annotations), ("direct_answer", da_preds, da_questions))
    }
    if strict:
        for name, missing in lacking.items():
            if missing:
                raise PredictionError(f"strict: {len(missing)} questions have no {name} prediction (e.g. {missing[:3]})")
        if not_a_choice and not map_to_choices:
            q = not_a_choice[0]
            raise PredictionError(
                f"strict: question {q}: multiple_choice {mc_preds[q]!r} is not one of {annotations[q]['choices']}"
                + (f" ({len(not_a_choice) - 1} more)" if len(not_a_choice) > 1 else "")
            )
    return {
        "mc_accuracy": multiple_choice_accuracy(mc_preds, annotations) if mc_preds else None,
        "da_accuracy": direct_answer_accuracy(da_preds, annotations) if da_preds else None,
        "num_questions": len(annotations),
        "num_da_questions": sum(a.get("difficult_direct_answer") is False for a in annotations.values()),
        "num_missing_mc_predictions": len(lacking["multiple_choice"]),
        "num_missing_da_predictions": len(lacking["direct_answer"]),
        "unknown_prediction_keys": unknown,
        "num_extra_predictions": len(extra),
        "extra_prediction_ids": extra,
        "num_mc_not_a_choice": len(not_a_choice),
        "mapped_to_choices": map_to_choices,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="aokvqa_v1p0_{val,train}.json (UTF-8)")
    parser.add_argument("--predictions", required=True, help="{question_id: {multiple_choice, direct_answer}}")
    parser.add_argument("--strict", action="store_true",
                        help="the official strict mode: every question needs a prediction, MC values must be choices")
    parser.add_argument("--map-to-choices", action="store_true",
                        help="map MC values that are not a choice to the nearest choice first (not official)")
    args = parser.parse_args(argv)
    try:
        result = score(load_annotations(args.annotations), load_predictions(args.predictions), strict=args.strict,
                       map_to_choices=args.map_to_choices)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, key, count in (("multiple_choice", "num_missing_mc_predictions", "num_questions"),
                             ("direct_answer", "num_missing_da_predictions", "num_da_questions")):
        if result[key]:
            print(f"warning: {result[key]} of the {result[count]} questions scored for {name} have no {name} "
                  "prediction (scored 0)", file=sys.stderr)
    if result["unknown_prediction_keys"]:
        print(f"warning: predictions carry keys that are not scored: {result['unknown_prediction_keys'][:5]} (the "
              f"scored ones: {list(PREDICTION_FIELDS)})", file=sys.stderr)
    if result["num_extra_predictions"]:
        print(f"warning: {result['num_extra_predictions']} predictions are for question ids not in the annotations "
              f"(ignored), e.g. {result['extra_prediction_ids'][:3]}", file=sys.stderr)
    if result["num_mc_not_a_choice"]:
        what = "mapped to the nearest choice" if args.map_to_choices else "scored 0; --map-to-choices maps them"
        print(f"warning: {result['num_mc_not_a_choice']} multiple_choice values are not one of their question's "
              f"choices ({what})", file=sys.stderr)
    for label, key, count in (("Multiple-choice", "mc_accuracy", "num_questions"),
                              ("Direct-answer", "da_accuracy", "num_da_questions")):  # difficult ones not scored
        value = result[key]
        shown = "not scored (no prediction has this field)" if value is None else f"{value:.2f}"
        print(f"{label + ' accuracy:':<26}{shown}  ({result[count]} questions)")
    print(json.dumps({"mc_accuracy": result["mc_accuracy"], "da_accuracy": result["da_accuracy"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
