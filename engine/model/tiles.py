"""Identical image tiles in a batch, found on the device: several questions about one image encode it once.

A position-weighted fingerprint of every tile (one small matrix product and one transfer of (tiles, 2) floats)
proposes groups; each member is confirmed equal to its group's first tile exactly, so a fingerprint collision can
cost a comparison, never a wrong merge.
"""

from __future__ import annotations

import torch

_FINGERPRINT_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def fingerprints(pixel_values: torch.Tensor) -> torch.Tensor:
    """(tiles, 2) float fingerprints of (tiles, ...) pixels, on the host."""
    flat = pixel_values.detach().reshape(pixel_values.shape[0], -1).float()
    key = (flat.shape[1], str(flat.device))
    if key not in _FINGERPRINT_WEIGHTS:
        g = torch.Generator(device="cpu").manual_seed(0)
        _FINGERPRINT_WEIGHTS[key] = torch.randn(flat.shape[1], 2, generator=g).to(flat.device)
    return (flat @ _FINGERPRINT_WEIGHTS[key]).cpu()


def unique_tiles(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(unique, inverse)`` with ``pixel_values[unique][inverse] == pixel_values`` (long index tensors on the
    pixels' device), or None when every tile is distinct."""
    tiles = pixel_values.shape[0]
    if tiles < 2:
        return None
    prints = fingerprints(pixel_values)
    first_of: dict[tuple, list[int]] = {}
    inverse = [0] * tiles
    unique: list[int] = []
    for t in range(tiles):
        candidates = first_of.setdefault(tuple(prints[t].tolist()), [])
        match = next((u for u in candidates if torch.equal(pixel_values[unique[u]], pixel_values[t])), None)
        if match is None:
            match = len(unique)
            unique.append(t)
            candidates.append(match)
        inverse[t] = match
    if len(unique) == tiles:
        return None
    device = pixel_values.device
    return torch.tensor(unique, device=device), torch.tensor(inverse, device=device)
