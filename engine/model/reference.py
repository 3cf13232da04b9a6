"""Plain references for the latent forward and for generation: slow, obviously correct, cache-free.

- `naive_forward`: for every latent column, recompute the whole prefix before it without any KV cache, read
  the hidden state of the previous position, write it in as the thought; then one full pass. This is the
  specification the engine's iterative forward is tested against, and the "naive recompute" scheme of the
  latent-forward benchmark.
- `naive_generate`: the original CoCoNuT's generation, one prompt at a time: the prompt's thoughts as
  `naive_forward` makes them, then the whole sequence recomputed for every new token, each new token fed as its
  embedding (a generated `<|latent|>` or `<IMG_CONTEXT>` is a token like any other, as in the original). The
  step-by-step reference for `MultimodalCoconut.generate` and the batch-1 baseline of the generation benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.compat import safe_attention
from engine.model.generation import select_next_token


@dataclass
class ReferenceOutput:
    logits: torch.Tensor  # (B, T, V)
    hidden_states: torch.Tensor  # (B, T, H)
    inputs_embeds: torch.Tensor  # (B, T, H), thoughts at the latent positions
    num_passes: int


def naive_forward(model, input_ids, attention_mask=None, pixel_values=None, position_ids=None) -> ReferenceOutput:
    batch = model.prepare(input_ids, attention_mask, pixel_values, position_ids)
    hidden, embeds, passes = naive_hidden_states(model, batch)
    return ReferenceOutput(model.base.lm_head(hidden), hidden, embeds, passes)


def naive_hidden_states(model, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The naive scheme on a prepared batch: (last hidden states (B, T, H), input embeddings with the thoughts
    in, number of language-model passes)."""
    embeds = model.base_embeddings(batch).clone()
    lm = model.language_model
    passes = 0
    for col in batch.schedule.latent_positions:
        with safe_attention(col, embeds.device):  # cuDNN's masked backward (engine/model/compat.py)
            hidden = lm(
                inputs_embeds=embeds[:, :col],
                attention_mask=batch.attention_mask[:, :col],
                position_ids=batch.position_ids[:, :col],
                use_cache=False,
            ).last_hidden_state
        passes += 1
        rows = batch.latent_mask[:, col]
        embeds = embeds.clone()
        embeds[rows, col] = hidden[rows, col - 1].to(embeds.dtype)
    with safe_attention(embeds.shape[1], embeds.device):
        hidden = lm(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
    return hidden, embeds, passes + 1


@torch.no_grad()
def naive_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tiles_per_row: list[int] | None = None,
) -> torch.Tensor:
    """Greedy generation one row at a time: the prompt's thoughts once, then the full forward over the prompt's
    embeddings and the new tokens' recomputed for every new token."""
    eos = model.eos_token_id if eos_token_id is None else eos_token_id
    pad = model.pad_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad  # as generate's
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tiles_per_row is None:
        counts = (input_ids == model.image_token_id).sum(1).tolist()
        tiles_per_row = [c // model.tokens_per_tile for c in counts]
    tile_starts = [0]
    for n in tiles_per_row:
        tile_starts.append(tile_starts[-1] + n)
    rows = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids = input_ids[b, keep][None]
        pv = None
        if pixel_values is not None and tiles_per_row[b]:
            pv = pixel_values[tile_starts[b] : tile_starts[b + 1]]
        prompt = model.prepare(ids, None, pv)
        hidden, embeds, _ = naive_hidden_states(model, prompt)  # the prompt's input embeddings, thoughts in
        positions = prompt.position_ids
        generated = []
        for step in range(max_new_tokens):
            if step:  # everything again, no cache
                with safe_attention(embeds.shape[1], embeds.device):
                    hidden = model.language_model(inputs_embeds=embeds, position_ids=positions,
                                                  use_cache=False).last_hidden_state
            token = select_next_token(model.base.lm_head(hidden[:, -1]), do_sample=False)
            generated.append(int(token))
            if eos is not None and int(token) == eos:
                break
            embeds = torch.cat([embeds, model.base.get_input_embeddings()(token)[:, None].to(embeds.dtype)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        rows.append(generated)
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.long, device=input_ids.device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
