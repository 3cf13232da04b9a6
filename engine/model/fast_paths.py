"""Which fast path runs, decided in one place, and logged once with its reason.

Every "auto" choice of the engine is made here, for a model, a device and a mode:

- `injection`: how a pass builds its input embeddings (the fused Triton op `kernels.latent_inject` or PyTorch);
- `latent_passes`: how the one-position latent passes of a training batch run (the CUDA-graphed latent block, the
  same block eagerly, or one transformers call per pass);
- `layer_ops`: whether training forwards' decoder layers (the latent block's, and the transformers passes' through
  `stack_passes`) use the differentiable Triton ops table (`engine.model.fused_ops.GradFusedOps`), after a
  one-time numerical self-check, forward and backward;
- `stack_passes`: whether a training forward's multi-position passes run through the layer stack with those ops
  (`engine.model.stack_pass`) instead of transformers calls;
- `vision_layers`: whether a training forward's vision encoder layers run their LayerNorms and layer-scaled residual
  adds through the Triton kernels with their backward (`engine.model.vision_layers`);
- `decode_ops`: whether the paged runner's layers use the Triton ops table (`engine.model.fused_ops`), after a
  one-time numerical self-check of the kernels on the device;
- `merged_projections`: whether the fused layers use one q/k/v and one gate/up product;
- `padded_lm_head`: whether those steps and the training loss use the lm_head padded to an aligned vocabulary width;
- `patch_embedding`: whether the vision tower's patch embedding runs as one matrix product (`PatchConv2d`);
- `eval_kv_cache`: the KV cache of validation generation (paged or dynamic).

Each function returns a `Decision` (the choice and why); the first time a (path, choice, reason) is seen in the
process it is logged at INFO, so a run's log says once which paths it took and why, e.g.
``[coconut] INFO fast path latent_passes: transformers (parameters are partitioned (DeepSpeed ZeRO-3))``.
Functions named ``*_unsupported`` return why a path cannot run (None when it can); an explicit request for a path
that cannot run is an error that carries that reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.layers import layer_stack_unsupported
from engine.utils.logging import get_logger

log = get_logger("fast_paths")

INJECTION_MODES = ("auto", "fused", "reference")
LATENT_PASS_MODES = ("auto", "transformers", "static", "cuda_graph")
LAYER_OPS = ("auto", "fused", "reference")
EVAL_KV_CACHES = ("auto", "dynamic", "paged")


@dataclass(frozen=True)
class Decision:
    path: str
    choice: str
    reason: str


_logged: set[tuple[str, str, str]] = set()


def _decide(path: str, choice: str, reason: str) -> Decision:
    key = (path, choice, reason)
    if key not in _logged:
        _logged.add(key)
        if os.environ.get("RANK", "0") == "0":  # the ranks decide alike: one line per decision, not one per rank
            log.info("fast path %s: %s (%s)", path, choice, reason)
    return Decision(path, choice, reason)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device`: CUDA, or the CPU under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def is_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the module's parameters (they carry ``ds_id``). Iterates, never
    indexes: under ZeRO-3 reading ``module.weight`` gathers the parameter, a collective only this rank would issue."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered_per_call(module: nn.Module) -> bool:
    """Whether ZeRO-3 gathers the module's parameters once around each call of it: a leaf module
    (`deepspeed.utils.set_z3_leaf_module`) whose parameters are partitioned."""
    return bool(getattr(module, "_z3_leaf", False)) and is_partitioned(module)


# ---------------------------------------------------------------------------------------------- injection


def injection_unsupported(model, *, allow_interpreter: bool = False) -> str | None:
    """Why the fused op cannot build this model's inputs, or None when it can."""
    embedding = model.base.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None or embedding.scale_grad_by_freq:
        return f"the input embeddings must be a plain nn.Embedding (no max_norm/scale_grad_by_freq): {embedding}"
    if embedding.sparse:
        return "the input embeddings have sparse gradients, which the fused op does not produce"
    if is_partitioned(embedding):
        return "the embedding weight is partitioned (DeepSpeed ZeRO-3)"
    weight = embedding.weight
    if weight.dim() != 2:
        return "the embedding weight is not 2-D"
    if weight.device.type != "cuda":
        if not (allow_interpreter and triton_runs_on(weight.device)):
            return (
                f"the model is on {weight.device}: the Triton kernel needs CUDA, or TRITON_INTERPRET=1 (set before "
                "kernels.latent_inject is imported) to run interpreted on CPU"
            )
    try:
        import kernels.latent_inject  # noqa: F401
    except ImportError as e:
        return f"kernels.latent_inject does not import ({e})"
    return None


