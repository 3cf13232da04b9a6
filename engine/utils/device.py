"""Host-to-device transfers that do not stall the stream, and the host values of what was transferred.

A training step copies its batch to the device and then needs some of its values on the host: the pass schedule
reads the token ids and the mask, the loss the positions that carry a label. Reading them back from the device
(`.tolist()`, `.cpu()`, a boolean mask's index) waits for every kernel queued before it, and the device then idles
while the host builds what comes next. `to_device_keeping_host` remembers the host tensor a device tensor was copied
from; `host_values` answers from it while the device tensor is unchanged since the copy (its version counter), and
reads the device otherwise. Views, slices and tensors made on the device have no host copy: they are read back as
before, with the same result. So are tensors that DeepSpeed's ZeRO-3 hooks replace: they detach a module's
positional inputs, so the trainer passes the batch by keyword.
"""

from __future__ import annotations

import torch

_HOST_COPY = "_host_copy_and_version"  # (host tensor, the device tensor's version when it was copied)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the stream: pinned staging (the caching host allocator keeps the buffer
    alive until the copy has run), so the host can keep queueing work ahead of the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device_keeping_host(t: torch.Tensor, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
    """``t.to(device)`` (``t`` a host tensor) with ``t`` remembered on the result for `host_values`. The host tensor
    must not be written afterwards (a batch from the data loader is not)."""
    moved = t.to(device, non_blocking=non_blocking)
    if moved is not t and t.device.type == "cpu" and moved.device.type != "cpu":
        remember_host_copy(moved, t)
    return moved


def remember_host_copy(t: torch.Tensor, host: torch.Tensor) -> None:
    """Remember ``host`` (a CPU tensor with ``t``'s values, never written afterwards) as ``t``'s host copy."""
    if host.device.type != "cpu" or host.shape != t.shape or host.dtype != t.dtype:
        raise ValueError(f"a host copy must be a CPU tensor of the same shape and dtype: got {host.dtype} "
                         f"{tuple(host.shape)} on {host.device} for {t.dtype} {tuple(t.shape)}")
    setattr(t, _HOST_COPY, (host, t._version))


def host_copy(t: torch.Tensor) -> torch.Tensor | None:
    """The host tensor ``t`` was copied from by `to_device_keeping_host`, if ``t`` has not been written since; else
    None."""
    kept = getattr(t, _HOST_COPY, None)
    if kept is None:
        return None
    host, version = kept
    if t._version != version or host.shape != t.shape or host.dtype != t.dtype:
        return None
    return host


def host_values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a CPU tensor: its `host_copy` when it has one (no wait for the device), else copied back."""
    host = host_copy(t)
    return host if host is not None else t.detach().to("cpu")
