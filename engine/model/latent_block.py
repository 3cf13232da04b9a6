"""The one-position latent passes of an aligned batch as one static-shape block, CUDA-graphed for training.

Why. A latent pass computes one position per row: a few milliseconds of GPU work, but through transformers'
eager modules it issues ~1,400 kernel launches forward and as many backward, and on the H100 each latent pass
cost ~80 ms of host time for ~3 ms of kernels (benchmarks/RESULTS.md). Captured in a CUDA graph, forward and
backward, the host cost of all of a batch's latent passes becomes two graph replays.

What the block computes. On a batch whose latents sit in contiguous columns ``r .. r+K-1`` with every row real
there (what the collator produces), passes 1..K-1 of the schedule each compute one column. `latent_block` runs
them in order, with the language model's own modules (RMSNorms, q/k/v projections with bias, rotary
embedding, o projection, MLP), as a function of static shapes:

- ``prev`` (B, H): the hidden state of column r-1 (the prefix pass's last position);
- ``column_embeds`` (B, M, H): token/image embeddings of columns r .. r+M-1 (M = K-1);
- ``column_is_latent`` (B, M): rows whose column holds a thought (they take the previous column's hidden state);
- ``positions`` (B, M): position ids of those columns;
- ``key_allowed`` (B, P_bucket + M): which keys are real (the prefix's attention mask, padded to the bucket);
- ``prefix_kv`` (L, 2, B, kv_heads, P_bucket, head_dim): the prefix pass's cache, padded to the bucket;

and returns ``hidden`` (B, M, H) and ``latent_kv`` (L, 2, B, kv_heads, M, head_dim), which are appended to the
transformers cache for the final pass. In training nobody needs the cache afterwards, so the block also runs
the final pass: its F columns are appended to the column inputs (the first may hold the last latent) and run
as one causal chunk. Padding the prefix to a multiple of `bucket` positions (masked out by ``key_allowed``)
and the final chunk to a multiple of `final_bucket` (right padding, causally after every real column) lets
one graph serve every batch whose lengths fall in the same buckets.

One query per row attends through the ops table's `one_query_attention` (the fused ops: one Triton kernel
forward and one backward, `kernels/one_query_attention.py`; the reference: grouped matmuls over the kv heads;
what SDPA after repeat_kv would save for backward is 7x larger at 14/2 heads); the final chunk uses SDPA as
transformers does.

`LatentBlock` runs it eagerly (the CPU path that tests compare with the transformers passes, bucket padding
included) or from two CUDA graphs per shape bucket: the forward and the backward (``autograd.grad`` with
respect to the inputs and the parameters), captured as `torch.cuda.make_graphed_callables` does, with three
differences that matter here: inputs shorter than the bucket are copied into the front of the static buffers;
outputs and the inputs' gradients are returned as copies, so nothing the caller keeps aliases graph memory that
the next replay overwrites (the weights' gradients are views lent until then, `_LentGradients`); and a backward
that runs after another replay of the same graph raises instead of reading overwritten activations.

Under DeepSpeed ZeRO-3 the language model's parameters are gathered into fresh memory at every call of it (its
leaf module, `MultimodalCoconut.set_language_model_leaf`), at addresses a graph cannot keep. With
``staged_weights`` the graphs read copies of the weights in buffers of their own instead, refreshed from the
gathered parameters before each forward replay (one multi-tensor copy: ~0.4 ms for the 1B geometry's 0.7 GB;
the buffers cost that memory once more); the gradients still go to the gathered parameters, so ZeRO-3 reduces
them as it reduces any other.

The weights' gradients leave every captured backward through one set of buffers shared by all captured shapes
(`LatentBlock.gradient_slots`): each is copied there as soon as autograd has summed it over the passes, and freed,
so a graph's memory pool holds a few layers' gradients at a time instead of all of them; autograd gets views of
the slots, copied only for whoever still holds one when the slots are next written (`_LentGradients`). One copy of
the weights for the gradients, whatever the number of shapes (at the 8B geometry each copy is 12 GiB). With staged
weights the slots are the staged buffers themselves, so the graphs keep one copy of the weights in all: a backward
reads a weight only until autograd has summed its gradient (a leaf's gradient is accumulated after every node with
a gradient edge to it, and the shared products, which read the weight without one, run before their `_Gather`
node, which has one), and every forward stages the weights anew. A backward whose staged weights another shape's
backward has overwritten since its forward stages them again first (`_StagedWeights`).

What the graphs keep (staged weights, slots, their memory pools) they keep for good, where the eager block's
activations are freed by its backward. A shape whose capture would not fit beside the step's peak (measured: with
staged weights the block's calls with gradients of the first steps run eagerly), or runs out of memory, runs
eagerly until the block is released, with a warning (`LatentBlock.graphs_unfit` says why); the shapes captured
before stay.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.layers import (
    LayerGeometry,
    ReferenceOps,
    layer_geometry,
    masked_sdpa,
    rotary_cos_sin,
    run_layers,
)
from engine.model.schedule import feed_thoughts
from engine.utils.logging import get_logger

log = get_logger("latent_block")


class _CachedChunkAttention:
    """The block's attention function (`engine.model.layers.Attention`): a chunk of queries attends to the keys
    cached so far plus its own, whose K/V it appends to ``past_keys[i]`` / ``past_values[i]`` (lists of
    (B, kv_heads, t, head_dim) pieces). ``allowed`` (B, 1, n, keys) says which keys each query sees."""

    def __init__(self, ops: ReferenceOps, geometry: LayerGeometry, past_keys, past_values, allowed: torch.Tensor):
        self.ops, self.geometry = ops, geometry
        self.past_keys, self.past_values, self.allowed = past_keys, past_values, allowed
        self.blocked = ~allowed[:, 0, 0] if allowed.shape[-2] == 1 else None  # one-query passes: (B, keys), once

    def __call__(self, index, q, k, v, cos, sin):
        g = self.geometry
        batch, n = q.shape[:2]
        q, k = self.ops.rotary(q, k, cos, sin)  # (B, n, heads, D)
        self.past_keys[index].append(k.transpose(1, 2))
        self.past_values[index].append(v.transpose(1, 2))
        if n == 1:
            # One query per row: the kv heads' query groups attend to the prefix's K/V where they are and to the
            # passes' own (a few positions, joined). Unlike SDPA after repeat_kv, nothing is saved at q_heads, and
            # the prefix is not concatenated with the passes' K/V per pass and layer (nor its gradient sliced).
            qg = q.view(batch, g.kv_heads, g.groups, g.head_dim)
            prefix_k, prefix_v = self.past_keys[index][0], self.past_values[index][0]
            new_k, new_v = torch.cat(self.past_keys[index][1:], dim=2), torch.cat(self.past_values[index][1:], dim=2)
            o = self.ops.one_query_attention(qg, prefix_k, prefix_v, new_k, new_v, self.blocked, g.scale)
            return o.reshape(batch, 1, g.q_heads, g.head_dim)
        keys, values = torch.cat(self.past_keys[index], dim=2), torch.cat(self.past_values[index], dim=2)
        return masked_sdpa(q.transpose(1, 2), keys, values, self.allowed, g).transpose(1, 2)


def latent_block(
    language_model: nn.Module,
    prev: torch.Tensor,
    column_embeds: torch.Tensor,
    column_is_latent: torch.Tensor,
    positions: torch.Tensor,
    key_allowed: torch.Tensor,
    prefix_kv: torch.Tensor,
    final_columns: int = 0,
    fused_ops: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M one-position passes over the cached prefix, then (``final_columns`` F > 0) the final pass as one chunk.

    Shapes in the module docstring, with the F final columns appended to `column_embeds`, `column_is_latent`,
    `positions` and `key_allowed` (the final chunk's first column can hold a latent; its other columns cannot).
    Returns hidden (B, M + F, H) and the K/V of the M one-position columns. ``fused_ops``: the layers' norms,
    rotary embedding and SwiGLU through `GradFusedOps` (Triton, with backward) instead of the modules.
    """
    lm = language_model
    batch, total, _ = column_embeds.shape
    num_columns = total - final_columns
    num_layers = prefix_kv.shape[0]
    geometry = dataclasses.replace(layer_geometry(lm), num_layers=num_layers, head_dim=prefix_kv.shape[-1])
    if fused_ops:
        from engine.model.fused_ops import GradFusedOps, shared_weight_unsupported, training_merge_unsupported

        # each layer runs once per pass: its q/k/v and gate/up weights concatenated once serve every pass, and
        # each weight's gradient is one product over all passes (the table lives for this forward only)
        layers = list(lm.layers[:num_layers])
        ops = GradFusedOps(
            lm,
            merge_projections=training_merge_unsupported(layers) is None,
            share_weight_grads=shared_weight_unsupported(layers, lm) is None,
        )
    else:
        ops = ReferenceOps(lm)
    bucket = prefix_kv.shape[-2]
    cos, sin = rotary_cos_sin(lm, column_embeds, positions)  # (B, M + F, head_dim), in the embeddings' dtype
    # unbind, not indexing: the gradient of prefix_kv is then one stack of the pieces' gradients, where L * 2
    # indexed pieces each give a zero-filled gradient of the whole (L, 2, B, kv, P, D) tensor that autograd then
    # sums (302 MB each at the 1B geometry: ~15 ms of fills and adds per backward)
    pairs = [layer.unbind(0) for layer in prefix_kv.unbind(0)]
    keys = [[k] for k, _ in pairs]
    values = [[v] for _, v in pairs]
    column_list = column_embeds.unbind(1)  # the same for the columns

    def chunk(x, j, end, allowed):
        attention = _CachedChunkAttention(ops, geometry, keys, values, allowed)
        return run_layers(lm, x, cos[:, j:end], sin[:, j:end], attention, ops, geometry)

    hiddens = []
    last = prev
    for j in range(num_columns):
        x = feed_thoughts(column_list[j], column_is_latent[:, j], last)[:, None]
        last = chunk(x, j, j + 1, key_allowed[:, None, None, : bucket + j + 1])
        hiddens.append(last)
        last = last[:, 0]
    latent_kv = torch.stack(
        [torch.stack([torch.cat(keys[i][1:], 2), torch.cat(values[i][1:], 2)]) for i in range(num_layers)]
    )
    if final_columns:
        j = num_columns
        first = feed_thoughts(column_list[j], column_is_latent[:, j], last)[:, None]
        x = torch.stack([first[:, 0], *column_list[j + 1 :]], dim=1)
        seen = bucket + num_columns
        causal = torch.ones(final_columns, final_columns, dtype=torch.bool, device=x.device).tril()
        allowed = torch.cat(
            [
                key_allowed[:, None, :seen].expand(-1, final_columns, -1),
                causal[None] & key_allowed[:, None, seen:],
            ],
            dim=-1,
        )[:, None]
        hiddens.append(chunk(x, j, total, allowed))
    return torch.cat(hiddens, dim=1), latent_kv


