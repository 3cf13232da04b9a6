"""Fused input construction of one latent pass: token rows, image features and thoughts in one kernel.

For every position ``(b, t)`` of a chunk ``[start, end)`` of a ``(B, T)`` batch::

    out[b, t - start] = latent_hidden[b]                      if latent_hidden is given and latent_mask[b, t]
                      = image_features[image_index[b, t]]     elif image_features is given and image_index[b, t] >= 0
                      = embed_weight[input_ids[b, t]]         otherwise

``image_index`` is computed once per batch (`image_index_from_ids`): the row of the flattened image features
that belongs to each ``<IMG_CONTEXT>`` position (-1 elsewhere), in row-major order, which is where
``masked_scatter`` would put them. So a pass reads each output row once from wherever it comes from and writes it
once, instead of an embedding lookup of the whole batch, a ``masked_scatter`` of the image features and, for
every latent pass, a ``torch.where`` + ``torch.cat`` rebuild of the chunk.

Public entry points (one name across kernels, tests and benchmarks):

- `latent_inject(...)`: validates its inputs and calls the custom op ``coconut::latent_inject`` (with
  ``register_fake`` for tracing/compiling and ``register_autograd`` for gradients into ``embed_weight``,
  ``image_features`` and ``latent_hidden``);
- `latent_inject_reference(...)`: the same semantics in plain PyTorch (the spec; autograd gives its gradients);
- `image_index_from_ids(...)`: the per-batch index.

The full ``(B, T)`` id/index/mask tensors are passed with ``start``/``end``: a chunk needs no slicing copy, and
any strides work (the hidden dimension too). All float inputs must share ``embed_weight``'s dtype: the op is a
pure copy, so bf16 is exact (no arithmetic touches the values; the interpreter would truncate casts).
Token ids are not range-checked on the device (that would need a sync): out-of-range ids read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "default_config",
    "image_index_from_ids",
    "latent_inject",
    "latent_inject_forward",
    "latent_inject_reference",
]

# --------------------------------------------------------------------------------------------------- kernel


@triton.jit
def _latent_inject_kernel(
    ids_ptr,
    index_ptr,
    mask_ptr,
    weight_ptr,
    image_ptr,
    latent_ptr,
    out_ptr,
    start,
    chunk,
    num_rows,
    hidden,
    stride_ids_b,
    stride_ids_t,
    stride_index_b,
    stride_index_t,
    stride_mask_b,
    stride_mask_t,
    stride_weight_v,
    stride_weight_h,
    stride_image_n,
    stride_image_h,
    stride_latent_b,
    stride_latent_h,
    stride_out_b,
    stride_out_t,
    HAS_IMAGE: tl.constexpr,
    HAS_LATENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_R positions of the chunk (flattened row-major over (B, end - start)) x BLOCK_H columns.

    Each output element is loaded from exactly one source: the three loads are predicated on disjoint masks,
    so a row costs one read and one write whatever its kind.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_ok = r < num_rows
    b = r // chunk
    t = start + r % chunk
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    h_ok = h < hidden
    tile_ok = r_ok[:, None] & h_ok[None, :]

    token = tl.load(ids_ptr + b * stride_ids_b + t * stride_ids_t, mask=r_ok, other=0).to(tl.int64)
    use_token = r_ok
    if HAS_LATENT:
        flag = tl.load(mask_ptr + b * stride_mask_b + t * stride_mask_t, mask=r_ok, other=0)
        use_latent = r_ok & (flag != 0)
        use_token = use_token & (flag == 0)
    if HAS_IMAGE:
        row = tl.load(index_ptr + b * stride_index_b + t * stride_index_t, mask=r_ok, other=-1).to(tl.int64)
        use_image = use_token & (row >= 0)  # a thought wins over an image row (never both in a real batch)
        use_token = use_token & (row < 0)

    x = tl.load(
        weight_ptr + token[:, None] * stride_weight_v + h[None, :] * stride_weight_h,
        mask=tile_ok & use_token[:, None],
        other=0.0,
    )
    if HAS_IMAGE:
        xi = tl.load(
            image_ptr + row[:, None] * stride_image_n + h[None, :] * stride_image_h,
            mask=tile_ok & use_image[:, None],
            other=0.0,
        )
        x = tl.where(use_image[:, None], xi, x)  # a select, not arithmetic: exact for bf16 in the interpreter too
    if HAS_LATENT:
        xl = tl.load(
            latent_ptr + b[:, None] * stride_latent_b + h[None, :] * stride_latent_h,
            mask=tile_ok & use_latent[:, None],
            other=0.0,
        )
        x = tl.where(use_latent[:, None], xl, x)
    tl.store(out_ptr + b[:, None] * stride_out_b + (t - start)[:, None] * stride_out_t + h[None, :], x, mask=tile_ok)


def _is_interpreted() -> bool:
    """Whether the kernel was built for the Triton interpreter (TRITON_INTERPRET=1 when it was decorated)."""
    return type(_latent_inject_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------------- checks

_INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check(input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx):
    """Validate shapes, dtypes and devices (no device sync). Returns the normalised padding_idx (-1: none)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in _INDEX_DTYPES:
        got = _fmt(input_ids) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D (batch, seq_len) int32/int64 tensor, got {got}")
    if not isinstance(embed_weight, torch.Tensor) or embed_weight.dim() != 2 or not embed_weight.is_floating_point():
        got = _fmt(embed_weight) if isinstance(embed_weight, torch.Tensor) else type(embed_weight).__name__
        raise ValueError(f"embed_weight must be a 2-D (vocab, hidden) floating-point tensor, got {got}")
    batch, seq_len = input_ids.shape
    vocab, hidden = embed_weight.shape
    device, dtype = embed_weight.device, embed_weight.dtype
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but embed_weight is on {device}")
    if not (0 <= start <= end <= seq_len):
        raise ValueError(f"the chunk must satisfy 0 <= start <= end <= seq_len={seq_len}, got start={start}, end={end}")

    if (image_index is None) != (image_features is None):
        raise ValueError(
            "image_index and image_features go together (both or neither), got "
            f"image_index={'None' if image_index is None else 'a tensor'}, "
            f"image_features={'None' if image_features is None else 'a tensor'}"
        )
    if image_features is not None:
        if image_index.shape != input_ids.shape or image_index.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"image_index must be an int32/int64 tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                f"{_fmt(image_index)}"
            )
        if image_features.dim() != 2 or image_features.shape[1] != hidden:
            raise ValueError(
                f"image_features must be (num_image_tokens, hidden={hidden}), got shape {tuple(image_features.shape)}"
            )
        if image_features.dtype != dtype:
            raise ValueError(f"image_features dtype {image_features.dtype} differs from embed_weight dtype {dtype}")
        for name, t in (("image_index", image_index), ("image_features", image_features)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but embed_weight is on {device}")

    if (latent_mask is None) != (latent_hidden is None):
        raise ValueError(
            "latent_mask and latent_hidden go together (both or neither; the first pass has no thoughts), got "
            f"latent_mask={'None' if latent_mask is None else 'a tensor'}, "
            f"latent_hidden={'None' if latent_hidden is None else 'a tensor'}"
        )
    if latent_hidden is not None:
        if latent_mask.shape != input_ids.shape or latent_mask.dtype != torch.bool:
            raise ValueError(
                f"latent_mask must be a bool tensor of input_ids' shape {tuple(input_ids.shape)}, "
                f"got {_fmt(latent_mask)}"
            )
        if latent_hidden.shape != (batch, hidden):
            raise ValueError(
                f"latent_hidden must be (batch={batch}, hidden={hidden}), got shape {tuple(latent_hidden.shape)}"
            )
        if latent_hidden.dtype != dtype:
            raise ValueError(f"latent_hidden dtype {latent_hidden.dtype} differs from embed_weight dtype {dtype}")
        for name, t in (("latent_mask", latent_mask), ("latent_hidden", latent_hidden)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but embed_weight is on {device}")

    if padding_idx is None:
        return -1
    if not (-vocab <= padding_idx < vocab):
        raise ValueError(f"padding_idx must be None or in [-{vocab}, {vocab}) for vocab {vocab}, got {padding_idx}")
    return padding_idx % vocab


# --------------------------------------------------------------------------------------------------- launcher


def default_config(rows: int, hidden: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) for `rows` positions of `hidden` columns.

    GPU: tiles of ~2048 elements on 2 warps (16-byte vectors per thread), with the widest power-of-two BLOCK_H
    in {64, 128, 256} that wastes the fewest masked lanes (896 = 7 x 128). On an H100 this was the best of a
    4x4x3 sweep of (BLOCK_R, BLOCK_H, warps) at 64 x 1024 x 896 bf16: 89.8% of the copy bandwidth, against
    86.4% for 4096-element tiles on 4 warps (benchmarks/RESULTS.md).
    Interpreter: whole rows and as few programs as possible (each costs ~0.5 ms whatever its size).
    """
    if device.type != "cuda":
        block_h = triton.next_power_of_2(max(hidden, 1))
        block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), max(1, 16384 // block_h)))
        return block_r, block_h, 4
    block_h = min((256, 128, 64), key=lambda w: (triton.cdiv(hidden, w) * w - hidden, -w))
    block_h = min(block_h, triton.next_power_of_2(max(hidden, 16)))
    block_r = max(1, min(2048 // block_h, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_h, 2


def latent_inject_forward(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    start: int,
    end: int,
    image_index: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    latent_hidden: torch.Tensor | None = None,
    *,
    block_r: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the kernel (no autograd, no checks beyond the device): (B, end - start, H) in embed_weight's dtype.

    The block sizes can be overridden (the benchmark sweeps them); the custom op uses `default_config`.
    """
    device = embed_weight.device
    if device.type == "cpu" and not _is_interpreted():
        raise RuntimeError(
            "latent_inject got CPU tensors, but its Triton kernel runs on CPU only in the interpreter: set "
            "TRITON_INTERPRET=1 before kernels.latent_inject is imported, or use latent_inject_reference "
            "(MultimodalCoconut.set_injection('reference'))"
        )
    batch = input_ids.shape[0]
    hidden = embed_weight.shape[1]
    chunk = end - start
    out = torch.empty((batch, chunk, hidden), dtype=embed_weight.dtype, device=device)
    rows = batch * chunk
    if rows == 0 or hidden == 0:
        return out
    has_image = image_features is not None and image_features.shape[0] > 0
    has_latent = latent_hidden is not None
    d_r, d_h, d_w = default_config(rows, hidden, device)
    block_r, block_h, num_warps = block_r or d_r, block_h or d_h, num_warps or d_w
    # Unused sources get a valid dummy pointer (never dereferenced: their loads are compiled out).
    image = image_features if has_image else embed_weight
    index = image_index if has_image else input_ids
    latent = latent_hidden if has_latent else embed_weight
    mask = latent_mask.view(torch.uint8) if has_latent else input_ids  # same-size view: strides are kept
    grid = (triton.cdiv(rows, block_r), triton.cdiv(hidden, block_h))
    _latent_inject_kernel[grid](
        input_ids,
        index,
        mask,
        embed_weight,
        image,
        latent,
        out,
        start,
        chunk,
        rows,
        hidden,
        input_ids.stride(0),
        input_ids.stride(1),
        index.stride(0),
        index.stride(1),
        mask.stride(0),
        mask.stride(1),
        embed_weight.stride(0),
        embed_weight.stride(1),
        image.stride(0),
        image.stride(1),
        latent.stride(0),
        latent.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_IMAGE=has_image,
        HAS_LATENT=has_latent,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------- custom op


def _check_op(
    input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx
):
    """The op's own checks: those of `latent_inject`, with padding_idx already normalised (-1: none)."""
    _check(input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, None)
    if not (-1 <= padding_idx < embed_weight.shape[0]):
        raise ValueError(f"coconut::latent_inject takes padding_idx -1 (none) or in [0, {embed_weight.shape[0]}), "
                         f"got {padding_idx}")


@torch.library.custom_op("coconut::latent_inject", mutates_args=())
def _latent_inject_op(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    start: int,
    end: int,
    image_index: torch.Tensor | None,
    image_features: torch.Tensor | None,
    latent_mask: torch.Tensor | None,
    latent_hidden: torch.Tensor | None,
    padding_idx: int,
) -> torch.Tensor:
    _check_op(input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx)
    return latent_inject_forward(
        input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden
    )


@_latent_inject_op.register_fake
def _latent_inject_fake(
    input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx
):
    _check_op(input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx)
    return embed_weight.new_empty((input_ids.shape[0], end - start, embed_weight.shape[1]))


def _setup_context(ctx, inputs, output):
    input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx = inputs
    ctx.start, ctx.end, ctx.padding_idx = start, end, padding_idx
    ctx.vocab = embed_weight.shape[0]
    ctx.num_image_rows = None if image_features is None else image_features.shape[0]
    ctx.save_for_backward(input_ids, image_index, latent_mask)


def _sources(input_ids, image_index, latent_mask, start, end, has_image: bool, has_latent: bool):
    """(B, C) bool masks of the positions that take a token row, an image row and a thought (disjoint)."""
    use_latent = latent_mask[:, start:end] if has_latent else None
    use_image = (image_index[:, start:end] >= 0) if has_image else None
    if use_latent is not None and use_image is not None:
        use_image = use_image & ~use_latent
    use_token = torch.ones_like(input_ids[:, start:end], dtype=torch.bool)
    for m in (use_latent, use_image):
        if m is not None:
            use_token = use_token & ~m
    return use_token, use_image, use_latent


def _backward(ctx, grad):
    input_ids, image_index, latent_mask = ctx.saved_tensors
    start, end = ctx.start, ctx.end
    need = ctx.needs_input_grad
    has_image = image_index is not None and ctx.num_image_rows
    has_latent = latent_mask is not None
    use_token, use_image, use_latent = _sources(input_ids, image_index, latent_mask, start, end, has_image, has_latent)
    zero = grad.new_zeros(())
    grad_weight = grad_image = grad_latent = None
    if need[1]:
        # nn.Embedding's own backward (sorted, fp32 accumulation on GPU; repeated ids add up; padding_idx rows
        # stay zero), fed zeros where the position took another source.
        grad_weight = torch.ops.aten.embedding_dense_backward(
            torch.where(use_token[..., None], grad, zero), input_ids[:, start:end], ctx.vocab, ctx.padding_idx, False
        )
    if need[5] and ctx.num_image_rows is not None:
        grad_image = grad.new_zeros((ctx.num_image_rows, grad.shape[-1]))
        if has_image:
            rows = image_index[:, start:end].clamp(min=0).reshape(-1).long()  # -1 -> row 0, with a zero gradient
            grad_image.index_add_(0, rows, torch.where(use_image[..., None], grad, zero).flatten(0, -2))
    if need[7] and has_latent:
        # summed in fp32 at least (bf16 sums of a chunk's rows would round at every add), in fp64 for fp64
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_latent = torch.where(use_latent[..., None], grad, zero).sum(1, dtype=acc).to(grad.dtype)
    return None, grad_weight, None, None, None, grad_image, None, grad_latent, None


_latent_inject_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------- public API


def latent_inject(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    start: int,
    end: int,
    *,
    image_index: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    latent_hidden: torch.Tensor | None = None,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """Input embeddings of positions ``[start, end)`` of every row: (B, end - start, H), one kernel.

    Args:
        input_ids: (B, T) int32/int64 token ids of the whole batch (any strides).
        embed_weight: (V, H) token embedding table (any strides); sets the output dtype and device.
        start, end: the chunk, ``0 <= start <= end <= T``.
        image_index: (B, T) int32/int64, the row of `image_features` for each image position, -1 elsewhere
            (`image_index_from_ids`). Given together with `image_features`, or not at all.
        image_features: (N, H) image features in row order, embed_weight's dtype.
        latent_mask: (B, T) bool, positions that take a thought. Given together with `latent_hidden`.
        latent_hidden: (B, H) the thought of each row (the previous pass's last hidden state), or None in the
            first pass (then no position takes a thought).
        padding_idx: as in `nn.Embedding`: that row of embed_weight gets no gradient.
    """
    pad = _check(
        input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx
    )
    return _latent_inject_op(
        input_ids, embed_weight, int(start), int(end), image_index, image_features, latent_mask, latent_hidden, pad
    )


def latent_inject_reference(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    start: int,
    end: int,
    *,
    image_index: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    latent_hidden: torch.Tensor | None = None,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """`latent_inject` in plain PyTorch (same arguments, same checks, same values; autograd for the gradients)."""
    pad = _check(
        input_ids, embed_weight, start, end, image_index, image_features, latent_mask, latent_hidden, padding_idx
    )
    out = torch.nn.functional.embedding(input_ids[:, start:end], embed_weight, padding_idx=None if pad < 0 else pad)
    if image_features is not None and image_features.shape[0] > 0:
        index = image_index[:, start:end]
        rows = image_features[index.clamp(min=0).long()]  # (B, C, H); -1 reads row 0, discarded just below
        out = torch.where((index >= 0)[..., None], rows, out)
    if latent_hidden is not None:
        out = torch.where(latent_mask[:, start:end, None], latent_hidden[:, None, :], out)
    return out


def image_index_from_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) int32: for each ``image_token_id`` position, its row in the flattened image features (row-major
    order over the batch, as ``masked_scatter`` fills them); -1 elsewhere. Once per batch, no device sync."""
    is_image = input_ids == image_token_id
    rows = is_image.reshape(-1).cumsum(0, dtype=torch.int64).view(input_ids.shape) - 1
    return torch.where(is_image, rows, -1).to(torch.int32)
