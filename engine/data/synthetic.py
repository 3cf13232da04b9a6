"""The built-in data set: a synthetic multimodal multi-hop task (a walk on a board of coloured cells).

Each image is a `grid x grid` board of coloured cells. The question names a start corner and a walk of
`hops` moves; the answer is the colour of the cell where the walk ends:

    question: Start at the top-left cell. Move right, down, right. What colour is the cell?
    steps:    right: row 0, column 1, blue
              down: row 1, column 1, red
              right: row 1, column 2, green
    answer:   green

Each step depends on the one before (the position), and every colour can only be read from the pixels: the
question alone says nothing about the colours, the image alone nothing about the walk. The steps are what
latent thoughts learn to compress. The text uses a handful of words in a fixed pattern, so a tiny model can
learn the task from a few thousand samples.

With the tiny model's image processing (224 px tiles, 28 px patches, pixel shuffle 0.5 -> 4 x 4 visual
tokens) the default 4 x 4 board of 56 px cells puts exactly one visual token on each cell.

Generation is deterministic per seed (same bytes), fast (PIL rectangle fills) and atomic: the data set is
built in a temporary sibling directory and renamed into place. `ensure_synthetic` reuses a data set only
when its recorded settings (`synthetic.json`) are the ones asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from engine.data.records import DataError, write_jsonl
from engine.utils.io import atomic_directory, atomic_write_json
from engine.utils.logging import get_logger

log = get_logger("data.synthetic")

# Colour names that are single tokens of the tiny tokenizer, with well-separated RGB values.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (240, 220, 40)),
    ("purple", (140, 60, 180)),
    ("orange", (245, 140, 20)),
    ("white", (245, 245, 245)),
    ("pink", (245, 150, 200)),
    ("brown", (120, 70, 30)),
    ("gray", (128, 128, 128)),
    ("cyan", (40, 215, 225)),
)
MOVES: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUM_CHOICES = 4
NUM_DIRECT_ANSWERS = 10
META_FILE = "synthetic.json"

_QUESTION = re.compile(
    r"Start at the (top|bottom)-(left|right) cell\. Move ((?:up|down|left|right)(?:, (?:up|down|left|right))*)\. "
    r"What colour is the cell\?"
)


def corner_cell(corner: str, grid: int) -> tuple[int, int]:
    vertical, horizontal = corner.split("-")
    return (0 if vertical == "top" else grid - 1, 0 if horizontal == "left" else grid - 1)


def question_text(corner: str, moves: Sequence[str]) -> str:
    return f"Start at the {corner} cell. Move {', '.join(moves)}. What colour is the cell?"


def step_text(move: str, row: int, column: int, colour: str) -> str:
    return f"{move}: row {row}, column {column}, {colour}"


def random_walk(rng: random.Random, start: tuple[int, int], hops: int, grid: int) -> list[str]:
    """`hops` moves that stay on the board and never step straight back."""
    row, col = start
    moves: list[str] = []
    for _ in range(hops):
        options = [
            m for m, (dr, dc) in MOVES.items()
            if 0 <= row + dr < grid and 0 <= col + dc < grid and (not moves or m != OPPOSITE[moves[-1]])
        ]
        move = rng.choice(options)
        moves.append(move)
        row, col = row + MOVES[move][0], col + MOVES[move][1]
    return moves


def walk_cells(start: tuple[int, int], moves: Sequence[str]) -> list[tuple[int, int]]:
    """The cell reached after each move."""
    row, col = start
    cells = []
    for move in moves:
        row, col = row + MOVES[move][0], col + MOVES[move][1]
        cells.append((row, col))
    return cells


def render_board(board: Sequence[Sequence[int]], image_size: int) -> Image.Image:
    """The board as an RGB image: cell (r, c) fills [c*S/g, (c+1)*S/g) x [r*S/g, (r+1)*S/g)."""
    grid = len(board)
    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    edges = [i * image_size // grid for i in range(grid + 1)]
    for r, row in enumerate(board):
        for c, colour in enumerate(row):
            draw.rectangle((edges[c], edges[r], edges[c + 1] - 1, edges[r + 1] - 1), fill=PALETTE[colour][1])
    return img


def _pixels(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}")
    return array


def read_cell_colour(pixels: np.ndarray, row: int, column: int, grid: int) -> str:
    """The palette colour nearest to the centre pixel of a cell."""
    height, width = pixels.shape[:2]
    y = int((row + 0.5) * height / grid)
    x = int((column + 0.5) * width / grid)
    rgb = pixels[y, x].astype(np.int64)
    distances = [int(((rgb - np.asarray(value)) ** 2).sum()) for _, value in PALETTE]
    return PALETTE[int(np.argmin(distances))][0]


def parse_question(question: str) -> tuple[str, list[str]]:
    """`(corner, moves)` of a question of the task; ValueError for any other text."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a question of the synthetic task: {question!r}")
    return f"{match.group(1)}-{match.group(2)}", match.group(3).split(", ")


