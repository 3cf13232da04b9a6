"""MultimodalCoconut: InternVL with continuous thoughts, computed by a causal, iterative, KV-cached forward.

At a `<|latent|>` position the input embedding is the last-layer (post-norm) hidden state of the position
before it. The forward (see `engine/model/schedule.py` for the pass schedule):

1. encodes the batch's image tiles once (vision tower + projector) and merges them at `<IMG_CONTEXT>`;
2. runs the language model on the prefix before the earliest latent, filling one KV cache;
3. runs one pass per further latent column: the new position's input is the hidden state the previous
   pass produced for the position before it, and it attends to everything cached (every visual token too);
4. runs a final pass over the rest.

Nothing is computed before the latents it depends on are filled in, and gradients flow through every
thought and every cached K/V back into the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.data.images import tokens_per_tile_from_config
from engine.model.schedule import PassSchedule, build_schedule, position_ids_from_mask
from engine.utils.profiling import profile_range

IGNORE_INDEX = -100


@dataclass
class CoconutOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, T, V), None when only the loss was asked for
    hidden_states: torch.Tensor  # (B, T, H) last-layer hidden states, post-norm
    inputs_embeds: torch.Tensor | None  # (B, T, H) the inputs actually fed: thoughts at latent positions
    num_passes: int
    past_key_values: object | None = None


@dataclass
class PreparedBatch:
    """Everything the passes need, computed once per batch."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T)
    latent_mask: torch.Tensor  # (B, T) bool
    image_features: torch.Tensor | None  # (tiles * tokens_per_tile, H), in row order
    schedule: PassSchedule
    tiles_per_row: list[int]
    # (B, T) int32: the row of image_features for each <IMG_CONTEXT> position, -1 elsewhere. Only the fused
    # injection reads it (set in prepare when that path is active, else on its first use).
    image_index: torch.Tensor | None = None


