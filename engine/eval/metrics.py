"""Answer extraction and the A-OKVQA metrics.

- The model writes `... ### answer<eos>`; the answer is the text after the last `###` (the whole text when there
  is none), whitespace stripped. The original CoCoNuT cut at the last `#` and removed every comma, which loses an
  answer that has either ("C#", "salt, pepper"); here only the commas of digit groups go ("1,000" is "1000"),
  in the normalisation both sides of a comparison get (`answer_match: normalized`, the default: also case,
  runs of spaces and trailing punctuation). `answer_match: original` scores as the original's code does, for
  figures to set beside the paper's.
- Both sides of every comparison are in Unicode's composed form (NFC), as Qwen2's tokenizer writes what it
  reads: a target written decomposed ("Jose\u0301") decodes composed, and must still match.
- Multiple choice (official): a prediction scores 1 when it equals `choices[correct_choice_idx]`. A free-form
  answer is first mapped to the nearest choice (exact match after normalisation, else the highest string
  similarity; not the official GloVe mapping), so that the official strict mode, where a prediction must be one
  of the choices, accepts it.
- Direct answer (official): over questions whose `difficult_direct_answer` is False,
  `min(1, #direct_answers equal to the prediction / 3)`, by the official evaluator's exact string match: the
  answer as the model wrote it against the direct answers as they are (the model learns to write the data's
  answers; a normalised prediction would miss "C#" or "1,000").
Both are averaged and reported as percentages.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from typing import Iterable, Sequence

_SPACES = re.compile(r"\s+")
_DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d)")
ANSWER_MARKER = "###"  # what the training targets put before the answer: "### " + answer


def extract_answer(text: str) -> str:
    """The text after the last `###`, stripped (the whole text, stripped, when the marker is missing)."""
    return text.rsplit(ANSWER_MARKER, 1)[-1].strip()


ANSWER_MATCHES = ("normalized", "original")


def normalize_answer(text: str) -> str:
    """Composed Unicode, lower-case, single spaces, no trailing punctuation (unless the answer is nothing else),
    no commas inside numbers: A-OKVQA's answers are written this way. Applied to both sides of the answer match and
    of the mapping to a choice; the direct answer is scored as written, as the official evaluator does."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text).strip().lower())
    text = _DIGIT_GROUP_COMMA.sub("", text)
    return text.rstrip(".!?;:").strip() or text  # "?" stays "?": an empty answer must not match it


def _original_form(text: str) -> str:
    """The original CoCoNuT's form of an answer: every comma removed, stripped (composed Unicode, as the tokenizer
    writes)."""
    return unicodedata.normalize("NFC", text).replace(",", "").strip()


def answer_matches(generation: str, answer: str, mode: str = "normalized") -> bool:
    """Whether ``generation`` (the decoded text after the prompt) answers ``answer``: `normalize_answer` of its
    text after the last `###` against the answer's (``normalized``), or the original's exact match after its own
    cut at `#` and comma removal (``original``)."""
    if mode == "original":  # its generation cut at the last '#'; its answers as the data file writes them
        return _original_form(generation.split("#")[-1]) == _original_form(answer)
    if mode != "normalized":
        raise ValueError(f"answer match must be one of {', '.join(ANSWER_MATCHES)}, got {mode!r}")
    return normalize_answer(extract_answer(generation)) == normalize_answer(answer)


def validation_score(record: dict) -> float | None:
    """How an epoch's validation ranks for `<run>/best` (higher is better): its answer accuracy, else its loss
    negated; None when it was not validated."""
    if record.get("val_accuracy") is not None:
        return record["val_accuracy"]
    return -record["val_loss"] if record.get("val_loss") is not None else None


def nearest_choice(prediction: str, choices: Sequence[str]) -> str:
    """Map a free-form answer to one of the choices (exact normalised match first, then string similarity)."""
    if not choices:
        raise ValueError("nearest_choice needs at least one choice")
    norm = normalize_answer(prediction)
    for choice in choices:
        if normalize_answer(choice) == norm:
            return choice
    scores = [difflib.SequenceMatcher(None, norm, normalize_answer(c)).ratio() for c in choices]
    return choices[max(range(len(choices)), key=scores.__getitem__)]


def multiple_choice_score(prediction: str, choices: Sequence[str], correct_choice_idx: int) -> float:
    return float(prediction == choices[correct_choice_idx])


def direct_answer_score(prediction: str, direct_answers: Iterable[str]) -> float:
    matches = sum(prediction == answer for answer in direct_answers)
    return min(1.0, matches / 3.0)


def multiple_choice_accuracy(predictions: dict, annotations: dict) -> float:
    """Official MC accuracy (%) over all annotated questions; a missing prediction scores 0."""
    if not annotations:
        raise ValueError("no annotated questions to score")
    total = 0.0
    for qid, ann in annotations.items():
        if qid in predictions:
            total += multiple_choice_score(predictions[qid], ann["choices"], ann["correct_choice_idx"])
    return 100.0 * total / len(annotations)


def direct_answer_accuracy(predictions: dict, annotations: dict) -> float:
    """Official DA accuracy (%) over questions with difficult_direct_answer False."""
    scored = {qid: a for qid, a in annotations.items() if a.get("difficult_direct_answer") is False}
    if not scored:
        raise ValueError("no question with difficult_direct_answer False to score")
    total = sum(direct_answer_score(predictions[q], a["direct_answers"]) for q, a in scored.items() if q in predictions)
    return 100.0 * total / len(scored)
