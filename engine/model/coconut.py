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

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from engine.model import fast_paths
from engine.model.checkpointing import checkpointed_layers
from engine.model.compat import cache_kwargs, safe_attention
from engine.model.generation import GenerationOptions, generate
from engine.model.layers import restore_default_rope, rope_default_limit
from engine.model.schedule import PassSchedule, build_schedule, feed_thoughts, position_ids_from_mask
from engine.model.stack_pass import stack_pass
from engine.model.vision_layers import fused_vision_layers
from engine.model.patch_embedding import use_patch_products
from engine.model.tiles import unique_tiles
from engine.utils.device import host_copy, to_device
from engine.utils.logging import get_logger
from engine.utils.profiling import profile_range
from engine.vocab import IGNORE_INDEX, tile_size_from_config, tokens_per_tile_from_config

log = get_logger("model")

ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "eager")


def check_attention_backend(attn_implementation: str) -> str:
    """The name of a transformers attention implementation this engine runs, or an error naming the fix."""
    if attn_implementation not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_BACKENDS}, got {attn_implementation!r}")
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package (pip install "
                "'multimodal-coconut[flash]'); it is not installed. Use 'sdpa' (the default)."
            )
    return attn_implementation


def call_as_forward(module: nn.Module, fn: Callable, *tensors: torch.Tensor):
    """``fn(*tensors)`` run as the forward of one call of ``module``: the module's hooks (DeepSpeed ZeRO-3's
    parameter gather before and release after, its backward hooks on the call's inputs and outputs) wrap it.
    ``fn`` must return a tuple of tensors; inside it, call the module's submodules without hooks."""
    module.forward = fn  # this call only: nn.Module.__call__ runs the hooks around the instance's forward
    try:
        return module(*tensors)
    finally:
        del module.forward


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


@contextlib.contextmanager
def plain_calls(module: nn.Module):
    """Inside ``call_as_forward(module, ...)``: a call of ``module`` (by code that calls it, e.g. transformers' own
    forward one level up) runs its class forward without the module's hooks, the call being already inside them
    (global module hooks, `torch.nn.modules.module.register_module_forward_hook`, still run)."""
    saved = {name: getattr(module, name) for name in _HOOK_DICTS}
    forward = module.__dict__.pop("forward", None)
    for name in _HOOK_DICTS:
        setattr(module, name, type(saved[name])())
    try:
        yield
        added = [name for name in _HOOK_DICTS if getattr(module, name)]
    finally:
        for name, hooks in saved.items():
            setattr(module, name, hooks)
        if forward is not None:
            module.forward = forward
    if added:  # they went to the emptied dicts, which are gone now
        raise RuntimeError(f"hooks were registered on {type(module).__name__} during its own call ({added})")