def injection(model, mode: str) -> Decision:
    """"fused" or "reference" for `mode` ("auto": fused when the model is on CUDA and the op can run)."""
    if mode not in INJECTION_MODES:
        raise ValueError(f"injection mode must be one of {INJECTION_MODES}, got {mode!r}")
    if mode == "reference":
        return _decide("injection", "reference", "asked for")
    reason = injection_unsupported(model, allow_interpreter=mode == "fused")
    if mode == "fused":
        if reason is not None:
            raise RuntimeError(f"set_injection('fused'): {reason}")
        return _decide("injection", "fused", "asked for")
    if reason is not None:
        return _decide("injection", "reference", reason)
    return _decide("injection", "fused", "auto on CUDA")


# ---------------------------------------------------------------------------------------------- latent passes


def latent_block_unsupported(model) -> str | None:
    """Why the latent block cannot run this model's language model (None when it can); decided once per model."""
    if not hasattr(model, "_latent_block_reason"):
        model._latent_block_reason = layer_stack_unsupported(model.language_model, training=True, graphs=True)
    return model._latent_block_reason


def check_latent_passes_mode(model, mode: str) -> None:
    """An explicit mode that cannot run this model is an error naming why (set_latent_passes)."""
    if mode not in LATENT_PASS_MODES:
        raise ValueError(f"latent passes mode must be one of {LATENT_PASS_MODES}, got {mode!r}")
    if mode in ("static", "cuda_graph"):
        reason = latent_block_unsupported(model)
        if reason is not None:
            raise RuntimeError(f"set_latent_passes({mode!r}): {reason}")
    if mode == "cuda_graph" and model.device.type != "cuda":
        raise RuntimeError(f"set_latent_passes('cuda_graph') needs the model on CUDA, it is on {model.device}")


def latent_passes(model, mode: str, device: torch.device) -> Decision:
    """"cuda_graph", "static" or "transformers" for a forward on `device` ("auto": the CUDA-graphed block for
    training on CUDA, with gradients on, no autocast and a supported layer stack; under ZeRO-3 too when the
    language model runs in one call (`MultimodalCoconut.set_language_model_leaf`: the graphs then read staged
    copies of its gathered weights) and their buffers fit (`latent_block.staged_graphs_unsupported`; else the
    block eagerly), else transformers)."""
    if mode != "auto":
        return _decide("latent_passes", mode, "asked for")
    if model.activation_checkpointing and torch.is_grad_enabled():
        return _decide("latent_passes", "transformers", "activation checkpointing checkpoints the transformers passes")
    if device.type != "cuda":
        return _decide("latent_passes", "transformers", f"auto on {device.type}")
    if not torch.is_grad_enabled():
        return _decide("latent_passes", "transformers", "auto without gradients (the block is captured for training)")
    if torch.is_autocast_enabled("cuda"):
        return _decide("latent_passes", "transformers", "auto under autocast")
    reason = latent_block_unsupported(model)
    if reason is not None:
        return _decide("latent_passes", "transformers", reason)
    if is_partitioned(model.language_model.norm):
        if model.language_model_in_one_call:  # gathered for the whole call, at addresses that change: staged
            from engine.model.latent_block import staged_graphs_unsupported

            if not hasattr(model, "_staged_graphs_reasons"):  # weight sizes and devices do not change: once each
                model._staged_graphs_reasons = {}
            if str(device) not in model._staged_graphs_reasons:
                model._staged_graphs_reasons[str(device)] = staged_graphs_unsupported(model.language_model, device)
            reason = model._staged_graphs_reasons[str(device)]
            if reason is not None:
                return _decide("latent_passes", "static", f"ZeRO-3, the block eagerly in one gather: {reason}")
            return _decide("latent_passes", "cuda_graph", "ZeRO-3 with the language model gathered once per call, "
                           "the graphs reading staged copies of its weights")
        return _decide("latent_passes", "transformers", "parameters are partitioned (DeepSpeed ZeRO-3) per module")
    return _decide("latent_passes", "cuda_graph", "auto for training on CUDA")


