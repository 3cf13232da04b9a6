"""The Triton ops table of the decoder-layer stack (`engine.model.layers`), for one-position inference steps.

A decode step of a small model is a few hundred tiny kernels, and transformers' RMSNorm alone is eight of them.
`FusedOps` does each RMSNorm with the residual add before it in one kernel, the rotary embedding of q and k in
one (with the K/V cache write, in the paged attention), the SwiGLU product in one (`kernels.decode_fusions`,
rounding as the modules do), with `MergedProjections` one matrix product for q/k/v and one for gate/up per
layer instead of five, and with `SplitKProducts` the o and down products split over their reduction
(`kernels.decode_linear`), summed by the next RMSNorm, and (when the paged attention asks for them) the merged
q/k/v product too, summed by the attention. No autograd: inference only.

`GradFusedOps` is the training counterpart (the latent block and a training forward's other passes,
`engine.model.stack_pass`): the same three fusions with their backward (`kernels.layer_grads`) and the latent
passes' one-query attention (`kernels.one_query_attention`), the projections left to the modules (their weights
are what training updates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.fast_paths import gathered_per_call
from engine.model.layers import ReferenceOps, decoder_layers
from engine.model.shared_weight import SharedWeight
from kernels.decode_fusions import rms_norm, rotary_qk, silu_mul
from kernels.decode_linear import (
    MAX_BLOCK_M,
    DecodeLinearConfig,
    decode_linear_config,
    decode_linear_partials,
)
from kernels.layer_grads import rms_norm_grad, rotary_qk_grad, silu_mul_grad
from kernels.one_query_attention import one_query_attention
from kernels.paged_kv import shared_memory_bytes

_QKV, _GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def fused_ops_unsupported(language_model: nn.Module) -> str | None:
    """Why `FusedOps` cannot stand in for these layers' norms and MLP (None when it can)."""
    act = str(getattr(language_model.config, "hidden_act", ""))
    if act not in ("silu", "swish"):
        return f"the MLP activation is {act!r}, the fused SwiGLU product needs silu"
    layers = decoder_layers(language_model)
    norms = [language_model.norm] + [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None for m in norms):
        return "the norms are not RMSNorms with a weight and variance_epsilon"
    if not all(all(hasattr(layer.mlp, p) for p in ("gate_proj", "down_proj", *_GATE_UP)) for layer in layers):
        return "the MLP is not a gate/up/down SwiGLU"
    return None


def _projections(layer: nn.Module) -> dict:
    """The projections `MergedProjections` merges, by name: q/k/v, then gate/up (None where a layer has none)."""
    attn, mlp = layer.self_attn, layer.mlp
    return {name: getattr(attn if name in _QKV else mlp, name, None) for name in (*_QKV, *_GATE_UP)}


def _all_projections(layer: nn.Module) -> dict:
    """Every linear projection of a decoder layer, by name."""
    return {**_projections(layer), "o_proj": getattr(layer.self_attn, "o_proj", None),
            "down_proj": getattr(layer.mlp, "down_proj", None)}  # fmt: skip


def merge_unsupported(layers: list[nn.Module]) -> str | None:
    """Why `MergedProjections` cannot stand in for these layers' projections (None when it can)."""
    for index, layer in enumerate(layers):
        projections = _projections(layer)
        for name, module in projections.items():
            if type(module) is not nn.Linear:  # wrapped (adapters, quantized): its weight is not the product
                return f"layer {index} {name} is a {type(module).__name__ if module is not None else None}, not a plain torch.nn.Linear"
        if any(projections[name].bias is not None for name in _GATE_UP):
            return f"layer {index} gate/up projections have a bias"
    return None


def _partitioned(layers: list[nn.Module]) -> bool:
    return any(hasattr(p, "ds_id") for layer in layers for p in layer.parameters())  # DeepSpeed ZeRO-3's mark


def _gathered(layers: list[nn.Module]) -> bool:
    """Whether every parameter of `layers` that ZeRO-3 partitions is gathered whole now (DeepSpeed's status)."""
    return all(getattr(getattr(p, "ds_status", None), "name", None) == "AVAILABLE"
               for layer in layers for p in layer.parameters() if hasattr(p, "ds_id"))