def _python_refs(tensors: list[torch.Tensor], index: int) -> int:
    """Python's reference count of ``tensors[index]``, always taken through this one function so that counts taken
    at different times compare."""
    return sys.getrefcount(tensors[index])


class _LentGradients:
    """The weights' gradients that captured backwards handed to autograd as views of the gradient slots, which
    every captured shape shares, instead of copies (at the 8B geometry a copy of every weight at once is 12 GiB).

    Only gradients that autograd sums into ``.grad`` unseen are lent (`_summed_into_grad`; the others, e.g. a
    ``torch.autograd.grad`` result, leave as copies). Autograd consumes them within that backward: it adds them to
    another use's gradient or copies them into ``.grad`` (it cannot take over a tensor held here, as it takes over
    a sole reference). One still held when the slots are next written (in autograd's buffers for the pending
    backward of another forward) gets its own copy first (`reclaim`): the held tensor is re-pointed at the copy, so
    it never sees a later replay's values."""

    def __init__(self):
        self._held: list[torch.Tensor] = []
        # each view held a second time: when autograd decides whether it may take a gradient over as .grad
        # (torch's `is_tensor_stealable`), a Python object referenced once does not count as a holder; .grad would
        # then live in the slot
        self._held_again: list[torch.Tensor] = []
        # a tensor nobody else sees, held as the views are: its reference count is that of a view nobody holds
        self._unseen, self._unseen_again = [torch.empty(0)], []
        self._unseen_again.append(self._unseen[0])

    def lend(self, slots: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of ``slots`` (each a tensor of its own over the slot's memory) to return to autograd."""
        start = len(self._held)
        self._held.extend(s.new_empty(0).set_(s.untyped_storage(), s.storage_offset(), s.size(), s.stride())
                          for s in slots)
        self._held_again.extend(self._held[start:])
        return self._held[start:]

    def reclaim(self) -> int:
        """Before the slots are written: give every lent view that somebody still holds (autograd's buffers count
        in the tensor's use count, Python holders in its reference count) a copy of its values, and forget them
        all. Returns how many were copied. Only the view itself is re-pointed: the backward lends only gradients
        that autograd sums into ``.grad`` unseen (`_summed_into_grad`), so nobody can have taken a view of one."""
        copied = 0
        unseen = _python_refs(self._unseen, 0)
        with torch.no_grad():
            for index in range(len(self._held)):  # no loop variable: it would count as a holder
                if self._held[index]._use_count() > 1 or _python_refs(self._held, index) > unseen:
                    self._held[index].set_(self._held[index].clone())
                    copied += 1
        self._held.clear()
        self._held_again.clear()
        return copied


def _summed_into_grad(params, indices: list[int], building_graph: bool) -> set[int]:
    """Those of ``indices`` whose parameter's gradient this backward only sums into ``.grad``: its accumulator runs
    (not under `torch.autograd.grad`, which returns it to the caller, nor a ``backward(inputs=...)`` without it), no
    tensor hook sees the gradient first, and the backward builds no graph (``create_graph``, where autograd hands on
    a detached alias). Only those may leave as views of the slots (`_LentGradients`); whoever receives the others
    may keep them, or views of them, so they leave as copies. A parameter without gradient takes none."""
    if building_graph:
        return set()
    from torch.autograd.graph import get_gradient_edge

    try:
        return {i for i in indices if not params[i].requires_grad or (
            not params[i]._backward_hooks and torch._C._will_engine_execute_node(get_gradient_edge(params[i]).node))}
    except RuntimeError:  # torch.autograd.grad with parameters among its inputs
        return set()


class _StagedWeights:
    """The staged weights' buffers, which the captured backwards also use as the gradient slots, and whether they
    hold the weights now (after a forward's staging) or a backward's gradients (after its replay)."""

    def __init__(self, buffers: list[torch.Tensor], lent: _LentGradients):
        self.buffers = buffers
        self.lent = lent  # gradients lent from these buffers: copied out before the weights overwrite them
        self.holds_weights = False

    def refresh(self, params) -> None:
        """Copy the parameters' values in (one multi-tensor copy)."""
        self.lent.reclaim()
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, [p.detach() for p in params])
        self.holds_weights = True

    def hold_weights(self, params) -> None:
        """`refresh` unless they hold the weights already (a backward or a capture's warm-up left gradients)."""
        if not self.holds_weights:
            self.refresh(params)


@dataclass
class _Graphs:
    """Static buffers and the forward/backward graphs of one (batch, prefix bucket, M, final bucket) shape."""

    inputs: tuple[torch.Tensor, ...]  # prev, column_embeds, column_is_latent, positions, key_allowed, prefix_kv
    outputs: tuple[torch.Tensor, torch.Tensor]
    grad_outputs: tuple[torch.Tensor, torch.Tensor]
    # prev, column_embeds, prefix_kv, then the parameters' gradient slots (shared by every captured shape: valid
    # only until the next write of the slots, so the autograd function lends views of them through `lent`)
    grad_inputs: tuple[torch.Tensor | None, ...]
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph
    lent: _LentGradients  # the block's, shared by every captured shape as the slots are
    replays: int = 0
    pool_reserved: int = 0  # bytes the graphs' memory pool took from the device
    pool_allocated: int = 0  # of which still allocated after the capture (outputs, gradients)
    # the tensors the graphs read and write outside their pool (staged weights, slots): kept alive with them, also
    # by a pending backward, when the block drops its own references
    buffers: tuple[torch.Tensor, ...] = ()
    # with staged weights: their buffers, which are also the slots (every shape's), and what they hold now
    staged: _StagedWeights | None = None


_DIFFERENTIABLE = (0, 1, 5)  # prev, column_embeds, prefix_kv


class _GraphedBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: _Graphs, prev, column_embeds, column_is_latent, positions, key_allowed, prefix_kv, *params):
        # Inputs shorter than the bucket fill the front of the static buffers; the rest is masked out or lies in
        # columns after every real one (causal), so stale values there cannot reach a real output.
        static = graphs.inputs
        columns = column_embeds.shape[1]
        static[0].copy_(prev)
        static[1][:, :columns].copy_(column_embeds)
        static[2][:, :columns].copy_(column_is_latent)
        static[3][:, :columns].copy_(positions)
        static[4].copy_(key_allowed)
        static[5][..., : prefix_kv.shape[-2], :].copy_(prefix_kv)
        if graphs.staged is not None:
            graphs.staged.hold_weights(params)
        graphs.forward_graph.replay()
        graphs.replays += 1
        ctx.graphs, ctx.replay, ctx.prefix_len, ctx.columns = graphs, graphs.replays, prefix_kv.shape[-2], columns
        # the parameters themselves (under ZeRO-3 gathered again for the backward), not their values: for staging
        # the weights again in backward when another backward overwrote them with its gradients, and to see where
        # their gradients go
        ctx.params = params
        hidden, latent_kv = graphs.outputs
        return hidden[:, :columns].clone(), latent_kv.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hidden, grad_latent_kv):
        graphs = ctx.graphs
        if graphs.replays != ctx.replay:
            raise RuntimeError(
                "the CUDA-graphed latent passes were replayed by another forward before this backward, which "
                "overwrote the activations it needs; run backward before the next forward of the same batch "
                "shape, or use model.set_latent_passes('transformers')"
            )
        graphs.grad_outputs[0][:, : ctx.columns].copy_(grad_hidden)
        graphs.grad_outputs[0][:, ctx.columns :].zero_()
        graphs.grad_outputs[1].copy_(grad_latent_kv)
        staged = graphs.staged
        if staged is not None:  # another shape's backward may have left its gradients there
            staged.hold_weights(ctx.params)
        graphs.lent.reclaim()  # what an earlier backward lent and is still held: copied out before the replay
        graphs.backward_graph.replay()
        if staged is not None:
            staged.holds_weights = False  # they hold this backward's gradients now
        g_prev, g_embeds, g_prefix, *g_params = graphs.grad_inputs
        # the slots are every shape's: what autograd only sums into .grad leaves as views of them, and a later
        # write of the slots copies out whatever is still held first (`_LentGradients`); the rest as copies
        present = [i for i, g in enumerate(g_params) if g is not None]
        lendable = _summed_into_grad(ctx.params, present, grad_hidden.requires_grad or grad_latent_kv.requires_grad)
        lent = [i for i in present if i in lendable]
        copied = [i for i in present if i not in lendable]
        for i, view in zip(lent, graphs.lent.lend([g_params[i] for i in lent])):
            g_params[i] = view
        for i, copy in zip(copied, torch._foreach_mul([g_params[i] for i in copied], 1.0) if copied else []):
            g_params[i] = copy
        return (
            None,
            None if g_prev is None else g_prev.clone(),
            None if g_embeds is None else g_embeds[:, : ctx.columns].clone(),
            None,
            None,
            None,
            None if g_prefix is None else g_prefix[..., : ctx.prefix_len, :].clone(),
            *g_params,
        )


