"""Triton kernels of the engine. Each op lives in `kernels/<op>.py` with its PyTorch reference.

- `latent_inject`: builds a pass's input embeddings (token rows, image features, thoughts) in one kernel.
- `paged_kv`: a paged multimodal KV cache (block pool, write kernel, paged attention, prefix sharing).
- `decode_fusions`: RMSNorm with its residual add, rotary embedding of q and k, the SwiGLU product: the small
  elementwise work of a one-position step, one kernel each (the paged runner's decode and latent steps).

This package imports nothing heavy at import time: transformers probes for a package named `kernels`
(the Hugging Face kernel hub) and must not pay for, or be confused by, ours.
"""
