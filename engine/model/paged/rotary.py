"""The rotary embedding of a one-position step as one gather from a table of every position."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.model.layers import restore_default_rope, rotary_cos_sin, rotary_host_dependent


class RotaryTable:
    """cos/sin of the model's rotary embedding for every position up to ``max_len``, computed once per device and
    dtype by the model's own module (each value is one fp32 product inv_freq * position, then cos/sin: the table
    holds exactly what the module returns), then one gather per step instead of the module's ~9 kernels.

    Rotary embeddings that depend on more than the position (dynamic, longrope) are not tabulated: every call
    then runs the module. ``on_rebuild`` is called when a table is replaced (CUDA graphs read the old one).
    """

    def __init__(self, language_model: nn.Module, max_len: int, on_rebuild: Callable[[], None] | None = None):
        self.lm = language_model
        self.max_len = max_len
        self.tabulated = rotary_host_dependent(language_model, max_positions=max_len) is None
        self.on_rebuild = on_rebuild
        self.table: torch.Tensor | None = None  # (2, max_len, head_dim)
        self._key: tuple | None = None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, head_dim) cos and sin at ``positions`` (N,), in x's dtype."""
        if not self.tabulated:
            cos, sin = self.lm.rotary_emb(x, positions[None])
            return cos[0], sin[0]
        key = (x.device, x.dtype)
        if self._key != key:
            if self.table is not None and self.on_rebuild is not None:
                self.on_rebuild()
            everywhere = torch.arange(self.max_len, device=x.device)
            restore_default_rope(self.lm, x.device, x.dtype)  # a grown dynamic rope would tabulate its grown values
            cos, sin = rotary_cos_sin(self.lm, x, everywhere[None])
            self.table, self._key = torch.stack([cos[0], sin[0]]), key
        both = self.table[:, positions]  # one gather
        return both[0], both[1]