def backward_into_slots(outputs, grad_outputs, inputs, weights, slots) -> tuple[torch.Tensor | None, ...]:
    """Backward of `outputs` (cotangents `grad_outputs`) into the leaves `inputs` and `weights`. Returns the inputs'
    gradients, then for each weight its slot (`slots[i]`, where its gradient is copied) or None when it has none.

    Each weight's gradient is copied into its slot as soon as autograd has summed it over all its uses and then
    freed, so a captured backward holds a few weights' gradients at a time, not all of them, and every captured
    shape leaves its gradients in the same slots."""
    filled: list[torch.Tensor | None] = [None] * len(weights)

    def into_slot(index: int):
        def hook(weight: torch.Tensor) -> None:
            slots[index].copy_(weight.grad)
            weight.grad = None
            filled[index] = slots[index]

        return hook

    for t in (*inputs, *weights):
        t.grad = None
    handles = [w.register_post_accumulate_grad_hook(into_slot(i)) for i, w in enumerate(weights)]
    try:
        torch.autograd.backward(outputs, grad_outputs, inputs=[*inputs, *weights])
    finally:
        for handle in handles:
            handle.remove()
    grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    return (*grads, *filled)


class _Holder(nn.Module):
    """`latent_block` as a module over the language model, for `torch.func.functional_call` at capture only."""

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.lm = language_model

    def forward(self, *inputs, final_columns: int = 0, fused_ops: bool = False):
        return latent_block(self.lm, *inputs, final_columns=final_columns, fused_ops=fused_ops)


