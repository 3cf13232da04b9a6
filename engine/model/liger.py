"""Liger-Kernel's Triton kernels in the Qwen2 language model (the optional `liger-kernel` package).

Pieces (`LIGER_KERNELS`), each with the module or function it stands in for, which stays the reference:

- ``fused_linear_cross_entropy``: `MultimodalCoconut.lm_loss`'s lm_head + cross-entropy over the labelled
  positions, in chunks whose logits are never kept (Liger computes the input and weight gradients during the
  forward; the chunked, recomputed lm_head of `lm_loss` is the reference). Not under ZeRO-3: it reads the lm_head
  weight outside the module call.
- ``rms_norm``: every Qwen2RMSNorm of the language model (Llama casting: the normalisation in fp32, the weight
  applied in the input dtype, as Qwen2RMSNorm does);
- ``swiglu``: the MLP's silu(gate) * up product;
- ``rope``: the rotary embedding of q and k. transformers' Qwen2 attention calls the module-level
  `apply_rotary_pos_emb`, so this one is replaced process-wide (every Qwen2 model in the process; undone when a
  model is set without it). Chunks of one position (the latent passes, decoding) keep transformers' function:
  liger-kernel 0.8.5's RoPE backward takes the row stride of the incoming (B, H, 1, D) gradient from its
  transposed view (D instead of H·D), so with several rows every row after the first gets another row's
  gradient (`tests/test_liger.py::test_rope_keeps_one_position_chunks_exact` checks the fallback).

Unlike `liger_kernel.transformers.apply_liger_kernel_to_qwen2`, which also replaces transformers' Qwen2RMSNorm and
Qwen2MLP classes for every model built afterwards, the norms and MLPs are patched on the given model's instances
only (their `forward`), and every piece can be switched off again.
"""

from __future__ import annotations

from types import MethodType
from typing import Iterable

import torch
from torch import nn

LIGER_KERNELS = ("fused_linear_cross_entropy", "rms_norm", "swiglu", "rope")
_PATCHED = "_liger_piece"  # attribute naming the piece that replaced a module's forward
_ORIGINAL_ROPE: dict[str, object] = {}


def liger_functional():
    """`liger_kernel.transformers.functional`, or an ImportError that says how to install it."""
    try:
        from liger_kernel.transformers import functional
    except ImportError as e:
        raise ImportError(
            f"liger_kernels needs the optional liger-kernel package (pip install 'multimodal-coconut[liger]'): {e}"
        ) from e
    return functional


def check_pieces(pieces: Iterable[str]) -> frozenset[str]:
    pieces = frozenset(pieces)
    unknown = sorted(pieces - set(LIGER_KERNELS))
    if unknown:
        raise ValueError(f"unknown Liger kernel(s) {unknown}; valid: {', '.join(LIGER_KERNELS)}")
    return pieces


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # in_place=False: Liger's in-place variant overwrites the incoming gradient in backward, which is only safe
    # when autograd hands that buffer to this op alone
    return liger_functional().liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(liger_functional().liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _patch(module: nn.Module, piece: str, forward, wanted: bool) -> None:
    patched = getattr(module, _PATCHED, None) == piece
    if wanted and not patched:
        module.forward = MethodType(forward, module)
        setattr(module, _PATCHED, piece)
    elif patched and not wanted:
        del module.forward  # the class's forward again
        delattr(module, _PATCHED)


def liger_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' `apply_rotary_pos_emb` signature; q (B, H, T, D), k (B, KV, T, D), cos/sin (B, T, D)."""
    if q.shape[-2] == 1 and q.shape[0] > 1:  # see the module docstring: Liger's backward is wrong here
        return _ORIGINAL_ROPE["qwen2"](q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return liger_functional().liger_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _set_rope(wanted: bool) -> None:
    from transformers.models.qwen2 import modeling_qwen2

    if wanted:
        if "qwen2" not in _ORIGINAL_ROPE:
            _ORIGINAL_ROPE["qwen2"] = modeling_qwen2.apply_rotary_pos_emb
        modeling_qwen2.apply_rotary_pos_emb = liger_rotary_pos_emb
    elif "qwen2" in _ORIGINAL_ROPE:
        modeling_qwen2.apply_rotary_pos_emb = _ORIGINAL_ROPE.pop("qwen2")


def apply_liger_kernels(language_model: nn.Module, pieces: Iterable[str]) -> frozenset[str]:
    """Switch the language model (a transformers Qwen2Model) to exactly `pieces`; returns them as a set.

    The loss piece is only recorded here (`MultimodalCoconut.lm_loss` reads it); the others patch modules."""
    pieces = check_pieces(pieces)
    if pieces:
        liger_functional()  # fail before changing anything when the package is missing
    config = language_model.config
    if "swiglu" in pieces and getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"Liger swiglu needs a silu MLP, the language model uses {config.hidden_act!r}")
    for module in language_model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            _patch(module, "rms_norm", _rms_norm_forward, "rms_norm" in pieces)
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            _patch(module, "swiglu", _swiglu_forward, "swiglu" in pieces)
    _set_rope("rope" in pieces)
    return pieces


def fused_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy(hidden @ weight.T, targets) in fp32, without materialising the (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,). The weight gradient is accumulated in fp32 across chunks."""
    if hasattr(weight, "ds_id"):
        raise RuntimeError("Liger fused_linear_cross_entropy reads the lm_head weight directly; under DeepSpeed ZeRO-3 "
                           "it is partitioned there. Use zero_stage <= 2 or switch the piece off")
    loss = liger_functional().liger_fused_linear_cross_entropy(
        hidden, weight, targets, reduction="sum", accum_dtype=torch.float32
    )
    return loss.float()
