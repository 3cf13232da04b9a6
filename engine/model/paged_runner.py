"""Generation over a paged KV cache: the prompt's latent passes, then decoding, with CUDA graphs on GPU.

`PagedRunner` runs the Qwen2 language model layer by layer with the model's own modules (q/k/v projections with
bias, the model's rotary embedding, RMSNorms, MLP), storing K/V in a `kernels.paged_kv.PagedKVCache` and attending
with the paged kernels. It follows the same pass schedule as `MultimodalCoconut.run_passes` (pass 0 over the
prefix, one position per latent pass fed by the previous pass's last hidden state, the final pass), then decodes
greedily or by sampling with `select_next_token`, and returns what `generate_with_dynamic_cache` returns: (B, n)
new tokens, rows that ended early padded with the pad id.

Layout. Only real tokens are computed and stored: a pass gathers the positions it computes from every row into
one packed list (left padding never enters it), and each token's K/V goes to the slot of its position id in its
row's block table. A multi-position pass attends with `paged_chunk_attention` (query i of a row sees positions
``0 .. pos_i``); a one-position pass (a latent step or a decode step) with `paged_decode_attention` (split-K).

Sharing. Rows whose pass-0 prefix starts with the same image and tokens share its full blocks (keyed by a chain
hash seeded with the image's pixel digest) and skip computing them; a row identical to an earlier row (same
tokens, same pixels: n samples of one question) computes nothing before decoding: it forks the earlier row's
blocks, its partial last block copied on the first write. Only positions inside pass 0 (and never the last one
before the first latent column, whose hidden state feeds a thought) are shared, so every shared block is written
by its owner in the same layer pass in which the other rows first read it.

CUDA graphs. A small model's one-position step is a few hundred kernel launches of a few microseconds each: eager
launch overhead (~30 us each) dominates. On CUDA the one-position steps are captured per batch bucket (the batch
padded to a power of two; padding rows have context 0 and write nothing) with static input buffers (token ids or
input embeddings, positions, an active mask, block tables of the maximum width) and replayed. On CPU (and with
``use_cuda_graphs=False``) everything runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from engine.model.generation import check_left_padded, decode_loop
from engine.utils.logging import get_logger
from engine.utils.profiling import profile_range
from kernels.decode_fusions import (
    decode_fusions_self_check,
    rms_norm,
    rotary_kv_write,
    rotary_qk,
    rotary_qk_reference,
    silu_mul,
)
from kernels.paged_kv import (
    PagedKVCache,
    choose_num_splits,
    image_digest,
    paged_chunk_attention,
    paged_decode_attention,
    paged_kv_write,
)

log = get_logger("paged")
_ATTENTION_OPTIONS = {"block_n", "num_warps", "num_stages", "dot_in_cache_dtype"}


def _fused_ops_unsupported(lm, layers) -> str | None:
    """Why `kernels.decode_fusions` cannot stand in for these layers' norms and MLP (None when they can)."""
    act = str(getattr(lm.config, "hidden_act", ""))
    if act not in ("silu", "swish"):
        return f"the MLP activation is {act!r}, the fused SwiGLU product needs silu"
    norms = [lm.norm] + [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None for m in norms):
        return "the norms are not RMSNorms with a weight and variance_epsilon"
    if not all(all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) for layer in layers):
        return "the MLP is not a gate/up/down SwiGLU"
    return None


_QKV, _GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def _projections(layer) -> dict:
    """The projections `_MergedProjections` merges, by name: q/k/v, then gate/up (None where a layer has none)."""
    attn, mlp = layer.self_attn, layer.mlp
    return {name: getattr(attn if name in _QKV else mlp, name, None) for name in (*_QKV, *_GATE_UP)}


