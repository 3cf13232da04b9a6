"""Batch validation and the pass schedule of the causal iterative forward.

The schedule cuts the sequence at every position that holds a `<|latent|>` in any row. Pass 0 covers
`[0, r1)`; every later pass starts at a latent position, whose input (for the rows that have a latent there)
is the last hidden state of the previous pass. So no position is ever computed before the thoughts it
depends on exist, whatever the batch layout. On a batch aligned by the collator (first latent at the same
column in every row, latents contiguous) the passes are: the prefix, one single-position pass per latent but
the last, and a final pass from the last latent to the end: `max_latents + 1` passes.

Everything here runs once per batch on a host copy of the ids (one device-to-host transfer), so the pass
loop itself never synchronises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.utils.device import host_values


class BatchLayoutError(ValueError):
    """A batch that the latent forward cannot run; the message names the row and the constraint."""


@dataclass(frozen=True)
class PassSchedule:
    """Chunks `[starts[i], starts[i+1])` of the sequence, one language-model pass each."""

    starts: tuple[int, ...]  # chunk starts; starts[0] == 0; the others are latent positions
    seq_len: int
    latent_positions: tuple[int, ...]  # sorted unique columns holding a latent in some row
    max_latents_per_row: int
    lockstep_starts: tuple[int, ...] = ()  # extra cuts made by `with_min_passes` (not latents)
    latent_columns_real: bool = False  # every row holds a real token (attention mask 1) at every latent column
    real_prefix_columns: int = 0  # the columns [0, this) are real in every row (no padding there), read on the host

    @property
    def num_passes(self) -> int:
        return len(self.starts)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        ends = list(self.starts[1:]) + [self.seq_len]
        return list(zip(self.starts, ends))

    def pass_name(self, index: int) -> str:
        """NVTX/profiler name of pass `index`: prefix, latent_pass_k (k from 1), final."""
        if self.num_passes == 1:
            return "coconut/full_pass"
        if index == 0:
            return "coconut/prefix_pass"
        if self.starts[index] in self.lockstep_starts:
            return "coconut/lockstep_pass"
        if index == self.num_passes - 1:
            return "coconut/final_pass"
        latent_number = sum(1 for start in self.starts[1 : index + 1] if start not in self.lockstep_starts)
        return f"coconut/latent_pass_{latent_number}"

    @property
    def one_position_passes(self) -> int:
        """M when passes 1..M each compute one column and can run as one static-shape block, else 0.

        That is the aligned layout: latents in contiguous columns, every row real there, no lockstep cuts.
        """
        latents = self.latent_positions
        if self.lockstep_starts or len(latents) < 2 or not self.latent_columns_real:
            return 0
        if latents[-1] - latents[0] != len(latents) - 1:
            return 0
        return len(latents) - 1

    def with_min_passes(self, min_passes: int) -> "PassSchedule":
        """The same computation in at least `min_passes` passes (as many as the sequence allows).

        Extra cuts go at the last non-latent positions: a chunk split in two runs the same positions through
        the same KV cache, so outputs and gradients are unchanged (causal attention over the cache), while
        the rank issues the same number of real language-model passes, forward and backward, as a rank with
        more latents. That is what keeps ZeRO-3's per-module parameter gathers in lockstep.
        """
        missing = min_passes - self.num_passes
        if missing <= 0:
            return self
        taken = set(self.starts)
        extra = [p for p in range(self.seq_len - 1, 0, -1) if p not in taken][:missing]
        return dataclasses.replace(
            self,
            starts=tuple(sorted((*self.starts, *extra))),
            lockstep_starts=tuple(sorted((*self.lockstep_starts, *extra))),
        )


def build_schedule(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    latent_id: int,
    image_token_id: int,
    tokens_per_tile: int,
    num_tiles: int | None,
) -> tuple[PassSchedule, list[int]]:
    """Validate a batch and return its pass schedule and the number of image tiles of each row.

    `num_tiles` is `pixel_values.shape[0]` (None when no pixel_values were given).
    """
    if input_ids.dim() != 2:
        raise BatchLayoutError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise BatchLayoutError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
        )
    ids = host_values(input_ids)  # the batch's host copy where the trainer kept one: no wait for the device
    mask = host_values(attention_mask).bool()
    batch, seq_len = ids.shape
    if seq_len == 0:
        raise BatchLayoutError("input_ids has no positions (seq_len 0)")

    latent = ids == latent_id
    image = ids == image_token_id

    # --- images: each row's image-token count must be a whole number of tiles, and the tiles must add up.
    image_counts = image.sum(1).tolist()
    tiles_per_row = []
    for row, count in enumerate(image_counts):
        if count % tokens_per_tile:
            raise BatchLayoutError(
                f"row {row} has {count} <IMG_CONTEXT> tokens, not a multiple of the {tokens_per_tile} tokens "
                "one image tile takes"
            )
        tiles_per_row.append(count // tokens_per_tile)
    wanted_tiles = sum(tiles_per_row)
    if num_tiles is None and wanted_tiles:
        raise BatchLayoutError(f"the batch has {wanted_tiles} tiles' worth of <IMG_CONTEXT> tokens but no pixel_values")
    if num_tiles is not None and num_tiles != wanted_tiles:
        per_row = ", ".join(f"row {r}: {t}" for r, t in enumerate(tiles_per_row))
        raise BatchLayoutError(
            f"pixel_values holds {num_tiles} tiles but the rows' <IMG_CONTEXT> tokens ask for {wanted_tiles} "
            f"({per_row}; {tokens_per_tile} tokens per tile)"
        )

    # --- latents: each needs a real token right before it, on a real position, after the row's image. Checked
    # as whole-batch masks (a few operators, not several per latent: this runs on the host before every forward);
    # the first offending latent in row-major order is the one named.
    prev_real = torch.zeros_like(mask)
    prev_real[:, 1:] = mask[:, :-1]
    no_source, masked = latent & ~prev_real, latent & ~mask
    bad = no_source | masked
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        col = int(bad[row].nonzero()[0])
        if no_source[row, col]:
            raise BatchLayoutError(
                f"row {row}: <|latent|> at position {col} has no real token before it to take its thought from "
                "(a latent cannot be a row's first token)"
            )
        raise BatchLayoutError(f"row {row}: <|latent|> at position {col} is masked out by attention_mask (padding)")
    if bool(image.any()) and bool(latent.any()):
        columns = torch.arange(seq_len)
        first = torch.where(image, columns, seq_len).amin(1)  # each row's first and last image column
        last = torch.where(image, columns, -1).amax(1)
        inside = latent & (columns >= first[:, None]) & (columns <= last[:, None])
        if bool(inside.any()):
            row = int(inside.any(1).nonzero()[0])
            raise BatchLayoutError(
                f"row {row}: <|latent|> at position {int(inside[row].nonzero()[0])} lies inside the image span "
                f"[{int(first[row])}, {int(last[row])}]; thoughts must come after the image tokens"
            )

    latent_positions = tuple(latent.any(0).nonzero().flatten().tolist())
    schedule = PassSchedule(
        starts=(0, *latent_positions),
        seq_len=seq_len,
        latent_positions=latent_positions,
        max_latents_per_row=int(latent.sum(1).max()) if batch else 0,
        latent_columns_real=bool(mask[:, list(latent_positions)].all()) if latent_positions else False,
        real_prefix_columns=real_prefix_columns(mask),
    )
    return schedule, tiles_per_row


def real_prefix_columns(mask: torch.Tensor) -> int:
    """How many leading columns of the (B, T) host ``mask`` are real in every row: a pass over columns [0, end)
    needs no padding mask when ``end`` is at most this."""
    padded = (~mask.bool().all(0)).nonzero()
    return int(padded[0]) if len(padded) else mask.shape[1]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def feed_thoughts(inputs: torch.Tensor, is_latent: torch.Tensor, prev_last: torch.Tensor) -> torch.Tensor:
    """The continuous-thought feedback, in one place: the input of a pass's first column is, at a latent, the last
    hidden state the previous pass produced (``prev_last``), elsewhere the token or image embedding ``inputs``.

    inputs (..., H), is_latent (...) bool, prev_last (..., H); only a pass's first column can hold a latent.
    """
    return torch.where(is_latent[..., None], prev_last.to(inputs.dtype), inputs)