MAX_GRAPHS = 6  # captured shapes a LatentBlock keeps by default
STAGED_GRAPHS_MEMORY_SHARE = 0.25  # of the device's memory, at most, for the graphs' weight buffers under ZeRO-3
GRAPHS_MEMORY_SHARE = 0.95  # of the device's memory, at most, for a step's peak with the graphs' buffers added
# Training steps whose calls (with gradients) run eagerly before the staged graphs (ZeRO-3) are captured. The first
# step's peak is not the run's: at the 8B geometry on two H200s under ZeRO-3, batch 8, the first step peaked at
# 92.9 GiB and later ones at 106 GiB.
EAGER_STEPS_BEFORE_STAGED_GRAPHS = 2


def pool_bytes(pool, device: torch.device) -> tuple[int, int]:
    """(reserved, allocated) bytes of the CUDA graph memory pool `pool` on `device`, from the allocator's segments
    (differences of `torch.cuda.memory_reserved` mislead: under memory pressure the allocator frees cached blocks
    of the default pool to grow the graph's)."""
    segments = [s for s in torch.cuda.memory_snapshot()
                if s["device"] == device.index and tuple(s["segment_pool_id"]) == tuple(pool)]
    return sum(s["total_size"] for s in segments), sum(s["allocated_size"] for s in segments)