def _merge_unsupported(layers) -> str | None:
    """Why `_MergedProjections` cannot stand in for these layers' projections (None when it can)."""
    for index, layer in enumerate(layers):
        projections = _projections(layer)
        for name, module in projections.items():
            if type(module) is not torch.nn.Linear:  # wrapped (adapters, quantized): its weight is not the product
                return f"layer {index} {name} is a {type(module).__name__}, not a plain torch.nn.Linear"
        if any(projections[name].bias is not None for name in _GATE_UP):
            return f"layer {index} gate/up projections have a bias"
    return None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the stream: pinned staging (the caching host allocator keeps the buffer
    alive until the copy has run), so the host can keep queueing work ahead of the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _image_keys(pixel_values: torch.Tensor | None, tiles_per_row: list[int]) -> list[bytes]:
    """Per row, a key of its image content for prefix sharing: the sha256 pixel digest (`image_digest`) of every
    image that several rows show, a row-unique key for an image no other row shows (nothing to share with: this
    skips hashing, and copying to the host, the pixels of a batch of distinct images), b"" for no image.

    Candidates are found by a position-weighted fingerprint computed on the device and confirmed exactly by the
    digest, so a fingerprint collision can only cost a hash, never a wrong share.
    """
    rows = len(tiles_per_row)
    keys = [b""] * rows
    if pixel_values is None or not any(tiles_per_row):
        return keys
    flat = pixel_values.detach().reshape(pixel_values.shape[0], -1).float()
    fingerprints = (flat @ _fingerprint_weights(flat.shape[1], flat.device)).cpu()  # (tiles, 2): one small transfer
    spans, start = [], 0
    for tiles in tiles_per_row:
        spans.append((start, start + tiles))
        start += tiles
    groups: dict[tuple, list[int]] = {}
    for b, (lo, hi) in enumerate(spans):
        if hi > lo:
            groups.setdefault((hi - lo, tuple(fingerprints[lo:hi].flatten().tolist())), []).append(b)
    for members in groups.values():
        if len(members) == 1:
            keys[members[0]] = f"unique-image-of-row-{members[0]}".encode()
            continue
        first = pixel_values[spans[members[0]][0] : spans[members[0]][1]]
        digest = image_digest(first)  # hashed once per image, however many rows show it
        for b in members:
            pixels = pixel_values[spans[b][0] : spans[b][1]]
            keys[b] = digest if torch.equal(pixels, first) else image_digest(pixels)
    return keys


_FINGERPRINT_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _fingerprint_weights(numel: int, device: torch.device) -> torch.Tensor:
    key = (numel, str(device))
    if key not in _FINGERPRINT_WEIGHTS:
        g = torch.Generator(device="cpu").manual_seed(0)
        _FINGERPRINT_WEIGHTS[key] = torch.randn(numel, 2, generator=g).to(device)
    return _FINGERPRINT_WEIGHTS[key]


@dataclass
class _Plan:
    """Host-side layout of one generate call."""

    positions: torch.Tensor  # (B, T) long, cpu: position id of every column (0 on left padding)
    compute: torch.Tensor  # (B, T) bool, cpu: columns this row computes (real, not shared, not a duplicate)
    lengths: list[int]  # real prompt length of every row
    source: torch.Tensor  # (B,) long, device: the row whose prompt results this row reuses (itself if none)
    has_duplicates: bool
    shared_tokens: list[int] = field(default_factory=list)


class _MergedProjections:
    """One layer's q/k/v projections as one (Q + 2KV, H) weight and its gate/up projections as one (2I, H) weight:
    two matrix products per layer instead of five (at decode sizes each product is a kernel whose weight read
    takes a few microseconds, plus a launch). Copies of the module weights, refreshed by `refresh` at the start of
    every generate call (the weights may have changed in between, in training) into the same buffers, so
    captured CUDA graphs stay valid. Costs one more copy of those weights (~0.47 GB at InternVL3-1B in bf16)."""

    def __init__(self, layer):
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

    def matches(self, layer) -> bool:
        """Still the layer's modules (not replaced, e.g. by adapters) with weights of the same shapes, device and
        dtype (else the runner rebuilds and drops its graphs)."""
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


