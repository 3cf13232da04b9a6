"""Triton kernels of the engine. Each op lives in `kernels/<op>.py` with its PyTorch reference.

- `latent_inject`: builds a pass's input embeddings (token rows, image features, thoughts) in one kernel.
- `paged_kv`: the paged KV cache's write kernel and one-query (decode) attention over block tables.
- `paged_chunk_attention`: packed query chunks over the same paged cache (prefill continuing from cached blocks).
- `decode_fusions`: RMSNorm with its residual add, rotary embedding of q and k, the SwiGLU product: the small
  elementwise work of a one-position step, one kernel each (the paged runner's decode and latent steps).
- `decode_linear`: a one-position step's narrow matrix products split over the reduction too, about one program
  per SM, their fp32 partial sums left for the next RMSNorm (`decode_fusions.rms_norm`) to add.
- `layer_grads`: those three with their backward, for training (the latent block and the language model's
  passes), and the vision tower's LayerNorm with its layer-scaled residual add, forward and backward.
- `one_query_attention`: the training latent passes' attention (one query per row over a cached prefix and the
  passes' own keys, GQA groups together), forward and backward; its reference imports without Triton.

Kernels, their custom ops and their references only: the host-side policy (block pool, prefix hashes, the
runner) lives in `engine/model/paged/`, and nothing here imports `engine`.

This package imports nothing heavy at import time: transformers probes for a package named `kernels`
(the Hugging Face kernel hub) and must not pay for, or be confused by, ours.
"""
