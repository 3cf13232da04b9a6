"""Convert the official A-OKVQA annotations (+ COCO 2017 images) to the engine's record format.

    python -m engine.data.prepare_aokvqa --aokvqa-dir /data/aokvqa --coco-dir /data/coco \\
        --split train --out data/aokvqa/train.jsonl

Input: `{aokvqa_dir}/aokvqa_v1p0_{split}.json` (a list of objects with question_id, image_id, question,
choices, correct_choice_idx, direct_answers, difficult_direct_answer, rationales) and the images at
`{coco_dir}/{split}2017/{image_id:012d}.jpg`.

Output record: id = question_id, image = absolute image path, steps = the three rationales in order (or,
with `--rationales first-sentences`, the first rationale cut into sentences; None for the test split, which has
no rationales), answer = `choices[correct_choice_idx]` (None for the test split, which has no answers), plus the multiple-choice and
direct-answer fields for the official metrics.

A missing image, a missing field or unreadable JSON raises an error that names the record id and the path;
`--skip-bad` skips such records instead and reports how many. `--verify-images` also decodes every image
completely (in parallel), so a truncated or corrupt file is found here. A question id that appears twice is an
error naming both entries. The output file is written to a temporary file
and renamed, so it is never left half-written and an existing file is untouched when preparation fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from engine.data.images import find_image_problems
from engine.data.records import DataError, validate_record, write_jsonl
from engine.utils.logging import get_logger

log = get_logger("data.aokvqa")

SPLITS = ("train", "val", "test")
RATIONALE_MODES = ("all", "first-sentences")
# Fields every split has, and those only the annotated splits (train, val) have.
COMMON_FIELDS = ("question_id", "image_id", "question", "choices")
ANSWER_FIELDS = ("correct_choice_idx", "direct_answers", "difficult_direct_answer", "rationales")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def annotation_path(aokvqa_dir: str | os.PathLike, split: str) -> Path:
    return Path(aokvqa_dir) / f"aokvqa_v1p0_{split}.json"


def coco_image_path(coco_dir: str | os.PathLike, split: str, image_id: int) -> Path:
    return Path(coco_dir) / f"{split}2017" / f"{int(image_id):012d}.jpg"


def split_sentences(text: str) -> list[str]:
    """Sentences of a rationale (split after . ! ? followed by whitespace), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def rationale_steps(rationales: Sequence[str], mode: str) -> list[str]:
    if mode == "all":
        return [r.strip() for r in rationales if r.strip()]
    if mode == "first-sentences":
        return split_sentences(rationales[0]) if rationales else []
    raise ValueError(f"rationales must be one of {RATIONALE_MODES}, got {mode!r}")


