"""CUDA graphs of the paged runner's one-position step, one per batch bucket.

A small model's one-position step (a latent step or a decode step) is a few hundred kernel launches of a few
microseconds each: eager launch overhead (~30 us each) dominates. The step is captured per batch bucket (the batch
padded to a power of two; padding rows have context 0 and write nothing) with static input buffers (token ids or
input embeddings, positions, an active mask, block tables of the maximum width) and replayed.
"""

from __future__ import annotations

from typing import Callable

import torch


class StepBuffers:
    """Static inputs of the one-position step for a batch bucket (the CUDA graphs read and write these)."""

    def __init__(self, size: int, hidden: int, table_width: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.embeds = torch.zeros(size, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.active = torch.zeros(size, dtype=torch.bool, device=device)
        self.block_tables = torch.zeros(size, table_width, dtype=torch.int32, device=device)
        # with_logits (decode step from token ids) or not (latent step from embeddings) -> (graph, output)
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def reset(self) -> None:
        self.block_tables.zero_()
        self.active.zero_()
        self.positions.zero_()


class StepGraphs:
    """The buckets of static buffers and their captured graphs; `drop` forgets them (and their memory pool)."""

    def __init__(self, hidden: int, table_width: int):
        self.hidden, self.table_width = hidden, table_width
        self.buckets: dict[int, StepBuffers] = {}
        self.pool = None
        self.captures = 0

    def bucket(self, batch: int, dtype: torch.dtype, device: torch.device) -> StepBuffers:
        size = 1 << max(0, (batch - 1).bit_length())
        buf = self.buckets.get(size)
        if buf is None:
            with torch.inference_mode(False):  # reused by later calls, in or out of inference mode
                buf = StepBuffers(size, self.hidden, self.table_width, dtype, device)
            self.buckets[size] = buf
        return buf

    def drop(self) -> None:
        self.buckets.clear()
        self.pool = None

    def drop_graphs(self) -> None:
        """Forget the captured graphs and their memory pool, keep the buckets' static buffers: the next step of each
        bucket captures anew at the same addresses. A new pool as `drop` takes one: a capture into the pool of
        graphs already destroyed failed PyTorch's allocator check (`use_count > 0`) on an H200."""
        for buf in self.buckets.values():
            buf.graphs.clear()
        self.pool = None

    def capture(self, buf: StepBuffers, with_logits: bool, step: Callable[[StepBuffers, bool], torch.Tensor]) -> None:
        """Capture ``step(buf, with_logits)`` (once per bucket and kind); nothing is written into the KV pool."""
        if with_logits in buf.graphs:
            return
        device = buf.tokens.device
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        saved_active = buf.active.clone()
        buf.active.zero_()  # warm-up and capture write nothing into the pool
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and picks cuBLAS algorithms outside the capture
                step(buf, with_logits)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a DataLoader's pinning thread) do not break the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = step(buf, with_logits)
        buf.graphs[with_logits] = (graph, output)
        buf.active.copy_(saved_active)
        self.captures += 1
