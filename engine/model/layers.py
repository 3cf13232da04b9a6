"""The decoder-layer stack of the language model, written once, over the model's own modules.

Three fast paths run the Qwen2/Llama decoder layers themselves instead of calling transformers' model: the
training latent block (`engine/model/latent_block.py`: the one-position latent passes as one static-shape block,
captured in CUDA graphs), a training forward's other passes (`engine/model/stack_pass.py`, over transformers'
cache) and the paged runner (`engine/model/paged/`: decoding over a paged KV cache). All call `run_layers`. The
weights stay in transformers' modules (exports, ZeRO and `from_pretrained` see nothing new); what varies between
the paths is passed in:

- an **attention function** ``attention(layer_index, q, k, v, cos, sin) -> o``: it applies the rotary embedding
  (through the ops table), stores K/V where its path keeps them and attends. q is (*tokens, q_heads, head_dim),
  k and v (*tokens, kv_heads, head_dim), o (*tokens, q_heads, head_dim); ``tokens`` is (B, n) in the training
  block and (N,) packed tokens in the paged runner. An attention function with ``sums_partial_qkv = True`` (the
  paged runner's one-position steps) may instead get q, k and v as the q/k/v product's fp32 split-K partial sums,
  (splits, *tokens, heads, head_dim), when the ops table gives them (``ops.qkv(..., partial_sums=True)``).
- an **ops table** for the rest of the layer's math: `ReferenceOps` calls the modules as transformers does (the
  spec); `engine.model.fused_ops.FusedOps` swaps in Triton kernels (RMSNorm with the residual add, rotary, SwiGLU)
  and merged q/k/v and gate/up products.

`layer_stack_unsupported` says, in one place, why a model cannot run here (None when it can).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.compat import cudnn_safe_key_padding

# attention(layer_index, q, k, v, cos, sin) -> o, shapes in the module docstring
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerGeometry:
    num_layers: int
    hidden_size: int
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float  # the attention's softmax scale (the module's `scaling`)

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.q_heads // self.kv_heads


def layer_geometry(language_model: nn.Module) -> LayerGeometry:
    config = language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LayerGeometry(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        q_heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        scale=float(language_model.layers[0].self_attn.scaling),
    )


PACK_QUERIES_BELOW = 128  # cuDNN's query tile: fewer queries per head leave most of each tile empty


def masked_sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, geometry: LayerGeometry
) -> torch.Tensor:
    """q (B, q_heads, n, D) attending to keys/values (B, kv_heads, T, D) under the mask ``allowed`` (B, 1, n, T;
    boolean, or additive floats), as transformers' SDPA path computes a masked call (repeat_kv, then SDPA; with
    fewer than `PACK_QUERIES_BELOW` queries, each KV head's query heads as its queries instead). Where
    cuDNN's masked backward fails for T keys, masked keys are appended first
    (`engine.model.compat.cudnn_safe_key_padding`): the same attention, at cuDNN's speed. Returns (B, q_heads, n,
    D)."""
    g = geometry
    pad = cudnn_safe_key_padding(keys.shape[-2], q.device)
    if pad:
        keys, values = F.pad(keys, (0, 0, 0, pad)), F.pad(values, (0, 0, 0, pad))
        allowed = allowed.expand(*allowed.shape[:-1], keys.shape[-2] - pad)  # a mask broadcast over the keys
        # the appended keys hidden: False in a boolean mask, -inf in an additive one
        allowed = F.pad(allowed, (0, pad), value=False if allowed.dtype == torch.bool else float("-inf"))
    batch, _, queries, _ = q.shape
    if g.groups > 1 and queries < PACK_QUERIES_BELOW:
        # Few queries per head (the latent block's final chunk): each KV head's query heads attend as its queries,
        # (B, kv, groups * n, D), instead of copying the K/V per query head. At 32 queries over 421 keys (64 rows,
        # 14/2 heads, bf16, cuDNN) 156 us of kernels forward + backward where repeat_kv takes 528; at 325 queries
        # the packed call is the slower (1,058 against 989 us): benchmarks/RESULTS.md.
        packed = q.reshape(batch, g.kv_heads, g.groups * queries, g.head_dim)
        mask = allowed.expand(*allowed.shape[:2], queries, keys.shape[-2]).repeat(1, 1, g.groups, 1)
        o = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=g.scale)
        return o.reshape(batch, g.q_heads, queries, g.head_dim)  # a view where SDPA returns it contiguous
    if g.groups > 1:  # transformers' repeat_kv: (B, kv, T, D) -> (B, kv * groups, T, D)
        keys = keys[:, :, None].expand(-1, -1, g.groups, -1, -1).reshape(batch, g.q_heads, -1, g.head_dim)
        values = values[:, :, None].expand(-1, -1, g.groups, -1, -1).reshape(batch, g.q_heads, -1, g.head_dim)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=g.scale)


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    return list(language_model.layers[: language_model.config.num_hidden_layers])


def rope_default_limit(language_model: nn.Module) -> int | None:
    """The positions below which a dynamic-NTK rotary embedding is its default one (transformers' dynamic rope
    rescales its frequencies only for sequences past its original max_position_embeddings: 32,768 for InternVL3's
    language models); None for a rope without such a limit."""
    rotary = getattr(language_model, "rotary_emb", None)
    if "dynamic" not in str(getattr(rotary, "rope_type", "default")):
        return None
    return int(getattr(rotary, "original_max_seq_len", None) or language_model.config.max_position_embeddings)


def rotary_host_dependent(language_model: nn.Module, max_positions: int | None = None) -> str | None:
    """Why the rotary embedding cannot be captured in a CUDA graph or tabulated by position for sequences of up to
    ``max_positions`` positions (None when it can; None as ``max_positions``: within a dynamic rope's default range,
    which its callers check per call): longrope branches on the host on the position values, and a dynamic rope
    past its default range (`rope_default_limit`)."""
    rope_type = str(getattr(getattr(language_model, "rotary_emb", None), "rope_type", "default"))
    if rope_type == "longrope":
        return f"rope type {rope_type!r} branches on the host on position values"
    limit = rope_default_limit(language_model)
    if limit is not None and max_positions is not None and max_positions > limit:
        return f"rope type {rope_type!r} rescales its frequencies on the host past {limit} positions ({max_positions} asked for)"
    return None


def rotary_cos_sin(language_model: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary cos and sin at ``positions`` (B, n), in x's dtype. A dynamic rope whose frequencies are
    still its default ones runs transformers' own forward without its dynamic update: the update compares the
    positions on the host, which a CUDA graph cannot hold, and changes nothing below `rope_default_limit` (callers
    keep the positions there)."""
    rotary = language_model.rotary_emb
    if rope_default_limit(language_model) is not None and rope_at_default(rotary):
        return inspect.unwrap(type(rotary).forward)(rotary, x, positions)
    return rotary(x, positions)