def read_annotations(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"A-OKVQA annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def convert_entry(entry: dict, *, split: str, coco_dir: Path, source: Path, index: int, rationales: str) -> dict:
    """One annotation -> one record; DataError names the record id and the file at fault."""
    if not isinstance(entry, dict):
        raise DataError(f"{source}: entry {index} is a {type(entry).__name__}, not an object")
    qid = entry.get("question_id", f"<entry {index}>")
    needed = COMMON_FIELDS + (ANSWER_FIELDS if split != "test" else ())
    missing = [f for f in needed if f not in entry or (entry[f] is None and f != "difficult_direct_answer")]
    if missing:
        raise DataError(f"{source}: record {qid!r} (entry {index}) is missing field(s) {missing}")
    image_id = entry["image_id"]
    if isinstance(image_id, str) and image_id.strip().isdigit():  # an id written as a string of digits is the id
        image_id = int(image_id)
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:  # int(2.7) would be image 2
        raise DataError(f"{source}: record {qid!r}: image_id {entry['image_id']!r} is not a non-negative integer")
    image = coco_image_path(coco_dir, split, image_id)
    if not image.is_file():
        raise DataError(f"record {qid!r}: image not found: {image}")

    choices = entry["choices"]
    answer = None
    correct = entry.get("correct_choice_idx")
    if split != "test":
        if not isinstance(correct, int) or not isinstance(choices, list) or not 0 <= correct < len(choices):
            raise DataError(f"{source}: record {qid!r}: correct_choice_idx {correct!r} is not an index into {choices!r}")
        answer = choices[correct]
    raw_rationales = entry.get("rationales")
    if raw_rationales is not None and (
        not isinstance(raw_rationales, list) or not all(isinstance(r, str) for r in raw_rationales)
    ):
        raise DataError(f"{source}: record {qid!r}: rationales must be a list of strings, got {raw_rationales!r}")
    record = {
        "id": qid,
        "image": str(image.absolute()),
        "question": entry["question"],
        # the test split has no rationales: its steps are not known (null), which is not "no steps"
        "steps": None if raw_rationales is None else rationale_steps(raw_rationales, rationales),
        "answer": answer,
        "choices": choices,
        "correct_choice_idx": correct,
        "direct_answers": entry.get("direct_answers"),
        "difficult_direct_answer": entry.get("difficult_direct_answer"),
    }
    validate_record(record, f"{source} (entry {index})", need_answer=split != "test")
    return record


def prepare_aokvqa(
    aokvqa_dir: str | os.PathLike,
    coco_dir: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    rationales: str = "all",
    skip_bad: bool = False,
    limit: int | None = None,
    verify_images: bool = False,
    progress: bool = True,
) -> dict:
    """Write the records of one split to `out` (JSON lines). Returns counts: {"total", "written", "skipped"}.

    `limit` converts only the first N annotations; `verify_images` also decodes every image completely, on a
    pool of threads (slower than the default existence check).
    """
    if Path(out).is_dir():
        raise ValueError(f"out: {out} is a folder; give the .jsonl file to write")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if rationales not in RATIONALE_MODES:
        raise ValueError(f"rationales must be one of {RATIONALE_MODES}, got {rationales!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    source = annotation_path(aokvqa_dir, split)
    entries = read_annotations(source)
    if limit is not None:
        entries = entries[:limit]
    records, skipped, first_error = [], 0, None
    first_entry: dict[str, int] = {}
    for index, entry in enumerate(tqdm(entries, desc=f"A-OKVQA {split}", disable=not progress, leave=False)):
        qid = entry.get("question_id") if isinstance(entry, dict) else None
        if qid is not None:  # checked before the entry's own checks: a skipped first copy is still a copy
            key = str(qid)
            if key in first_entry:  # evaluation keys predictions by question id: a duplicate would be scored once
                raise DataError(f"{source}: question_id {qid!r} appears twice: entry {first_entry[key]} and entry {index}")
            first_entry[key] = index
        try:
            record = convert_entry(entry, split=split, coco_dir=Path(coco_dir), source=source, index=index,
                                   rationales=rationales)
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            first_error = first_error or str(e)
            continue
        records.append(record)
    if verify_images:
        problems = find_image_problems(r["image"] for r in records)
        bad = [r for r in records if r["image"] in problems]
        if bad and not skip_bad:
            r = bad[0]
            more = f" ({len(bad) - 1} more records have bad images)" if len(bad) > 1 else ""
            raise DataError(f"record {r['id']!r} (entry {first_entry[str(r['id'])]}): {problems[r['image']]}{more}")
        if bad:
            skipped += len(bad)
            first_error = first_error or f"record {bad[0]['id']!r}: {problems[bad[0]['image']]}"
            records = [r for r in records if r["image"] not in problems]
    if not records:
        raise DataError(f"no usable records in {source} ({skipped} skipped); nothing written to {out}")
    write_jsonl(out, records)
    if skipped:
        log.warning("skipped %d of %d A-OKVQA %s records (first: %s)", skipped, len(entries), split, first_error)
    log.info("wrote %d %s records to %s", len(records), split, out)
    return {"total": len(entries), "written": len(records), "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Convert A-OKVQA annotations and COCO images to JSON-lines records.")
    parser.add_argument("--aokvqa-dir", required=True, help="directory with aokvqa_v1p0_{split}.json")
    parser.add_argument("--coco-dir", required=True, help="directory with {split}2017/ image folders")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--rationales", default="all", choices=RATIONALE_MODES,
                        help="steps: the three rationales (all) or the first rationale's sentences")
    parser.add_argument("--skip-bad", action="store_true", help="skip records with a missing image or field")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N questions")
    parser.add_argument("--verify-images", action="store_true", help="also decode every image completely")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if Path(args.out).is_dir():  # checked before the conversion, not when the records are written
        parser.error(f"--out: {args.out} is a folder; give the .jsonl file to write")
    folder = Path(args.out).absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create the folder {folder}: {e.strerror or e}")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out: the folder {folder} is not writable")
    return prepare_aokvqa(
        args.aokvqa_dir,
        args.coco_dir,
        args.split,
        args.out,
        rationales=args.rationales,
        skip_bad=args.skip_bad,
        limit=args.limit,
        verify_images=args.verify_images,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # exit status 2, as the trainer's for bad data
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
