"""Host-side bookkeeping of the paged multimodal KV cache: the block pool, block tables, prefix hashes.

The cache of every layer is a pool of fixed-size blocks, ``[num_blocks, block_size, kv_heads, head_dim]`` for K
and the same for V (all layers live in one tensor, ``[layers, num_blocks, ...]``, so that copying a block is one
op). A sequence owns a *block table*: the list of blocks that hold its positions ``0, 1, 2, ...`` in order. Slot
``block * block_size + offset`` is where one token's K/V lives; the kernels that read and write it are in
`kernels/paged_kv.py`.

Left padding never reaches the cache: a sequence stores only its real tokens, at their position ids (which start at
0 at the first real token), so a row's attention reads exactly ``context_len`` slots and needs no mask.

Visual-prefix sharing. Rows whose prompts start with the same image and the same tokens share the full blocks of
that prefix. Each full block is keyed by a chain hash: ``h_i = sha256(h_{i-1} || tokens of block i)`` with
``h_{-1}`` a digest of the row's pixel content, so a block is found only when the image and every token before it
match. Shared blocks are reference-counted and return to the free list when the count drops to 0. A sequence forked
from another (n samples of one prompt) shares all of its blocks, the partial last one included; the first write
into a shared partial block copies it first (copy-on-write). So n samples per question, or several questions about
one image, pay for the image's KV once.

Nothing here imports Triton.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Sequence

import torch


class PoolExhaustedError(RuntimeError):
    """The block pool has too few free blocks for a request; nothing was allocated."""

    def __init__(self, needed: int, free: int, block_size: int, num_blocks: int, enough: int | None = None):
        """``enough``: a pool size that serves the whole call that failed (the runner's worst case), where the
        default, this one request's shortfall, would only move the failure to the next request."""
        self.needed, self.free, self.block_size, self.num_blocks = needed, free, block_size, num_blocks
        self.enough = num_blocks + needed - free if enough is None else enough
        super().__init__(
            f"paged KV pool exhausted: {needed} block(s) of {block_size} tokens needed, {free} free of {num_blocks}. "
            f"Give the cache more blocks (num_blocks >= {self.enough}), lower the batch size or "
            "max_new_tokens, or free finished sequences first."
        )


def image_digest(pixel_values: torch.Tensor | None) -> bytes:
    """sha256 of the pixel content (shape, dtype and bytes); b'' when there is no image."""
    if pixel_values is None or pixel_values.numel() == 0:
        return b""
    t = pixel_values.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, seed: bytes = b"") -> list[bytes]:
    """Chain hashes of the full blocks of ``token_ids``: h_i = sha256(h_{i-1} || tokens of block i), h_{-1} = seed."""
    hashes, h = [], hashlib.sha256(b"paged-kv|" + seed).digest()
    for i in range(len(token_ids) // block_size):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        h = hashlib.sha256(h + b"|" + ",".join(str(int(t)) for t in chunk).encode()).digest()
        hashes.append(h)
    return hashes


class BlockAllocator:
    """Free list, reference counts and the hash -> block table of shareable full blocks (host-side)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise PoolExhaustedError(count, len(self._free), self.block_size, self.num_blocks)
        blocks = [self._free.popleft() for _ in range(count)]
        for blk in blocks:
            self.ref_counts[blk] = 1
        return blocks

    def share(self, block: int) -> int:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is free; only allocated blocks can be shared")
        self.ref_counts[block] += 1
        return block

    def release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is already free (double release)")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            h = self._hash_of.pop(block, None)
            if h is not None and self._by_hash.get(h) == block:
                del self._by_hash[h]
            self._free.append(block)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def register(self, block: int, block_hash: bytes) -> None:
        if block_hash not in self._by_hash:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash


class PagedKVCache:
    """K/V block pools of every layer plus the block tables of live sequences.

    Typical use for a batch: for each row in order, ``add_sequence`` (finds shared prefix blocks; returns how many
    leading positions are already provided) then ``reserve`` (allocates the rest of the prompt; blocks that carry a
    prefix hash are registered so later rows find them). The owner of a registered block writes it in the same
    layer pass in which the later rows first read it (every layer writes K/V before it attends), so rows of one
    batch share prefix blocks without any ordering between rows. ``fork`` shares a whole sequence (n samples);
    ``reserve`` copies a shared partial last block before it is written into (copy-on-write).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        enable_prefix_sharing: bool = True,
    ):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.num_layers = num_layers
        self.enable_prefix_sharing = enable_prefix_sharing
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # positions with a slot (reserved), per sequence
        self._pending_hashes: dict[int, list[bytes]] = {}  # prefix hashes of blocks not yet allocated

    # -- shapes and views
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def device(self) -> torch.device:
        return self.key.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.key[index], self.value[index]

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    # -- sequences
    def add_sequence(self, seq_id: int, shareable_tokens: Sequence[int] = (), *, seed: bytes = b"") -> int:
        """Start a sequence; return the number of leading positions served by shared blocks (a multiple of the
        block size). ``shareable_tokens`` are the prompt tokens whose K/V depend only on themselves and the image
        (``seed`` = its digest); only their full blocks are keyed."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already exists")
        hashes = prefix_block_hashes(shareable_tokens, self.block_size, seed) if self.enable_prefix_sharing else []
        table: list[int] = []
        for h in hashes:
            block = self.allocator.lookup(h)
            if block is None:
                break
            table.append(self.allocator.share(block))
        self.tables[seq_id] = table
        self.lengths[seq_id] = len(table) * self.block_size
        self._pending_hashes[seq_id] = hashes[len(table) :]
        return self.lengths[seq_id]

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares every block of ``parent`` (the partial last one too, copied on its first write)."""
        if child in self.tables:
            raise ValueError(f"sequence {child} already exists")
        self.tables[child] = [self.allocator.share(b) for b in self.tables[parent]]
        self.lengths[child] = self.lengths[parent]
        self._pending_hashes[child] = []

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks ``reserve(seq_id, num_tokens)`` would allocate (copy-on-write included)."""
        length, table = self.lengths[seq_id], self.tables[seq_id]
        if num_tokens <= length:
            return 0
        new = -(-num_tokens // self.block_size) - len(table)
        cow = length % self.block_size != 0 and self.allocator.ref_counts[table[length // self.block_size]] > 1
        return new + int(cow)

    def reserve(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Give positions ``< num_tokens`` slots. Returns the changed table entries as (index, block)."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.allocator.num_free:
            raise PoolExhaustedError(needed, self.allocator.num_free, self.block_size, self.num_blocks)
        length, table = self.lengths[seq_id], self.tables[seq_id]
        if num_tokens <= length:
            return []
        changed = []
        if length % self.block_size:
            index = length // self.block_size
            old = table[index]
            if self.allocator.ref_counts[old] > 1:  # copy-on-write of a shared partial block
                (new,) = self.allocator.allocate(1)
                self.key[:, new] = self.key[:, old]
                self.value[:, new] = self.value[:, old]
                self.allocator.release(old)
                table[index] = new
                changed.append((index, new))
        grow = -(-num_tokens // self.block_size) - len(table)
        pending = self._pending_hashes[seq_id]
        for blk in self.allocator.allocate(max(0, grow)):
            index = len(table)
            table.append(blk)
            changed.append((index, blk))
            if pending:
                self.allocator.register(blk, pending.pop(0))
        self.lengths[seq_id] = num_tokens
        return changed

    def free_sequence(self, seq_id: int) -> None:
        for block in self.tables.pop(seq_id):
            self.allocator.release(block)
        del self.lengths[seq_id]
        self._pending_hashes.pop(seq_id, None)

    def free_all(self) -> None:
        for seq_id in list(self.tables):
            self.free_sequence(seq_id)

    def slot(self, seq_id: int, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def block_table(self, seq_ids: Sequence[int], width: int | None = None, device=None) -> torch.Tensor:
        """(len(seq_ids), width) int32 block tables, unused entries 0 (never read: reads stop at the length)."""
        width = max((len(self.tables[s]) for s in seq_ids), default=0) if width is None else width
        out = torch.zeros(len(seq_ids), max(width, 1), dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            table = self.tables[s]
            if len(table) > width:
                raise ValueError(f"sequence {s} has {len(table)} blocks, more than the table width {width}")
            out[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return out.to(self.device if device is None else device)