def layer_ops_unsupported(model, device: torch.device) -> str | None:
    """Why training forwards' decoder layers cannot use the differentiable Triton ops on `device` (None when they
    can); the layers' part decided once per model."""
    if not hasattr(model, "_layer_ops_reason"):
        model._layer_ops_reason = layer_stack_unsupported(model.language_model, fused_ops=True)
    if model._layer_ops_reason is not None:
        return model._layer_ops_reason
    if not triton_runs_on(device):
        return f"the layers run on {device}: the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU"
    return None


_self_checks: dict[tuple[str, str, torch.dtype], str | None] = {}


def _after_self_check(path: str, kernels: str, check, device: torch.device, dtype: torch.dtype) -> Decision:
    """"fused" once ``check(device, dtype)`` (run once per path, device and dtype in the process) returned None,
    else "reference" with the failure as the reason (and a warning naming the kernels)."""
    key = (path, str(device), dtype)
    if key not in _self_checks:
        _self_checks[key] = check(device, dtype)
        if _self_checks[key] is not None:
            log.warning("%s off on %s (%s): %s", kernels, device, dtype, _self_checks[key])
    if _self_checks[key] is not None:
        return _decide(path, "reference", f"self-check failed: {_self_checks[key]}")
    return _decide(path, "fused", "auto on CUDA, self-check passed")


def layer_ops(model, mode: str, device: torch.device, dtype: torch.dtype) -> Decision:
    """"fused" or "reference" for training forwards' decoder layers ("auto": fused on CUDA for layers the ops
    table knows, once the kernels pass a self-check, forward and backward, on this device and dtype)."""
    if mode not in LAYER_OPS:
        raise ValueError(f"layer ops must be one of {LAYER_OPS}, got {mode!r}")
    if mode == "reference":
        return _decide("layer_ops", "reference", "asked for")
    if mode == "auto" and device.type != "cuda":  # first: deciding this imports no kernel module
        return _decide("layer_ops", "reference", f"auto on {device.type}")
    reason = layer_ops_unsupported(model, device)
    if mode == "fused":
        if reason is not None:
            raise RuntimeError(f"layer ops 'fused': {reason}")
        return _decide("layer_ops", "fused", "asked for")
    if reason is not None:
        return _decide("layer_ops", "reference", reason)
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels on the host: not inside a CUDA graph, and slow
        return _decide("layer_ops", "reference", "auto under the Triton interpreter")
    from kernels.layer_grads import layer_grads_self_check

    return _after_self_check("layer_ops", "layer fusions", layer_grads_self_check, device, dtype)


def stack_passes(model, device: torch.device, dtype: torch.dtype) -> Decision:
    """"layer_stack" or "transformers" for a forward's multi-position passes: through `engine.model.stack_pass`
    with the fused layer ops (training, on the layers `layer_ops` fuses, SDPA attention), else transformers calls,
    which stay the path whenever something acts on transformers' modules or attention (checkpointing, Liger's
    patches, another attention backend, autocast)."""
    if not torch.is_grad_enabled():
        return _decide("stack_passes", "transformers", "without gradients")
    if layer_ops(model, model.layer_ops_mode, device, dtype).choice != "fused":
        return _decide("stack_passes", "transformers", "the layer ops are the modules")
    if model.activation_checkpointing:
        return _decide("stack_passes", "transformers", "activation checkpointing checkpoints the transformers passes")
    if is_partitioned(model.language_model.norm) and not model.language_model_in_one_call:
        return _decide("stack_passes", "transformers", "parameters are partitioned (DeepSpeed ZeRO-3) per module")
    patched = sorted(set(getattr(model, "_liger_pieces", ())) & {"rms_norm", "swiglu", "rope"})
    if patched:
        return _decide("stack_passes", "transformers", f"Liger-Kernel's module patches are on ({', '.join(patched)})")
    if model.training and float(getattr(model.language_model.config, "attention_dropout", 0.0) or 0.0) > 0.0:
        return _decide("stack_passes", "transformers", "attention dropout (the stack's attention has none)")
    backend = getattr(model.language_model.config, "_attn_implementation", "sdpa")
    if backend != "sdpa":
        return _decide("stack_passes", "transformers", f"attention backend {backend!r} (the stack uses SDPA)")
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return _decide("stack_passes", "transformers", "under autocast")
    return _decide("stack_passes", "layer_stack", "training with the fused layer ops")