def shared_weight_unsupported(layers: list[nn.Module], language_model: nn.Module | None = None) -> str | None:
    """Why the latent block's passes should not take each projection's weight gradient once over all of them
    (`engine.model.shared_weight`; None: they should). The products then read the modules' weights directly,
    which a wrapped module (adapters, quantized) would not compute and a module's forward hooks would not see;
    under autocast they would save the weights uncast. ZeRO-3's partitioned weights they read only where
    `language_model` is a ZeRO-3 leaf module gathered whole now: DeepSpeed then gathers it again for its backward,
    where the modules' own fetches, which the products skip, would be the only ones otherwise."""
    if _partitioned(layers) and not (language_model is not None and gathered_per_call(language_model)
                                     and _gathered(layers)):
        return "ZeRO-3 partitions the weights and the language model is not gathered whole around the block"
    device = next(layers[0].parameters()).device.type if layers else "cpu"
    if torch.is_autocast_enabled(device):
        return "autocast is on (the products would cast the weights)"
    for index, layer in enumerate(layers):
        for name, module in _all_projections(layer).items():
            if type(module) is not nn.Linear:
                return f"layer {index} {name} is a {type(module).__name__}, not a plain torch.nn.Linear"
            if _has_hooks(module):
                return f"layer {index} {name} has forward hooks, which its products would bypass"
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


MERGED_COPY_LIMIT = 2 << 30  # bytes of concatenated weights a training pass's merged ops table may hold


def training_merge_unsupported(layers: list[nn.Module]) -> str | None:
    """Why the latent block's passes should not merge these layers' q/k/v and gate/up weights (None: merge). The
    concatenated copies live through the step's backward (2 bytes per projection weight in bf16): merged while
    they stay under 2 GiB (InternVL3-1B: 0.47 GB; 2B: 1.7 GB; 8B: 8.5 GB is not), never under ZeRO-3, whose
    partitioned weights an ops table must not read."""
    if _partitioned(layers):
        return "ZeRO-3 partitions the weights"
    reason = merge_unsupported(layers)
    if reason is not None:
        return reason
    size = sum(m.weight.numel() * m.weight.element_size() for layer in layers for m in _projections(layer).values())
    if size > MERGED_COPY_LIMIT:
        return f"the merged copies would take {size / 2**30:.1f} GiB (the limit is {MERGED_COPY_LIMIT / 2**30:.0f})"
    return None


class MergedProjections:
    """One layer's q/k/v projections as one (Q + 2KV, H) weight and its gate/up projections as one (2I, H) weight:
    two matrix products per layer instead of five (at decode sizes each product is a kernel whose weight read
    takes a few microseconds, plus a launch). Copies of the module weights, refreshed by `refresh` (the weights may
    change between generate calls, in training) into the same buffers, so that captured CUDA graphs stay valid.
    Costs one more copy of those weights (~0.47 GB at InternVL3-1B in bf16)."""

    def __init__(self, layer: nn.Module):
        self.sources = _projections(layer)
        self.qkv_sources = [self.sources[name] for name in _QKV]
        self.gate_up_sources = [self.sources[name] for name in _GATE_UP]
        self.weight_shapes = [m.weight.shape for m in self.sources.values()]
        self.qkv_sizes = [m.weight.shape[0] for m in self.qkv_sources]
        self.gate_up_sizes = [m.weight.shape[0] for m in self.gate_up_sources]
        weight = self.qkv_sources[0].weight
        self.qkv_weight = weight.new_empty(sum(self.qkv_sizes), weight.shape[1])
        has_bias = any(m.bias is not None for m in self.qkv_sources)
        self.qkv_bias = weight.new_zeros(sum(self.qkv_sizes)) if has_bias else None  # a missing bias stays 0
        self.gate_up_weight = weight.new_empty(sum(self.gate_up_sizes), self.gate_up_sources[0].weight.shape[1])
        self.refresh()

    def matches(self, layer: nn.Module) -> bool:
        """Still the layer's modules (not replaced, e.g. by adapters) with weights of the same shapes, device and
        dtype (else the owner rebuilds them and drops its graphs)."""
        current = _projections(layer)
        if any(current[name] is not module for name, module in self.sources.items()):
            return False
        weights = [m.weight for m in self.sources.values()]
        return [w.shape for w in weights] == self.weight_shapes and all(
            w.device == self.qkv_weight.device and w.dtype == self.qkv_weight.dtype for w in weights
        )

    @torch.no_grad()
    def refresh(self) -> None:
        torch.cat([m.weight for m in self.qkv_sources], out=self.qkv_weight)
        torch.cat([m.weight for m in self.gate_up_sources], out=self.gate_up_weight)
        if self.qkv_bias is not None:
            start = 0
            for m, size in zip(self.qkv_sources, self.qkv_sizes):
                if m.bias is not None:
                    self.qkv_bias[start : start + size].copy_(m.bias)
                start += size