def _ce_sum(head, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def _ce_sum_padded(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int, h: torch.Tensor, y: torch.Tensor):
    """`_ce_sum` with the head's weight padded to an aligned vocabulary (`fused_ops.aligned_vocab_weight`): the
    padding columns are masked out of the softmax in place (a slice would allocate a padded gradient in backward)."""
    logits = F.linear(h, weight, bias).float()
    logits[:, vocab:] = float("-inf")
    return F.cross_entropy(logits, y, reduction="sum")


@dataclass
class CoconutOutput(ModelOutput):
    """The forward's outputs. A transformers `ModelOutput` (a dict as well as a dataclass): DeepSpeed's engine
    finds the tensors it hooks its backward set-up onto (timers, ZeRO's accumulation boundary) in a dict, a list or
    a tuple only, and skipped that set-up for a plain dataclass."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V), None when only the loss was asked for
    hidden_states: torch.Tensor | None = None  # (B, T, H) last-layer hidden states, post-norm
    inputs_embeds: torch.Tensor | None = None  # (B, T, H) the inputs actually fed: thoughts at latent positions
    num_passes: int | None = None
    cache: object | None = None  # the KV cache with use_cache=True (transformers' name from 5.24 on)

    @property
    def past_key_values(self):
        """`cache` under its name before transformers 5.24 (and this output's before it was a ModelOutput)."""
        return self.cache


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
    # A zero that depends on the vision path's parameters (`vision_every_batch` with no image in the batch): added
    # to the loss, it gives them zero gradients where they would have had none.
    image_anchor: torch.Tensor | None = None


def _labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label (position t predicts labels[:, t + 1]) and those labels, in row-major
    order. With the batch's host copy of the labels (`engine.utils.device.host_copy`) the positions are found on
    the host and gathered by an index, so neither this forward nor its backward waits for the device to count
    them, as a boolean mask's selection does; the same rows either way."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    host = host_copy(labels)
    if host is None:
        selected = labels[:, 1:] != IGNORE_INDEX
        return hidden[:, :-1][selected], labels[:, 1:][selected]
    positions = (host[:, 1:] != IGNORE_INDEX).nonzero()  # (N, 2): row, position
    rows = positions[:, 0] * hidden.shape[1] + positions[:, 1]
    index = to_device(rows, hidden.device)
    targets = to_device(host[positions[:, 0], positions[:, 1] + 1], labels.device)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), targets


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
        vision = getattr(getattr(base, "model", None), "vision_tower", None)
        if vision is not None:  # the patch embedding's strided Conv2d as one matrix product (the same parameters)
            use_patch_products(vision)
        self.latent_id = int(latent_id)
        self.start_latent_id = int(start_latent_id)
        self.end_latent_id = int(end_latent_id)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        # How a pass builds its input embeddings (set_injection); "auto" is decided at each forward
        # (`fast_paths.injection`), so that moving the model to a GPU after construction switches the fused op on.
        self._injection_mode = "auto"
        # How the one-position latent passes of an aligned batch run (set_latent_passes); the block object holds
        # captured CUDA graphs, so it is created on first use and kept outside the module tree.
        self._latent_passes_mode = "auto"
        self._latent_blocks: dict[tuple[bool, bool, bool], object] = {}  # by (CUDA graphs, fused ops, staged)
        self._latent_buckets = (128, 32, 1)  # (prefix, final chunk, forwards per step): see set_latent_passes
        self.layer_ops_mode = "auto"  # training forwards' layer ops: see set_layer_ops
        self.activation_checkpointing = False  # set_activation_checkpointing
        # False: `<|latent|>` is an ordinary token whose own learned embedding fills every thought position (the
        # paper's "pause as thought" ablation); `prepare` then schedules no feedback, for training and generation.
        self.thought_feedback = True
        # True: a batch without images still runs the vision tower and projector, on one blank tile whose features
        # join the loss at weight zero (`PreparedBatch.image_anchor`). Ranks whose batches mix image and text-only
        # records then run the same modules in every batch, as DeepSpeed's ZeRO collectives need (the gradient
        # buckets of ZeRO-2, the parameter gathers of ZeRO-3); the trainer sets it for such runs on several ranks, and
        # on one rank with offloaded optimizer states under gradient accumulation (DeepSpeed drops the accumulated
        # gradients of parameters a cycle's last micro-batch leaves unused).
        self.vision_every_batch = False

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
        return next(self.base.lm_head.parameters()).device  # iterated: see `dtype`

    @property
    def dtype(self) -> torch.dtype:
        # iterated, not read as `.weight`: under ZeRO-3 that getter gathers the weight during a forward
        return next(self.base.lm_head.parameters()).dtype

    def set_attention_backend(self, name: str) -> None:
        """'sdpa' (default), 'flash_attention_2' (when installed) or 'eager' (for debugging)."""
        self.base.set_attn_implementation(check_attention_backend(name))

    def set_injection(self, mode: str) -> None:
        """How each pass builds its input embeddings.

        - "reference": PyTorch (embedding + masked_scatter once per batch, torch.where + cat per latent pass);
        - "fused": the `coconut::latent_inject` Triton op (`kernels/latent_inject.py`), one read and one write per
          row of each chunk; on CPU only under the Triton interpreter (TRITON_INTERPRET=1), else an error;
        - "auto" (default): "fused" when the model is on CUDA and triton imports, else "reference".
        Values and gradients are the same either way.
        """
        if mode == "fused":
            fast_paths.injection(self, mode)  # an error naming why, when the op cannot run here
        elif mode not in fast_paths.INJECTION_MODES:
            raise ValueError(f"injection mode must be one of {fast_paths.INJECTION_MODES}, got {mode!r}")
        self._injection_mode = mode

    def set_latent_passes(self, mode: str, *, prefix_bucket: int = 128, final_bucket: int = 32,
                          forwards_per_step: int = 1) -> None:
        """How the one-position latent passes of an aligned batch run (`engine/model/latent_block.py`).

        - "transformers": one pass per latent column with the transformers DynamicCache (any layout): a call of the
          transformers language model, or in training with fused layer ops the same pass through the layer stack
          (`set_layer_ops`);
        - "static": the passes as one static-shape block over the model's own modules, run eagerly (any device;
          what the CUDA graphs capture, so that CPU tests can compare it with "transformers");
        - "cuda_graph": that block captured in CUDA graphs, forward and backward, per shape bucket;
        - "auto" (default): "cuda_graph" for training on CUDA (gradients on, no autocast) unless DeepSpeed ZeRO-3
          gathers the parameters per module, which a graph cannot replay ("transformers" then); under ZeRO-3 with the
          language model as one leaf module the graphs read staged copies of the gathered weights.
        Batches that are not aligned (latents in scattered columns) always take the "transformers" passes. When the
        caller does not ask for the cache (training), the block runs the final pass too, as one chunk.
        `prefix_bucket` / `final_bucket`: the block pads the prefix's cache and the final chunk up to a multiple of
        them, so that one graph serves every length in a bucket (padding is masked out or causally after every
        real column; larger buckets mean fewer captures and more wasted work). `forwards_per_step`: training
        forwards per optimizer step (gradient accumulation): the graphs with staged weights are sized against a
        whole step's peak, measured over the first steps' forwards, run eagerly.
        """
        if min(prefix_bucket, final_bucket, forwards_per_step) < 1:
            raise ValueError(f"prefix_bucket, final_bucket and forwards_per_step must be >= 1, got {prefix_bucket}, "
                             f"{final_bucket} and {forwards_per_step}")
        fast_paths.check_latent_passes_mode(self, mode)
        self._latent_passes_mode = mode
        if (prefix_bucket, final_bucket, forwards_per_step) != self._latent_buckets:
            self._latent_blocks.clear()
            self._latent_buckets = (prefix_bucket, final_bucket, forwards_per_step)

    def set_layer_ops(self, mode: str) -> None:
        """The layers' elementwise work in training forwards: through the modules ("reference") or through Triton
        kernels with their backward ("fused"; on CPU only under TRITON_INTERPRET=1). Fused, the decoder layers'
        norms, rotary embedding and SwiGLU product go through `engine.model.fused_ops.GradFusedOps` in the latent
        block and, with gradients on, in the multi-position passes, which then run through the layer stack instead
        of transformers calls (`engine.model.stack_pass`, decided by `fast_paths.stack_passes`); the vision
        encoder layers' LayerNorms with their layer-scaled residual adds go through `engine.model.vision_layers`
        (`fast_paths.vision_layers`). "auto" (default): fused on CUDA once a self-check of the kernels passed."""
        if mode == "fused":  # an error naming why, when the kernels cannot run here
            fast_paths.layer_ops(self, mode, self.device, self.dtype)
        elif mode not in fast_paths.LAYER_OPS:
            raise ValueError(f"layer ops must be one of {fast_paths.LAYER_OPS}, got {mode!r}")
        if mode != self.layer_ops_mode:  # blocks of the other ops would keep their graphs' memory
            self._latent_blocks.clear()
        self.layer_ops_mode = mode

    def set_liger_kernels(self, pieces) -> None:
        """Liger-Kernel's Triton kernels (`engine/model/liger.py`, optional package): exactly `pieces` of
        fused_linear_cross_entropy (in `lm_loss`, instead of the chunked lm_head + cross-entropy, which stays the
        reference), rms_norm, swiglu and rope (process-wide) for the language model; an empty list switches all off."""
        from engine.model.liger import apply_liger_kernels

        if isinstance(pieces, str):  # "rms_norm" or "rms_norm,swiglu": the names, not their letters
            pieces = [p.strip() for p in pieces.split(",") if p.strip()]
        self._liger_pieces = apply_liger_kernels(self.language_model, pieces)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint every decoder layer in training forwards (`engine/model/checkpointing.py`): only the layers'
        inputs are kept for backward, each layer is recomputed there, against the KV cache as it was (transformers'
        own checkpointing drops the cache). The latent passes then run as transformers calls (the graphed block
        keeps its activations)."""
        if enabled and self._latent_passes_mode in ("static", "cuda_graph"):
            raise RuntimeError(
                f"activation checkpointing runs the latent passes as transformers calls; latent passes are set to "
                f"{self._latent_passes_mode!r}: use set_latent_passes('auto') or 'transformers'"
            )
        self.activation_checkpointing = bool(enabled)

    def release_latent_graphs(self) -> None:
        """Drop the captured latent-pass graphs (and their memory pools); the next training forwards measure and
        recapture (`LatentBlock.release`)."""
        for block in self._latent_blocks.values():
            block.release()

    def latent_blocks_described(self) -> str:
        """How the latent blocks called since they were built or released ran (`LatentBlock.describe`), "; "-joined;
        "" when none was called (the transformers passes, or no latents)."""
        return "; ".join(block.describe() for block in self._latent_blocks.values() if block.calls)

    def _rope_in_default_range(self, batch) -> bool:
        """Whether this forward's positions keep a dynamic-NTK rope on its default frequencies, where the fast paths
        (the latent block, the stack passes) compute it without transformers' host-side update; True for other
        ropes. A rope an earlier, longer forward grew is put back first, and the latent graphs, captured over its
        old frequency buffer, are released to be captured again."""
        limit = rope_default_limit(self.language_model)
        if limit is None:
            return True
        host_positions = host_copy(batch.position_ids)  # the collator's: no device read
        has_host = host_positions is not None and host_positions.numel()
        last_position = int(host_positions.max()) if has_host else batch.schedule.seq_len - 1
        if last_position >= limit:  # transformers rescales past it, on the host: its passes do that eagerly
            log.warning("positions up to %d reach past the dynamic rope's default range (%d): this forward runs the "
                        "transformers passes", last_position, limit)
            return False
        rotary = self.language_model.rotary_emb
        restore_default_rope(self.language_model, batch.input_ids.device, self.dtype)
        if rotary.inv_freq.data_ptr() != getattr(self, "_rope_buffer", None):
            self.release_latent_graphs()
            self._rope_buffer = rotary.inv_freq.data_ptr()
        return True

    def _latent_block_runner(self, schedule: PassSchedule, device: torch.device):
        """The LatentBlock for this forward (on inputs on `device`), or None for the transformers passes."""
        if schedule.one_position_passes == 0:
            return None
        mode = fast_paths.latent_passes(self, self._latent_passes_mode, device).choice
        if mode == "transformers":
            return None
        graphed = mode == "cuda_graph"
        # ZeRO-3 gathers the weights into fresh memory at every call: the graphs read staged copies of them
        staged = graphed and fast_paths.is_partitioned(self.language_model.norm)
        if staged and not self.language_model_in_one_call:
            raise RuntimeError(
                "latent_passes 'cuda_graph' under ZeRO-3 needs the language model as one leaf module "
                "(set_language_model_leaf before deepspeed.initialize): per-module gathers cannot run in a graph"
            )
        fused = fast_paths.layer_ops(self, self.layer_ops_mode, device, self.dtype).choice == "fused"
        key = (graphed, fused, staged)
        if key not in self._latent_blocks:
            from engine.model.latent_block import LatentBlock

            self._latent_blocks[key] = LatentBlock(
                self.language_model,
                use_cuda_graphs=graphed,
                bucket=self._latent_buckets[0],
                final_bucket=self._latent_buckets[1],
                fused_ops=fused,
                staged_weights=staged,
                forwards_per_step=self._latent_buckets[2],
            )
        return self._latent_blocks[key]

    def _stack_pass_ops(self, device: torch.device):
        """The ops table of this forward's multi-position passes through the layer stack (`stack_pass`), or None
        for transformers calls (`fast_paths.stack_passes` decides)."""
        if fast_paths.stack_passes(self, device, self.dtype).choice != "layer_stack":
            return None
        from engine.model.fused_ops import GradFusedOps

        # not merged: a stack pass runs each layer once, over hundreds of rows a product, where a concatenated copy
        # of the weights would cost a copy and memory and save no launch worth it
        return GradFusedOps(self.language_model)

    def _injection_hook(self) -> Callable | None:
        """The injection hook of this forward (None: the PyTorch path), `fast_paths.injection` deciding "auto"."""
        fused = fast_paths.injection(self, self._injection_mode).choice == "fused"
        return self._fused_inject if fused else None

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
    def encode_images(self, pixel_values: torch.Tensor, *, dedupe: bool = False) -> torch.Tensor:
        """Vision tower + projector: (tiles, 3, H, W) -> (tiles * tokens_per_tile, hidden). With ``dedupe``,
        identical tiles (several questions about one image) are encoded once (`engine.model.tiles`)."""
        groups = unique_tiles(pixel_values) if dedupe else None
        fused = fast_paths.vision_layers(self, pixel_values.device, self.dtype).choice == "fused"
        with profile_range("coconut/image_encode"), fused_vision_layers(self, fused):
            pixels = (pixel_values if groups is None else pixel_values[groups[0]]).to(self.dtype)
            if self.vision_tower_in_one_call:
                features = self._image_features_in_one_call(pixels)
            else:
                features = self.base.model.get_image_features(pixel_values=pixels).pooler_output
        if groups is not None:
            features = features[groups[1]]  # (tiles, tokens_per_tile, hidden) in the batch's order
        return features.reshape(-1, features.shape[-1])

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """(tiles, 3, S, S) normalised floats with S the vision tower's input size. Tiles of another size give the
        tower another number of patches: more feature rows than image tokens were silently cut to fit, fewer
        failed in the scatter (or, in the fused injection kernel, were read past their end)."""
        tile = tile_size_from_config(self.base.config)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, tile, tile):
            raise ValueError(f"pixel_values must be (total_tiles, 3, {tile}, {tile}) for this model's {tile}-pixel "
                             f"tiles (engine.data.images.ImageProcessor makes them), got {tuple(pixel_values.shape)}")  # fmt: skip
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be normalised floats (ImageProcessor), got {pixel_values.dtype}")

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        min_passes: int = 0,
        dedupe_images: bool = False,
    ) -> PreparedBatch:
        """Validate the batch, build its pass schedule (at least `min_passes` passes) and encode the images (each
        distinct tile once with `dedupe_images`, as generation does)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None:
            self._check_pixel_values(pixel_values)
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
        image_anchor = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values, dedupe=dedupe_images)
            if self._injection_hook() is not None:
                from kernels.latent_inject import image_index_from_ids

                # Once per batch: each pass's fused op gathers its image rows through it (no masked_scatter).
                image_index = image_index_from_ids(input_ids, self.image_token_id)
        elif self.vision_every_batch and (torch.is_grad_enabled()
                                          or fast_paths.is_partitioned(self.base.model.vision_tower)):
            # needed where gradients are reduced (ZeRO-2) or parameters gathered (ZeRO-3, generation included)
            tile = tile_size_from_config(self.base.config)
            blank = torch.zeros(1, 3, tile, tile, dtype=self.dtype, device=input_ids.device)
            total = self.encode_images(blank).float().sum()
            # a zero even where a broken tower gives inf or NaN (its gradient is zero either way)
            image_anchor = torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        return PreparedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            latent_mask=input_ids == feedback_id,
            image_features=image_features,
            schedule=schedule,
            tiles_per_row=tiles_per_row,
            image_index=image_index,
            image_anchor=image_anchor,
        )

    def base_embeddings(self, batch: PreparedBatch) -> torch.Tensor:
        """Token embeddings with the image features merged in (latent positions still hold placeholders)."""
        inject = self._injection_hook()
        if inject is not None:
            return inject(batch, 0, batch.input_ids.shape[1], None)  # one fused gather for the whole batch
        embeds = self.base.get_input_embeddings()(batch.input_ids)
        if batch.image_features is not None:
            features = batch.image_features.to(embeds.dtype)
            host_ids = host_copy(batch.input_ids)
            if host_ids is None:
                image_mask = (batch.input_ids == self.image_token_id).unsqueeze(-1)
                return embeds.masked_scatter(image_mask, features)
            # the image positions from the batch's host copy: an index, where masked_scatter's backward counts the
            # mask on the host (a wait for the device); the same rows in the same order
            positions = (host_ids.flatten() == self.image_token_id).nonzero().flatten()
            if positions.numel() != features.shape[0]:
                raise ValueError(f"{features.shape[0]} image feature rows for {positions.numel()} <IMG_CONTEXT> tokens")
            positions = to_device(positions, embeds.device)
            embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, positions, features).view_as(embeds)
        return embeds

    # ------------------------------------------------------------------ the passes
    def run_passes(self, batch: PreparedBatch, cache=None, *, keep_inputs: bool = False, need_cache: bool = True):
        """Run the schedule. Returns (hidden (B,T,H), inputs_embeds or None, cache).

        Without `need_cache` the returned cache may stop short of the sequence's end (the latent block then
        computes the final pass too, without storing its K/V). Under DeepSpeed ZeRO-3 with the language model as
        one leaf module (`set_language_model_leaf`), every pass runs inside one call of the language model."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.language_model.config)
        if self.language_model_in_one_call:
            return self._passes_in_one_call(batch, cache, keep_inputs, need_cache)
        inject = self._injection_hook()  # "auto" decided for this forward
        embeds = self.base_embeddings(batch) if inject is None else None
        return self._passes(batch, cache, embeds, inject, keep_inputs, need_cache, self.language_model)

    # ------------------------------------------------------------------ ZeRO-3: the language model as one leaf
    def set_language_model_leaf(self, enabled: bool = True) -> None:
        """Under DeepSpeed ZeRO-3, treat the language model as one leaf module (call before deepspeed.initialize).

        ZeRO-3 gathers a module's parameters before its forward and frees them after, per module, and checks that
        every rank calls the same modules in the same order; a latent forward calls every decoder module once per
        pass, so the parameters would be gathered once per pass, forward and backward, and ranks with different
        latent counts would need lockstep passes. As a leaf (`deepspeed.utils.set_z3_leaf_module`) the language
        model's parameters are gathered when it is called and freed after, and the language-model work runs inside
        one such call (`in_language_model_call`): a forward's embeddings and every pass (the latent block eagerly),
        or one decoding step. One gather per forward and one per backward, whatever the number of latents."""
        from deepspeed.utils import set_z3_leaf_module

        set_z3_leaf_module(self.language_model, enabled)

    def set_vision_tower_leaf(self, enabled: bool = True) -> None:
        """Under DeepSpeed ZeRO-3, treat the vision tower as one leaf module (call before deepspeed.initialize): its
        parameters are gathered once when it is called and once for its backward, instead of around each of its
        few hundred modules, whose Python hooks then cost more host time than the tower's kernels take (at the
        1B geometry, ~150 ms per step forward and as much backward on two GPUs). Gathered, the tower holds all its
        weights for the duration of its call (0.6 GB at InternViT-300M in bf16)."""
        from deepspeed.utils import set_z3_leaf_module

        set_z3_leaf_module(self.base.model.vision_tower, enabled)

    @property
    def vision_tower_in_one_call(self) -> bool:
        """Whether the vision tower runs inside one call of its module (ZeRO-3 with the leaf set)."""
        return fast_paths.gathered_per_call(self.base.model.vision_tower)

    def _image_features_in_one_call(self, pixels: torch.Tensor) -> torch.Tensor:
        """transformers' `get_image_features` inside one call of the vision tower (a ZeRO-3 leaf): the tower's
        parameters gathered once around it. DeepSpeed reduces a leaf's gradients in a full backward hook, which
        fires once the gradients of the call's tensor inputs are computed, and only if its outputs are tensors:
        the call returns the features as a tuple, and takes, besides the pixels, a zero scalar that needs a
        gradient and is added to them before anything else, so that the hook fires after the tower's first
        product, never before its weights have their gradients (pixels need none)."""
        tower = self.base.model.vision_tower
        anchor = pixels.new_zeros((), requires_grad=torch.is_grad_enabled())

        def forward(pixels, anchor):
            with plain_calls(tower):
                return (self.base.model.get_image_features(pixel_values=pixels + anchor).pooler_output,)

        return call_as_forward(tower, forward, pixels, anchor)[0]

    @property
    def language_model_in_one_call(self) -> bool:
        """Whether the language model runs inside one call of its module (ZeRO-3 with the leaf set)."""
        return fast_paths.gathered_per_call(self.language_model)

    def in_language_model_call(self, fn: Callable, *tensors: torch.Tensor):
        """``fn(language_model, *tensors)`` -> a tuple of tensors, inside one call of the language model module when
        it is a ZeRO-3 leaf (its parameters gathered throughout, forward and backward; ``language_model`` is then its
        forward without hooks, which must not be called through the module), else directly with the module."""
        lm = self.language_model
        if not self.language_model_in_one_call:
            return fn(lm, *tensors)
        unhooked = functools.partial(type(lm).forward, lm)
        return call_as_forward(lm, functools.partial(fn, unhooked), *tensors)

    def _passes_in_one_call(self, batch, cache, keep_inputs, need_cache):
        """The embeddings and `_passes` inside one call of the language model (`in_language_model_call`). The
        call's input is the image features: DeepSpeed reduces the leaf's gradients in a hook that fires once the
        call's inputs have their gradients, i.e. after every weight of the call has its own. Without images, or
        with features that need no gradient, a zero scalar that needs one, added to the embeddings, is that input
        (with no input needing one, the hook would fire before the weights' gradients exist, and they would be
        lost; DESIGN.md, "ZeRO-3")."""
        result = {}
        features = batch.image_features
        # the features are the call's input that needs a gradient, unless they need none (a frozen tower)
        add_anchor = features is None or not features.requires_grad

        def forward(language_model, *call_inputs):
            inside = dataclasses.replace(batch, image_features=call_inputs[0]) if features is not None else batch
            embeds = self.base_embeddings(inside)  # the embedding weight is gathered inside the call
            if add_anchor:
                embeds = embeds + call_inputs[-1]
            hidden, inputs, _ = self._passes(inside, cache, embeds, None, keep_inputs, need_cache, language_model)
            result["has_inputs"] = inputs is not None
            return (hidden, inputs) if inputs is not None else (hidden,)

        call_inputs = [] if features is None else [features]
        if add_anchor:
            device = batch.input_ids.device
            call_inputs.append(torch.zeros((), dtype=self.dtype, device=device, requires_grad=torch.is_grad_enabled()))
        outputs = self.in_language_model_call(forward, *call_inputs)
        return outputs[0], (outputs[1] if result["has_inputs"] else None), cache

    def _passes(self, batch, cache, embeds, inject, keep_inputs, need_cache, language_model):
        """The pass loop of `run_passes`; ``language_model`` is what each transformers pass calls."""
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        with checkpointed_layers(self.language_model, checkpointing):
            return self._pass_loop(batch, cache, embeds, inject, keep_inputs, need_cache, language_model)

    def _pass_loop(self, batch, cache, embeds, inject, keep_inputs, need_cache, language_model):
        schedule = batch.schedule
        hidden_chunks, input_chunks = [], []
        prev_last = None  # (B, H): hidden state of the last position computed so far
        fast = self._rope_in_default_range(batch)
        block = self._latent_block_runner(schedule, batch.input_ids.device) if fast else None
        stack_ops = self._stack_pass_ops(batch.input_ids.device) if fast else None
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
                    end = batch.input_ids.shape[1] if not need_cache else start + width
                    # latent rows of these columns are replaced inside the block
                    columns = inject(batch, start, end, None) if inject is not None else embeds[:, start:end]
                    hidden, chunk_in = block.run_columns(batch, cache, columns, start, prev_last, keep_inputs)
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
                        first = feed_thoughts(embeds[:, start], batch.latent_mask[:, start], prev_last)
                        chunk_in = torch.cat([first.unsqueeze(1), embeds[:, start + 1 : end]], dim=1)
                    mask, positions = batch.attention_mask[:, :end], batch.position_ids[:, start:end]
                    if stack_ops is not None:
                        all_real = end <= schedule.real_prefix_columns  # known on the host: no synchronisation
                        hidden = stack_pass(self.language_model, chunk_in, mask, positions, cache, stack_ops, all_real)
                    else:
                        with safe_attention(end, chunk_in.device):  # cuDNN's masked backward (compat.py)
                            hidden = language_model(
                                inputs_embeds=chunk_in,
                                attention_mask=mask,
                                position_ids=positions,
                                use_cache=True,
                                **cache_kwargs(self.language_model, cache),
                            ).last_hidden_state
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
            if batch.image_anchor is not None:
                loss = loss + batch.image_anchor
        return CoconutOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden,
            inputs_embeds=inputs,
            num_passes=batch.schedule.num_passes + max(0, min_passes - batch.schedule.num_passes),
            cache=cache if use_cache else None,
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
        def one_pass(language_model, x_in):
            out = language_model(inputs_embeds=x_in, attention_mask=ones, position_ids=ones * 0, use_cache=False)
            return (out.last_hidden_state,)

        for _ in range(count):
            with profile_range("coconut/padding_pass"):
                (hidden,) = self.in_language_model_call(one_pass, x)
            term = term + hidden.float().sum() * 0.0
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
        if logits is not None:
            selected = targets != IGNORE_INDEX
            flat = logits[:, :-1][selected]
            return F.cross_entropy(flat.float(), targets[selected]) if flat.numel() else logits.sum() * 0.0
        h, y = _labelled_positions(hidden, labels)  # (N, H), (N,)
        head = self.base.lm_head
        if fast_paths.is_partitioned(head):
            # ZeRO-3: every chunk inside one call of the lm_head module, so that each rank issues one gather per
            # forward and one per backward whatever its number of labelled tokens (chunk counts differ by rank).
            unhooked = functools.partial(type(head).forward, head)
            return call_as_forward(head, lambda h_in: (self._chunked_loss(h_in, y, unhooked),), h)[0]
        if h.shape[0] == 0:
            return hidden.sum() * 0.0
        if "fused_linear_cross_entropy" in getattr(self, "_liger_pieces", ()):  # set_liger_kernels
            from engine.model.liger import fused_linear_cross_entropy_sum

            return fused_linear_cross_entropy_sum(h, head.weight, y) / h.shape[0]
        # an odd vocabulary sends cuBLAS to slow unaligned kernels: on CUDA the products use a padded weight
        pad_vocab = head.weight.is_cuda and fast_paths.padded_lm_head(head).choice == "on"
        return self._chunked_loss(h, y, head, pad_vocab=pad_vocab)

    def _chunked_loss(self, h: torch.Tensor, y: torch.Tensor, head, pad_vocab: bool = False) -> torch.Tensor:
        """Mean cross-entropy of ``head(h)`` (N, V) against ``y`` (N,), in chunks recomputed in backward.
        ``pad_vocab``: the head's weight padded once to an aligned vocabulary (a plain nn.Linear head; the same
        loss, GEMMs on aligned kernels: benchmarks/RESULTS.md)."""
        if h.shape[0] == 0:
            return h.sum() * 0.0
        if pad_vocab:
            from engine.model.fused_ops import aligned_vocab_weight

            weight, bias = aligned_vocab_weight(head)
            loss_sum = functools.partial(_ce_sum_padded, weight, bias, head.weight.shape[0])
        else:
            loss_sum = functools.partial(_ce_sum, head)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], self.loss_chunk_tokens):
            chunk = slice(i, i + self.loss_chunk_tokens)
            total = total + checkpoint(loss_sum, h[chunk], y[chunk], use_reentrant=False)
        return total / h.shape[0]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        options: GenerationOptions | None = None,
        **option_overrides,
    ) -> torch.Tensor:
        """Batched, KV-cached generation (`engine.model.generation.generate`): the prompt's latent thoughts, then
        greedy or sampled decoding. Prompts must be left-padded (every row's last column real). Returns (B, n) new
        tokens; a row that ended early (its eos included) is padded with the pad id. Options as a
        `GenerationOptions` and/or its fields by keyword (``max_new_tokens=64, kv_cache="paged", ...``)."""
        options = dataclasses.replace(options or GenerationOptions(), **option_overrides)
        return generate(self, input_ids, attention_mask, pixel_values, options)
