"""KNOWN-BAD BASELINE, kept only to be measured against. Do not train with it.

"Full pass, then refine": one forward over the whole sequence (with pixel_values, latents holding their
placeholder embedding, every token after them included), then refinement passes that reuse that KV cache.
The cache already holds the positions after the latents, so every refined thought attends to the future:
the thoughts, and everything computed from them, depend on tokens that come after them. The causality test
shows the leak; the latent-forward benchmark compares its cost and its error with the engine's forward.
"""

from __future__ import annotations

import torch

from engine.model.coconut import CoconutOutput
from engine.model.compat import cache_kwargs, safe_attention


def fullpass_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    return_logits: bool = True,
) -> CoconutOutput:
    from transformers import DynamicCache

    batch = model.prepare(input_ids, attention_mask, pixel_values, position_ids)
    lm = model.language_model
    embeds = model.base_embeddings(batch)
    mask = batch.attention_mask
    cache = DynamicCache(config=lm.config)

    # 1. One full pass over everything: the cache now holds every position, the future included.
    with safe_attention(mask.shape[1], embeds.device):  # cuDNN's masked backward (engine/model/compat.py)
        hidden = lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids, use_cache=True,
            **cache_kwargs(lm, cache),
        ).last_hidden_state
    latent_cols = batch.schedule.latent_positions
    if not latent_cols:
        logits = model.base.lm_head(hidden) if return_logits else None
        loss = model.lm_loss(hidden, labels, logits) if labels is not None else None
        return CoconutOutput(loss, logits, hidden, embeds, num_passes=1)

    # 2. Refine each thought with a one-token pass that reuses the full cache (it sees all T positions).
    hidden = hidden.clone()
    embeds = embeds.clone()
    bsz = input_ids.shape[0]
    for col in latent_cols:
        rows = batch.latent_mask[:, col]
        thought = torch.where(rows[:, None], hidden[:, col - 1], embeds[:, col])
        embeds[:, col] = thought
        mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
        with safe_attention(mask.shape[1], embeds.device):
            refined = lm(
                inputs_embeds=thought[:, None],
                attention_mask=mask,
                position_ids=batch.position_ids[:, col : col + 1],
                use_cache=True,
                **cache_kwargs(lm, cache),
            ).last_hidden_state[:, 0]
        hidden[:, col] = torch.where(rows[:, None], refined, hidden[:, col])

    # 3. Recompute the tail with the refined thoughts, again on top of the polluted cache.
    first = latent_cols[0]
    tail_mask = torch.cat([mask, mask.new_ones(bsz, embeds.shape[1] - first)], dim=1)
    with safe_attention(tail_mask.shape[1], embeds.device):
        tail = lm(
            inputs_embeds=embeds[:, first:],
            attention_mask=tail_mask,
            position_ids=batch.position_ids[:, first:],
            use_cache=True,
            **cache_kwargs(lm, cache),
        ).last_hidden_state
    hidden = torch.cat([hidden[:, :first], tail], dim=1)
    logits = model.base.lm_head(hidden) if return_logits else None
    loss = model.lm_loss(hidden, labels, logits) if labels is not None else None
    return CoconutOutput(loss, logits, hidden, embeds, num_passes=2 + len(latent_cols))
