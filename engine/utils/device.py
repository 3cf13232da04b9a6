"""Host-to-device transfers that do not stall the stream."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the stream: pinned staging (the caching host allocator keeps the buffer
    alive until the copy has run), so the host can keep queueing work ahead of the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
