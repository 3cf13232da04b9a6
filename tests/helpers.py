"""Builders for hand-made batches: image span, question, latents, tail, with any padding; a free port for the
tests' launchers."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.vocab import (
    END_LATENT_TOKEN,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    LATENT_TOKEN,
    START_LATENT_TOKEN,
)


def sample_ids(tok, model, *, tiles=1, question="What colour is the cell?", n_latents=2, tail="move right.\n### red", markers=True):
    """Token ids of `<img> ctx* </img> question \\n [<start> latent* <end>] tail eos`."""
    text = ""
    if tiles:
        text += IMAGE_START_TOKEN + IMAGE_CONTEXT_TOKEN * (model.tokens_per_tile * tiles) + IMAGE_END_TOKEN
    text += question + "\n"
    if markers:
        text += START_LATENT_TOKEN + LATENT_TOKEN * n_latents + END_LATENT_TOKEN
    text += tail
    return tok(text).input_ids + [tok.eos_token_id]


def pad_batch(rows, pad_id, *, left=None):
    """Pad rows to one length. `left[i]` True pads row i on the left, else on the right."""
    width = max(len(r) for r in rows)
    left = left or [False] * len(rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if left[i]:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    return ids, mask


def random_pixels(tiles, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 3, size, size, generator=g)


def align_batch(rows, pad_id, latent_id):
    """Left-pad each row so that its first latent lands in one column (as the collator does), then right-pad.

    Rows without a latent are aligned on their end."""
    firsts = [r.index(latent_id) if latent_id in r else None for r in rows]
    anchor = max(f for f in firsts if f is not None)
    shifts = [anchor - f if f is not None else None for f in firsts]
    width = max(len(r) + (s or 0) for r, s in zip(rows, shifts))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, shifts)):
        s = width - len(r) if s is None else s
        ids[i, s : s + len(r)] = torch.tensor(r)
        mask[i, s : s + len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------------- paged KV pools

PAGED_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: output rounding (8 bits) of O(1) values


def random_pool(num_blocks, block_size, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def random_tables(rows, blocks_per_row, num_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_blocks, generator=g)[:blocks_per_row] for _ in range(rows)]).int()


def assert_close(actual, expected, dtype, what):
    tol = PAGED_TOLERANCE[dtype]
    err = (actual.float() - expected.float()).abs()
    worst = err.argmax().item()
    assert err.max() <= tol, f"{what}: max error {err.max():.3g} > {tol} at flat index {worst} of {tuple(err.shape)}"


def latent_block_inputs(language_model, *, batch=3, columns=4, prefix=9, seed=0):
    """`latent_block`'s inputs for a language model: prev, column embeddings (one column not a latent), positions,
    a key mask with some prefix keys blocked, and a prefix cache; prev, the embeddings and the cache need grad."""
    config = language_model.config
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    inputs = (
        torch.randn(batch, hidden, generator=g, requires_grad=True),
        torch.randn(batch, columns, hidden, generator=g, requires_grad=True),
        torch.tensor([[True, False] + [True] * (columns - 2)] * batch),
        torch.arange(prefix, prefix + columns).repeat(batch, 1),
        torch.rand(batch, prefix + columns, generator=g) > 0.2,
        torch.randn(config.num_hidden_layers, 2, batch, config.num_key_value_heads, prefix, head_dim, generator=g,
                    requires_grad=True),
    )  # fmt: skip
    inputs[4][:, prefix:] = True
    return inputs


class CountProducts(TorchDispatchMode):
    """Matrix products (mm, addmm, addmm_) issued while active."""

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.products += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)
        return func(*args, **(kwargs or {}))


def free_port() -> str:
    """A port nothing listens on now, for a launcher's rendezvous: each launch gets its own, so one launch's store
    still closing cannot refuse the next (parametrized launches follow each other within a second)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
