"""Identical image tiles encoded once (`engine/model/tiles.py`): same features, fewer tiles through the tower."""

from __future__ import annotations

import torch

import engine.model.tiles as tiles_module
from engine.model.tiles import unique_tiles
from tests.helpers import random_pixels


def test_unique_tiles_groups_equal_tiles_and_survives_fingerprint_collisions(monkeypatch):
    a, b, c = random_pixels(3, 28, seed=1).unbind(0)
    pixels = torch.stack([a, b, a, c, b, a])
    unique, inverse = unique_tiles(pixels)
    assert unique.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1, 0]
    assert torch.equal(pixels[unique][inverse], pixels)
    assert unique_tiles(torch.stack([a, b, c])) is None
    # every fingerprint equal: the exact comparison must still keep distinct tiles apart
    monkeypatch.setattr(tiles_module, "fingerprints", lambda p: torch.zeros(p.shape[0], 2))
    unique, inverse = unique_tiles(pixels)
    assert unique.tolist() == [0, 1, 3] and torch.equal(pixels[unique][inverse], pixels)


def test_deduplicated_encoding_gives_the_same_features_from_fewer_tiles(tiny_model):
    model = tiny_model
    size = model.config.vision_config.image_size[0]
    distinct = random_pixels(2, size, seed=4)
    pixels = distinct[[0, 1, 0, 0, 1]]
    seen = []
    tower = model.base.model.vision_tower
    handle = tower.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model.encode_images(pixels)
            deduped = model.encode_images(pixels, dedupe=True)
    finally:
        handle.remove()
    assert seen == [5, 2], f"tiles through the vision tower: {seen}"
    torch.testing.assert_close(deduped, plain, atol=1e-6, rtol=1e-5)