class _StepBuffers:
    """Static inputs of the one-position step for a batch bucket (the CUDA graphs read and write these)."""

    def __init__(self, size: int, hidden: int, table_width: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.embeds = torch.zeros(size, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.active = torch.zeros(size, dtype=torch.bool, device=device)
        self.block_tables = torch.zeros(size, table_width, dtype=torch.int32, device=device)
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}


class PagedRunner:
    """Paged-cache generation for one `MultimodalCoconut` (see the module docstring).

    block_size: tokens per block. num_blocks: pool size; None sizes the pool to each call's worst case (growing it
    when a call needs more; no call then runs out), an int fixes it (a call that needs more raises
    `PoolExhaustedError`). max_model_len: the longest sequence (prompt + new tokens); it sets the width of the
    static block tables. use_cuda_graphs: capture the one-position steps on CUDA (off: eager everywhere).
    fused_ops: RMSNorm (with the residual add before it), rotary embedding and the SwiGLU product through
    `kernels.decode_fusions` (a few kernels per layer instead of ~25); None: on CUDA when the layers allow it.
    merged_projections: with the fused ops, one matrix product for q/k/v and one for gate/up per layer
    (`_MergedProjections`: a copy of those weights, refreshed at every generate call). attention_options: launch
    settings of `paged_decode_attention` for the one-position steps (block_n, num_warps, num_stages,
    dot_in_cache_dtype), e.g. the best configuration of the paged-KV report's sweep.
    max_graph_batch: the largest batch bucket that gets graphs (larger batches run eagerly). sync_interval: decode
    steps between host checks for "every row has ended" (the output is trimmed exactly afterwards).
    """

    def __init__(
        self,
        model,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_sharing: bool = True,
        use_cuda_graphs: bool = True,
        max_graph_batch: int = 256,
        num_splits: int | None = None,
        sync_interval: int = 4,
        fused_ops: bool | None = None,
        merged_projections: bool = True,
        attention_options: dict | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        unknown = set(attention_options or {}) - _ATTENTION_OPTIONS
        if unknown:
            raise ValueError(f"attention_options: unknown {sorted(unknown)}; valid: {sorted(_ATTENTION_OPTIONS)}")
        self.attention_options = dict(attention_options or {})
        if sync_interval < 1:
            raise ValueError(f"sync_interval must be >= 1, got {sync_interval}")
        self.model = model
        lm = model.language_model
        config = lm.config
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"the paged runner supports full-attention layers only, got {sorted(set(layer_types))}"
            )
        self.lm = lm
        self.layers = list(lm.layers[: config.num_hidden_layers])
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.scale = float(self.layers[0].self_attn.scaling)
        self.block_size = block_size
        self.fixed_num_blocks = num_blocks
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.table_width = -(-self.max_model_len // block_size)
        self.enable_prefix_sharing = enable_prefix_sharing
        self.use_cuda_graphs = use_cuda_graphs
        self.max_graph_batch = max_graph_batch
        self.num_splits = num_splits
        self.sync_interval = sync_interval
        self.cache: PagedKVCache | None = None
        # Counters of the last generate call: prompt_tokens, computed_prompt_tokens, blocks_after_prompt,
        # duplicate_rows, peak_blocks (blocks in use at the end of decoding, the most it held).
        self.stats: dict[str, int] = {}
        self._buckets: dict[int, _StepBuffers] = {}
        self._graph_pool = None
        # Runs the bucketed static-buffer step (what the CUDA graphs replay) eagerly on any device: lets the CPU
        # tests cover the bucket padding, the static block tables and the active mask of the graph path.
        self.static_buffers_without_graphs = False
        rope_type = str(getattr(lm.rotary_emb, "rope_type", "default"))
        # dynamic/longrope rotary embeddings branch on the host on the position values: not capturable
        self._graphs_ok = "dynamic" not in rope_type and rope_type != "longrope"
        # cos/sin of every position once, then one gather per step instead of the ~9 kernels of the module (the
        # values are the module's: each is one fp32 product inv_freq * position, then cos/sin); position-only ropes
        self._rotary_table_ok = self._graphs_ok
        self._rotary_table: tuple[tuple, torch.Tensor] | None = None
        fused_ops_reason = _fused_ops_unsupported(lm, self.layers)
        self._fused_ops_ok = fused_ops_reason is None
        if fused_ops and not self._fused_ops_ok:
            raise NotImplementedError(f"fused_ops=True: {fused_ops_reason}")
        self.fused_ops = fused_ops
        self._fused_ops_checked: dict[tuple, bool] = {}
        merge_reason = _merge_unsupported(self.layers) if merged_projections and self._fused_ops_ok else None
        if merge_reason is not None:
            log.info("merged projections off: %s", merge_reason)
        self.merged_projections = merged_projections and self._fused_ops_ok and merge_reason is None
        self._merged: list[_MergedProjections] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _graphs_enabled(self, batch: int) -> bool:
        on_device = self.device.type == "cuda" or self.static_buffers_without_graphs
        return (
            self.use_cuda_graphs
            and self._graphs_ok
            and on_device
            and batch <= self.max_graph_batch
            and not torch.is_grad_enabled()
        )

    # ------------------------------------------------------------------ the pool
    def _ensure_cache(self, blocks_needed: int) -> None:
        cache = self.cache
        if cache is not None and cache.device == self.device and cache.key.dtype == self.dtype:
            if self.fixed_num_blocks is not None or cache.num_blocks >= blocks_needed:
                return
        num_blocks = self.fixed_num_blocks or blocks_needed
        if self.cache is not None:
            log.info("growing the paged KV pool from %d to %d blocks", self.cache.num_blocks, num_blocks)
        self.cache = None
        self._drop_graphs()  # the graphs hold the old pool's addresses
        self.cache = PagedKVCache(
            num_layers=len(self.layers),
            num_blocks=num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            enable_prefix_sharing=self.enable_prefix_sharing,
        )

    def refresh_merged_projections(self) -> None:
        """Bring the merged q/k/v and gate/up weights up to date with the modules (in place: the CUDA graphs keep
        their addresses), building them on first use or when the model changed device, dtype or shape."""
        if not (self.merged_projections and self._use_fused_ops()):
            return
        if self._merged is None or not all(m.matches(layer) for m, layer in zip(self._merged, self.layers)):
            if self._merged is not None:
                self._drop_graphs()  # the graphs read the old buffers
                self._merged = None
            reason = _merge_unsupported(self.layers)  # modules replaced since: maybe by wrapped ones
            if reason is not None:
                log.info("merged projections off: %s", reason)
                self.merged_projections = False
                return
            self._merged = [_MergedProjections(layer) for layer in self.layers]
            return
        for merged in self._merged:
            merged.refresh()

    def _drop_graphs(self) -> None:
        self._buckets.clear()
        self._graph_pool = None

    # ------------------------------------------------------------------ the layers
    def _forward_tokens(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """x (N, H) input embeddings at ``positions`` (N,) -> (N, H) last hidden states (post-norm).

        Every layer writes the tokens' K/V at ``slots`` before attending, so tokens of this call see each other
        through the cache. ``attend(q, key_cache, value_cache)`` returns (N, q_heads, head_dim).
        """
        cos, sin = self.rotary_cos_sin(x, positions)  # (N, head_dim) each, the model's own rotary embedding
        if self._use_fused_ops():
            return self._forward_tokens_fused(x, cos, sin, slots, attend)
        n = x.shape[0]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, self.q_heads, self.head_dim)
            k = attn.k_proj(h).view(n, self.kv_heads, self.head_dim)
            v = attn.v_proj(h).view(n, self.kv_heads, self.head_dim)
            q, k = rotary_qk_reference(q, k, cos, sin)
            key_cache, value_cache = self.cache.layer(index)
            paged_kv_write(k, v, key_cache, value_cache, slots)
            o = attend(q, key_cache, value_cache)
            x = x + attn.o_proj(o.reshape(n, self.q_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.norm(x)

    def rotary_cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, head_dim) cos and sin of the model's rotary embedding at ``positions`` (N,), in x's dtype: rows of a
        table of all ``max_model_len`` positions (built on first use per device and dtype), or the module itself
        for rotary embeddings that depend on more than the position."""
        if not self._rotary_table_ok:
            cos, sin = self.lm.rotary_emb(x, positions[None])
            return cos[0], sin[0]
        key = (x.device, x.dtype)
        if self._rotary_table is None or self._rotary_table[0] != key:
            if self._rotary_table is not None:
                self._drop_graphs()  # the graphs read the old table
            everywhere = torch.arange(self.max_model_len, device=x.device)
            cos, sin = self.lm.rotary_emb(x, everywhere[None])
            self._rotary_table = (key, torch.stack([cos[0], sin[0]]))  # (2, max_model_len, head_dim)
        both = self._rotary_table[1][:, positions]  # one gather
        return both[0], both[1]

    def _forward_tokens_fused(self, x, cos, sin, slots, attend) -> torch.Tensor:
        """`_forward_tokens` with `kernels.decode_fusions`: each RMSNorm takes the residual add before it, rotary
        embedding of q and k and the cache write of k and v are one kernel, the SwiGLU product one kernel; with
        `merged_projections` one matrix product for q/k/v and one for gate/up. The fused kernels round as the
        modules do; a merged product may use another GEMM algorithm than the separate ones (on GPU, not
        bit-identical then: same values to bf16 rounding)."""
        n = x.shape[0]
        if self.merged_projections and self._merged is None:  # built here when generate did not run first
            self.refresh_merged_projections()
        merged = self._merged if self.merged_projections else None
        pending = None  # the last sublayer's output, added to x by the next norm
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            if pending is None:
                h = rms_norm(x, norm.weight, norm.variance_epsilon)
            else:
                h, x = rms_norm(pending, norm.weight, norm.variance_epsilon, residual=x)
            if merged is not None:  # views into one product: the kernels below read them strided, no copies
                q, k, v = F.linear(h, merged[index].qkv_weight, merged[index].qkv_bias).split(merged[index].qkv_sizes, -1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.view(n, self.q_heads, self.head_dim)
            k = k.view(n, self.kv_heads, self.head_dim)
            v = v.view(n, self.kv_heads, self.head_dim)
            key_cache, value_cache = self.cache.layer(index)
            if k.dtype == key_cache.dtype:
                q = rotary_kv_write(q, k, v, cos, sin, key_cache, value_cache, slots)  # k, v straight to the cache
            else:  # layers in another dtype than the cache: the write rounds k and v to it
                q, k = rotary_qk(q, k, cos, sin)
                paged_kv_write(k, v, key_cache, value_cache, slots)
            o = attend(q, key_cache, value_cache)
            pending = attn.o_proj(o.reshape(n, self.q_heads * self.head_dim))
            norm = layer.post_attention_layernorm
            h, x = rms_norm(pending, norm.weight, norm.variance_epsilon, residual=x)
            if merged is not None:
                gate, up = F.linear(h, merged[index].gate_up_weight).split(merged[index].gate_up_sizes, -1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            pending = mlp.down_proj(silu_mul(gate, up))
        norm = self.lm.norm
        if pending is None:
            return rms_norm(x, norm.weight, norm.variance_epsilon)
        return rms_norm(pending, norm.weight, norm.variance_epsilon, residual=x)[0]

    def _use_fused_ops(self) -> bool:
        if self.fused_ops is not None:
            return self.fused_ops
        # auto: on CUDA, for the layers the fused path knows, once the kernels pass a self-check on this device
        if not self._fused_ops_ok or self.device.type != "cuda":
            return False
        key = (str(self.device), self.dtype)
        if key not in self._fused_ops_checked:
            reason = decode_fusions_self_check(self.device, self.dtype)
            if reason is not None:
                log.warning("decode fusions off on %s (%s): %s", self.device, self.dtype, reason)
            self._fused_ops_checked[key] = reason is None
        return self._fused_ops_checked[key]

    def _step_forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        active: torch.Tensor,
        block_tables: torch.Tensor,
        num_splits: int,
    ) -> torch.Tensor:
        """One position per row: (R, H) inputs -> (R, H) hidden. Inactive rows write nothing, read nothing."""
        context_lens = torch.where(active, positions + 1, 0).to(torch.int32)
        blocks = block_tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        slots = torch.where(active, blocks * self.block_size + positions % self.block_size, -1)

        def attend(q, key_cache, value_cache):
            return paged_decode_attention(
                q, key_cache, value_cache, block_tables, context_lens, scale=self.scale, num_splits=num_splits,
                **self.attention_options,
            )

        return self._forward_tokens(x, positions, slots, attend)

    def _splits_for(self, rows: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        block_n = self.attention_options.get("block_n", 64)
        return choose_num_splits(rows, self.kv_heads, self.max_model_len, self.device, block_n=block_n)

    # ------------------------------------------------------------------ one-position steps (eager or graph)
    def _bucket(self, batch: int) -> _StepBuffers:
        size = 1 << max(0, (batch - 1).bit_length())
        buf = self._buckets.get(size)
        if buf is None:
            buf = _StepBuffers(size, self.hidden_size, self.table_width, self.dtype, self.device)
            self._buckets[size] = buf
        return buf

    def _static_step(self, buf: _StepBuffers, with_logits: bool) -> torch.Tensor:
        x = self.model.base.get_input_embeddings()(buf.tokens) if with_logits else buf.embeds
        hidden = self._step_forward(x, buf.positions, buf.active, buf.block_tables, self._splits_for(buf.size))
        return self.model.base.lm_head(hidden) if with_logits else hidden

    def _capture(self, buf: _StepBuffers, with_logits: bool) -> None:
        if with_logits in buf.graphs:
            return
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        saved_active = buf.active.clone()
        buf.active.zero_()  # warm-up and capture write nothing into the pool
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and picks cuBLAS algorithms outside the capture
                self._static_step(buf, with_logits)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a DataLoader's pinning thread) do not break the capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            output = self._static_step(buf, with_logits)
        buf.graphs[with_logits] = (graph, output)
        buf.active.copy_(saved_active)

    def _one_position(
        self,
        buf: _StepBuffers | None,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        active: torch.Tensor,
        *,
        embeds: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One position per row of the batch. With ``tokens``: returns logits (B, V); with ``embeds``: hidden (B, H)."""
        with_logits = tokens is not None
        batch = positions.shape[0]
        if buf is None:  # eager
            x = self.model.base.get_input_embeddings()(tokens) if with_logits else embeds
            hidden = self._step_forward(x, positions, active, block_tables, self._splits_for(batch))
            return self.model.base.lm_head(hidden) if with_logits else hidden
        graphed = buf.tokens.device.type == "cuda"
        if graphed:
            self._capture(buf, with_logits)
        if with_logits:
            buf.tokens[:batch].copy_(tokens)
        else:
            buf.embeds[:batch].copy_(embeds)
        buf.positions[:batch].copy_(positions)
        buf.active[:batch].copy_(active)
        if not graphed:
            return self._static_step(buf, with_logits)[:batch]
        graph, output = buf.graphs[with_logits]
        graph.replay()
        return output[:batch]

    # ------------------------------------------------------------------ planning
    def _plan(
        self, batch, pixel_values: torch.Tensor | None, max_new_tokens: int, block_tables_out: torch.Tensor
    ) -> _Plan:
        """Add every row to the cache (sharing prefixes, forking duplicates) and fill its block table."""
        ids = batch.input_ids.detach().cpu()
        mask = batch.attention_mask.detach().cpu().bool()
        positions = batch.position_ids.detach().cpu().long()
        rows, width = ids.shape
        lengths = mask.sum(1).tolist()
        pads = [width - n for n in lengths]
        too_long = [b for b in range(rows) if lengths[b] + max_new_tokens > self.max_model_len]
        if too_long:
            raise ValueError(
                f"rows {too_long} need more than max_model_len={self.max_model_len} positions (prompt + "
                f"max_new_tokens={max_new_tokens}); create the PagedRunner with a larger max_model_len"
            )
        first_latent = batch.schedule.starts[1] if batch.schedule.num_passes > 1 else width
        digests = _image_keys(pixel_values, batch.tiles_per_row) if self.enable_prefix_sharing else [b""] * rows
        cache = self.cache
        source = list(range(rows))
        shared = [0] * rows
        seen: dict[tuple, int] = {}
        for b in range(rows):
            real = tuple(ids[b, pads[b] :].tolist())
            key = (real, digests[b])
            if self.enable_prefix_sharing and key in seen:
                source[b] = seen[key]
                cache.fork(source[b], b)
                shared[b] = lengths[b]
                continue
            seen.setdefault(key, b)
            # Shareable: pass-0 tokens of the row but the last one before the first latent column.
            shareable = ids[b, pads[b] : max(pads[b], first_latent - 1)].tolist()
            shared[b] = cache.add_sequence(b, shareable, seed=digests[b])
            cache.reserve(b, lengths[b])
        table = cache.block_table(range(rows), block_tables_out.shape[1], device="cpu")
        block_tables_out.copy_(_to_device(table, block_tables_out.device))
        compute = mask & (positions >= torch.tensor(shared)[:, None])
        self.stats = {
            "prompt_tokens": int(sum(lengths)),
            "computed_prompt_tokens": int(compute.sum()),
            "blocks_after_prompt": cache.num_used_blocks,
            "duplicate_rows": sum(int(source[b] != b) for b in range(rows)),
        }
        return _Plan(
            positions=positions,
            compute=compute,
            lengths=lengths,
            source=torch.tensor(source, device=self.device),
            has_duplicates=source != list(range(rows)),
            shared_tokens=shared,
        )

    # ------------------------------------------------------------------ the prompt's passes
    def _chunk_pass(self, start, end, plan, embeds, latent_mask, prev_last, block_tables) -> torch.Tensor:
        """A multi-position pass over columns [start, end): packed tokens, chunk attention."""
        compute = plan.compute[:, start:end]
        counts = compute.sum(1)
        if int(counts.sum()) == 0:
            return prev_last
        rows, cols = compute.nonzero(as_tuple=True)  # row-major: each row's tokens contiguous and in order
        cols = cols + start
        query_start = torch.zeros(counts.shape[0] + 1, dtype=torch.int32)
        query_start[1:] = counts.cumsum(0)
        index = _to_device(torch.stack([rows, cols, plan.positions[rows, cols]]), self.device)
        rows_d, cols_d, pos_d = index[0], index[1], index[2]
        query_start_d = _to_device(query_start, self.device)
        x = embeds[rows_d, cols_d]
        # Only a pass's first column can hold a latent: it takes the previous pass's last hidden state.
        x = torch.where(latent_mask[rows_d, cols_d][:, None], prev_last[rows_d], x)
        blocks = block_tables[rows_d, pos_d // self.block_size].long()
        slots = blocks * self.block_size + pos_d % self.block_size
        visible = (pos_d + 1).to(torch.int32)
        max_query_len = int(counts.max())

        def attend(q, key_cache, value_cache):
            return paged_chunk_attention(
                q,
                key_cache,
                value_cache,
                block_tables,
                query_start_d,
                visible,
                max_query_len=max_query_len,
                scale=self.scale,
            )

        hidden = self._forward_tokens(x, pos_d, slots, attend)
        has = counts > 0
        last = _to_device((query_start[1:] - 1)[has].long(), self.device)
        updated = _to_device(has.nonzero().flatten(), self.device)
        prev_last = prev_last.clone()
        prev_last[updated] = hidden[last]
        return prev_last

    def _prompt_passes(self, batch, plan: _Plan, block_tables: torch.Tensor, buf: _StepBuffers | None) -> torch.Tensor:
        """Run the schedule over the cache; returns (B, H): every row's last hidden state."""
        embeds = self.model.base_embeddings(batch)
        latent_mask = batch.latent_mask
        schedule = batch.schedule
        prev_last = embeds.new_zeros(embeds.shape[0], embeds.shape[-1])
        positions_d = batch.position_ids.to(self.device)
        for index, (start, end) in enumerate(schedule.chunks):
            with profile_range(schedule.pass_name(index)):
                if end - start == 1:
                    active_host = plan.compute[:, start]
                    if bool(active_host.any()):
                        active = _to_device(active_host, self.device)
                        x = torch.where(latent_mask[:, start, None], prev_last, embeds[:, start])
                        hidden = self._one_position(buf, block_tables, positions_d[:, start], active, embeds=x)
                        prev_last = torch.where(active[:, None], hidden, prev_last)
                else:
                    prev_last = self._chunk_pass(start, end, plan, embeds, latent_mask, prev_last, block_tables)
                if plan.has_duplicates:
                    prev_last = prev_last[plan.source]
        return prev_last

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        min_passes: int = 0,
        step_sync: Callable[[bool], bool] | None = None,
    ) -> torch.Tensor:
        """Same contract as `generate_with_dynamic_cache`: (B, n) new tokens, ended rows padded with the pad id."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_left_padded(attention_mask)
        model = self.model
        batch = model.prepare(input_ids, attention_mask, pixel_values)
        rows = input_ids.shape[0]
        pad = pad_token_id if pad_token_id is not None else 0
        out = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        if max_new_tokens == 0 or rows == 0:
            return out

        lengths = attention_mask.sum(1).tolist()
        # worst case: no sharing, every row to its last token, plus one copy-on-write block per row
        worst_case = sum(-(-(n + max_new_tokens) // self.block_size) for n in lengths) + rows
        self._ensure_cache(worst_case)
        self.refresh_merged_projections()
        use_graphs = self._graphs_enabled(rows)
        buf = self._bucket(rows) if use_graphs else None
        if buf is not None:
            buf.block_tables.zero_()
            buf.active.zero_()
            buf.positions.zero_()
            block_tables = buf.block_tables[:rows]
        else:
            width = -(-(max(lengths) + max_new_tokens) // self.block_size)
            block_tables = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
        try:
            plan = self._plan(batch, pixel_values, max_new_tokens, block_tables)
            prev_last = self._prompt_passes(batch, plan, block_tables, buf)
            model.padding_passes(prev_last, min_passes - batch.schedule.num_passes)
            logits = model.base.lm_head(prev_last)
            return self._decode(
                logits, plan, block_tables, buf, out,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                eos_token_id=eos_token_id, pad=pad, step_sync=step_sync,
            )
        finally:
            self.cache.free_all()

    def _decode(self, logits, plan, block_tables, buf, out, *, do_sample, temperature, top_k, top_p, generator,
                eos_token_id, pad, step_sync) -> torch.Tensor:
        rows = out.shape[0]
        cache = self.cache
        positions = _to_device(torch.tensor(plan.lengths, dtype=torch.long), self.device)  # next position per row
        next_pos = list(plan.lengths)

        def advance(token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
            nonlocal positions
            updates = []
            for b in range(rows):
                for index, block in cache.reserve(b, next_pos[b] + 1):
                    updates.append((b, index, block))
                next_pos[b] += 1
            if updates:
                u = _to_device(torch.tensor(updates, dtype=torch.long).T.contiguous(), self.device)
                block_tables[u[0], u[1]] = u[2].to(torch.int32)
            logits = self._one_position(buf, block_tables, positions, ~finished, tokens=token)
            positions = positions + 1
            return logits

        out = decode_loop(
            logits,
            out,
            advance,
            sampling=dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator),
            eos_token_id=eos_token_id,
            pad=pad,
            step_sync=step_sync,
            sync_interval=self.sync_interval,  # checking every step would stall the host on the GPU each step
        )
        self.stats["peak_blocks"] = cache.num_used_blocks
        return out


class _RunnerSlot:
    """Holds a model's cached runner. Copies and pickles of the model (deepcopy, torch.save) get an empty slot:
    a runner's pool and CUDA graphs belong to one model on one device."""

    def __init__(self):
        self.runner: PagedRunner | None = None
        self.options: dict = {}

    def __reduce__(self):
        return (_RunnerSlot, ())


def get_paged_runner(model, **options) -> PagedRunner:
    """The runner cached on ``model`` (its pool and CUDA graphs are reused across calls); new options replace it."""
    slot = model.__dict__.get("_paged_runner_slot")
    if slot is None:
        slot = _RunnerSlot()
        model.__dict__["_paged_runner_slot"] = slot  # a plain attribute: not a submodule, not in the state dict
    if slot.runner is None or (options and options != slot.options):
        slot.runner = PagedRunner(model, **options)
        slot.options = dict(options)
    return slot.runner


def release_paged_runner(model) -> bool:
    """Drop the runner cached on ``model`` (its block pool, CUDA graphs and merged weights go with it, back to the
    allocator); the next paged generate builds a new one. Returns whether there was one."""
    slot = model.__dict__.get("_paged_runner_slot")
    if slot is None or slot.runner is None:
        return False
    runner, slot.runner, slot.options = slot.runner, None, {}
    runner._drop_graphs()
    runner.cache = None
    runner._merged = None
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    return True


def generate_with_paged_cache(model, input_ids, attention_mask, pixel_values, **kwargs) -> torch.Tensor:
    """`generate_with_dynamic_cache`'s signature over the paged cache (the model's cached runner)."""
    return get_paged_runner(model).generate(input_ids, attention_mask, pixel_values, **kwargs)
