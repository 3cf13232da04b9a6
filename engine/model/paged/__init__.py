"""Generation over a paged KV cache (see `runner.py`); the host-side cache bookkeeping (`cache.py`) imports no
Triton. Modules: `cache` (block pool, block tables, prefix hashes), `plan` (prefix sharing and duplicate rows of a
call), `rotary` (the rotary table of the steps), `graphs` (CUDA graphs of the one-position steps), `attention` (the
paged attention functions of the layer stack), `runner` (`PagedRunner`, composing them)."""