class MultimodalCoconut(nn.Module):
    """Wraps a transformers `InternVLForConditionalGeneration` (``self.base``)."""

    def __init__(
        self,
        base: nn.Module,
        *,
        latent_id: int,
        start_latent_id: int,
        end_latent_id: int,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        loss_chunk_tokens: int = 4096,
    ):
        super().__init__()
        self.base = base
        self.latent_id = int(latent_id)
        self.start_latent_id = int(start_latent_id)
        self.end_latent_id = int(end_latent_id)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        # Builds a pass's input embeddings: `_inject(batch, start, end, prev_last) -> (B, end - start, H)`, or
        # None for the PyTorch path. Chosen by set_injection ("auto": the fused Triton op on CUDA, decided at
        # each forward so that moving the model to a GPU after construction switches it on).
        self._injection_mode = "auto"
        self._inject: Callable | None = None
        # How the one-position latent passes of an aligned batch run (set_latent_passes); the block object holds
        # captured CUDA graphs, so it is created on first use and kept outside the module tree.
        self._latent_passes_mode = "auto"
        self._latent_blocks: dict[bool, object] = {}
        self._latent_buckets = (128, 32)  # (prefix, final chunk): see set_latent_passes
        # False: `<|latent|>` is an ordinary token whose own learned embedding fills every thought position (the
        # paper's "pause as thought" ablation); `prepare` then schedules no feedback, for training and generation.
        self.thought_feedback = True

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self.base.config

    @property
    def language_model(self) -> nn.Module:
        return self.base.model.language_model

    @property
    def image_token_id(self) -> int:
        return int(self.base.config.image_token_id)

    @property
    def tokens_per_tile(self) -> int:
        return tokens_per_tile_from_config(self.base.config)

    @property
    def device(self) -> torch.device:
        return self.base.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.lm_head.weight.dtype

    def set_attention_backend(self, name: str) -> None:
        """'sdpa' (default), 'flash_attention_2' (when installed) or 'eager' (for debugging)."""
        from engine.model.loading import _attn_check

        self.base.set_attn_implementation(_attn_check(name))

    def set_injection(self, mode: str) -> None:
        """How each pass builds its input embeddings.

        - "reference": PyTorch (embedding + masked_scatter once per batch, torch.where + cat per latent pass);
        - "fused": the `coconut::latent_inject` Triton op (`kernels/latent_inject.py`), one read and one write per
          row of each chunk; on CPU only under the Triton interpreter (TRITON_INTERPRET=1), else an error;
        - "auto" (default): "fused" when the model is on CUDA and triton imports, else "reference".
        Values and gradients are the same either way.
        """
        if mode not in ("auto", "fused", "reference"):
            raise ValueError(f"injection mode must be 'auto', 'fused' or 'reference', got {mode!r}")
        if mode == "fused":
            reason = self._fused_injection_unsupported(allow_interpreter=True)
            if reason is not None:
                raise RuntimeError(f"set_injection('fused'): {reason}")
        self._injection_mode = mode
        self._inject = self._fused_inject if mode == "fused" else None

    def set_latent_passes(self, mode: str, *, prefix_bucket: int = 128, final_bucket: int = 32) -> None:
        """How the one-position latent passes of an aligned batch run (`engine/model/latent_block.py`).

        - "transformers": one call of the transformers language model per pass, with its DynamicCache (any layout);
        - "static": the passes as one static-shape block over the model's own modules, run eagerly (any device;
          what the CUDA graphs capture, so that CPU tests can compare it with "transformers");
        - "cuda_graph": that block captured in CUDA graphs, forward and backward, per shape bucket;
        - "auto" (default): "cuda_graph" for training on CUDA (gradients on, no autocast) when the parameters are
          not partitioned (ZeRO-3 gathers them per module, which a graph cannot replay), else "transformers".
        Batches that are not aligned (latents in scattered columns) always take the transformers passes. When the
        caller does not ask for the cache (training), the block runs the final pass too, as one chunk.
        `prefix_bucket` / `final_bucket`: the block pads the prefix's cache and the final chunk up to a multiple of
        them, so that one graph serves every length in a bucket (padding is masked out or causally after every
        real column; larger buckets mean fewer captures and more wasted work).
        """
        if prefix_bucket < 1 or final_bucket < 1:
            raise ValueError(f"prefix_bucket and final_bucket must be >= 1, got {prefix_bucket} and {final_bucket}")
        if mode not in ("auto", "transformers", "static", "cuda_graph"):
            raise ValueError(f"latent passes mode must be 'auto', 'transformers', 'static' or 'cuda_graph', got {mode!r}")
        if mode in ("static", "cuda_graph"):
            reason = self._latent_block_unsupported()
            if reason is not None:
                raise RuntimeError(f"set_latent_passes({mode!r}): {reason}")
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise RuntimeError(f"set_latent_passes('cuda_graph') needs the model on CUDA, it is on {self.device}")
        self._latent_passes_mode = mode
        if (prefix_bucket, final_bucket) != self._latent_buckets:
            self._latent_blocks.clear()
            self._latent_buckets = (prefix_bucket, final_bucket)

    def release_latent_graphs(self) -> None:
        """Drop the captured latent-pass graphs (and their memory pools); the next training forward recaptures."""
        for block in self._latent_blocks.values():
            block.release()

    def _latent_block_unsupported(self) -> str | None:
        """Why the latent block cannot run this language model (None when it can); decided once per model."""
        if not hasattr(self, "_latent_block_reason"):
            from engine.model.latent_block import block_unsupported

            self._latent_block_reason = block_unsupported(self.language_model)
        return self._latent_block_reason

    def _latent_block_runner(self, schedule: PassSchedule, device: torch.device):
        """The LatentBlock for this forward (on inputs on `device`), or None for the transformers passes."""
        if schedule.one_position_passes == 0:
            return None
        mode = self._latent_passes_mode
        if mode == "auto":
            if device.type != "cuda" or not torch.is_grad_enabled() or torch.is_autocast_enabled("cuda"):
                return None
            # Iterate, never index: under ZeRO-3 reading `module.weight` gathers the parameter (a collective that
            # only this rank would issue). Partitioned parameters carry `ds_id`.
            if any(hasattr(p, "ds_id") for p in self.language_model.norm.parameters()):
                return None
            if self._latent_block_unsupported() is not None:
                return None
            mode = "cuda_graph"
        if mode == "transformers":
            return None
        graphed = mode == "cuda_graph"
        if graphed not in self._latent_blocks:
            from engine.model.latent_block import LatentBlock

            self._latent_blocks[graphed] = LatentBlock(
                self.language_model,
                use_cuda_graphs=graphed,
                bucket=self._latent_buckets[0],
                final_bucket=self._latent_buckets[1],
            )
        return self._latent_blocks[graphed]

    def _injection_hook(self) -> Callable | None:
        """The injection hook of this forward (None: the PyTorch path); resolves "auto" on the current device."""
        if self._injection_mode == "auto":
            self._inject = self._fused_inject if self._fused_injection_unsupported() is None else None
        return self._inject

    def _fused_injection_unsupported(self, *, allow_interpreter: bool = False) -> str | None:
        """Why the fused op cannot build this model's inputs, or None when it can."""
        import os

        embedding = self.base.get_input_embeddings()
        weight = getattr(embedding, "weight", None)
        if type(embedding) is not nn.Embedding or embedding.max_norm is not None or embedding.scale_grad_by_freq:
            return f"the input embeddings must be a plain nn.Embedding (no max_norm/scale_grad_by_freq): {embedding}"
        if embedding.sparse:
            return "the input embeddings have sparse gradients, which the fused op does not produce"
        if hasattr(weight, "ds_id") or weight is None or weight.dim() != 2:
            return "the embedding weight is partitioned (DeepSpeed ZeRO-3) or not 2-D; use set_injection('reference')"
        if weight.device.type != "cuda":
            if not (allow_interpreter and weight.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
                return (
                    f"the model is on {weight.device}: the Triton kernel needs CUDA, or TRITON_INTERPRET=1 (set before "
                    "kernels.latent_inject is imported) to run interpreted on CPU"
                )
        try:
            import kernels.latent_inject  # noqa: F401
        except ImportError as e:
            return f"kernels.latent_inject does not import ({e})"
        return None

    def _fused_inject(self, batch: PreparedBatch, start: int, end: int, prev_last: torch.Tensor | None) -> torch.Tensor:
        """Chunk [start, end) of the pass inputs, (B, end - start, H), in one kernel (the injection hook)."""
        from kernels.latent_inject import image_index_from_ids, latent_inject

        embedding = self.base.get_input_embeddings()
        weight = embedding.weight
        features = batch.image_features
        if features is not None and batch.image_index is None:  # a batch prepared while the PyTorch path was active
            batch.image_index = image_index_from_ids(batch.input_ids, self.image_token_id)
        thought = None if prev_last is None else prev_last.to(weight.dtype)
        return latent_inject(
            batch.input_ids,
            weight,
            start,
            end,
            image_index=None if features is None else batch.image_index,
            image_features=None if features is None else features.to(weight.dtype),
            latent_mask=None if thought is None else batch.latent_mask,
            latent_hidden=thought,
            padding_idx=embedding.padding_idx,
        )

    # ------------------------------------------------------------------ preparation
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: (tiles, 3, H, W) -> (tiles * tokens_per_tile, hidden)."""
        with profile_range("coconut/image_encode"):
            features = self.base.model.get_image_features(pixel_values=pixel_values.to(self.dtype)).pooler_output
        return features.reshape(-1, features.shape[-1])

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        min_passes: int = 0,
    ) -> PreparedBatch:
        """Validate the batch, build its pass schedule (at least `min_passes` passes) and encode the images."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None and pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be (total_tiles, 3, H, W) as in transformers, got shape {tuple(pixel_values.shape)}"
            )
        feedback_id = self.latent_id if self.thought_feedback else -1  # -1: no position takes a thought
        schedule, tiles_per_row = build_schedule(
            input_ids,
            attention_mask,
            latent_id=feedback_id,
            image_token_id=self.image_token_id,
            tokens_per_tile=self.tokens_per_tile,
            num_tiles=None if pixel_values is None else int(pixel_values.shape[0]),
        )
        schedule = schedule.with_min_passes(min_passes)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
            )
        image_features = None
        image_index = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
            if self._injection_hook() is not None:
                from kernels.latent_inject import image_index_from_ids

                # Once per batch: each pass's fused op gathers its image rows through it (no masked_scatter).
                image_index = image_index_from_ids(input_ids, self.image_token_id)
        return PreparedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            latent_mask=input_ids == feedback_id,
            image_features=image_features,
            schedule=schedule,
            tiles_per_row=tiles_per_row,
            image_index=image_index,
        )

    def base_embeddings(self, batch: PreparedBatch) -> torch.Tensor:
        """Token embeddings with the image features merged in (latent positions still hold placeholders)."""
        inject = self._injection_hook()
        if inject is not None:
            return inject(batch, 0, batch.input_ids.shape[1], None)  # one fused gather for the whole batch
        embeds = self.base.get_input_embeddings()(batch.input_ids)
        if batch.image_features is not None:
            image_mask = (batch.input_ids == self.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, batch.image_features.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ the passes
    def run_passes(self, batch: PreparedBatch, cache=None, *, keep_inputs: bool = False, need_cache: bool = True):
        """Run the schedule. Returns (hidden (B,T,H), inputs_embeds or None, cache).

        Without `need_cache` the returned cache may stop short of the sequence's end (the latent block then
        computes the final pass too, without storing its K/V)."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.language_model.config)
        schedule = batch.schedule
        inject = self._injection_hook()  # self._inject, with "auto" decided for this forward
        embeds = self.base_embeddings(batch) if inject is None else None
        hidden_chunks, input_chunks = [], []
        prev_last = None  # (B, H): hidden state of the last position computed so far
        block = self._latent_block_runner(schedule, batch.input_ids.device)
        chunks = schedule.chunks
        index = 0
        while index < len(chunks):
            start, end = chunks[index]
            if index == 1 and block is not None:
                # Passes 1..M compute one column each: one static-shape block (CUDA graphs on GPU), which also runs
                # the final pass when nobody needs the cache afterwards.
                width = schedule.one_position_passes
                name = f"coconut/latent_passes_1-{width}" + ("" if need_cache else "+final")
                with profile_range(name):
                    hidden, chunk_in = self._run_latent_block(
                        block, batch, cache, embeds, inject, start, width, prev_last, keep_inputs, not need_cache
                    )
                index = index + width if need_cache else len(chunks)
            else:
                with profile_range(schedule.pass_name(index)):
                    if inject is not None:
                        # One kernel writes each row of the chunk from its source (token row, image row or
                        # thought): no whole-batch embedding, no masked_scatter, no torch.where/cat per pass.
                        chunk_in = inject(batch, start, end, prev_last)
                    elif prev_last is None:
                        chunk_in = embeds[:, start:end]
                    else:
                        # Only the chunk's first column can be a latent: it takes the previous pass's last hidden.
                        first = torch.where(
                            batch.latent_mask[:, start, None], prev_last.to(embeds.dtype), embeds[:, start]
                        )
                        chunk_in = torch.cat([first.unsqueeze(1), embeds[:, start + 1 : end]], dim=1)
                    out = self.language_model(
                        inputs_embeds=chunk_in,
                        attention_mask=batch.attention_mask[:, :end],
                        position_ids=batch.position_ids[:, start:end],
                        past_key_values=cache,
                        use_cache=True,
                    )
                hidden = out.last_hidden_state
                index += 1
            hidden_chunks.append(hidden)
            if keep_inputs:
                input_chunks.append(chunk_in)
            prev_last = hidden[:, -1]
        hidden = hidden_chunks[0] if len(hidden_chunks) == 1 else torch.cat(hidden_chunks, dim=1)
        inputs = None
        if keep_inputs:
            inputs = input_chunks[0] if len(input_chunks) == 1 else torch.cat(input_chunks, dim=1)
        return hidden, inputs, cache

    def _run_latent_block(self, block, batch, cache, embeds, inject, start, width, prev_last, keep_inputs, with_final):
        """Columns [start, start + width) through `block`, and with `with_final` the final pass too (to the end of
        the sequence; the cache then stays at the prefix). Otherwise the columns' K/V are appended to `cache`.

        Returns (hidden (B, columns, H), the inputs actually fed when `keep_inputs` else None).
        """
        end = batch.input_ids.shape[1] if with_final else start + width
        if inject is not None:
            column_embeds = inject(batch, start, end, None)  # latent rows are replaced inside the block
        else:
            column_embeds = embeds[:, start:end]
        layers = cache.layers
        prefix_kv = torch.stack([t for layer in layers for t in (layer.keys, layer.values)])
        prefix_kv = prefix_kv.view(len(layers), 2, *prefix_kv.shape[1:])
        column_is_latent = batch.latent_mask[:, start:end]
        hidden, latent_kv = block(
            prev_last,
            column_embeds,
            column_is_latent,
            batch.position_ids[:, start:end],
            batch.attention_mask[:, :end],
            prefix_kv,
            final_columns=end - start - width,
        )
        if not with_final:
            for index in range(len(layers)):
                cache.update(latent_kv[index, 0], latent_kv[index, 1], index)
        if not keep_inputs:
            return hidden, None
        previous = torch.cat([prev_last[:, None], hidden[:, :-1]], dim=1).to(column_embeds.dtype)
        return hidden, torch.where(column_is_latent[..., None], previous, column_embeds)

    # ------------------------------------------------------------------ forward and loss
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        return_logits: bool = True,
        return_inputs_embeds: bool = False,
        use_cache: bool = False,
        min_passes: int = 0,
    ) -> CoconutOutput:
        """`min_passes` runs the batch in at least that many passes (ZeRO-3 ranks must issue the same number of
        parameter gathers per step; the trainer agrees on the maximum across ranks). Outputs do not change."""
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(input_ids.shape)}")
        batch = self.prepare(input_ids, attention_mask, pixel_values, position_ids, min_passes=min_passes)
        hidden, inputs, cache = self.run_passes(batch, keep_inputs=return_inputs_embeds, need_cache=use_cache)
        padding = self.padding_passes(hidden[:, -1], min_passes - batch.schedule.num_passes)
        logits = self.base.lm_head(hidden) if return_logits else None
        loss = None
        if labels is not None:
            loss = self.lm_loss(hidden, labels, logits=logits)
            if padding is not None:
                loss = loss + padding
        return CoconutOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden,
            inputs_embeds=inputs,
            num_passes=batch.schedule.num_passes + max(0, min_passes - batch.schedule.num_passes),
            past_key_values=cache if use_cache else None,
        )

    def padding_passes(self, last_hidden: torch.Tensor, count: int) -> torch.Tensor | None:
        """Run `count` one-position language-model passes whose result is multiplied by zero.

        Only for a sequence too short to be cut into `min_passes` real passes (see
        `PassSchedule.with_min_passes`): they change no output and no gradient but run the same modules.
        """
        if count <= 0:
            return None
        x = last_hidden.detach()[:, None]  # (B, 1, H)
        ones = torch.ones(x.shape[0], 1, dtype=torch.long, device=x.device)
        term = x.new_zeros((), dtype=torch.float32)
        for _ in range(count):
            with profile_range("coconut/padding_pass"):
                out = self.language_model(inputs_embeds=x, attention_mask=ones, position_ids=ones * 0, use_cache=False)
            term = term + out.last_hidden_state.float().sum() * 0.0
        return term

    def compute_loss(
        self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None, *, min_passes: int = 0
    ) -> torch.Tensor:
        """Training loss without materialising (B, T, V) logits (lm_head runs only on labelled positions)."""
        if labels is None:
            raise ValueError("compute_loss needs labels")
        return self.forward(
            input_ids, attention_mask, pixel_values, labels, position_ids, return_logits=False, min_passes=min_passes
        ).loss

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose label is not -100.

        Without precomputed logits, the lm_head runs only on the labelled positions, in chunks that are
        recomputed in backward, so the peak stays at one chunk of logits.
        """
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        if logits is not None:
            flat = logits[:, :-1][selected]
            return F.cross_entropy(flat.float(), targets[selected]) if flat.numel() else logits.sum() * 0.0
        h = hidden[:, :-1][selected]  # (N, H)
        y = targets[selected]
        if h.shape[0] == 0:
            return hidden.sum() * 0.0
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], self.loss_chunk_tokens):
            total = total + checkpoint(
                self._ce_sum, h[i : i + self.loss_chunk_tokens], y[i : i + self.loss_chunk_tokens], use_reentrant=False
            )
        return total / h.shape[0]

    def _ce_sum(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.base.lm_head(h).float(), y, reduction="sum")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        min_passes: int = 0,
        step_sync: Callable[[bool], bool] | None = None,
        kv_cache: str = "dynamic",
    ) -> torch.Tensor:
        """Batched, KV-cached generation: the prompt's latent thoughts, then greedy (or sampled) decoding.

        Prompts must be left-padded (every row's last column real). Returns (B, n) new tokens; a row that
        ended early (its eos included) is padded with the pad id. For ZeRO-3 ranks, `min_passes` pads the
        prompt's passes and `step_sync(local_done) -> all_done` keeps every rank decoding until all are done.
        `kv_cache`: "dynamic" (transformers' DynamicCache) or "paged" (`engine.model.paged_runner`: a paged
        block pool with visual-prefix sharing, Triton paged attention, CUDA graphs for one-position steps).
        """
        if kv_cache == "dynamic":
            from engine.model.generation import generate_with_dynamic_cache as run
        elif kv_cache == "paged":
            from engine.model.paged_runner import generate_with_paged_cache as run
        else:
            raise ValueError(f"kv_cache must be 'dynamic' or 'paged', got {kv_cache!r}")
        return run(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos_token_id=self.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=self.pad_token_id if pad_token_id is None else pad_token_id,
            min_passes=min_passes,
            step_sync=step_sync,
        )
