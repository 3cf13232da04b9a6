"""The staged curriculum: records -> token sequences with k*c latent thoughts in place of the first k steps.

A training sample (DESIGN.md):

    <img> <IMG_CONTEXT>*(tokens_per_tile * tiles) </img> question \\n
    <|start-latent|> <|latent|>*n <|end-latent|> step_{k+1} \\n ... step_m \\n ### answer <eos>

The pieces are tokenised separately and concatenated (as the original CoCoNuT does), so the latent and
marker ids are exact whatever the tokenizer merges. Labels are -100 on the image span, the question, the
markers and the latents; the targets are the remaining steps, `### answer` and eos. The markers are present
in CoCoNuT mode (also at stage 0, around zero latents) and absent with `cot`, `no_cot` and `no_thoughts`.

How many steps a stage removes and how many thoughts replace them (`num_latents_for_stage`) follows the
original's rules; text is tokenised once per data set, images are decoded lazily in `__getitem__` (so data
loader workers do it), and the number of image tokens comes from the image header alone.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from engine.data.images import ImageError
from engine.data.records import DataError, validate_record
from engine.utils.logging import get_logger
from engine.vocab import (
    END_LATENT_TOKEN,
    IGNORE_INDEX,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    LATENT_TOKEN,
    START_LATENT_TOKEN,
)

log = get_logger("data")

OVERLONG_POLICIES = ("drop", "error")


@dataclass
class CurriculumConfig:
    """The curriculum keys of the original CoCoNuT (same names and meaning) plus the length policy.

    - `c_thought`: thoughts per removed step.
    - `max_latent_stage`: the last stage that still removes one more step; later stages remove every step
      and keep `max_latent_stage * c_thought` thoughts.
    - `pad_latent_to_max`: keep the scheduled number of thoughts even for samples with fewer steps. Without it a
      sample with fewer steps than its stage gets one thought per step it has, in training as in generation
      (`num_latents_for_stage`); the original's training set gave it the stage's count while its generation
      gave it fewer, so its model met another number of thoughts at test time than it trained with.
    - `uniform_prob`: probability that a training sample uses a random stage instead of the scheduled one
      (not with `cot` or `no_cot`, whose sequences have no stage; the original's would drop steps there too).
    - `uniform_prob_from_stage` (not in the original, which mixes from stage 0): the first scheduled stage whose
      samples are mixed; earlier stages train as scheduled. 1 keeps stage 0 a plain chain of thought, so that
      the model learns the task's steps before any sample asks for thoughts (measured: benchmarks/RESULTS.md,
      "`make demo` on a 2-core CPU"); 0 mixes from the start as the original does.
    - `cot`: plain chain of thought (stage 0, no markers); `no_cot`: question -> answer (no steps, no markers).
    - `no_thoughts` (the paper's "w/o thought" ablation): the stages remove steps as usual but insert no
      thoughts and no markers in their place.
    - `no_curriculum` (the paper's "w/o curriculum" ablation): after stage 0 every epoch trains at the final
      stage (`stage_for_epoch`), and `uniform_prob` mixes in no other stage (that mixing is a curriculum too).
    - `coconut`: the model feeds thoughts back (does not change the sequences).
    - `max_length`: longest sequence (image tokens included); `overlong`: "drop" (counted, warned) or "error".
    """

    c_thought: int = 1
    max_latent_stage: int = 3
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    uniform_prob_from_stage: int = 1
    cot: bool = False
    no_cot: bool = False
    no_thoughts: bool = False
    no_curriculum: bool = False
    coconut: bool = True
    max_length: int = 2048
    overlong: str = "drop"

    def __post_init__(self):
        if not isinstance(self.c_thought, int) or self.c_thought < 1:
            raise ValueError(f"c_thought must be an integer >= 1, got {self.c_thought!r}")
        if not isinstance(self.max_latent_stage, int) or self.max_latent_stage < 0:
            raise ValueError(f"max_latent_stage must be an integer >= 0, got {self.max_latent_stage!r}")
        if not 0.0 <= float(self.uniform_prob) <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob!r}")
        if not isinstance(self.uniform_prob_from_stage, int) or self.uniform_prob_from_stage < 0:
            raise ValueError(f"uniform_prob_from_stage must be an integer >= 0, got {self.uniform_prob_from_stage!r}")
        modes = [name for name in ("cot", "no_cot", "no_thoughts") if getattr(self, name)]
        if len(modes) > 1:
            raise ValueError(f"cot, no_cot and no_thoughts are exclusive; set at most one, got {' and '.join(modes)}")
        if self.no_curriculum and (self.cot or self.no_cot):
            raise ValueError("no_curriculum changes the latent stages; it does not apply to cot or no_cot")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")

    @property
    def use_markers(self) -> bool:
        """`<|start-latent|>` / `<|end-latent|>` surround the thoughts unless in cot / no_cot / no_thoughts mode."""
        return not (self.cot or self.no_cot or self.no_thoughts)

    def final_stage(self, most_steps: int) -> int:
        """The first stage whose sequences every later stage repeats, for data whose longest sample has
        `most_steps` steps: `max_latent_stage` when no sample has more steps than that, else
        `max_latent_stage + 1` (the stage that also removes the steps beyond it). 0 with cot / no_cot."""
        if self.cot or self.no_cot:
            return 0
        return self.max_latent_stage if most_steps <= self.max_latent_stage else self.max_latent_stage + 1


def stage_for_epoch(epoch: int, epochs_per_stage: int, config: CurriculumConfig, final_stage: int | None = None) -> int:
    """The stage of `epoch`: `epoch // epochs_per_stage`, always 0 with `cot` or `no_cot`.

    With `final_stage` (`CurriculumConfig.final_stage` of the training data) the stage stops there: later
    epochs train on the same sequences, so they count as the final stage (an epoch budget past the
    curriculum lengthens the final stage, as the original's recipes do). With `no_curriculum`, every epoch
    after stage 0 is at `final_stage`, which must then be given.
    """
    if epochs_per_stage < 1:
        raise ValueError(f"epochs_per_stage must be >= 1, got {epochs_per_stage}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if config.cot or config.no_cot:
        return 0
    if final_stage is not None and final_stage < 0:
        raise ValueError(f"final_stage must be >= 0, got {final_stage}")
    stage = epoch // epochs_per_stage
    if config.no_curriculum:
        if final_stage is None:
            raise ValueError("no_curriculum needs final_stage: the stage every epoch after stage 0 trains at")
        return 0 if stage == 0 else final_stage
    return stage if final_stage is None else min(stage, final_stage)


def num_latents_for_stage(stage: int, num_steps: int, config: CurriculumConfig) -> tuple[int, int]:
    """`(steps_removed, n_latents)` for a sample with `num_steps` steps at `stage`.

    - `no_cot`: every step removed, no thoughts. `cot`: nothing removed (stage 0).
    - `no_thoughts`: the steps of the stage removed as below, no thoughts in their place.
    - stage <= max_latent_stage: the first `min(stage, num_steps)` steps are removed; each becomes
      `c_thought` thoughts (with `pad_latent_to_max`, `stage * c_thought` thoughts even when the sample has
      fewer steps).
    - stage > max_latent_stage: every step is removed and `max_latent_stage * c_thought` thoughts are used
      (`min(max_latent_stage, num_steps) * c_thought` for a shorter sample unless `pad_latent_to_max`).

    These are the original CoCoNuT's rules (its question-only data set), used here for training and
    generation alike, so a sample sees the same number of thoughts in both.
    """
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if config.no_cot:
        return num_steps, 0
    if config.cot:
        return 0, 0
    top = config.max_latent_stage
    per_step = 0 if config.no_thoughts else config.c_thought
    if stage > top:
        thoughts = top if config.pad_latent_to_max else min(top, num_steps)
        return num_steps, thoughts * per_step
    thoughts = stage if config.pad_latent_to_max else min(stage, num_steps)
    return min(stage, num_steps), thoughts * per_step


def max_steps(records: Sequence[dict]) -> int:
    """The largest number of steps of any record (0 for no records)."""
    return max((len(r.get("steps") or []) for r in records), default=0)


def check_stages(records: Sequence[dict], config: CurriculumConfig) -> None:
    """Refuse a curriculum that asks for more latent stages than any sample has steps to replace."""
    if config.cot or config.no_cot:
        return
    most = max_steps(records)
    if config.max_latent_stage > most:
        raise DataError(
            f"max_latent_stage={config.max_latent_stage} is larger than the largest number of steps in the data "
            f"({most}); stages above {most} would have no step left to replace. Lower max_latent_stage to <= {most}."
        )


# ---------------------------------------------------------------------- images and tokens
@functools.lru_cache(maxsize=1 << 17)
def image_size(path: str) -> tuple[int, int]:
    """`(width, height)` from the image header only (no decoding); a bad file names itself."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read the image header of {path}: {e}") from e


def _token_id(token: str, vocab: dict) -> int:
    if token not in vocab:
        raise DataError(
            f"the tokenizer has no {token!r} token; load it with engine.model.load_model, which adds the latent "
            "tokens (InternVL tokenizers carry the image tokens)"
        )
    return int(vocab[token])


@dataclass(frozen=True)
class SpecialIds:
    image_start: int
    image_context: int
    image_end: int
    start_latent: int
    latent: int
    end_latent: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        vocab = tokenizer.get_vocab()
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; the answer must end with one")
        return cls(
            image_start=_token_id(IMAGE_START_TOKEN, vocab),
            image_context=_token_id(IMAGE_CONTEXT_TOKEN, vocab),
            image_end=_token_id(IMAGE_END_TOKEN, vocab),
            start_latent=_token_id(START_LATENT_TOKEN, vocab),
            latent=_token_id(LATENT_TOKEN, vocab),
            end_latent=_token_id(END_LATENT_TOKEN, vocab),
            eos=int(tokenizer.eos_token_id),
        )


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` for a tokenizer that starts every text it encodes with its bos token (Llama's), else ``[]``
    (Qwen2's, InternVL3's language models, write none): the original CoCoNuT encodes its questions with the
    tokenizer's own special tokens. The sequence starts with it, before the image."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, in one batched tokenizer call.

    Text that spells a special token (`<IMG_CONTEXT>`, `<|latent|>`, `<|endoftext|>`) stays text: parsed as the
    token, it would become an image slot without an image, a thought the data set does not count, or an eos
    in the middle of a target.
    """
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def tokenize_records(tokenizer, records: Sequence[dict]) -> list[list[int]]:
    """The token ids of every record's text pieces, in order: its question (with its newline), each step (with its
    newline), then ``### answer``; what `CurriculumDataset` builds its sequences from."""
    texts: list[str] = []
    for record in records:
        texts.append(record["question"] + "\n")
        texts.extend(step + "\n" for step in record.get("steps") or [])
        texts.append("### " + record["answer"])
    return tokenize_texts(tokenizer, texts)


class _ImageTextDataset(Dataset):
    """Shared by the two data sets: tile counts from image headers and lazy image loading."""

    needs_answer = True  # the records' answers are trained on (QuestionDataset: generation needs none)

    def __init__(self, records: Sequence[dict], tokenizer, image_processor, config: CurriculumConfig, stage: int):
        if not isinstance(config, CurriculumConfig):
            raise TypeError(f"config must be a CurriculumConfig, got {type(config).__name__}")
        if stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}")
        self.records = list(records)
        for index, record in enumerate(self.records):  # as load_records checks a file: a string of steps would be
            # tokenised as one step per character, a missing field fail in a worker without the record's id
            validate_record(record, f"{type(self).__name__} record {index}", need_answer=self.needs_answer)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.stage = int(stage)
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self.bos = bos_prefix(tokenizer)

    def num_tiles(self, record: dict) -> int:
        """Tiles the image of `record` will be cut into (0 for a text-only record), from its header."""
        path = record.get("image")
        if path is None:
            return 0
        if self.image_processor.max_tiles == 1:
            return 1
        try:
            width, height = image_size(str(path))
        except ImageError as e:  # check_images=false: the first read of the file names its record
            raise ImageError(f"record {record['id']!r}: {e}") from e
        return self.image_processor.num_tiles_for_size(height, width)

    def image_span(self, tiles: int) -> list[int]:
        """What comes before the question: the bos token where the tokenizer writes one (`bos_prefix`), then the
        image's ``<img> <IMG_CONTEXT>*n </img>`` (nothing for a text-only record)."""
        if tiles == 0:
            return list(self.bos)
        n = self.image_processor.num_image_tokens(tiles)
        return self.bos + [self.ids.image_start] + [self.ids.image_context] * n + [self.ids.image_end]

    def span_length(self, tiles: int) -> int:
        return len(self.bos) + (self.image_processor.num_image_tokens(tiles) + 2 if tiles else 0)

    def load_pixels(self, record: dict, tiles: int) -> torch.Tensor | None:
        """Decode and tile the record's image: (tiles, 3, H, W); ImageError names a bad file."""
        path = record.get("image")
        if path is None:
            return None
        try:
            processed = self.image_processor(path)
        except ImageError as e:
            raise ImageError(f"record {record['id']!r}: {e}") from e
        if processed.num_tiles != tiles:
            raise ImageError(
                f"{path}: the image processor made {processed.num_tiles} tiles but its header size gave {tiles} "
                "(was the file replaced while the data set was in use?)"
            )
        return processed.pixel_values

    def markers(self, n_latents: int) -> tuple[list[int], list[int]]:
        """(start ids, end ids) around the thoughts: the markers in CoCoNuT mode, nothing otherwise."""
        thoughts = [self.ids.latent] * n_latents
        if self.config.use_markers:
            return [self.ids.start_latent] + thoughts, [self.ids.end_latent]
        return thoughts, []


class CurriculumDataset(_ImageTextDataset):
    """Training sequences of one curriculum stage.

    `__getitem__(i)` returns `{"input_ids": (T,) long, "labels": (T,) long, "pixel_values": (tiles, 3, H, W)
    float or None (text-only record), "num_latents": int, "index": int (position in `records`)}`.
    With `uniform_prob > 0`, a sample's stage is drawn deterministically from `(seed, epoch, index)`.
    Samples longer than `config.max_length` are dropped (`num_dropped`, `dropped_ids`) or raise DataError.
    """

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer,
        image_processor,
        config: CurriculumConfig,
        stage: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        tokens: list[list[int]] | None = None,
        warn_dropped: bool = True,
    ):
        super().__init__(records, tokenizer, image_processor, config, stage)
        self.seed = int(seed)
        self.epoch = int(epoch)

        # The records' text as `tokenize_records` gives it: one batched tokenizer call, or the caller's (a trainer
        # tokenises its records once for every epoch)
        if tokens is None:
            tokens = tokenize_records(tokenizer, self.records)
        elif len(tokens) != sum(len(r.get("steps") or []) + 2 for r in self.records):
            raise ValueError("tokens must be tokenize_records(tokenizer, records) of these records")
        pieces = iter(tokens)

        self._text: list[np.ndarray] = []  # question .. eos, without the image span
        self._n_prompt: list[int] = []  # unlabelled text tokens: question, markers, thoughts
        self._tiles: list[int] = []
        self._latents: list[int] = []
        self._index: list[int] = []
        self.sample_stages: list[int] = []
        self.dropped_ids: list = []
        longest_dropped = 0
        for i, record in enumerate(self.records):
            question = next(pieces)
            steps = [next(pieces) for _ in record.get("steps") or []]
            answer = next(pieces) + [self.ids.eos]
            sample_stage = self.stage_of(i, len(steps))
            removed, n_latents = num_latents_for_stage(sample_stage, len(steps), config)
            before, after = self.markers(n_latents)
            prompt = question + before + after
            target = [t for step in steps[removed:] for t in step] + answer
            tiles = self.num_tiles(record)
            length = self.span_length(tiles) + len(prompt) + len(target)
            if length > config.max_length:
                if config.overlong == "error":
                    raise DataError(
                        f"record {record['id']!r}: its sequence at stage {sample_stage} has {length} tokens "
                        f"({self.span_length(tiles) - len(self.bos)} of them image tokens), more than "
                        f"max_length={config.max_length}; "
                        "raise max_length or set overlong='drop'"
                    )
                self.dropped_ids.append(record["id"])
                longest_dropped = max(longest_dropped, length)
                continue
            self._text.append(np.asarray(prompt + target, dtype=np.int64))
            self._n_prompt.append(len(prompt))
            self._tiles.append(tiles)
            self._latents.append(n_latents)
            self._index.append(i)
            self.sample_stages.append(sample_stage)
        if self.dropped_ids and warn_dropped:
            log.warning(
                "dropped %d of %d samples longer than max_length=%d at stage %d (longest %d tokens)",
                len(self.dropped_ids), len(self.records), config.max_length, self.stage, longest_dropped,
            )

    def stage_of(self, index: int, num_steps: int) -> int:
        """The stage sample `index` trains at: the scheduled one, or with probability `uniform_prob` one drawn
        uniformly from 0..num_steps (as the original CoCoNuT) once the scheduled stage is at least
        `uniform_prob_from_stage`, seeded by (seed, epoch, index) only. Never with `no_curriculum`: its ablation
        trains on no intermediate stage."""
        config = self.config
        if (config.cot or config.no_cot or config.no_curriculum or config.uniform_prob <= 0.0
                or self.stage < config.uniform_prob_from_stage):
            return self.stage
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        if rng.random() < config.uniform_prob:
            return rng.randint(0, num_steps)
        return self.stage

    @property
    def num_dropped(self) -> int:
        return len(self.dropped_ids)

    @property
    def lengths(self) -> list[int]:
        """Sequence length of every kept sample (image tokens included), e.g. for a length-grouped sampler."""
        return [self.span_length(t) + len(x) for t, x in zip(self._tiles, self._text)]

    @property
    def num_latents(self) -> list[int]:
        return list(self._latents)

    def __len__(self) -> int:
        return len(self._text)

    def __getitem__(self, i: int) -> dict:
        index = self._index[i]
        record = self.records[index]
        tiles = self._tiles[i]
        span = self.image_span(tiles)
        text = torch.from_numpy(self._text[i])
        input_ids = torch.cat([torch.tensor(span, dtype=torch.long), text])
        labels = input_ids.clone()
        labels[: len(span) + self._n_prompt[i]] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.load_pixels(record, tiles),
            "num_latents": self._latents[i],
            "index": index,
        }


class QuestionDataset(_ImageTextDataset):
    """Generation prompts of one stage: image span, question, `\\n` and the stage's thoughts.

    The thoughts follow the training rules (`num_latents_for_stage`, no `uniform_prob`). A record whose steps
    are not known (`steps: null`, a test split without rationales) is taken to have `max_latent_stage` of them,
    so it gets the stage's usual thoughts; one with no steps (`[]`) gets none, as in training. `__getitem__(i)`
    returns `{"input_ids": (T,) long, "pixel_values": (tiles, 3, H, W) or None, "num_latents": int, "record": dict,
    "index": int}`.
    """

    needs_answer = False

    def __init__(self, records: Sequence[dict], tokenizer, image_processor, config: CurriculumConfig, stage: int):
        super().__init__(records, tokenizer, image_processor, config, stage)
        questions = tokenize_texts(tokenizer, [r["question"] + "\n" for r in self.records])
        self._text: list[np.ndarray] = []
        self._tiles: list[int] = []
        self._latents: list[int] = []
        stepless = 0
        _, usual = num_latents_for_stage(self.stage, config.max_latent_stage, config)  # a record's with steps unknown
        for record, question in zip(self.records, questions):
            steps = record["steps"]
            n_latents = usual if steps is None else num_latents_for_stage(self.stage, len(steps), config)[1]
            stepless += steps == [] and n_latents < usual
            before, after = self.markers(n_latents)
            self._text.append(np.asarray(question + before + after, dtype=np.int64))
            self._tiles.append(self.num_tiles(record))
            self._latents.append(n_latents)
        if stepless:
            log.warning(
                "%d of %d records have no steps ([]), so they get no thoughts at stage %d; write steps: null for "
                "records whose steps are not known (a test split) to give them the stage's thoughts",
                stepless, len(self.records), self.stage,
            )

    @property
    def num_latents(self) -> list[int]:
        return list(self._latents)

    @property
    def lengths(self) -> list[int]:
        """Prompt length of every record (image tokens included)."""
        return [self.span_length(t) + len(x) for t, x in zip(self._tiles, self._text)]

    def __len__(self) -> int:
        return len(self._text)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        tiles = self._tiles[i]
        span = torch.tensor(self.image_span(tiles), dtype=torch.long)
        return {
            "input_ids": torch.cat([span, torch.from_numpy(self._text[i])]),
            "pixel_values": self.load_pixels(record, tiles),
            "num_latents": self._latents[i],
            "record": record,
            "index": i,
        }
