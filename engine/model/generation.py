"""Batched latent generation: the prompt (with its latent thoughts) through the iterative forward, then decoding.

The original CoCoNuT generates with batch size 1 and recomputes the whole prefix for every new token. Here the
prompt runs once through the same pass schedule as training (so the thoughts are computed exactly as in
`forward`), its KV cache is kept, and each decoding step feeds one token per row. Two KV caches serve it:

- "dynamic": transformers' DynamicCache, through the language model's own forward (any model, any device);
- "paged": `engine.model.paged.runner.PagedRunner`: a paged block pool with visual-prefix sharing, Triton paged
  attention and CUDA-graphed one-position steps (hold a runner to reuse its pool and graphs across calls).

`generate(model, input_ids, attention_mask, pixel_values, options)` is the one entry point (the model's
`generate` method calls it); `GenerationOptions` holds every option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from engine.model.compat import cache_kwargs
from engine.utils.profiling import profile_range

KV_CACHES = ("dynamic", "paged")


class GenerationError(ValueError):
    pass


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. ``eos_token_id``/``pad_token_id`` None take the model's. ``min_passes`` runs the prompt in
    at least that many passes and ``step_sync(local_done) -> all_done`` keeps every rank decoding until all are done
    (ZeRO-3 ranks must issue the same module calls)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    kv_cache: str = "dynamic"
    min_passes: int = 0
    step_sync: Callable[[bool], bool] | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.do_sample and not self.temperature > 0:  # NaN too
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.min_passes) or self.min_passes < 0:
            raise ValueError(f"min_passes must be an integer >= 0, got {self.min_passes!r}")
        for name in ("eos_token_id", "pad_token_id"):
            object.__setattr__(self, name, _one_token_id(name, getattr(self, name)))

    def for_model(self, model) -> "GenerationOptions":
        """These options with the model's eos and pad ids where none were given."""
        return dataclasses.replace(
            self,
            eos_token_id=model.eos_token_id if self.eos_token_id is None else self.eos_token_id,
            pad_token_id=model.pad_token_id if self.pad_token_id is None else self.pad_token_id,
        )

    @property
    def pad(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else 0


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _one_token_id(name: str, value) -> int | None:
    """None, or one token id as an int (a one-element integer tensor is read once, here; an id no token has, such
    as -1, makes every row run to max_new_tokens)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        return int(value.item())
    if _is_int(value):
        return int(value)
    raise ValueError(f"{name} must be one token id (an integer) or None, got {value!r}"
                     + (" (several end ids are not supported: pick one)" if isinstance(value, (list, tuple)) else ""))


def check_prompt_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """(B, T) integer token ids inside the embedding table (one host read per generate call: an id out of range
    would otherwise fail deep in the embedding, or, in a fused kernel on the GPU, read past the table)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.numel():
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one read of the device
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids hold ids in [{low}, {high}], outside the model's vocabulary of {vocab_size}")


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """A mask of 0s and 1s whose rows all end in a real token (one read of the device). Other values would count
    as positions: a mask of 2s puts the tokens at positions 1, 3, 5, ... and the paged cache past its writes."""
    if attention_mask.dtype.is_complex:
        raise GenerationError(f"attention_mask must hold 0 and 1, got {attention_mask.dtype}")
    if attention_mask.dim() != 2 or attention_mask.shape[1] == 0:
        raise GenerationError(f"attention_mask must be (batch, tokens) with at least one token, got shape "
                              f"{tuple(attention_mask.shape)}")
    last = attention_mask[:, -1].bool()
    binary = ((attention_mask == 0) | (attention_mask == 1)).all()
    ends_real, binary = torch.stack([last.all(), binary]).tolist() if attention_mask.numel() else (True, True)
    if not binary:
        low, high = torch.stack(torch.aminmax(attention_mask.float())).tolist()
        raise GenerationError(f"attention_mask must hold only 0 (padding) and 1 (token), got values in [{low}, {high}]")
    if not ends_real:
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


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    options: GenerationOptions | None = None,
    *,
    runner=None,
) -> torch.Tensor:
    """(B, n) new tokens for left-padded prompts; a row that ended early (its eos included) is padded with the pad
    id. ``runner``: the `PagedRunner` of a paged call (None: a runner is built for this call and released)."""
    if options is not None and not isinstance(options, GenerationOptions):
        raise TypeError(f"options must be a GenerationOptions, got {type(options).__name__} (keywords such as "
                        "max_new_tokens go to model.generate)")  # fmt: skip
    options = (options or GenerationOptions()).for_model(model)
    check_prompt_ids(input_ids, model.base.get_input_embeddings().num_embeddings)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_left_padded(attention_mask)
    with eval_mode(model):
        return _generate(model, input_ids, attention_mask, pixel_values, options, runner)


def positions_used(prompt_length: int, max_new_tokens: int) -> int:
    """The positions a row's generation fills: its prompt and the new tokens but the last, which is returned, never
    fed (both caches check this against their limit)."""
    return prompt_length + max_new_tokens - 1