def restore_default_rope(language_model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Put a grown dynamic rope back on its default frequencies (eagerly: transformers' own update does it for a
    call within its range) before positions within the range are computed from it. Its frequency buffer may then
    be another tensor, which a CUDA graph captured before would read at a stale address."""
    rotary = getattr(language_model, "rotary_emb", None)
    if rope_default_limit(language_model) is None or rope_at_default(rotary):
        return
    position = torch.zeros(1, 1, dtype=torch.long, device=device)
    rotary(torch.zeros(1, 1, 1, device=device, dtype=dtype), position)


def rope_at_default(rotary: nn.Module) -> bool:
    """A dynamic rope that has not grown its frequencies for a longer sequence (an eager call past its limit does;
    its next call within the limit puts them back)."""
    return int(getattr(rotary, "max_seq_len_cached", 0)) <= int(getattr(rotary, "original_max_seq_len", 0))


def layer_stack_unsupported(
    language_model: nn.Module, *, training: bool = False, graphs: bool = False, fused_ops: bool = False
) -> str | None:
    """Why `run_layers` cannot run this language model (None when it can).

    ``training``: gradients must match the transformers passes (no attention dropout); ``graphs``: the stack is
    captured in CUDA graphs (the rotary embedding must not branch on the host); ``fused_ops``: with the Triton
    ops table (`engine.model.fused_ops.fused_ops_unsupported` adds the kernels' own conditions).
    """
    config = language_model.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"only full-attention layers are supported, got {sorted(set(layer_types))}"
    layers = decoder_layers(language_model)
    if not layers:
        return "the language model has no decoder layers"
    for index, layer in enumerate(layers):
        needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
        attn = getattr(layer, "self_attn", None)
        if not all(hasattr(layer, name) for name in needed) or not all(
            hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
        ):
            return f"decoder layer {index} ({type(layer).__name__}) is not a Qwen2/Llama-style layer"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"decoder layer {index} normalises q/k (QK-norm), which the layer stack does not apply"
    if _model_rotary(language_model) is None:
        return f"{type(layers[0].self_attn).__module__} defines no apply_rotary_pos_emb"
    if training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0.0:
        return "attention dropout is not supported"
    if graphs:
        reason = rotary_host_dependent(language_model)
        if reason is not None:
            return reason
    if fused_ops:
        from engine.model.fused_ops import fused_ops_unsupported

        return fused_ops_unsupported(language_model)
    return None


def _model_rotary(language_model: nn.Module) -> Callable | None:
    """The rotary function of the model's own modeling file (transformers' `apply_rotary_pos_emb`)."""
    module = sys.modules.get(type(language_model.layers[0].self_attn).__module__)
    return getattr(module, "apply_rotary_pos_emb", None)


class LayerOps(Protocol):
    """What `run_layers` asks of an ops table (`ReferenceOps` is the spec)."""

    def add_norm(self, norm: nn.Module, x: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def qkv(self, index: int, attn: nn.Module, h: torch.Tensor, partial_sums: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def o_proj(self, index: int, attn: nn.Module, o: torch.Tensor) -> torch.Tensor: ...

    def mlp(self, index: int, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor: ...


class ReferenceOps:
    """The layer's modules called as transformers calls them: the stack then computes what the model computes."""

    name = "reference"
    fuses_cache_write = False  # FusedOps: the rotary kernel also stores k/v into a paged cache

    def __init__(self, language_model: nn.Module):
        self._apply_rotary = _model_rotary(language_model)

    def add_norm(self, norm: nn.Module, x: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add of the last sublayer's output (``pending``), then the norm: (norm(x'), x')."""
        if pending is not None:
            x = x + pending
        return norm(x), x

    def qkv(self, index: int, attn: nn.Module, h: torch.Tensor, partial_sums: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three projections of ``h`` (*tokens, H). ``partial_sums``: the attention could take split-K partial
        sums instead (an ops table may give them; this one gives the products)."""
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (*tokens, heads, D), k likewise, cos/sin (*tokens, D): the model's own rotary function."""
        return self._apply_rotary(q, k, cos, sin, unsqueeze_dim=-2)

    def one_query_attention(self, q, prefix_k, prefix_v, new_k, new_v, blocked, scale) -> torch.Tensor:
        """One query position per row over a cached prefix and a few new keys (the latent block's passes; shapes
        in `kernels.one_query_attention`): with torch ops."""
        from kernels.one_query_attention import one_query_attention_reference

        return one_query_attention_reference(q, prefix_k, prefix_v, new_k, new_v, blocked, scale)

    def o_proj(self, index: int, attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
        """The attention's output projection of ``o`` (*tokens, q_heads * head_dim)."""
        return attn.o_proj(o)

    def mlp(self, index: int, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return mlp(h)


def run_layers(
    language_model: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention: Attention,
    ops: LayerOps,
    geometry: LayerGeometry | None = None,
) -> torch.Tensor:
    """Every decoder layer and the final norm over ``x`` (*tokens, H) with the rotary ``cos``/``sin`` of the
    tokens' positions (*tokens, head_dim). Returns the last hidden states (*tokens, H), post-norm (the vector a
    continuous thought feeds back)."""
    g = geometry or layer_geometry(language_model)
    tokens = x.shape[:-1]
    partial_qkv = bool(getattr(attention, "sums_partial_qkv", False))
    pending = None  # the last sublayer's output: the next norm adds it to the residual stream
    for index, layer in enumerate(language_model.layers[: g.num_layers]):
        attn = layer.self_attn
        h, x = ops.add_norm(layer.input_layernorm, x, pending)
        # an attention that sums split-K partial products (`attention.sums_partial_qkv`) may get q, k, v as
        # (splits, *tokens, width) partial sums: the heads split off the last dimension either way
        q, k, v = ops.qkv(index, attn, h, partial_sums=partial_qkv)
        o = attention(
            index,
            q.unflatten(-1, (g.q_heads, g.head_dim)),
            k.unflatten(-1, (g.kv_heads, g.head_dim)),
            v.unflatten(-1, (g.kv_heads, g.head_dim)),
            cos,
            sin,
        )
        pending = ops.o_proj(index, attn, o.reshape(*tokens, g.q_heads * g.head_dim))
        h, x = ops.add_norm(layer.post_attention_layernorm, x, pending)
        pending = ops.mlp(index, layer.mlp, h)
    return ops.add_norm(language_model.norm, x, pending)[0]