def vision_layers(model, device: torch.device, dtype: torch.dtype) -> Decision:
    """"fused" or "modules" for a forward's vision encoder layers: `engine.model.vision_layers` in training with
    the fused layer ops (whose self-check covers its kernel), where the layers allow it (InternViT layers with
    LayerNorm and layer scale, not compiled, not partitioned by ZeRO-3 other than with the tower as one leaf)."""
    if not torch.is_grad_enabled():
        return _decide("vision_layers", "modules", "without gradients")
    if layer_ops(model, model.layer_ops_mode, device, dtype).choice != "fused":
        return _decide("vision_layers", "modules", "the layer ops are the modules")
    from engine.model.vision_layers import fused_vision_layers_unsupported

    reason = fused_vision_layers_unsupported(model)
    if reason is not None:
        return _decide("vision_layers", "modules", reason)
    return _decide("vision_layers", "fused", "training with the fused layer ops")


# ---------------------------------------------------------------------------------------------- decode ops



def decode_ops(language_model: nn.Module, requested: bool | None, device: torch.device, dtype: torch.dtype) -> Decision:
    """"fused" or "reference" for the paged runner's layers. `requested` None is auto: fused on CUDA for layers
    the Triton ops table knows, once the kernels pass a self-check on this device and dtype."""
    if requested is False:
        return _decide("decode_ops", "reference", "asked for")
    reason = layer_stack_unsupported(language_model, fused_ops=True)
    if requested:
        if reason is not None:
            raise NotImplementedError(f"fused_ops=True: {reason}")
        return _decide("decode_ops", "fused", "asked for")
    if reason is not None:
        return _decide("decode_ops", "reference", reason)
    if device.type != "cuda":
        return _decide("decode_ops", "reference", f"auto on {device.type}")
    from kernels.decode_fusions import decode_fusions_self_check

    return _after_self_check("decode_ops", "decode fusions", decode_fusions_self_check, device, dtype)


def _fused_layers_refusal(path: str, requested: bool, fused: bool, reason: Callable[[], str | None]) -> Decision | None:
    """The refusals every option of the fused layers shares: not asked for, no fused ops, or modules the option
    cannot stand in for (``reason()``, asked last: it walks the layers). None: none of them applies."""
    if not requested:
        return _decide(path, "off", "asked for")
    if not fused:
        return _decide(path, "off", "the layers do not use the fused ops")
    why = reason()
    return None if why is None else _decide(path, "off", why)


def merged_projections(layers: list[nn.Module], requested: bool, fused: bool) -> Decision:
    """Whether the fused layers use merged q/k/v and gate/up products (plain nn.Linear projections only)."""
    from engine.model.fused_ops import merge_unsupported

    refused = _fused_layers_refusal("merged_projections", requested, fused, lambda: merge_unsupported(layers))
    return refused or _decide("merged_projections", "on", "asked for")


def _checked_fused_layers_option(path: str, kernels: str, requested: bool, fused: bool,
                                 reason: Callable[[], str | None], check: str, device: torch.device,
                                 dtype: torch.dtype) -> Decision:  # fmt: skip
    """"on" or "off" for an option of the fused layers that runs kernels of its own: `_fused_layers_refusal`, then
    on CUDA the self-check ``check`` ("module.function", imported only then), once per device and dtype."""
    refused = _fused_layers_refusal(path, requested, fused, reason)
    if refused is not None:
        return refused
    if device.type == "cuda":
        module, function = check.rsplit(".", 1)
        checked = _after_self_check(path, kernels, getattr(importlib.import_module(module), function), device, dtype)
        if checked.choice != "fused":
            return _decide(path, "off", checked.reason)
    return _decide(path, "on", "asked for")


def split_k_products(layers: list[nn.Module], requested: bool, fused: bool, device: torch.device,
                     dtype: torch.dtype) -> Decision:  # fmt: skip
    """Whether the fused layers' o and down products of one-position steps are split-K partial sums that the next
    norm adds (`engine.model.fused_ops.SplitKProducts`; plain bias-free nn.Linear projections without hooks; on
    CUDA once the kernels pass a self-check on this device and dtype). The q/k/v product's partial sums, which the
    attention adds, are decided apart (`split_k_qkv`)."""
    from engine.model.fused_ops import split_k_unsupported

    return _checked_fused_layers_option("split_k_products", "split-K products", requested, fused,
                                        lambda: split_k_unsupported(layers), "kernels.decode_linear.decode_linear_self_check",
                                        device, dtype)  # fmt: skip


