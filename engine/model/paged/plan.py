"""The host-side plan of one paged generate call: which rows share which prefix blocks, what each row computes.

Rows whose pass-0 prefix starts with the same image and tokens share its full blocks (keyed by a chain hash seeded
with the image's pixel digest) and skip computing them; a row identical to an earlier row (same tokens, same
pixels: n samples of one question) computes nothing before decoding: it forks the earlier row's blocks, its
partial last block copied on the first write. Only positions inside pass 0 (and never the last one before the
first latent column, whose hidden state feeds a thought) are shared, so every shared block is written by its owner
in the same layer pass in which the other rows first read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.model.generation import positions_used
from engine.model.paged.cache import PagedKVCache, image_digest
from engine.model.tiles import fingerprints
from engine.utils.device import to_device


@dataclass
class PromptPlan:
    """Host-side layout of one generate call."""

    positions: torch.Tensor  # (B, T) long, cpu: position id of every column (0 on left padding)
    compute: torch.Tensor  # (B, T) bool, cpu: columns this row computes (real, not shared, not a duplicate)
    lengths: list[int]  # real prompt length of every row
    source: torch.Tensor  # (B,) long, device: the row whose prompt results this row reuses (itself if none)
    has_duplicates: bool
    shared_tokens: list[int] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def image_keys(pixel_values: torch.Tensor | None, tiles_per_row: list[int]) -> list[bytes]:
    """Per row, a key of its image content for prefix sharing: the sha256 pixel digest (`image_digest`) of every
    image that several rows show, a row-unique key for an image no other row shows (nothing to share with: this
    skips hashing, and copying to the host, the pixels of a batch of distinct images), b"" for no image.

    Candidates are found by the tiles' fingerprints (`engine.model.tiles`) and confirmed exactly by the digest, so a
    fingerprint collision can only cost a hash, never a wrong share.
    """
    rows = len(tiles_per_row)
    keys = [b""] * rows
    if pixel_values is None or not any(tiles_per_row):
        return keys
    prints = fingerprints(pixel_values)  # (tiles, 2): one small transfer
    spans, start = [], 0
    for tiles in tiles_per_row:
        spans.append((start, start + tiles))
        start += tiles
    groups: dict[tuple, list[int]] = {}
    for b, (lo, hi) in enumerate(spans):
        if hi > lo:
            groups.setdefault((hi - lo, tuple(prints[lo:hi].flatten().tolist())), []).append(b)
    for members in groups.values():
        if len(members) == 1:
            keys[members[0]] = f"unique-image-of-row-{members[0]}".encode()
            continue
        first = pixel_values[spans[members[0]][0] : spans[members[0]][1]]
        digest = image_digest(first)  # hashed once per image, however many rows show it
        for b in members:
            pixels = pixel_values[spans[b][0] : spans[b][1]]
            keys[b] = digest if torch.equal(pixels, first) else image_digest(pixels)
    return keys


def plan_prompt(
    cache: PagedKVCache,
    batch,
    pixel_values: torch.Tensor | None,
    *,
    max_new_tokens: int,
    max_model_len: int,
    enable_prefix_sharing: bool,
    block_tables_out: torch.Tensor,
) -> PromptPlan:
    """Add every row of a prepared batch to ``cache`` (sharing prefixes, forking duplicates) and write its block
    table into ``block_tables_out`` (B, width) on the device."""
    ids = batch.input_ids.detach().cpu()
    mask = batch.attention_mask.detach().cpu().bool()
    positions = batch.position_ids.detach().cpu().long()
    rows, width = ids.shape
    lengths = mask.sum(1).tolist()
    pads = [width - n for n in lengths]
    too_long = [b for b in range(rows) if positions_used(lengths[b], max_new_tokens) > max_model_len]
    if too_long:
        raise ValueError(
            f"rows {too_long} need more than max_model_len={max_model_len} positions (prompt + "
            f"max_new_tokens={max_new_tokens}): generate fewer tokens, or give generate a runner made with a larger "
            "max_model_len (PagedRunner(model, max_model_len=...); without one it is the model's "
            "max_position_embeddings)"
        )
    first_latent = batch.schedule.starts[1] if batch.schedule.num_passes > 1 else width
    digests = image_keys(pixel_values, batch.tiles_per_row) if enable_prefix_sharing else [b""] * rows
    source = list(range(rows))
    shared = [0] * rows
    seen: dict[tuple, int] = {}
    for b in range(rows):
        real = tuple(ids[b, pads[b] :].tolist())
        key = (real, digests[b])
        if enable_prefix_sharing and key in seen:
            source[b] = seen[key]
            cache.fork(source[b], b)
            shared[b] = lengths[b]
            continue
        seen.setdefault(key, b)
        # Shareable: pass-0 tokens of the row but the last one before the first latent column.
        shareable = ids[b, pads[b] : max(pads[b], first_latent - 1)].tolist()
        shared[b] = cache.add_sequence(b, shareable, seed=digests[b])
        cache.reserve(b, lengths[b])
    table = cache.block_table(range(rows), block_tables_out.shape[1], device="cpu")
    block_tables_out.copy_(to_device(table, block_tables_out.device))
    compute = mask & (positions >= torch.tensor(shared)[:, None])
    return PromptPlan(
        positions=positions,
        compute=compute,
        lengths=lengths,
        source=torch.tensor(source, device=block_tables_out.device),
        has_duplicates=source != list(range(rows)),
        shared_tokens=shared,
        stats={
            "prompt_tokens": int(sum(lengths)),
            "computed_prompt_tokens": int(compute.sum()),
            "blocks_after_prompt": cache.num_used_blocks,
            "duplicate_rows": sum(int(source[b] != b) for b in range(rows)),
        },
    )
