"""The record format every data set is converted to, and its JSON-lines files.

One record per line:

    {"id": "q1", "image": "images/q1.png", "question": "...", "steps": ["...", "..."], "answer": "...",
     "choices": [...], "correct_choice_idx": 0, "direct_answers": [...], "difficult_direct_answer": false}

- `id`: a string or an integer, unique in its file.
- `image`: a path (relative paths are resolved against the file's directory, or `image_root`); None makes a
  text-only sample.
- `steps`: the reasoning steps as strings, in order (may be empty); null where they are not known (A-OKVQA's
  test split): generation then gives the record the stage's usual thoughts, and training refuses it.
- `answer`: a string; None is allowed where no answer is needed (A-OKVQA's test split).
- `choices`, `correct_choice_idx`, `direct_answers`, `difficult_direct_answer`: optional, A-OKVQA's
  multiple-choice and direct-answer fields, used by the metrics.

Every error names the file, the line and the record id.

The original CoCoNuT's data files (a JSON array of {"question", "steps", "answer"} objects: GSM8k, ProntoQA,
ProsQA) are read as they are: a record's `id` defaults to its position in the array (the original's `idx`) and
its `image` to null (text only); errors name the file and the entry (its position).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from engine.utils.io import atomic_write_text

REQUIRED_FIELDS = ("id", "image", "question", "steps", "answer")
OPTIONAL_FIELDS = ("choices", "correct_choice_idx", "direct_answers", "difficult_direct_answer")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+://|data:)")  # http://, s3://, file://, data:; not C:\ nor C:/


class DataError(ValueError):
    """Bad or missing data; the message names the file (and line, record id) at fault."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for every non-blank line (line numbers start at 1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:  # lines decoded one by one: a bad byte is named with its line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark is no error
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
            yield line_no, obj


def _holds_json_array(path: Path) -> bool:
    """Whether the file's first non-blank character opens a JSON array (the original CoCoNuT's format)."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            text = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")  # blanks and a byte-order mark
            if text:
                return text.startswith(b"[")
    return False


def iter_record_file(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield `(where, object)` for every record of a data file: JSON lines (`where` is `file:line`), or a JSON
    array as the original CoCoNuT's files are (`where` is `file: entry N`; `id` defaults to N and `image` to null
    there)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if not _holds_json_array(path):
        for line_no, obj in iter_jsonl(path):
            yield f"{path}:{line_no}", obj
        return
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    for index, obj in enumerate(items):
        where = f"{path}: entry {index}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, {"id": index, "image": None, **obj}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All objects of a JSON-lines file; blank lines are skipped."""
    return [obj for _, obj in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically (a temporary file renamed into place)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_record(record: dict, where: str, *, need_answer: bool = True) -> None:
    """Raise DataError (naming `where` and the record id) unless `record` has the record format."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    label = f"{where}: record {rid!r}"
    if "id" not in record:
        raise DataError(f"{where}: record has no 'id' field (fields present: {sorted(record)})")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
        raise DataError(f"{label}: 'id' must be a non-empty string or an integer, got {rid!r}")
    missing = [f for f in REQUIRED_FIELDS if f not in record and not (f == "answer" and not need_answer)]
    if missing:
        raise DataError(f"{label}: missing field(s) {missing}")

    image = record["image"]
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise DataError(f"{label}: 'image' must be a path string or null, got {image!r}")
    if image is not None and _URL.match(image):  # made a local path, it became "<dir>/http:/host/..."
        raise DataError(f"{label}: 'image' is a URL ({image[:80]!r}); images are read from local files only: "
                        "download them and give their paths")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{label}: 'question' must be a non-empty string, got {question!r}")
    steps = record["steps"]
    if steps is None:
        if need_answer:
            raise DataError(f"{label}: 'steps' is null (not known) but this split trains on its steps; write [] for "
                            "a record that has none")
    elif not _is_str_list(steps):
        raise DataError(f"{label}: 'steps' must be a list of strings, got {steps!r}")
    answer = record.get("answer")
    if answer is None:
        if need_answer:
            raise DataError(f"{label}: 'answer' is null but this split needs answers")
    elif not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{label}: 'answer' must be a non-empty string, got {answer!r}")

    problem = answer_fields_problem(record)
    if problem:
        raise DataError(f"{label}: {problem}")


def answer_fields_problem(record: dict, *, required: bool = False) -> str | None:
    """What is wrong with a record's A-OKVQA answer fields (choices, correct_choice_idx, direct_answers,
    difficult_direct_answer), None when nothing. Absent or null fields pass unless ``required`` (an annotation
    file being scored, `engine.eval.aokvqa`): a string where a list belongs would be matched per character, a
    string "false" would count as difficult."""
    choices = record.get("choices")
    if (choices is not None or required) and (not _is_str_list(choices) or not choices):
        return f"choices must be a non-empty list of strings, got {choices!r}"
    idx = record.get("correct_choice_idx")
    if idx is not None or required:
        if choices is None:
            return "correct_choice_idx is set but there are no choices"
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(choices):
            return f"correct_choice_idx must be an index into its {len(choices)} choices, got {idx!r}"
    direct = record.get("direct_answers")
    if (direct is not None or required) and not _is_str_list(direct):
        return f"direct_answers must be a list of strings, got {direct!r}"
    difficult = record.get("difficult_direct_answer")
    if (difficult is not None or required) and not isinstance(difficult, bool):
        allowed = "true or false" if required else "true, false or null"
        return f"difficult_direct_answer must be {allowed}, got {difficult!r}"
    return None


def load_records(
    path: str | os.PathLike, *, need_answer: bool = True, image_root: str | os.PathLike | None = None
) -> list[dict]:
    """Read and validate a records file.

    Relative image paths become absolute, resolved against `image_root` (default: the file's directory).
    Missing optional fields are filled with None, and `answer` with None where answers are not needed.
    Duplicate ids are an error (evaluation keys its results by id).
    """
    path = Path(path)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    records: list[dict] = []
    seen: dict[str, str] = {}
    for where, record in iter_record_file(path):
        validate_record(record, where, need_answer=need_answer)
        key = str(record["id"])
        if key in seen:
            raise DataError(f"{where}: record {record['id']!r}: duplicate id (first seen at {seen[key]})")
        seen[key] = where
        record = dict(record)
        record.setdefault("answer", None)
        for name in OPTIONAL_FIELDS:
            record.setdefault(name, None)
        if record["image"] is not None:
            image = Path(record["image"]).expanduser()
            record["image"] = str(image if image.is_absolute() else (root / image).absolute())
        records.append(record)
    if not records:
        raise DataError(f"no records in {path}")
    return records
