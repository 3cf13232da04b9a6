"""Batching for the latent forward (training) and for generation.

Training batches are aligned as in the original CoCoNuT: each row is left-padded so that its FIRST latent
sits at the same column in every row (rows without latents are not shifted), then all rows are right-padded
to one length. Position ids start at 0 at each row's first real token, so a row computes exactly what it
would alone, and every latent pass advances all rows by one position together (max_latents + 1 passes):

    xxxxxxxxxxL L xxxxx--
    -----xxxxxL xxxxxxxx-
    ---xxxxxxxL L xxxxxxx        (x: token, L: latent, -: padding)

Generation prompts are left-padded so that every row's last column is real.
"""

from __future__ import annotations

from typing import Sequence

import torch

from engine.vocab import IGNORE_INDEX


def _concat_pixels(samples: Sequence[dict]) -> torch.Tensor | None:
    """All rows' tiles in row order, (total_tiles, 3, H, W); None when no row has an image."""
    tiles = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None and len(s["pixel_values"])]
    if not tiles:
        return None
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=0)


def _num_latents(samples: Sequence[dict]) -> torch.Tensor:
    return torch.tensor([int(s.get("num_latents", 0)) for s in samples], dtype=torch.long)


class MultimodalCollator:
    """Training batches: `input_ids`, `attention_mask`, `position_ids`, `labels` (all (B, T) long),
    `pixel_values` ((total_tiles, 3, H, W) or None), `num_latents` ((B,) long) and `index` ((B,) long)."""

    def __init__(self, pad_token_id: int, latent_id: int, label_pad_id: int = IGNORE_INDEX):
        if pad_token_id is None:
            raise ValueError("pad_token_id must be set (the tokenizer's pad or eos id)")
        self.pad_token_id = int(pad_token_id)
        self.latent_id = int(latent_id)
        self.label_pad_id = int(label_pad_id)

    def left_padding(self, rows: Sequence[torch.Tensor]) -> list[int]:
        """Padding to put before each row so that every row's first latent lands on the same column."""
        firsts = []
        for ids in rows:
            hits = (ids == self.latent_id).nonzero()
            firsts.append(int(hits[0]) if len(hits) else None)
        present = [f for f in firsts if f is not None]
        if not present:
            return [0] * len(rows)
        column = max(present)
        return [0 if f is None else column - f for f in firsts]

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        rows = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
        labels = [
            torch.as_tensor(s["labels"], dtype=torch.long) if s.get("labels") is not None else None for s in samples
        ]
        for b, (ids, lab) in enumerate(zip(rows, labels)):
            if lab is not None and lab.shape != ids.shape:
                raise ValueError(f"sample {b}: labels length {len(lab)} differs from input_ids length {len(ids)}")
        pads = self.left_padding(rows)
        width = max(p + len(r) for p, r in zip(pads, rows))
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        out_labels = torch.full((batch, width), self.label_pad_id, dtype=torch.long)
        for b, (pad, ids, lab) in enumerate(zip(pads, rows, labels)):
            n = len(ids)
            input_ids[b, pad : pad + n] = ids
            attention_mask[b, pad : pad + n] = 1
            position_ids[b, pad : pad + n] = torch.arange(n)
            if lab is not None:
                out_labels[b, pad : pad + n] = lab
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": out_labels,
            "pixel_values": _concat_pixels(samples),
            "num_latents": _num_latents(samples),
        }
        if all("index" in s for s in samples):
            out["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
        return out


class GenerationCollator:
    """Generation batches, left-padded: `input_ids`, `attention_mask`, `position_ids` ((B, T) long),
    `pixel_values` ((total_tiles, 3, H, W) or None), `num_latents` ((B,) long) and `records` (list)."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("pad_token_id must be set (the tokenizer's pad or eos id)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        rows = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
        width = max(len(r) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        for b, ids in enumerate(rows):
            n = len(ids)
            input_ids[b, width - n :] = ids
            attention_mask[b, width - n :] = 1
            position_ids[b, width - n :] = torch.arange(n)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": _concat_pixels(samples),
            "num_latents": _num_latents(samples),
            "records": [s.get("record") for s in samples],
        }
