"""The vision tower's patch embedding as one matrix product.

InternViT cuts each 448 x 448 tile into 14 x 14 patches with a Conv2d whose stride is its kernel: every output
position reads its own patch and nothing else, so the convolution is a matrix product of the flattened patches
(tiles x 1,024 patches, 3 x 14 x 14) with the flattened kernel (1,024 x 588). cuDNN does not see that: with 3 input
channels in bf16 it runs a generic implicit-GEMM kernel without tensor cores, 3.9 ms forward and 5.4 ms forward +
backward for the 64 tiles of a training step at the InternVL3-1B geometry on an H200, where the product (with the
copy that lays the patches out) takes 0.6 and 1.4 ms (benchmarks/RESULTS.md, "the patch embedding as a matrix
product").

`PatchConv2d` is an `nn.Conv2d` (same parameters, state dict and module name) whose convolution is that product
when it is one (stride equal to the kernel, no padding or dilation, one group) and `fast_paths.patch_embedding`
chooses it for the device (CUDA); otherwise the class convolution.
It returns the (N, C_out, h, w) result as a channels-last view, which the embedding's ``flatten(2).transpose(1, 2)``
turns into the (N, h * w, C_out) tokens without a copy. `use_patch_products(module)` gives every such Conv2d under
``module`` this class.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.model import fast_paths

__all__ = ["PatchConv2d", "conv_reference", "patch_product_unsupported", "patch_projection", "use_patch_products"]


def patch_product_unsupported(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` is not a product of non-overlapping patches, or None when it is."""
    if conv.stride != conv.kernel_size:
        return f"stride {conv.stride} is not the kernel {conv.kernel_size}"
    if conv.padding not in ((0, 0), "valid"):
        return f"padding {conv.padding}"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if conv.groups != 1:
        return f"{conv.groups} groups"
    return None


def patch_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=kernel)`` for (N, C_in, H, W) ``x`` and (C_out, C_in, kh, kw) ``weight``:
    rows and columns past the last whole patch are dropped, as the convolution does. Returns (N, C_out, H // kh,
    W // kw) with channels-last strides."""
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h, w = height // kh, width // kw
    x = x[:, :, : h * kh, : w * kw]
    patches = x.reshape(n, c_in, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(n * h * w, c_in * kh * kw)
    flat_weight = weight.reshape(c_out, c_in * kh * kw).t()
    out = patches @ flat_weight if bias is None else torch.addmm(bias, patches, flat_weight)
    return out.view(n, h, w, c_out).permute(0, 3, 1, 2)


class PatchConv2d(nn.Conv2d):
    """A Conv2d computed as `patch_projection` where `patch_product_unsupported` allows (the module docstring)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.dim() != 4 or self.padding_mode != "zeros" or patch_product_unsupported(self) is not None
                or input.shape[-2] < self.kernel_size[0] or input.shape[-1] < self.kernel_size[1]  # the conv's error
                or fast_paths.patch_embedding(input.device).choice != "product"):
            return super()._conv_forward(input, weight, bias)
        return patch_projection(input, weight, bias)


def use_patch_products(module: nn.Module) -> int:
    """Make every Conv2d under ``module`` whose convolution is a product of patches a `PatchConv2d` (in place: the
    same parameters and names). Returns how many."""
    count = 0
    for conv in module.modules():
        if type(conv) is nn.Conv2d and patch_product_unsupported(conv) is None:
            conv.__class__ = PatchConv2d
            count += 1
    return count


def conv_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The class convolution of ``conv`` (what `PatchConv2d` replaces), for tests and benchmarks."""
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