def _buffers_like(buffers: list[torch.Tensor] | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`buffers` when they match `tensors` in shape, dtype and device one for one, else new contiguous ones that
    do: the graphs' own buffers keep their addresses while the tensors they stand for keep their layout."""
    layout = [(t.shape, t.dtype, t.device) for t in tensors]
    if buffers is None or [(b.shape, b.dtype, b.device) for b in buffers] != layout:
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    return buffers


class GraphsDoNotFit(RuntimeError):
    """The captured graphs' buffers and the step's peak do not fit the device together."""


def memory_in_use(device: torch.device) -> tuple[int, int, int] | None:
    """(bytes allocated now, the most allocated since the peak was last reset, the device's total) on `device`;
    None off CUDA (no limit checked)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device), total


def block_parameters(language_model: nn.Module) -> list[nn.Parameter]:
    """The weights the block reads and differentiates: the layers' and the final norm's that need a gradient."""
    modules = [*language_model.layers[: language_model.config.num_hidden_layers], language_model.norm]
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def block_weight_bytes(language_model: nn.Module) -> int:
    """Bytes of `block_parameters`, counted whole also when DeepSpeed ZeRO-3 partitions them (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in block_parameters(language_model))


def staged_graphs_unsupported(language_model: nn.Module, device: torch.device) -> str | None:
    """Why the graphs with staged weights (ZeRO-3) should not run on `device` (None: they should). They keep a
    whole copy of the block's weights, the staged values, which are also the gradient slots (0.65 GiB at the 1B
    geometry, 2.4 GiB at 2B, 12 GiB at 8B), which the memory ZeRO-3 frees must not pay for; above
    `STAGED_GRAPHS_MEMORY_SHARE` of the device the block runs eagerly inside the gather instead. (Whether they
    fit beside a step's peak is measured at the capture: `LatentBlock._check_fit`.)"""
    need = block_weight_bytes(language_model)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if need > STAGED_GRAPHS_MEMORY_SHARE * total:
        return (f"the graphs' weight buffers would take {need / 2**30:.1f} GiB, over "
                f"{STAGED_GRAPHS_MEMORY_SHARE:.0%} of the device's {total / 2**30:.0f} GiB")
    return None


class LatentBlock:
    """Runs `latent_block` for a language model, eagerly or from CUDA graphs (see the module docstring).

    Not an nn.Module on purpose: it only refers to the language model's modules, so the model's state dict and
    parameter list stay as they are. `bucket`: prefix lengths are padded up to a multiple of it. `max_graphs`:
    captured shapes kept (least recently used dropped first; each holds its activations, all share the gradient slots).
    `fused_ops`: the layers' elementwise work through `engine.model.fused_ops.GradFusedOps` (what
    `fast_paths.layer_ops` decides). `staged_weights`: the graphs read copies of the weights, refreshed before
    every forward replay, so that parameters re-created at new addresses at every call (ZeRO-3's gathers) keep
    the graphs valid (see the module docstring). `forwards_per_step`: training forwards per optimizer step
    (gradient accumulation), so that the eager calls before the staged graphs span whole steps.
    """

    def __init__(
        self,
        language_model: nn.Module,
        *,
        use_cuda_graphs: bool,
        bucket: int = 128,
        final_bucket: int = 32,
        max_graphs: int = MAX_GRAPHS,
        fused_ops: bool = False,
        staged_weights: bool = False,
        forwards_per_step: int = 1,
    ):
        if min(bucket, final_bucket, max_graphs, forwards_per_step) < 1:
            raise ValueError(
                f"bucket, final_bucket, max_graphs and forwards_per_step must be >= 1, got {bucket}, {final_bucket}, "
                f"{max_graphs} and {forwards_per_step}"
            )
        self.lm = language_model
        self.use_cuda_graphs = use_cuda_graphs
        self.bucket = bucket
        self.final_bucket = final_bucket
        self.max_graphs = max_graphs
        self.fused_ops = fused_ops
        self.staged_weights = staged_weights
        # with `staged_weights`: the weights the graphs read (`_staged`), which are also the slots
        self._staging: _StagedWeights | None = None
        self._gradient_slots: list[torch.Tensor] | None = None  # where the captured backwards leave the weights' grads
        self._lent = _LentGradients()  # views of the slots that backwards returned to autograd
        self._graphs: OrderedDict[tuple, _Graphs] = OrderedDict()
        self._param_fingerprint: tuple | None = None
        self.captures = 0  # graphs captured so far (benchmarks report it)
        # eager calls with gradients before the staged graphs: `EAGER_STEPS_BEFORE_STAGED_GRAPHS` steps of
        # `forwards_per_step` forwards each (gradient accumulation)
        self.measuring_calls = EAGER_STEPS_BEFORE_STAGED_GRAPHS * forwards_per_step
        self._measuring_calls = 0  # made so far
        self._eager_shapes: set[tuple] = set()  # shapes whose graphs did not fit: they run eagerly
        self._eager_activation_bytes = 0  # kept for the backward by those calls
        self.graphs_unfit: str | None = None  # why a shape's graphs last gave way to the eager block, if they did
        self.calls = 0

    def release(self) -> None:
        """Drop every captured graph and its memory (the staged weights and the gradient slots too), and start over:
        the next calls measure the step again and capture if the graphs fit (also after they once did not)."""
        self._drop_graphs()
        self._eager_shapes.clear()
        self.graphs_unfit = None
        self._measuring_calls = 0
        self._eager_activation_bytes = 0
        self.calls = 0

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._staging = None
        self._gradient_slots = None
        # a pending backward of the dropped graphs writes the old slots, and reclaims through their own `lent`
        self._lent = _LentGradients()
        self._param_fingerprint = None

    @property
    def _measuring(self) -> bool:
        """Whether the staged graphs still wait for the first steps' eager calls (`EAGER_STEPS_BEFORE_STAGED_GRAPHS`).
        """
        return self.staged_weights and self._measuring_calls < self.measuring_calls

    def describe(self) -> str:
        """How the block has run since it was built or released: "eager", "graphs, N shape(s)", the shapes that ran
        eagerly because their graphs did not fit (and the last reason), or that it is still measuring."""
        if not self.use_cuda_graphs:
            return "eager"
        said = [f"graphs, {len(self._graphs)} shape(s)"] if self._graphs else []
        if self._eager_shapes:
            said.append(f"eager for {len(self._eager_shapes)} shape(s) whose graphs did not fit ({self.graphs_unfit})")
        if not said:
            said.append("eager, measuring the step before the graphs" if self._measuring
                        else "graphs, none captured yet")
        return "; ".join(said)

    def __getstate__(self):  # a copied or pickled model recaptures: graphs hold this process's device addresses
        state = dict(self.__dict__)
        state["_graphs"] = OrderedDict()
        state["_staging"] = None
        state["_gradient_slots"] = None
        state["_lent"] = _LentGradients()
        state["_param_fingerprint"] = None
        return state

    @property
    def _staged(self) -> list[torch.Tensor] | None:
        return None if self._staging is None else self._staging.buffers

    def _params(self) -> list[nn.Parameter]:
        return block_parameters(self.lm)

    def __call__(
        self,
        prev: torch.Tensor,
        column_embeds: torch.Tensor,
        column_is_latent: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_kv: torch.Tensor,
        final_columns: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the columns after a prefix of P positions.

        `column_embeds` (B, M + F, H), `column_is_latent` and `positions` (B, M + F): the M one-position columns,
        then the F columns of the final pass (F = `final_columns`, 0 to leave the final pass to the caller);
        `attention_mask` (B, P + M + F): the batch's mask over all of them; `prefix_kv` (L, 2, B, kv, P, head_dim).
        Returns hidden (B, M + F, H) and the M columns' K/V (L, 2, B, kv, M, head_dim).
        """
        self.calls += 1
        batch, columns, _ = column_embeds.shape
        num_columns = columns - final_columns
        prefix_len = prefix_kv.shape[-2]
        padded = -(-prefix_len // self.bucket) * self.bucket
        final_padded = -(-final_columns // self.final_bucket) * self.final_bucket
        device = column_embeds.device
        key_allowed = torch.zeros(batch, padded + num_columns + final_padded, dtype=torch.bool, device=device)
        key_allowed[:, :prefix_len] = attention_mask[:, :prefix_len].bool()
        key_allowed[:, padded : padded + columns] = attention_mask[:, prefix_len:].bool()

        def eagerly():  # the same padding as the graphs
            extra = final_padded - final_columns
            pad = prefix_kv.new_zeros((*prefix_kv.shape[:-2], padded - prefix_len, prefix_kv.shape[-1]))
            hidden, latent_kv = latent_block(
                self.lm,
                prev,
                F.pad(column_embeds, (0, 0, 0, extra)),
                F.pad(column_is_latent, (0, extra)),
                F.pad(positions, (0, extra)),
                key_allowed,
                torch.cat([prefix_kv, pad], -2),
                final_columns=final_padded,
                fused_ops=self.fused_ops,
            )
            return hidden[:, :columns], latent_kv

        if not self.use_cuda_graphs:
            return eagerly()
        if self.staged_weights and not self._graphs and (self._measuring or not torch.is_grad_enabled()):
            # Under ZeRO-3 a step's peak comes after the forward and the graphs keep a copy of the weights and their
            # pool for good: the first steps' calls with gradients run eagerly so that the peak the graphs
            # are sized against (`_check_fit`) is a whole step's, and a later one's; the activations they keep for
            # the backward stand for the graphs' pool until one is captured. (A call without gradients, e.g. a
            # validation, measures nothing, and captures nothing before training has.)
            self._measuring_calls += torch.is_grad_enabled()
            before = memory_in_use(device)
            outputs = eagerly()
            if before is not None:
                kept = memory_in_use(device)[0] - before[0]
                self._eager_activation_bytes = max(self._eager_activation_bytes, kept)
            return outputs
        key = (batch, padded, num_columns, final_padded, column_embeds.dtype, prefix_kv.dtype, device)
        if key in self._eager_shapes:
            return eagerly()
        try:
            graphs = self._graphs_for(key, column_embeds, prefix_kv)
        except (torch.OutOfMemoryError, GraphsDoNotFit) as e:  # left before going on: its traceback holds tensors
            self.graphs_unfit = f"batch {batch}, prefix bucket {padded}: {(str(e).splitlines() or [repr(e)])[0]}"
            graphs = None
        if graphs is None:  # this shape's graphs do not fit: it runs eagerly until `release`, the others stay
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the failed capture's warm-up may still use what is freed below
            self._graphs.pop(key, None)
            self._eager_shapes.add(key)
            if not self._graphs:  # nothing reads the staged weights and slots any more
                self._drop_graphs()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("the latent passes' CUDA graphs do not fit (%s); this shape runs eagerly until the block is "
                        "released", self.graphs_unfit)
            return eagerly()
        return _GraphedBlockFunction.apply(
            graphs, prev, column_embeds, column_is_latent, positions, key_allowed, prefix_kv, *self._params()
        )

    def _graphs_for(self, key: tuple, column_embeds: torch.Tensor, prefix_kv: torch.Tensor) -> _Graphs:
        """The graphs of shape `key`, captured now if they are not kept (the staged weights refreshed first)."""
        device = column_embeds.device
        before = memory_in_use(device)  # before the staged weights and the slots exist
        params = self._params()
        if not self._graphs and before is not None:  # a first capture: whether it can fit, before allocating
            # one copy of the weights: the staged ones (which are also the slots), or else the slots
            copies = int((self._staged if self.staged_weights else self._gradient_slots) is None)
            self._check_fit(before, copies * block_weight_bytes(self.lm), pools=self._eager_activation_bytes)
        read = self._stage(params) if self.staged_weights else params  # the tensors the graphs read
        slots = self.gradient_slots(read)
        fresh = memory_in_use(device)[0] - before[0] if before is not None else 0  # allocated for them just now
        fingerprint = tuple(t.data_ptr() for t in (*read, *slots))
        if fingerprint != self._param_fingerprint:  # parameters moved or re-created: the graphs hold old addresses
            self._graphs.clear()
            self._param_fingerprint = fingerprint
        graphs = self._graphs.get(key)
        if graphs is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            batch, padded, num_columns, final_padded = key[:4]
            graphs = self._capture(params, read, slots, batch, padded, num_columns, final_padded, column_embeds,
                                   prefix_kv)
            self._graphs[key] = graphs
            self._check_fit(before, fresh)
        self._graphs.move_to_end(key)
        return graphs

    def _check_fit(self, before: tuple[int, int, int] | None, fresh: int, pools: int | None = None) -> None:
        """Raises `GraphsDoNotFit` when the most memory allocated so far (``before``: `memory_in_use` ahead of this
        capture) plus what the graphs keep beyond it (``fresh``: the staged weights and slots allocated for it;
        ``pools``: by default the newest graphs' pool, whole, and the free blocks of the older ones) exceeds
        `GRAPHS_MEMORY_SHARE` of the device. Before a first capture the eager calls' activations stand for its pool.

        The graphs keep these for good, where the eager block's activations are freed by its backward; at the 8B
        geometry on two H200s under ZeRO-3 (batch 8: an eager step peaks at 106 GiB) graphs that kept 24 GiB of
        weights and slots and a 15 GiB pool made the step after the capture run out of memory (they now keep 12 GiB
        and a 3.4 GiB pool, and fit). Without staged weights
        the graphs are captured at the first call, against the peak of a partial step: the check then catches only
        what is plainly too large, and a capture that runs out of memory gives way."""
        if before is None:
            return
        _, peak, total = before
        measured = pools is None
        if measured:  # the newest pool whole; the older pools' free blocks (their allocated ones may be in the peak)
            newest = next(reversed(self._graphs.values()))
            older = [g for g in self._graphs.values() if g is not newest]
            pools = newest.pool_reserved + sum(g.pool_reserved - g.pool_allocated for g in older)
        held = fresh + pools
        if measured:
            log.info("the latent passes' graphs keep %.2f GiB beside a peak of %.1f GiB so far (of %.1f GiB)",
                     held / 2**30, peak / 2**30, total / 2**30)
        if peak + held > GRAPHS_MEMORY_SHARE * total:
            raise GraphsDoNotFit(
                f"the step's peak so far ({peak / 2**30:.1f} GiB) and what the graphs keep ({held / 2**30:.1f} GiB: "
                f"staged weights, gradient slots, memory pools) exceed {GRAPHS_MEMORY_SHARE:.0%} of the device's "
                f"{total / 2**30:.1f} GiB"
            )

    def _stage(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The staged copies of `params`' values (allocated at the first call, and again if the parameters' shapes,
        dtypes or devices change), refreshed now."""
        buffers = _buffers_like(self._staged, params)
        if buffers is not self._staged:
            self._staging = _StagedWeights(buffers, self._lent)
        self._staging.refresh(params)
        return buffers

    def gradient_slots(self, read: list[torch.Tensor]) -> list[torch.Tensor]:
        """Where a captured backward leaves the weights' gradients, shared by every captured shape: with staged
        weights the staged buffers `read` themselves (the module docstring says why that is safe), else one buffer
        like each tensor the graphs read (allocated at the first call, and again if shapes, dtypes or devices
        change)."""
        if self.staged_weights:
            self._gradient_slots = read
        else:
            self._gradient_slots = _buffers_like(self._gradient_slots, read)
        return self._gradient_slots

    def run_columns(self, batch, cache, column_embeds, start: int, prev_last, keep_inputs: bool):
        """The block on a prepared batch (`MultimodalCoconut._passes`): its one-position columns from ``start`` and,
        when ``column_embeds`` (B, C, H) reaches past them, the final pass too, to the sequence's end (the cache then
        stays at the prefix); otherwise the columns' K/V are appended to the transformers ``cache``.

        Returns (hidden (B, C, H), the inputs actually fed (thoughts at latent columns) when `keep_inputs` else None).
        """
        width = batch.schedule.one_position_passes
        end = start + column_embeds.shape[1]
        layers = cache.layers
        prefix_kv = torch.stack([t for layer in layers for t in (layer.keys, layer.values)])
        prefix_kv = prefix_kv.view(len(layers), 2, *prefix_kv.shape[1:])
        column_is_latent = batch.latent_mask[:, start:end]
        hidden, latent_kv = self(
            prev_last,
            column_embeds,
            column_is_latent,
            batch.position_ids[:, start:end],
            batch.attention_mask[:, :end],
            prefix_kv,
            final_columns=end - start - width,
        )
        if end - start == width:  # no final pass here: the caller continues from the cache
            for index in range(len(layers)):
                cache.update(latent_kv[index, 0], latent_kv[index, 1], index)
        if not keep_inputs:
            return hidden, None
        previous = torch.cat([prev_last[:, None], hidden[:, :-1]], dim=1)
        return hidden, feed_thoughts(column_embeds, column_is_latent, previous)

    def graph_body(self, params, inputs, final_columns: int = 0, read=None):
        """(run, wrt): what the graphs capture. `run()` computes the block on `inputs` with aliases of `params`
        (of `read`, the tensors holding their values, when given: the staged weights); `wrt` lists the tensors
        differentiated: prev, column_embeds, prefix_kv, then one alias per parameter.

        The aliases share the parameters' storage but are fresh autograd leaves, first used on the warm-up
        stream. The parameters' own gradient accumulators were created by eager passes on the default stream,
        and the autograd engine would make the capturing stream wait on that stream, which invalidates the
        capture. The gradients the graphs return go to the real parameters.
        """
        read = params if read is None else read
        ids = {id(p): i for i, p in enumerate(params)}
        named = {name: read[ids[id(p)]] for name, p in self.lm.named_parameters() if id(p) in ids}
        if len(named) != len(params):
            raise RuntimeError("the latent block's parameters are not all parameters of the language model")
        aliases = {f"lm.{name}": t.detach().requires_grad_(True) for name, t in named.items()}
        order = {id(t): f"lm.{name}" for name, t in named.items()}
        wrt = [inputs[i] for i in _DIFFERENTIABLE] + [aliases[order[id(t)]] for t in read]
        holder = _Holder(self.lm)

        def run():
            with torch.enable_grad():  # captured for training even when the first call comes from a no-grad eval
                options = {"final_columns": final_columns, "fused_ops": self.fused_ops}
                return torch.func.functional_call(holder, aliases, inputs, options, tie_weights=False, strict=False)

        return run, wrt

    def _capture(self, params, read, slots, batch, padded, num_columns, final_padded, column_embeds, prefix_kv):
        device = column_embeds.device
        hidden_size = column_embeds.shape[-1]
        columns = num_columns + final_padded
        inputs = (
            torch.zeros(batch, hidden_size, dtype=column_embeds.dtype, device=device, requires_grad=True),
            torch.zeros(batch, columns, hidden_size, dtype=column_embeds.dtype, device=device, requires_grad=True),
            torch.ones(batch, columns, dtype=torch.bool, device=device),
            torch.zeros(batch, columns, dtype=torch.long, device=device),
            torch.ones(batch, padded + columns, dtype=torch.bool, device=device),
            torch.zeros(
                (*prefix_kv.shape[:-2], padded, prefix_kv.shape[-1]),
                dtype=prefix_kv.dtype,
                device=device,
                requires_grad=True,
            ),
        )
        run, wrt = self.graph_body(params, inputs, final_padded, read)
        self._lent.reclaim()  # the warm-ups write the slots: copies out first, on this stream, before it is waited on
        torch.cuda.synchronize(device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        differentiated = len(_DIFFERENTIABLE)
        staged = self._staging if self.staged_weights else None
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuBLAS/SDPA algorithm choice and lazy init outside the capture
                if staged is not None:  # the staged weights are the slots: the last warm-up left gradients there
                    staged.refresh(params)
                outputs = run()
                if staged is not None:  # from here they take gradients, also if this backward fails half-way
                    staged.holds_weights = False
                backward_into_slots(outputs, [torch.ones_like(o) for o in outputs], wrt[:differentiated],
                                    wrt[differentiated:], slots)
            del outputs
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pinning thread touching CUDA does not invalidate the capture
        with torch.cuda.graph(forward_graph, pool=pool, capture_error_mode="thread_local"):
            outputs = run()
        grad_outputs = tuple(torch.empty_like(o) for o in outputs)
        with torch.cuda.graph(backward_graph, pool=pool, capture_error_mode="thread_local"), torch.enable_grad():
            grad_inputs = backward_into_slots(outputs, grad_outputs, wrt[:differentiated], wrt[differentiated:], slots)
        self.captures += 1
        pool_reserved, pool_allocated = pool_bytes(pool, device)
        log.info(
            "captured the latent passes: batch %d, prefix bucket %d, %d one-position passes, final chunk bucket %d "
            "(a %.2f GiB memory pool)",
            batch,
            padded,
            num_columns,
            final_padded,
            pool_reserved / 2**30,
        )
        return _Graphs(
            inputs=inputs,
            outputs=tuple(o.detach() for o in outputs),
            grad_outputs=grad_outputs,
            grad_inputs=tuple(grad_inputs),
            forward_graph=forward_graph,
            backward_graph=backward_graph,
            lent=self._lent,
            pool_reserved=pool_reserved,
            pool_allocated=pool_allocated,
            buffers=(*read, *slots) if read is not params else tuple(slots),
            staged=self._staging if self.staged_weights else None,
        )
