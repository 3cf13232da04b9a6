"""Score A-OKVQA predictions with the official formulas.

    python -m engine.eval.aokvqa --annotations aokvqa_v1p0_val.json --predictions preds.json

`preds.json` is the official format: `{question_id: {"multiple_choice": str, "direct_answer": str}}`.
Multiple-choice predictions that are not one of the choices are mapped to the nearest choice first
(`--strict` refuses them instead). The last line printed is a JSON object
`{"mc_accuracy": ..., "da_accuracy": ...}` (percentages).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.eval.metrics import direct_answer_accuracy, multiple_choice_accuracy, nearest_choice

REQUIRED_FIELDS = ("question_id", "choices", "correct_choice_idx", "direct_answers", "difficult_direct_answer")


class PredictionError(ValueError):
    pass


def load_annotations(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of A-OKVQA records")
    out = {}
    for i, rec in enumerate(data):
        missing = [f for f in REQUIRED_FIELDS if rec.get(f) is None and f != "difficult_direct_answer"]
        if "difficult_direct_answer" not in rec:
            missing.append("difficult_direct_answer")
        if missing:
            raise ValueError(
                f"{path}: record {i} (question_id {rec.get('question_id')!r}) lacks {missing}; "
                "the test split has no answers and cannot be scored"
            )
        out[str(rec["question_id"])] = rec
    return out


def load_predictions(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PredictionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PredictionError(f"{path} must be a JSON object {{question_id: {{multiple_choice, direct_answer}}}}")
    for qid, pred in data.items():
        if not isinstance(pred, dict) or not {"multiple_choice", "direct_answer"} <= set(pred):
            raise PredictionError(
                f"{path}: prediction for question {qid!r} must be an object with keys multiple_choice and "
                f"direct_answer, got {pred!r}"
            )
    return {str(k): v for k, v in data.items()}


def score(annotations: dict[str, dict], predictions: dict[str, dict], *, strict: bool = False) -> dict:
    mc_preds, da_preds = {}, {}
    for qid, pred in predictions.items():
        if qid not in annotations:
            continue
        choices = annotations[qid]["choices"]
        mc = pred["multiple_choice"]
        if mc not in choices:
            if strict:
                raise PredictionError(f"question {qid}: multiple_choice {mc!r} is not one of {choices}")
            mc = nearest_choice(mc, choices)
        mc_preds[qid] = mc
        da_preds[qid] = pred["direct_answer"]
    missing = len(set(annotations) - set(predictions))
    return {
        "mc_accuracy": multiple_choice_accuracy(mc_preds, annotations),
        "da_accuracy": direct_answer_accuracy(da_preds, annotations),
        "num_questions": len(annotations),
        "num_missing_predictions": missing,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="aokvqa_v1p0_{val,train}.json")
    parser.add_argument("--predictions", required=True, help="{question_id: {multiple_choice, direct_answer}}")
    parser.add_argument("--strict", action="store_true", help="refuse MC predictions that are not a choice")
    args = parser.parse_args(argv)
    try:
        result = score(load_annotations(args.annotations), load_predictions(args.predictions), strict=args.strict)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["num_missing_predictions"]:
        print(f"warning: {result['num_missing_predictions']} questions have no prediction (scored 0)", file=sys.stderr)
    print(f"Multiple-choice accuracy: {result['mc_accuracy']:.2f}  ({result['num_questions']} questions)")
    print(f"Direct-answer accuracy:   {result['da_accuracy']:.2f}")
    print(json.dumps({"mc_accuracy": result["mc_accuracy"], "da_accuracy": result["da_accuracy"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