def question_cells(question: str, grid: int = 4) -> list[tuple[int, int]]:
    """The cell `(row, column)` that each step of the question's walk reaches (step k -> entry k - 1): what
    the k-th reasoning step, or the thought that replaces it, has to look at in the image."""
    corner, moves = parse_question(question)
    return walk_cells(corner_cell(corner, grid), moves)


def solve(image, question: str, *, grid: int = 4) -> tuple[list[str], str]:
    """Steps and answer of a question, computed from the image pixels and the question text alone."""
    corner, moves = parse_question(question)
    start = corner_cell(corner, grid)
    pixels = _pixels(image)
    steps, colour = [], None
    for move, (row, col) in zip(moves, walk_cells(start, moves)):
        if not (0 <= row < grid and 0 <= col < grid):
            raise ValueError(f"the walk of {question!r} leaves the {grid}x{grid} board")
        colour = read_cell_colour(pixels, row, col, grid)
        steps.append(step_text(move, row, col, colour))
    return steps, colour


def answer_from_image(image, question: str, *, grid: int = 4) -> str:
    """The answer, from the image (path, PIL image or (H, W, 3) array) and the question text alone."""
    return solve(image, question, grid=grid)[1]


def _make_record(rng: random.Random, split: str, i: int, *, grid: int, hops: int, num_colors: int, random_start: bool):
    board = [[rng.randrange(num_colors) for _ in range(grid)] for _ in range(grid)]
    corner = rng.choice(CORNERS) if random_start else "top-left"
    start = corner_cell(corner, grid)
    moves = random_walk(rng, start, hops, grid)
    cells = walk_cells(start, moves)
    names = [PALETTE[board[r][c]][0] for r, c in cells]
    answer = names[-1]
    active = [PALETTE[k][0] for k in range(num_colors) if PALETTE[k][0] != answer]
    inactive = [name for name, _ in PALETTE[num_colors:]]
    distractors = rng.sample(active, min(NUM_CHOICES - 1, len(active)))
    distractors += inactive[: NUM_CHOICES - 1 - len(distractors)]
    choices = [answer] + distractors
    rng.shuffle(choices)
    record = {
        "id": f"{split}-{i:06d}",
        "image": f"images/{split}_{i:06d}.png",
        "question": question_text(corner, moves),
        "steps": [step_text(m, r, c, name) for m, (r, c), name in zip(moves, cells, names)],
        "answer": answer,
        "choices": choices,
        "correct_choice_idx": choices.index(answer),
        "direct_answers": [answer] * NUM_DIRECT_ANSWERS,
        "difficult_direct_answer": False,
    }
    key = (tuple(map(tuple, board)), corner, tuple(moves))
    return record, board, key