# cuBLAS takes its Hopper (sm90) GEMM kernels only when the output's leading dimension is 16-byte aligned; an odd
# vocabulary (InternVL3's 151,674 = 2 mod 8) sends the decode step's lm_head to sm80 "align2" kernels at ~2 TB/s.
VOCAB_ALIGNMENT = 64


def aligned_vocab_size(vocab: int) -> int:
    """The vocabulary rounded up to a multiple of `VOCAB_ALIGNMENT`."""
    return -(-vocab // VOCAB_ALIGNMENT) * VOCAB_ALIGNMENT


def padded_head_unsupported(lm_head: nn.Module) -> str | None:
    """Why `PaddedVocabProjection` cannot (or need not) stand in for ``lm_head`` (None when it can)."""
    if type(lm_head) is not nn.Linear:
        return f"the lm_head is a {type(lm_head).__name__}, not a plain torch.nn.Linear"
    if lm_head.weight.shape[0] % VOCAB_ALIGNMENT == 0:
        return f"the vocabulary ({lm_head.weight.shape[0]}) is already a multiple of {VOCAB_ALIGNMENT}"
    return None


def aligned_vocab_weight(lm_head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight (and bias) padded with zero rows to a multiple of `VOCAB_ALIGNMENT`, differentiably (the
    gradient of the real rows reaches the parameters): for training's loss, where the weight changes every step.
    Costs one copy of the weight per call (~0.1 ms for InternVL3's 272 MB on an H200), held until backward, and a
    padded gradient buffer in backward: about two more head weights of memory at the peak."""
    vocab = lm_head.weight.shape[0]
    pad = aligned_vocab_size(vocab) - vocab
    weight = F.pad(lm_head.weight, (0, 0, 0, pad))
    return weight, (None if lm_head.bias is None else F.pad(lm_head.bias, (0, pad)))


class PaddedVocabProjection:
    """The lm_head with its vocabulary padded by zero rows to a multiple of `VOCAB_ALIGNMENT`, for inference: the
    product's output rows are then aligned and cuBLAS picks its Hopper kernels (at the InternVL3-1B geometry the
    decode step's lm_head: 131 -> 77 us at batch 64, 91 -> 68 us at batch 1; benchmarks/RESULTS.md). Returns the
    real vocabulary's logits, a view (rows strided by the padded width). A copy of the weight, refreshed in place
    by `refresh` (captured CUDA graphs keep its address), like `MergedProjections`."""

    def __init__(self, lm_head: nn.Linear):
        self.source = lm_head
        vocab, hidden = lm_head.weight.shape
        self.vocab = vocab
        padded = aligned_vocab_size(vocab)
        self.weight = lm_head.weight.new_zeros(padded, hidden)  # rows past the vocabulary stay 0
        self.bias = None if lm_head.bias is None else lm_head.bias.new_zeros(padded)
        self.refresh()

    def matches(self, lm_head: nn.Module) -> bool:
        """Still that module, with a weight of the same shape, device and dtype, and a bias exactly if it had one."""
        w = lm_head.weight
        return (lm_head is self.source and w.shape[0] == self.vocab and w.shape[1] == self.weight.shape[1]
                and w.device == self.weight.device and w.dtype == self.weight.dtype
                and (lm_head.bias is None) == (self.bias is None))  # fmt: skip

    @torch.no_grad()
    def refresh(self) -> None:
        self.weight[: self.vocab].copy_(self.source.weight)
        if self.bias is not None:
            self.bias[: self.vocab].copy_(self.source.bias)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)[..., : self.vocab]


def split_k_unsupported(layers: list[nn.Module]) -> str | None:
    """Why `SplitKProducts` cannot stand in for these layers' o and down products (None when it can)."""
    for index, layer in enumerate(layers):
        for name, module in (("o_proj", getattr(layer.self_attn, "o_proj", None)),
                             ("down_proj", getattr(layer.mlp, "down_proj", None))):  # fmt: skip
            if type(module) is not nn.Linear:
                return f"layer {index} {name} is a {type(module).__name__}, not a plain torch.nn.Linear"
            if module.bias is not None:
                return f"layer {index} {name} has a bias"
            if _has_hooks(module):
                return f"layer {index} {name} has forward hooks, which its product would bypass"
    return None


class SplitKProducts:
    """The o and down products of a step of at most `MAX_BLOCK_M` rows as split-K partial sums
    (`kernels.decode_linear`), which the next RMSNorm sums into the residual stream (`FusedOps.add_norm`): at
    decode sizes a GEMM library gives these narrow outputs (the hidden size wide) a handful of tiles and leaves most
    SMs idle. `product` also serves the merged q/k/v product, whose partial sums the paged attention sums.
    ``config`` fixes the launch settings (tests); None takes `decode_linear_config` per shape."""

    def __init__(self, device: torch.device, config: DecodeLinearConfig | None = None):
        device = torch.device(device)
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self.shared_bytes = shared_memory_bytes(device)
        self.config = config
        self.configs: dict[tuple, DecodeLinearConfig] = {}

    def __call__(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """(splits, rows, out) fp32 partial products of ``x`` (rows, in), or None where the module should run."""
        return self.product(x, module.weight)

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """(splits, rows, out) fp32 partial products of ``x`` (rows, in) and ``weight`` (out, in) whose sum is the
        biased product, or None where a step has too many rows (or another dtype) for them."""
        if x.dim() != 2 or x.shape[0] > MAX_BLOCK_M or x.dtype != weight.dtype:
            return None
        key = (x.shape[0], *weight.shape)
        config = self.config or self.configs.get(key)
        if config is None:
            config = self.configs[key] = decode_linear_config(
                x.shape[0], *weight.shape, self.sm_count, x.element_size(), self.shared_bytes
            )
        return decode_linear_partials(x, weight, config, bias=bias)


class FusedOps(ReferenceOps):
    """`ReferenceOps` with `kernels.decode_fusions` and, when ``merged`` is given (one `MergedProjections` per
    layer), merged projections; with ``split_k``, the o and down products as split-K partial sums that the next
    norm adds (a pending sublayer output is then (splits, N, H) fp32), and the merged q/k/v product as partial sums
    when the attention sums them (`qkv` with ``partial_sums``). Inputs are (N, H) rows. The kernels round
    as the modules do; a merged or split product may use another summation order than the separate ones (on GPU
    not bit-identical then: equal to bf16 rounding)."""

    name = "fused"
    fuses_cache_write = True  # the paged attention stores k/v inside the rotary kernel (`rotary_kv_write`)

    def __init__(self, language_model: nn.Module, merged: list[MergedProjections] | None = None,
                 split_k: SplitKProducts | None = None):  # fmt: skip
        super().__init__(language_model)
        self.merged = merged
        self.split_k = split_k

    def o_proj(self, index, attn, o):
        partials = self.split_k(attn.o_proj, o) if self.split_k is not None else None
        return attn.o_proj(o) if partials is None else partials

    def add_norm(self, norm, x, pending):
        if pending is None:
            return rms_norm(x, norm.weight, norm.variance_epsilon), x
        # a (splits, N, H) pending output: the split-K partial sums of an o or down product
        return rms_norm(pending, norm.weight, norm.variance_epsilon, residual=x, partial_sums=pending.dim() == 3)

    def qkv(self, index, attn, h, partial_sums: bool = False):
        """q, k, v of ``h``; with ``partial_sums`` (the caller's attention sums them: the paged runner's
        one-position steps with the rotary embedding inside the attention) and the merged and split products on,
        each as (splits, *tokens, width) fp32 split-K partial sums, the bias in the first split."""
        if self.merged is None:
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        m = self.merged[index]  # views into one product: the kernels read them strided, no copies
        if partial_sums and self.split_k is not None:
            partials = self.split_k.product(h, m.qkv_weight, m.qkv_bias)
            if partials is not None:
                return partials.split(m.qkv_sizes, -1)
        return F.linear(h, m.qkv_weight, m.qkv_bias).split(m.qkv_sizes, -1)

    def rotary(self, q, k, cos, sin):
        return rotary_qk(q, k, cos, sin)

    def mlp(self, index, mlp, h):
        if self.merged is None:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        else:
            gate, up = F.linear(h, self.merged[index].gate_up_weight).split(self.merged[index].gate_up_sizes, -1)
        product = silu_mul(gate, up, programmatic_launch=None)  # the split-K down product launches as it runs
        partials = self.split_k(mlp.down_proj, product) if self.split_k is not None else None
        return mlp.down_proj(product) if partials is None else partials


class GradFusedOps(ReferenceOps):
    """`ReferenceOps` with `kernels.layer_grads`: RMSNorm with its residual add, rotary embedding and the SwiGLU
    product, one kernel each forward and one backward, for inputs of any leading shape. Where a norm's weight, the
    sublayer output or the rotary table has another dtype than the activations (type promotion the kernels do not
    model), the modules run.

    ``merge_projections``: each layer's q/k/v weights (and biases) and gate/up weights are concatenated on first
    use and kept for this table's life, so that passes sharing the table (the latent block's, each layer used once
    per pass) run two products per layer instead of five, forward and backward (gradients flow back through the
    concatenation to the modules' parameters). Layers whose projections `merge_unsupported` refuses, or whose
    q/k/v mix biased and unbiased projections, keep the modules.

    ``share_weight_grads``: each product's weight (merged or a plain `nn.Linear`'s) goes through one
    `engine.model.shared_weight.SharedWeight` for this table's life, so that the passes sharing the table take
    each weight's gradient once over all of them instead of once per pass plus a sum. For a table that serves one
    forward (the latent block's)."""

    name = "fused_grad"

    def __init__(self, language_model: nn.Module, merge_projections: bool = False, share_weight_grads: bool = False):
        super().__init__(language_model)
        self._merged: dict | None = {} if merge_projections else None
        self._shared: dict | None = {} if share_weight_grads else None

    def _product(self, key: tuple, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T + bias, through the key's `SharedWeight` when this table shares weight gradients."""
        if self._shared is None:
            return F.linear(x, weight, bias)
        if key not in self._shared:
            self._shared[key] = SharedWeight(weight, bias)
        return self._shared[key](x)

    def _linear(self, key: tuple, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A projection module on x: its weight shared across passes where it is a plain `nn.Linear`."""
        if self._shared is None or type(module) is not nn.Linear or _has_hooks(module):
            return module(x)
        return self._product(key, module.weight, module.bias, x)

    def _merged_weights(self, key: tuple, modules: list[nn.Module]):
        """(weight, bias, sizes) of ``modules`` concatenated, or None where this table does not merge them."""
        if self._merged is None:
            return None
        if key not in self._merged:
            biases = [m.bias for m in modules]
            if any(b is None for b in biases) and not all(b is None for b in biases):
                self._merged[key] = None
            else:
                bias = None if biases[0] is None else torch.cat(biases)
                self._merged[key] = (torch.cat([m.weight for m in modules]), bias, [m.out_features for m in modules])
        return self._merged[key]

    def add_norm(self, norm, x, pending):
        if norm.weight.dtype != x.dtype or (pending is not None and pending.dtype != x.dtype):
            return super().add_norm(norm, x, pending)
        if pending is None:
            return rms_norm_grad(x, norm.weight, norm.variance_epsilon), x
        return rms_norm_grad(pending, norm.weight, norm.variance_epsilon, residual=x)

    def rotary(self, q, k, cos, sin):
        if cos.dtype != q.dtype or k.dtype != q.dtype:
            return super().rotary(q, k, cos, sin)
        return rotary_qk_grad(q, k, cos, sin)

    def qkv(self, index, attn, h, partial_sums=False):  # the products always (training keeps autograd)
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        merged = self._merged_weights(("qkv", index), projections)
        if merged is None:
            return tuple(self._linear((name, index), m, h) for name, m in zip(_QKV, projections))
        weight, bias, sizes = merged
        return self._product(("qkv", index), weight, bias, h).split(sizes, -1)  # views: the kernels read them strided

    def one_query_attention(self, q, prefix_k, prefix_v, new_k, new_v, blocked, scale):
        if any(t.dtype != q.dtype for t in (prefix_k, prefix_v, new_k, new_v)):
            return super().one_query_attention(q, prefix_k, prefix_v, new_k, new_v, blocked, scale)
        return one_query_attention(q, prefix_k, prefix_v, new_k, new_v, blocked, scale)

    def o_proj(self, index, attn, o):
        return self._linear(("o_proj", index), attn.o_proj, o)

    def mlp(self, index, mlp, h):
        projections = [mlp.gate_proj, mlp.up_proj]
        merged = self._merged_weights(("gate_up", index), projections)
        if merged is None:
            gate, up = (self._linear((name, index), m, h) for name, m in zip(_GATE_UP, projections))
        else:
            weight, bias, sizes = merged
            gate, up = self._product(("gate_up", index), weight, bias, h).split(sizes, -1)
        return self._linear(("down_proj", index), mlp.down_proj, silu_mul_grad(gate, up))
