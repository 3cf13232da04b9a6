"""engine/model/patch_embedding.py: the strided Conv2d of a patch embedding as one matrix product gives the
convolution's output and gradients (awkward sizes, rows and columns past the last patch, no bias, bf16), leaves
other convolutions to the class, and is what the model's vision tower runs."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from engine.model import fast_paths
from engine.model.patch_embedding import PatchConv2d, conv_reference, patch_product_unsupported, use_patch_products


@pytest.fixture(autouse=True)
def product_on_cpu(monkeypatch):
    """The product is CUDA's fast path (`fast_paths.patch_embedding`); these tests take it on the CPU."""
    monkeypatch.setattr(fast_paths, "patch_embedding", lambda device: fast_paths.Decision("patch_embedding", "product", "test"))


def pair(conv: nn.Conv2d) -> tuple[nn.Conv2d, PatchConv2d]:
    patched = copy.deepcopy(conv)
    assert use_patch_products(patched) == 1 and type(patched) is PatchConv2d
    return conv, patched


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,kernel,bias", [
    ((2, 3, 28, 28), (14, 14), True),
    ((3, 3, 30, 17), (7, 5), True),  # rows and columns past the last whole patch, a kernel that is not square
    ((1, 5, 9, 12), (3, 4), False),
])
def test_patch_product_equals_the_convolution(shape, kernel, bias, dtype, tol):
    torch.manual_seed(0)
    conv, patched = pair(nn.Conv2d(shape[1], 16, kernel, stride=kernel, bias=bias).to(dtype))
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref, got = conv(x), patched(x2)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *conv.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x2, *patched.parameters()], grad)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))
    # the embedding's flatten(2).transpose(1, 2) gives contiguous tokens without a copy
    tokens = got.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous()
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=tol, atol=tol)


def test_other_convolutions_stay_the_class_ones(monkeypatch):
    import engine.model.patch_embedding as module

    calls = []
    real = module.patch_projection
    monkeypatch.setattr(module, "patch_projection", lambda *a: calls.append(1) or real(*a))
    for conv in (nn.Conv2d(3, 8, 3, stride=1, padding=1), nn.Conv2d(3, 8, 4, stride=2), nn.Conv2d(4, 8, 2, stride=2, groups=2),
                 nn.Conv2d(3, 8, 2, stride=2, dilation=2)):
        assert patch_product_unsupported(conv) is not None
        assert use_patch_products(conv) == 0 and type(conv) is nn.Conv2d
        conv.__class__ = PatchConv2d  # forced: the class convolution still runs
        x = torch.randn(2, conv.in_channels, 11, 11)
        torch.testing.assert_close(conv(x), conv_reference(conv, x))
    assert calls == []
    conv = PatchConv2d(3, 8, 2, stride=2)
    conv(torch.randn(1, 3, 4, 4))
    assert calls == [1]
    with pytest.raises(RuntimeError):  # smaller than one patch: the convolution's error, not an empty result
        conv(torch.randn(1, 3, 1, 4))


def test_the_model_runs_the_patch_product(tiny):
    model, _, _ = tiny
    projection = model.base.model.vision_tower.embeddings.patch_embeddings.projection
    assert type(projection) is PatchConv2d
    assert "projection.weight" in dict(model.base.model.vision_tower.embeddings.patch_embeddings.named_parameters())
    size = model.config.vision_config.image_size[0]
    pixels = torch.randn(2, 3, size, size)
    got = model.encode_images(pixels)
    plain = copy.deepcopy(model)
    plain.base.model.vision_tower.embeddings.patch_embeddings.projection.__class__ = nn.Conv2d
    torch.testing.assert_close(got, plain.encode_images(pixels), rtol=1e-5, atol=1e-5)
    clone = pickle.loads(pickle.dumps(projection))  # a module-level class: checkpoints and copies keep it
    assert type(clone) is PatchConv2d


def test_the_product_is_cudas_fast_path(monkeypatch):
    monkeypatch.undo()
    assert fast_paths.patch_embedding("cuda:0").choice == "product"
    assert fast_paths.patch_embedding("cpu").choice == "conv"
    import engine.model.patch_embedding as module

    calls = []
    real = module.patch_projection
    monkeypatch.setattr(module, "patch_projection", lambda *a: calls.append(1) or real(*a))
    PatchConv2d(3, 8, 2, stride=2)(torch.randn(1, 3, 4, 4))  # on the CPU: the class convolution
    assert calls == []