@dataclass(frozen=True)
class SyntheticSettings:
    """The settings of the task: the `synthetic:` keys of a training config and the arguments of
    `generate_synthetic`. `synthetic.json` records them beside the data they made."""

    n_train: int = 2000
    n_val: int = 200
    seed: int = 0
    hops: int = 3
    grid: int = 4
    image_size: int = 224
    num_colors: int = 4
    random_start: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = bool if f.type in (bool, "bool") else int
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"{f.name} must be {'true or false' if want is bool else 'an integer'}, got {value!r}")
        if self.n_train < 0 or self.n_val < 0:
            raise ValueError(f"n_train and n_val must be >= 0, got {self.n_train} and {self.n_val}")
        if self.n_train + self.n_val == 0:
            raise ValueError("n_train + n_val must be > 0")
        if self.hops < 1:
            raise ValueError(f"hops must be >= 1, got {self.hops}")
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if not 2 <= self.num_colors <= len(PALETTE):
            raise ValueError(f"num_colors must be in [2, {len(PALETTE)}], got {self.num_colors}")
        if self.image_size < self.grid:
            raise ValueError(f"image_size must be >= grid ({self.grid}), got {self.image_size}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "SyntheticSettings":
        """Settings from a mapping of some of the keys; an unknown key is an error naming the valid ones."""
        values = dict(values or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in values if k not in valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_settings(out_dir: str | os.PathLike) -> SyntheticSettings | None:
    """The settings recorded in `<out_dir>/synthetic.json`, or None when there is no readable record."""
    meta = Path(out_dir) / META_FILE
    try:
        data = json.loads(meta.read_text())
        return SyntheticSettings.from_dict({k: v for k, v in data.items() if k != "task"})
    except (OSError, ValueError, TypeError):
        return None


def ensure_synthetic(out_dir: str | os.PathLike, settings: SyntheticSettings) -> bool:
    """Make `out_dir` hold the task generated with `settings`: reused when `synthetic.json` records exactly these
    settings and both files are there, generated (replacing an older synthetic set) otherwise. Returns whether
    it was generated."""
    out = Path(out_dir)
    recorded = read_settings(out)
    if recorded == settings and (out / "train.jsonl").is_file() and (out / "val.jsonl").is_file():
        return False
    if recorded is not None and recorded != settings:
        changed = {k: (v, getattr(settings, k)) for k, v in recorded.to_dict().items() if getattr(settings, k) != v}
        log.info("the synthetic data in %s was made with other settings (%s); generating it again", out,
                 ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
    generate_synthetic(out, **settings.to_dict())
    return True


def _check_replaceable(out: Path) -> None:
    """Only a missing directory, an empty one or an older synthetic data set may be replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; cannot write the synthetic data set there")
    if any(out.iterdir()) and not (out / META_FILE).is_file():
        raise DataError(
            f"{out} is a non-empty directory that holds no synthetic data set ({META_FILE}); refusing to replace it"
        )


def generate_synthetic(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 2000,
    n_val: int = 200,
    seed: int = 0,
    hops: int = 3,
    grid: int = 4,
    image_size: int = 224,
    num_colors: int = 4,
    random_start: bool = True,
    progress: bool = True,
) -> dict:
    """Write `train.jsonl`, `val.jsonl`, `images/*.png` and `synthetic.json` (the settings) under `out_dir`, with a
    progress bar (``progress``: where stderr is a terminal).

    Returns `{"train": path, "val": path, "image_dir": path, "meta": path, "n_train": ..., "n_val": ...,
    "seconds": ...}`. Validation samples never repeat a training sample (same board, start and walk).
    """
    settings = SyntheticSettings(n_train=n_train, n_val=n_val, seed=seed, hops=hops, grid=grid,
                                 image_size=image_size, num_colors=num_colors, random_start=random_start)
    if image_size % grid:
        log.warning("image_size %d is not a multiple of grid %d: cells will not align with patches", image_size, grid)

    start_time = time.perf_counter()
    out = Path(out_dir).absolute()
    _check_replaceable(out)
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        seen: set = set()
        bar = tqdm(total=n_train + n_val, desc="synthetic task", unit="sample", leave=False,
                   disable=not progress or not sys.stderr.isatty())
        for split, count in (("train", n_train), ("val", n_val)):
            rng = random.Random(f"synthetic:{seed}:{split}")
            records, attempts = [], 0
            while len(records) < count:
                attempts += 1
                if attempts > 50 * count + 1000:
                    raise ValueError(
                        f"cannot find {count} distinct {split} samples with grid={grid}, hops={hops}, "
                        f"num_colors={num_colors}: too few distinct boards and walks; use fewer samples or a larger task"
                    )
                record, board, key = _make_record(
                    rng, split, len(records), grid=grid, hops=hops, num_colors=num_colors, random_start=random_start
                )
                if key in seen:
                    continue
                seen.add(key)
                render_board(board, image_size).save(tmp / record["image"], format="PNG")
                records.append(record)
                bar.update(1)
            write_jsonl(tmp / f"{split}.jsonl", records)
        bar.close()
        atomic_write_json(tmp / META_FILE, {"task": "grid-walk", **settings.to_dict()})
    seconds = time.perf_counter() - start_time
    log.info("synthetic task: %d train + %d val samples in %s (%.1f s)", n_train, n_val, out, seconds)
    return {
        "train": out / "train.jsonl",
        "val": out / "val.jsonl",
        "image_dir": out / "images",
        "meta": out / META_FILE,
        "n_train": n_train,
        "n_val": n_val,
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Generate the synthetic grid-walk task (images + JSON-lines records).")
    parser.add_argument("--out", required=True, help="output directory (replaced if it holds an older synthetic set)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hops", type=int, default=3, help="moves per question (= reasoning steps)")
    parser.add_argument("--grid", type=int, default=4, help="cells per side")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-colors", type=int, default=4, help=f"colours in use, 2..{len(PALETTE)}")
    parser.add_argument("--fixed-start", action="store_true", help="always start at the top-left cell")
    args = parser.parse_args(argv)
    return generate_synthetic(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        hops=args.hops,
        grid=args.grid,
        image_size=args.image_size,
        num_colors=args.num_colors,
        random_start=not args.fixed_start,
    )


if __name__ == "__main__":
    main()
