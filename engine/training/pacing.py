"""How far the host may run ahead of the device in training.

The training step no longer reads the device on the host between its forward and its backward (the batch's host
copies serve the schedule, the loss and the image merge), so the host may queue the backward while the device still
runs the forward. Under ZeRO-3 that costs memory: the language model, gathered whole for the forward and released
after it, is gathered again for the backward, and the allocator does not hand the released buffer out again until the
device has finished the forward that reads it (its stream's recorded use). A host that runs ahead allocates the
second gather beside the first; at the 8B geometry on two H200s (116 GiB of 140) the caching allocator then ran
short, flushed its cache and retried with the device synchronised: 4-12 retries per 20 steps and 6-20% slower,
against none with the wait the loss used to make (benchmarks/RESULTS.md). `HostPacer` makes that one wait explicit
under ZeRO-3: the backward is queued once the device has finished the forward, so each gather reuses the memory of
the one before.
ZeRO-0/1/2 gather nothing and do not wait.
"""

from __future__ import annotations

import torch


class HostPacer:
    """`after_forward()` marks the end of a forward on the device; `before_backward()` waits on the host until the
    device has reached it. Enabled on CUDA under ZeRO-3 (`zero_stage`); a no-op otherwise."""

    def __init__(self, device: torch.device, zero_stage: int):
        self.enabled = device.type == "cuda" and zero_stage == 3
        self._forward_done: torch.cuda.Event | None = None

    def after_forward(self) -> None:
        if self.enabled:
            self._forward_done = torch.cuda.Event()
            self._forward_done.record()

    def before_backward(self) -> None:
        if self._forward_done is not None:
            self._forward_done.synchronize()
            self._forward_done = None
