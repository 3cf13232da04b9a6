"""DeepSpeed's CUDA stream calls without torch's device look-up per call.

DeepSpeed reaches streams through its accelerator: `current_stream()` is `torch.cuda.current_stream(None)` and
`stream(s)` is `torch.cuda.stream(s)`. Both resolve "the current device" through torch's generic
`_get_device_index(None)`, which asks `torch.cuda.is_available()` (an environment read and a device count) every
time; `torch.cuda.StreamContext` does it twice per `with`. ZeRO-3 makes these calls per parameter and per gradient:
~4,600 in one backward at the InternVL3-1B geometry on two H200s (cProfile of rank 0), ~1,250 in the optimizer step,
so the look-ups cost more host time than the kernels they order.

`use_fast_streams()` gives the CUDA accelerator two equivalents: `current_stream()` asks the current device directly
(`torch.cuda.current_device()`, one C call) and `stream(s)` is `CurrentDeviceStream`, which sets the stream and
restores the previous one as torch's context does, and hands a stream of another device to torch's own context
(which also switches that device's current stream). `restore_deepspeed_streams()` undoes it. Both are process-wide,
as the accelerator is; tests/test_accelerator_streams.py checks the equivalence on a GPU and the install rules.
"""

from __future__ import annotations

import torch

_INSTALLED = ("current_stream", "stream")  # instance attributes over the accelerator class's methods


class CurrentDeviceStream:
    """`torch.cuda.stream(s)` for a stream of the current device without torch's device look-ups; a stream of
    another device (or not a `torch.cuda.Stream`) goes to torch's `StreamContext`, and None is a no-op, as there.
    What each entry replaced is kept on a stack, so one object entered inside itself restores each level in turn."""

    __slots__ = ("stream", "saved")

    def __init__(self, stream):
        self.stream = stream
        self.saved = []  # per entry: the previous stream, or torch's context that was entered

    def __enter__(self):
        stream = self.stream
        if stream is None:
            return None
        device = torch.cuda.current_device()
        if not isinstance(stream, torch.cuda.Stream) or stream.device_index != device:
            context = torch.cuda.StreamContext(stream)
            self.saved.append(context)
            return context.__enter__()
        self.saved.append(torch.cuda.current_stream(device))
        torch.cuda.set_stream(stream)
        return None

    def __exit__(self, exc_type, exc, traceback):
        if self.stream is None or not self.saved:
            return None
        saved = self.saved.pop()
        if isinstance(saved, torch.cuda.StreamContext):
            return saved.__exit__(exc_type, exc, traceback)
        torch.cuda.set_stream(saved)
        return None


def _current_stream(device_index=None):
    """`torch.cuda.current_stream(device_index)`, the current device asked for directly when none is given."""
    return torch.cuda.current_stream(torch.cuda.current_device() if device_index is None else device_index)


def fast_streams_unsupported(accelerator=None) -> str | None:
    """Why DeepSpeed's accelerator keeps its own stream calls, or None when the equivalents can stand in."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if accelerator.device_name() != "cuda":
        return f"the accelerator is {accelerator.device_name()}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is not None:
        return "ROCm (the equivalents were checked on CUDA only)"
    return None


def use_fast_streams() -> str | None:
    """Install the equivalents on DeepSpeed's accelerator; returns why not (and installs nothing), else None."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    why = fast_streams_unsupported(accelerator)
    if why is None:
        accelerator.current_stream = _current_stream
        accelerator.stream = CurrentDeviceStream
    return why


def fast_streams_active() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().__dict__.get("stream") is CurrentDeviceStream


def restore_deepspeed_streams() -> None:
    """DeepSpeed's accelerator methods again (the class's, which the instance attributes shadowed)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name in _INSTALLED:
        accelerator.__dict__.pop(name, None)
