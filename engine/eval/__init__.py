"""Evaluation: answer extraction, A-OKVQA metrics, batched generation over a validation set."""

from engine.eval.metrics import (
    direct_answer_accuracy,
    extract_answer,
    multiple_choice_accuracy,
    nearest_choice,
    normalize_answer,
)

__all__ = [
    "direct_answer_accuracy",
    "extract_answer",
    "multiple_choice_accuracy",
    "nearest_choice",
    "normalize_answer",
]
