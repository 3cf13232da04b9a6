"""Named profiling ranges: NVTX (for Nsight Systems) and torch.profiler labels.

`profile_range("coconut/latent_pass_3")` shows up as an NVTX range on the GPU timeline when CUDA and
the `nvtx` package are present, and as a labelled block in torch.profiler traces. Elsewhere it costs
one branch.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch


@functools.lru_cache(maxsize=1)
def _nvtx_module():
    if not torch.cuda.is_available():
        return None
    try:
        import nvtx  # type: ignore

        return nvtx
    except ImportError:
        return None


@contextlib.contextmanager
def profile_range(name: str) -> Iterator[None]:
    nvtx = _nvtx_module()
    with contextlib.ExitStack() as stack:
        if nvtx is not None:
            stack.enter_context(nvtx.annotate(name))
        if torch.autograd.profiler._is_profiler_enabled:
            stack.enter_context(torch.profiler.record_function(name))
        yield
