"""Random batches in the model's sequence layout, built in code: for benchmarks, tests and profiling.

`synthetic_batch` builds collated rows ``<img> ctx* </img> question [<start> latent* <end>] answer eos``,
left-padded so the first latent sits at one column in every row (as `MultimodalCollator` aligns real data).
`perturb_after` and `replace_latents` are the causality probes the benchmarks and tests use: change every token
after a column (nothing before it may move), or turn the latents into ordinary tokens (one plain pass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.data.records import DataError
from engine.vocab import IGNORE_INDEX, IMAGE_END_TOKEN, IMAGE_START_TOKEN, tile_size_from_config


@dataclass
class SyntheticBatch:
    """A collated batch built in code: left-padded so the first latent sits at one column in every row."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 except on the answer tokens and eos
    pixel_values: torch.Tensor | None  # (B * tiles, 3, S, S)
    tiles_per_row: int
    n_latents: int
    first_latent_col: int | None  # None without latents
    end_col: int  # last column before the tokens that follow the thoughts (the end-latent marker)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) positions, image tokens and latents included."""
        return int(self.attention_mask.sum())

    def rows(self, n: int) -> "SyntheticBatch":
        """The first n rows (their tiles with them)."""
        pv = None if self.pixel_values is None else self.pixel_values[: n * self.tiles_per_row]
        return dataclasses.replace(
            self, input_ids=self.input_ids[:n], attention_mask=self.attention_mask[:n], labels=self.labels[:n], pixel_values=pv
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SyntheticBatch":
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device=device, dtype=dtype or pv.dtype)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            pixel_values=pv,
        )

    def with_ids(self, input_ids: torch.Tensor) -> "SyntheticBatch":
        return dataclasses.replace(self, input_ids=input_ids)


def special_ids(model, tok) -> set[int]:
    ids = set(tok.all_special_ids) | {model.latent_id, model.start_latent_id, model.end_latent_id, model.image_token_id}
    for t in (IMAGE_START_TOKEN, IMAGE_END_TOKEN):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return {i for i in ids if i is not None}


def ordinary_token_ids(model, tok) -> torch.Tensor:
    """Every id of the base vocabulary that is no special, image or latent token."""
    special = special_ids(model, tok)
    return torch.tensor([i for i in range(tok.vocab_size) if i not in special], dtype=torch.long)


def image_tiles_for(model, image_tokens: int) -> int:
    """Tiles per row for `image_tokens` <IMG_CONTEXT> tokens (a whole number of tiles, or an error)."""
    per_tile = model.tokens_per_tile
    if image_tokens < 0 or image_tokens % per_tile:
        raise DataError(f"image tokens must be a multiple of the model's {per_tile} tokens per tile, got {image_tokens}")
    return image_tokens // per_tile


def synthetic_batch(
    model,
    tok,
    *,
    batch_size: int,
    n_latents: int,
    question_len: int,
    answer_len: int,
    image_tokens: int,
    seed: int = 0,
    ragged: bool = True,
    markers: bool = True,
) -> SyntheticBatch:
    """Rows `<img> ctx*image_tokens </img> question [<start> latent*n <end>] answer eos`, left-padded.

    Question lengths vary by up to a quarter between rows when `ragged` (so padding is exercised, as the
    collator pads real data); answers all have `answer_len` tokens. With `answer_len == 0` the rows end at
    the end-latent marker (a generation prompt), without eos. Labels cover the answer and eos.
    """
    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_token_ids(model, tok)
    draw = lambda n: ordinary[torch.randint(len(ordinary), (n,), generator=g)].tolist()  # noqa: E731
    tiles = image_tiles_for(model, image_tokens)
    img_start = tok.convert_tokens_to_ids(IMAGE_START_TOKEN)
    img_end = tok.convert_tokens_to_ids(IMAGE_END_TOKEN)
    rows, label_rows = [], []
    for b in range(batch_size):
        shorten = int(torch.randint(0, question_len // 4 + 1, (1,), generator=g)) if (ragged and b) else 0
        prefix = [img_start, *[model.image_token_id] * image_tokens, img_end] if tiles else []
        prefix += draw(max(1, question_len - shorten))
        middle = [model.start_latent_id, *[model.latent_id] * n_latents, model.end_latent_id] if markers else []
        answer = draw(answer_len) + [tok.eos_token_id] if answer_len else []
        rows.append(prefix + middle + answer)
        label_rows.append([IGNORE_INDEX] * (len(prefix) + len(middle)) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    for b, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
        labels[b, width - len(r) :] = torch.tensor(lab)
    size = tile_size_from_config(model.config)
    pv = torch.randn(batch_size * tiles, 3, size, size, generator=g) if tiles else None
    latent_cols = (ids[0] == model.latent_id).nonzero().flatten()
    first = int(latent_cols[0]) if len(latent_cols) else None
    end_cols = (ids[0] == model.end_latent_id).nonzero().flatten()
    end_col = int(end_cols[0]) if len(end_cols) else width - 1 - (answer_len + 1 if answer_len else 0)
    return SyntheticBatch(ids, mask, labels, pv, tiles, n_latents, first, end_col)


def replace_latents(batch: SyntheticBatch, model, tok, seed: int = 1) -> SyntheticBatch:
    """The same batch with every <|latent|> replaced by an ordinary token: same length, one plain pass."""
    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_token_ids(model, tok).to(batch.input_ids.device)
    fill = ordinary[torch.randint(len(ordinary), batch.input_ids.shape, generator=g).to(ordinary.device)]
    return batch.with_ids(torch.where(batch.input_ids == model.latent_id, fill, batch.input_ids))


def perturb_after(batch: SyntheticBatch, model, tok, col: int, seed: int = 2) -> SyntheticBatch:
    """Replace every real token after column `col` by a different ordinary token (the causality probe)."""
    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_token_ids(model, tok).to(batch.input_ids.device)
    ids = batch.input_ids
    fill = ordinary[torch.randint(len(ordinary), ids.shape, generator=g).to(ordinary.device)]
    fill = torch.where(fill == ids, ordinary[(torch.searchsorted(ordinary, fill) + 1) % len(ordinary)], fill)
    after = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    after[:, col + 1 :] = True
    after &= batch.attention_mask.bool()
    return batch.with_ids(torch.where(after, fill, ids))
