"""What differs between the releases of the libraries the engine runs on, and how it stays correct on each.

- transformers (setup.py: >= 5.17) renamed the KV-cache keyword of its models' forward: `cache_kwargs`.
- cuDNN's SDPA backward (torch's default attention backend on H100/H200 since torch 2.11) returns NaN query
  gradients for a call with an attention mask over a key length with ``keys % 128 == 64`` when a query row's
  logsumexp is below ~-88.7 (the last key tile's padding is scored 0 instead of -inf: pytorch/pytorch#196678,
  huggingface/trl#7181). Both triggers are common here: the left padding of aligned latent batches makes fully
  masked query rows, and Qwen2.5's "massive activation" heads give whole rows of very negative scores. Measured on
  an H200 (torch 2.11, cuDNN 9.19; benchmarks/RESULTS.md): a left-padded prefix pass over 320 keys got non-finite
  query gradients with cuDNN and none with the memory-efficient kernel; a sweep over 16-768 keys found exactly the
  counts with ``keys % 128 == 64`` unsafe. Two remedies: the engine's own masked calls append half a tile of
  masked keys (`cudnn_safe_key_padding`: the same attention, and cuDNN ran 320 queries over 384 keys as fast as
  over 320, 694 vs 693 µs forward and backward, where the memory-efficient kernel took 1,254); transformers' calls,
  which the engine cannot pad, run under `safe_attention`, which leaves cuDNN out of them (forward and, for
  checkpointed layers, the recomputation in backward).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

CACHE_KEYWORDS = ("cache", "past_key_values")  # a transformers forward's KV-cache keyword: from 5.24, before
CUDNN_KEY_TILE = 128  # cuDNN's SDPA key tile on Hopper; a key count half a tile past a multiple of it is unsafe


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    current, earlier = CACHE_KEYWORDS
    return current if current in inspect.signature(model_class.forward).parameters else earlier


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{keyword: cache}`` for a call of the transformers ``model``: its forward takes the KV cache as ``cache``
    from transformers 5.24 on (``past_key_values`` is deprecated there, to be removed in 5.40), as
    ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


def cudnn_attention_backward_unsafe(keys: int, device: torch.device | str) -> bool:
    """Whether cuDNN's SDPA backward can give NaN for a masked attention call over ``keys`` keys on ``device``
    (the module docstring): on CUDA when ``keys % 128 == 64``."""
    return torch.device(device).type == "cuda" and keys % CUDNN_KEY_TILE == CUDNN_KEY_TILE // 2


def cudnn_safe_key_padding(keys: int, device: torch.device | str) -> int:
    """How many masked keys to append to a masked SDPA call over ``keys`` keys so that cuDNN's backward is right:
    half a tile where it is unsafe and SDPA may choose cuDNN for a call with gradients, else 0. Appended keys the
    mask hides change nothing but the key count (the output, and the real keys' gradients, are the same)."""
    if not torch.is_grad_enabled() or not torch.backends.cuda.cudnn_sdp_enabled():
        return 0
    return CUDNN_KEY_TILE // 2 if cudnn_attention_backward_unsafe(keys, device) else 0


def safe_attention(keys: int, device: torch.device | str):
    """A context for the SDPA calls of a pass over ``keys`` keys with gradients on: where cuDNN's backward is
    unsafe, SDPA chooses among the other backends the process has enabled (flash without a mask, the
    memory-efficient kernel, the math one), not cuDNN; elsewhere, and without gradients (cuDNN's forward is
    right), nothing changes. SDPA's backward runs the kernel its forward chose, so the forward's context decides
    both."""
    if not torch.is_grad_enabled() or not cudnn_attention_backward_unsafe(keys, device):
        return contextlib.nullcontext()
    enabled = [
        backend
        for backend, on in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if on
    ]
    return sdpa_kernel(enabled or [SDPBackend.MATH])  # only cuDNN enabled: the math kernel rather than NaN