def rotary_in_attention(requested: bool, fused: bool, device: torch.device, dtype: torch.dtype) -> Decision:
    """Whether the fused layers' one-position steps rotate q and k and write the new K/V inside the paged attention
    kernel (`kernels.decode_fusions.rotary_paged_decode_attention`; on CUDA once that kernel passes a self-check
    of its own on this device and dtype, so that a failure there keeps the other fusions)."""
    return _checked_fused_layers_option("rotary_in_attention", "rotary inside the attention", requested, fused,
                                        lambda: None, "kernels.decode_fusions.rotary_attention_self_check", device, dtype)  # fmt: skip


def split_k_qkv(requested: bool, rotary_inside: bool, split_products: bool, merged: bool, device: torch.device,
                dtype: torch.dtype) -> Decision:  # fmt: skip
    """Whether the fused layers' one-position steps give the rotary attention their q/k/v product as split-K partial
    sums, which it sums as it reads q and the new K/V (`engine.model.paged.runner.PagedRunner`'s ``split_k_qkv``):
    with the rotary embedding inside the attention, the split-K products and the merged projections all on; on
    CUDA once that mode passes a self-check of its own, so that a failure there keeps the other fusions."""

    def missing() -> str | None:
        for taken, what in ((rotary_inside, "the rotary embedding is not inside the attention"),
                            (split_products, "the split-K products are off"),
                            (merged, "the projections are not merged")):  # fmt: skip
            if not taken:
                return what
        return None

    return _checked_fused_layers_option("split_k_qkv", "q/k/v partial sums in the attention", requested, True, missing,
                                        "kernels.decode_fusions.partial_qkv_attention_self_check", device, dtype)  # fmt: skip


def padded_lm_head(lm_head: nn.Module) -> Decision:
    """Whether the lm_head's products use its weight padded to a vocabulary width that cuBLAS's Hopper kernels take:
    the paged runner's steps (with their weight copies, `engine.model.fused_ops.PaddedVocabProjection`) and, on
    CUDA, the training loss (`fused_ops.aligned_vocab_weight`)."""
    from engine.model.fused_ops import VOCAB_ALIGNMENT, padded_head_unsupported

    reason = padded_head_unsupported(lm_head)
    if reason is not None:
        return _decide("padded_lm_head", "off", reason)
    vocab = lm_head.weight.shape[0]
    return _decide("padded_lm_head", "on", f"a vocabulary of {vocab}, not a multiple of {VOCAB_ALIGNMENT}")


def patch_embedding(device: torch.device | str) -> Decision:
    """Whether a `engine.model.patch_embedding.PatchConv2d` computes its convolution as one matrix product: on CUDA,
    where cuDNN has no tensor-core kernel for the patch embedding's 3 input channels (5.9 vs 1.1 ms at a training
    step's 64 tiles); elsewhere the class convolution, which is not slow there and keeps the numerics CPU runs
    (`make demo`) were measured with: the demo's curriculum is sensitive to rounding-level changes."""
    device = torch.device(device)
    if device.type == "cuda":
        return _decide("patch_embedding", "product", "cuDNN has no tensor-core kernel for 3 input channels")
    return _decide("patch_embedding", "conv", f"the class convolution on {device.type}")


# ---------------------------------------------------------------------------------------------- evaluation


def eval_kv_cache(mode: str, device: torch.device, zero_stage: int, paged_failed: bool = False) -> Decision:
    """The KV cache of validation generation ("auto": paged on GPU under ZeRO 0-2, unless it failed in this run)."""
    if mode not in EVAL_KV_CACHES:
        raise ValueError(f"eval_kv_cache must be one of {EVAL_KV_CACHES}, got {mode!r}")
    if mode == "paged" and not triton_runs_on(device):
        raise ValueError(f"eval_kv_cache=paged needs CUDA (its Triton kernels), the model is on {device}: use "
                         "eval_kv_cache=auto or dynamic, or TRITON_INTERPRET=1 to run the kernels interpreted")
    if mode != "auto":
        return _decide("eval_kv_cache", mode, "asked for")
    if device.type != "cuda":
        return _decide("eval_kv_cache", "dynamic", f"auto on {device.type}")
    if zero_stage >= 3:
        return _decide("eval_kv_cache", "dynamic", "ZeRO-3 partitions the weights the paged runner reads")
    if paged_failed:
        return _decide("eval_kv_cache", "dynamic", "the paged cache failed earlier in this run")
    return _decide("eval_kv_cache", "paged", "auto on CUDA")
