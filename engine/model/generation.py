"""Batched latent generation: prompt (with its latent thoughts) through the iterative forward, then decoding.

The original CoCoNuT generates with batch size 1 and recomputes the whole prefix for every new token. Here
the prompt runs once through the same pass schedule as training (so the thoughts are computed exactly as in
`forward`), its KV cache is kept, and each decoding step feeds one token per row.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.utils.profiling import profile_range


class GenerationError(ValueError):
    pass


def check_left_padded(attention_mask: torch.Tensor) -> None:
    last = attention_mask[:, -1].bool()
    if not bool(last.all()):
        rows = (~last).nonzero().flatten().tolist()
        raise GenerationError(
            f"generate needs left-padded prompts (every row's last column real); rows {rows} end in padding"
        )


def select_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. Greedy, or sampling with temperature / top-k / top-p, all on device."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    # multinomial on device: no host synchronisation
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_with_dynamic_cache(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    min_passes: int = 0,
    step_sync: Callable[[bool], bool] | None = None,
) -> torch.Tensor:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_left_padded(attention_mask)
    batch = model.prepare(input_ids, attention_mask, pixel_values, min_passes=min_passes)
    bsz = input_ids.shape[0]
    pad = pad_token_id if pad_token_id is not None else 0
    out = torch.full((bsz, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    if max_new_tokens == 0:
        return out
    hidden, _, cache = model.run_passes(batch)
    model.padding_passes(hidden[:, -1], min_passes - batch.schedule.num_passes)
    mask = batch.attention_mask
    next_pos = batch.position_ids[:, -1:] + 1
    embed = model.base.get_input_embeddings()

    def advance(token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        nonlocal mask, next_pos
        mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
        hidden = model.language_model(
            inputs_embeds=embed(token[:, None]),
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        next_pos = next_pos + 1
        return model.base.lm_head(hidden[:, -1])

    return decode_loop(
        model.base.lm_head(hidden[:, -1]),
        out,
        advance,
        sampling=dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator),
        eos_token_id=eos_token_id,
        pad=pad,
        step_sync=step_sync,
    )


def decode_loop(
    logits: torch.Tensor,
    out: torch.Tensor,
    advance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    sampling: dict,
    eos_token_id: int | None,
    pad: int,
    step_sync: Callable[[bool], bool] | None = None,
    sync_interval: int = 1,
) -> torch.Tensor:
    """The decoding loop of every KV cache: pick a token per row from `logits` (B, V), write it into `out`
    (B, max_new_tokens), then `advance(token, finished)` runs one step and returns the next logits.

    Rows that ended (eos) get the pad id. Whether every row ended is checked on the host every
    `sync_interval` steps (each check waits for the GPU) and the output is then cut where the last row ended,
    so the result does not depend on the interval. `step_sync(local_done) -> all_done` (ZeRO-3) replaces the
    check: every rank steps until all are done.
    """
    rows, max_new_tokens = out.shape
    finished = torch.zeros(rows, dtype=torch.bool, device=out.device)
    steps = 0
    for step in range(max_new_tokens):
        token = select_next_token(logits, **sampling)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out[:, step] = token
        steps = step + 1
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if step_sync is not None:
            done = step_sync(eos_token_id is not None and bool(finished.all()))
        else:
            check = eos_token_id is not None and (step + 1) % sync_interval == 0
            done = check and bool(finished.all())
        if done or step == max_new_tokens - 1:
            break
        with profile_range(f"coconut/decode_step_{step}"):
            logits = advance(token, finished)
    out = out[:, :steps]
    if eos_token_id is not None and step_sync is None and steps:
        ended = out == eos_token_id
        if bool(ended.any(1).all()):  # every row ended: cut where the last one did
            out = out[:, : int(ended.int().argmax(1).max()) + 1]
    return out