def position_room_problem(batch, max_new_tokens: int, limit: int) -> str | None:
    """What is wrong when prompt and new tokens exceed the model's positions (None when they fit), as the paged cache
    checks them against its max_model_len."""
    longest = int(batch.attention_mask.sum(1).max())
    needed = positions_used(longest, max_new_tokens)
    if needed <= limit:
        return None
    return (f"the longest prompt ({longest} tokens) and max_new_tokens={max_new_tokens} need {needed} positions, "
            f"more than the model's max_position_embeddings={limit}: shorten the prompt or generate fewer tokens")


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for a generation (no dropout: the paged runner's own layers have none, and a model
    left in train mode would decode differently on the dynamic cache), its modules' modes restored after."""
    training = [m for m in model.modules() if m.training]
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True


def _generate(model, input_ids, attention_mask, pixel_values, options: GenerationOptions, runner) -> torch.Tensor:
    # several questions about one image (or n samples of one prompt) encode the image once, unless the paged
    # runner was asked not to share prefixes (the unshared baseline computes everything)
    share = options.kv_cache == "dynamic" or runner is None or runner.enable_prefix_sharing
    batch = model.prepare(input_ids, attention_mask, pixel_values, min_passes=options.min_passes, dedupe_images=share)
    out = torch.full((input_ids.shape[0], options.max_new_tokens), options.pad, dtype=torch.long, device=input_ids.device)
    if options.max_new_tokens == 0 or input_ids.shape[0] == 0:
        return out
    if options.kv_cache == "dynamic":
        problem = position_room_problem(batch, options.max_new_tokens,
                                        model.base.config.get_text_config().max_position_embeddings)
        # ranks in lockstep (ZeRO-3) refuse together: one rank raising alone would leave the others in a collective
        if options.step_sync is not None and not options.step_sync(problem is None):
            problem = problem or "another rank's prompts need more positions than the model has"
        if problem:
            raise GenerationError(problem)
        return _generate_dynamic(model, batch, out, options)
    if runner is not None:
        return runner.generate_prepared(batch, pixel_values, out, options)
    from engine.model.paged.runner import PagedRunner

    with PagedRunner(model) as call_runner:
        return call_runner.generate_prepared(batch, pixel_values, out, options)


def _generate_dynamic(model, batch, out: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """The prompt's passes and the decoding steps through transformers' DynamicCache."""
    hidden, _, cache = model.run_passes(batch)
    model.padding_passes(hidden[:, -1], options.min_passes - batch.schedule.num_passes)
    rows = out.shape[0]
    mask = batch.attention_mask
    next_pos = batch.position_ids[:, -1:] + 1

    def step(language_model, token_ids: torch.Tensor) -> tuple[torch.Tensor]:
        out = language_model(
            input_ids=token_ids, attention_mask=mask, position_ids=next_pos, use_cache=True,
            **cache_kwargs(model.language_model, cache),
        )
        return (out.last_hidden_state,)

    def advance(token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        nonlocal mask, next_pos
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        (hidden,) = model.in_language_model_call(step, token[:, None])  # ZeRO-3: one gather per step
        next_pos = next_pos + 1
        return model.base.lm_head(hidden[:, -1])

    return decode_loop(model.base.lm_head(hidden[:, -1]), out, advance, options)


def decode_loop(
    logits: torch.Tensor,
    out: torch.Tensor,
    advance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    options: GenerationOptions,
    *,
    sync_interval: int = 1,
) -> torch.Tensor:
    """The decoding loop of every KV cache: pick a token per row from `logits` (B, V), write it into `out`
    (B, max_new_tokens), then `advance(token, finished)` runs one step and returns the next logits.

    Rows that ended (eos) get the pad id. Whether every row ended is checked on the host every
    `sync_interval` steps (each check waits for the GPU) and the output is then cut where the last row ended,
    so the result does not depend on the interval. Sampling checks every step: a step past the end would draw
    from the random generator, whose state a caller's next call starts from. `options.step_sync(local_done) ->
    all_done` (ZeRO-3) replaces the check: every rank steps until all are done.
    """
    rows, max_new_tokens = out.shape
    eos, pad, step_sync = options.eos_token_id, options.pad, options.step_sync
    if options.do_sample:
        sync_interval = 1
    finished = torch.zeros(rows, dtype=torch.bool, device=out.device)
    steps = 0
    for step in range(max_new_tokens):
        token = select_next_token(
            logits,
            do_sample=options.do_sample,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            generator=options.generator,
        )
        token = torch.where(finished, torch.full_like(token, pad), token)
        out[:, step] = token
        steps = step + 1
        if eos is not None:
            finished = finished | (token == eos)
        if step_sync is not None:
            done = step_sync(eos is not None and bool(finished.all()))
        else:
            check = eos is not None and (step + 1) % sync_interval == 0
            done = check and bool(finished.all())
        if done or step == max_new_tokens - 1:
            break
        with profile_range(f"coconut/decode_step_{step}"):
            logits = advance(token, finished)
    out = out[:, :steps]
    if eos is not None and step_sync is None and steps:
        ended = out == eos
        if bool(ended.any(1).all()):  # every row ended: cut where the last one did
            out = out[:, : int(ended.int().argmax(1).max()) + 1]
    return out
