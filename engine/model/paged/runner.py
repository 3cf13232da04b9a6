"""Generation over a paged KV cache: the prompt's latent passes, then decoding, with CUDA graphs on GPU.

`PagedRunner` runs the language model through the decoder-layer stack (`engine.model.layers.run_layers`) with the
model's own modules, or the Triton ops table on CUDA (`engine.model.fused_ops`), storing K/V in a
`PagedKVCache` (`engine.model.paged.cache`) and attending with the paged kernels (`engine.model.paged.attention`).
It follows the model's pass schedule (pass 0 over the prefix, one position per latent pass fed by the previous
pass's last hidden state, the final pass), then decodes with `engine.model.generation.decode_loop`.

Layout. Only real tokens are computed and stored: a pass gathers the positions it computes from every row into
one packed list (left padding never enters it), and each token's K/V goes to the slot of its position id in its
row's block table. Prefix sharing and duplicate rows are planned on the host (`engine.model.paged.plan`); the
one-position steps are CUDA-graphed per batch bucket (`engine.model.paged.graphs`).

A runner owns its pool, graphs and merged weights: use it as a context manager (or call `close`) to give them
back; `MultimodalCoconut.generate(kv_cache="paged")` builds one per call.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from engine.model import fast_paths
from engine.model.generation import GenerationOptions, decode_loop, generate
from engine.model.layers import ReferenceOps, decoder_layers, layer_geometry, layer_stack_unsupported, run_layers
from engine.model.paged.attention import PagedAttention
from engine.model.paged.cache import PagedKVCache, PoolExhaustedError
from engine.model.paged.graphs import StepBuffers, StepGraphs
from engine.model.paged.plan import PromptPlan, plan_prompt
from engine.model.paged.rotary import RotaryTable
from engine.model.schedule import feed_thoughts
from engine.utils.device import to_device
from engine.utils.logging import get_logger
from engine.utils.profiling import profile_range
from kernels.decode_fusions import rotary_paged_decode_attention
from kernels.paged_chunk_attention import paged_chunk_attention
from kernels.paged_kv import paged_decode_attention

log = get_logger("paged")
ATTENTION_OPTIONS = ("block_n", "num_warps", "num_stages", "dot_in_cache_dtype", "programmatic_launch",
                     "lengths_before_wait")
# what a one-position step passes to its attention unless `attention_options` says otherwise: the step computes its
# context lengths before its layers, so no attention kernel follows their writer
STEP_ATTENTION_DEFAULTS = {"lengths_before_wait": True}


class PagedRunner:
    """Paged-cache generation for one `MultimodalCoconut` (see the module docstring).

    block_size: tokens per block. num_blocks: pool size; None sizes the pool to each call's worst case (growing it
    when a call needs more; no call then runs out), an int fixes it (a call that needs more raises
    `PoolExhaustedError`). max_model_len: the longest sequence (prompt + new tokens); it sets the width of the
    static block tables. use_cuda_graphs: capture the one-position steps on CUDA (off: eager everywhere).
    fused_ops: the Triton ops table (RMSNorm with the residual add, rotary with the cache write, SwiGLU); None
    decides it (`fast_paths.decode_ops`: on CUDA after a self-check). merged_projections: with the fused ops, one
    matrix product for q/k/v and one for gate/up per layer (a copy of those weights, refreshed at every generate
    call; and the lm_head with its vocabulary padded to a multiple of 64, `fused_ops.PaddedVocabProjection`, when it
    is not one already). split_k_products: with the fused ops, each layer's o and down products of a step of at most
    64 rows as split-K partial sums, summed by the next RMSNorm (`fused_ops.SplitKProducts`). rotary_in_attention:
    with the fused ops, the one-position steps' rotary embedding and K/V cache write inside the attention kernel
    (`kernels.decode_fusions.rotary_paged_decode_attention`: one kernel per layer instead of two). split_k_qkv: with
    the split-K products, the merged projections and the rotary embedding inside the attention, the one-position
    steps' q/k/v product as split-K partial sums too, which the attention kernel sums as it reads q and the new K/V
    (nothing between the product and the attention, which launches while the product finishes).
    attention_options: launch settings of `paged_decode_attention` for the one-position steps (block_n,
    num_warps, num_stages, dot_in_cache_dtype, programmatic_launch; unset: the kernel's defaults;
    lengths_before_wait, unset: True, since a step computes its context lengths before its layers). max_graph_batch:
    the largest batch bucket that gets graphs.
    sync_interval: decode steps between host checks for "every row has ended" (the output is trimmed exactly);
    sampled decoding checks every step, so that it never draws past the end from the caller's generator.
    """

    def __init__(
        self,
        model,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_sharing: bool = True,
        use_cuda_graphs: bool = True,
        max_graph_batch: int = 256,
        num_splits: int | None = None,
        sync_interval: int = 4,
        fused_ops: bool | None = None,
        merged_projections: bool = True,
        split_k_products: bool = True,
        rotary_in_attention: bool = True,
        split_k_qkv: bool = True,
        attention_options: dict | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        unknown = set(attention_options or {}) - set(ATTENTION_OPTIONS)
        if unknown:
            raise ValueError(f"attention_options: unknown {sorted(unknown)}; valid: {sorted(ATTENTION_OPTIONS)}")
        if sync_interval < 1:
            raise ValueError(f"sync_interval must be >= 1, got {sync_interval}")
        for name, value in (("num_blocks", num_blocks), ("max_model_len", max_model_len), ("num_splits", num_splits),
                            ("max_graph_batch", max_graph_batch)):  # fmt: skip
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        lm = model.language_model
        reason = layer_stack_unsupported(lm)
        if reason is not None:
            raise NotImplementedError(f"the paged runner cannot run this language model: {reason}")
        self.model = model
        self.lm = lm
        self.layers = decoder_layers(lm)
        self.geometry = layer_geometry(lm)
        self.block_size = block_size
        self.fixed_num_blocks = num_blocks
        self.max_model_len = int(max_model_len or lm.config.max_position_embeddings)
        self.table_width = -(-self.max_model_len // block_size)
        self.enable_prefix_sharing = enable_prefix_sharing
        self.use_cuda_graphs = use_cuda_graphs
        self.max_graph_batch = max_graph_batch
        self.num_splits = num_splits
        self.sync_interval = sync_interval
        self.attention_options = dict(attention_options or {})
        self.fused_ops = fused_ops
        self.merged_projections = merged_projections
        self.split_k_products = split_k_products
        self.rotary_in_attention = rotary_in_attention
        self.split_k_qkv = split_k_qkv
        self._split_qkv = False  # the decision for the current ops table (`refresh_merged_projections`)
        self._rotary_inside = False  # the decision for the current ops table (`refresh_merged_projections`)
        if fused_ops:  # an explicit request that cannot run is an error now, not at the first call
            fast_paths.decode_ops(lm, True, self.device, self.dtype)
        self.cache: PagedKVCache | None = None
        self.graphs = StepGraphs(self.geometry.hidden_size, self.table_width)
        self.rotary = RotaryTable(lm, self.max_model_len, on_rebuild=self.graphs.drop)
        self.merged = None  # list of MergedProjections while the fused ops use them
        self.head = None  # PaddedVocabProjection while the fused ops use it
        self._head_module = None  # the lm_head module the head (or the graphs, without one) was set up for
        self._ops_key: tuple | None = None
        self._ops = None
        # Runs the bucketed static-buffer step (what the CUDA graphs replay) eagerly on any device: lets the CPU
        # tests cover the bucket padding, the static block tables and the active mask of the graph path.
        self.static_buffers_without_graphs = False
        # Counters of the last generate call: prompt_tokens, computed_prompt_tokens, blocks_after_prompt,
        # duplicate_rows, peak_blocks (blocks in use at the end of decoding, the most it held), decode_steps; with
        # time_decode also decode_ms (device time of the decoding steps, the prompt excluded; one sync at the end).
        self.stats: dict[str, float] = {}
        self.time_decode = False

    @property
    def rotary_in_attention_taken(self) -> bool:
        """Whether the one-position steps run the rotary embedding inside the attention now: the option
        ``rotary_in_attention``, decided at the last `refresh_merged_projections` (every generate call; the fused
        ops and, on CUDA, the kernel's self-check)."""
        return self._rotary_inside

    @property
    def split_k_qkv_taken(self) -> bool:
        """Whether the one-position steps of at most `kernels.decode_linear.MAX_BLOCK_M` rows now give their
        attention the q/k/v product as split-K partial sums, decided at the last `refresh_merged_projections`
        (`fast_paths.split_k_qkv`: the option with the split-K products, the merged projections and the rotary
        embedding inside the attention all taken; on CUDA the kernel's self-check)."""
        return self._split_qkv

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "PagedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give back the pool, the CUDA graphs and the merged weights (the runner rebuilds them if used again)."""
        self.graphs.drop()
        self.cache = None
        self.merged = None
        self.head = None
        self._ops = self._ops_key = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------ ops, weights, pool
    def ops(self):
        """The ops table of this device and dtype (decided once per device and dtype, `fast_paths.decode_ops`)."""
        key = (self.device, self.dtype)
        if self._ops is None or self._ops_key != key:
            fused = fast_paths.decode_ops(self.lm, self.fused_ops, self.device, self.dtype).choice == "fused"
            if fused:
                from engine.model.fused_ops import FusedOps

                self._ops = FusedOps(self.lm)  # its split products: `refresh_merged_projections`
            else:
                self._ops = ReferenceOps(self.lm)
            self._ops_key = key
            self.merged = self.head = None  # copies for the previous ops table, device or dtype
            self.refresh_merged_projections()
        return self._ops

    @torch.inference_mode(False)  # the merged weights and the padded head outlive the call, as the pool does
    def refresh_merged_projections(self) -> None:
        """Bring the merged q/k/v and gate/up weights and the padded lm_head up to date with the modules (in place:
        the CUDA graphs keep their addresses), building them on first use or when the modules changed device, dtype,
        shape or identity; decide the options of the fused layers again (dropping the graphs where a decision
        changes)."""
        self._refresh_products()
        ops = self._ops
        decision = fast_paths.split_k_qkv(
            self.split_k_qkv, self._rotary_inside, getattr(ops, "split_k", None) is not None, self.merged is not None,
            self.device, self.dtype,
        )
        if (decision.choice == "on") != self._split_qkv:
            self.graphs.drop()  # the captured steps hold the other q/k/v product
            self._split_qkv = decision.choice == "on"

    def _refresh_products(self) -> None:
        ops = self.ops()
        fused = ops.name == "fused"
        inside = fast_paths.rotary_in_attention(self.rotary_in_attention, fused, self.device, self.dtype).choice == "on"
        if inside != self._rotary_inside:
            self.graphs.drop()  # the captured steps hold the other kernels
            self._rotary_inside = inside
        if fused:
            self._refresh_split_k(ops)
        if not (fused and self.merged_projections):
            if self.merged is not None or self.head is not None:  # switched off since: the graphs read the copies
                self.graphs.drop()
                self.merged = self.head = ops.merged = None
            return
        self._refresh_head()
        from engine.model.fused_ops import MergedProjections

        if self.merged is not None and all(m.matches(layer) for m, layer in zip(self.merged, self.layers)):
            for merged in self.merged:
                merged.refresh()
            return
        if self.merged is not None:
            self.graphs.drop()  # the graphs read the old buffers
        decision = fast_paths.merged_projections(self.layers, True, fused)  # modules may have been replaced since
        self.merged = [MergedProjections(layer) for layer in self.layers] if decision.choice == "on" else None
        ops.merged = self.merged

    def _refresh_split_k(self, ops) -> None:
        """Decide the split products again (the option or the layers' modules may have changed since: an adapter,
        a hook), dropping the graphs when the decision changes."""
        from engine.model.fused_ops import SplitKProducts

        want = fast_paths.split_k_products(self.layers, self.split_k_products, True, self.device, self.dtype)
        if (want.choice == "on") != (ops.split_k is not None):
            self.graphs.drop()  # the graphs hold the other products
            ops.split_k = SplitKProducts(self.device) if want.choice == "on" else None

    def _refresh_head(self) -> None:
        lm_head = self.model.base.lm_head
        if self.head is not None and self.head.matches(lm_head):
            self.head.refresh()
            return
        from engine.model.fused_ops import PaddedVocabProjection

        on = fast_paths.padded_lm_head(lm_head).choice == "on"
        head = PaddedVocabProjection(lm_head) if on else None
        if head is not None or self.head is not None or lm_head is not self._head_module:
            self.graphs.drop()  # the graphs read the old head: its padded buffer, or a module's weight
        self.head, self._head_module = head, lm_head

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``hidden``: through the padded copy while the fused ops use it, else the module."""
        return self.head(hidden) if self.head is not None else self.model.base.lm_head(hidden)

    def ensure_cache(self, blocks_needed: int) -> None:
        """A pool of at least ``blocks_needed`` blocks (or the fixed size) on the model's device and dtype."""
        cache = self.cache
        if cache is not None and cache.device == self.device and cache.key.dtype == self.dtype:
            if self.fixed_num_blocks is not None or cache.num_blocks >= blocks_needed:
                return
        num_blocks = self.fixed_num_blocks or blocks_needed
        if self.cache is not None:
            log.info("growing the paged KV pool from %d to %d blocks", self.cache.num_blocks, num_blocks)
        self.cache = None
        self.graphs.drop()  # the graphs hold the old pool's addresses
        with torch.inference_mode(False):  # it outlives the call: an inference tensor could not be written outside
            self.cache = PagedKVCache(
                num_layers=self.geometry.num_layers,
                num_blocks=num_blocks,
                block_size=self.block_size,
                num_kv_heads=self.geometry.kv_heads,
                head_dim=self.geometry.head_dim,
                dtype=self.dtype,
                device=self.device,
                enable_prefix_sharing=self.enable_prefix_sharing,
            )

    # ------------------------------------------------------------------ the layers
    def forward_tokens(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend,
                       rotate_attend=None) -> torch.Tensor:  # fmt: skip
        """x (N, H) input embeddings at ``positions`` (N,) -> (N, H) last hidden states (post-norm); the tokens'
        K/V go to ``slots``; ``attend(q, key_cache, value_cache)`` is the paged attention kernel of the pass,
        ``rotate_attend`` the one-position steps' kernel with the rotary embedding and the cache write inside
        (which also sums the q/k/v product's partial sums where `split_k_qkv_taken`)."""
        ops = self.ops()
        cos, sin = self.rotary(x, positions)
        partial_qkv = rotate_attend is not None and self.split_k_qkv_taken and self.cache.key.dtype == x.dtype
        attention = PagedAttention(self.cache, slots, attend, ops, rotate_attend, sums_partial_qkv=partial_qkv)
        return run_layers(self.lm, x, cos, sin, attention, ops, self.geometry)

    def _step_forward(self, x, positions, active, block_tables) -> torch.Tensor:
        """One position per row: (R, H) inputs -> (R, H) hidden. Inactive rows write nothing, read nothing."""
        context_lens = torch.where(active, positions + 1, 0).to(torch.int32)
        blocks = block_tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        slots = torch.where(active, blocks * self.block_size + positions % self.block_size, -1)

        options = dict(scale=self.geometry.scale, num_splits=self.num_splits, **STEP_ATTENTION_DEFAULTS)
        options.update(self.attention_options)

        def attend(q, key_cache, value_cache):
            return paged_decode_attention(q, key_cache, value_cache, block_tables, context_lens, **options)

        def rotate_attend(q, k, v, cos, sin, key_cache, value_cache, slots):  # each row's new token: its last position
            return rotary_paged_decode_attention(q, k, v, cos, sin, key_cache, value_cache, slots, block_tables,
                                                 context_lens, **options)  # fmt: skip

        return self.forward_tokens(x, positions, slots, attend, rotate_attend if self._rotary_inside else None)

    # ------------------------------------------------------------------ one-position steps (eager or graph)
    def _graphs_enabled(self, batch: int) -> bool:
        on_device = self.device.type == "cuda" or self.static_buffers_without_graphs
        return (
            self.use_cuda_graphs
            and self.rotary.tabulated  # rotary embeddings that branch on the host cannot be captured
            and on_device
            and batch <= self.max_graph_batch
            and not torch.is_grad_enabled()
        )

    def _static_step(self, buf: StepBuffers, with_logits: bool) -> torch.Tensor:
        x = self.model.base.get_input_embeddings()(buf.tokens) if with_logits else buf.embeds
        hidden = self._step_forward(x, buf.positions, buf.active, buf.block_tables)
        return self.lm_head(hidden) if with_logits else hidden

    def one_position(self, buf: StepBuffers | None, block_tables, positions, active, *, embeds=None, tokens=None):
        """One position per row of the batch, eagerly (``buf`` None) or through the bucket's static buffers (and
        its CUDA graph on CUDA). With ``tokens``: returns logits (B, V); with ``embeds``: hidden (B, H)."""
        with_logits = tokens is not None
        batch = positions.shape[0]
        if buf is None:
            x = self.model.base.get_input_embeddings()(tokens) if with_logits else embeds
            hidden = self._step_forward(x, positions, active, block_tables)
            return self.lm_head(hidden) if with_logits else hidden
        graphed = buf.tokens.device.type == "cuda"
        if graphed:
            self.graphs.capture(buf, with_logits, self._static_step)
        if with_logits:
            buf.tokens[:batch].copy_(tokens)
        else:
            buf.embeds[:batch].copy_(embeds)
        buf.positions[:batch].copy_(positions)
        buf.active[:batch].copy_(active)
        if not graphed:
            return self._static_step(buf, with_logits)[:batch]
        graph, output = buf.graphs[with_logits]
        graph.replay()
        return output[:batch]

    # ------------------------------------------------------------------ the prompt's passes
    def _chunk_pass(self, start, end, plan: PromptPlan, embeds, latent_mask, prev_last, block_tables) -> torch.Tensor:
        """A multi-position pass over columns [start, end): packed tokens, chunk attention. Returns prev_last."""
        compute = plan.compute[:, start:end]
        counts = compute.sum(1)
        if int(counts.sum()) == 0:
            return prev_last
        rows, cols = compute.nonzero(as_tuple=True)  # row-major: each row's tokens contiguous and in order
        cols = cols + start
        query_start = torch.zeros(counts.shape[0] + 1, dtype=torch.int32)
        query_start[1:] = counts.cumsum(0)
        index = to_device(torch.stack([rows, cols, plan.positions[rows, cols]]), self.device)
        rows_d, cols_d, pos_d = index[0], index[1], index[2]
        query_start_d = to_device(query_start, self.device)
        # Only a pass's first column can hold a latent: it takes the previous pass's last hidden state.
        x = feed_thoughts(embeds[rows_d, cols_d], latent_mask[rows_d, cols_d], prev_last[rows_d])
        blocks = block_tables[rows_d, pos_d // self.block_size].long()
        slots = blocks * self.block_size + pos_d % self.block_size
        visible = (pos_d + 1).to(torch.int32)
        max_query_len = int(counts.max())

        def attend(q, key_cache, value_cache):
            return paged_chunk_attention(
                q, key_cache, value_cache, block_tables, query_start_d, visible,
                max_query_len=max_query_len, scale=self.geometry.scale,
            )

        hidden = self.forward_tokens(x, pos_d, slots, attend)
        has = counts > 0
        last = to_device((query_start[1:] - 1)[has].long(), self.device)
        updated = to_device(has.nonzero().flatten(), self.device)
        prev_last = prev_last.clone()
        prev_last[updated] = hidden[last]
        return prev_last

    def _prompt_passes(self, batch, plan: PromptPlan, block_tables, buf: StepBuffers | None) -> torch.Tensor:
        """Run the schedule over the cache; returns (B, H): every row's last hidden state."""
        embeds = self.model.base_embeddings(batch)
        latent_mask = batch.latent_mask
        schedule = batch.schedule
        prev_last = embeds.new_zeros(embeds.shape[0], embeds.shape[-1])
        positions_d = batch.position_ids.to(self.device)
        for index, (start, end) in enumerate(schedule.chunks):
            with profile_range(schedule.pass_name(index)):
                if end - start == 1:
                    active_host = plan.compute[:, start]
                    if bool(active_host.any()):
                        active = to_device(active_host, self.device)
                        x = feed_thoughts(embeds[:, start], latent_mask[:, start], prev_last)
                        hidden = self.one_position(buf, block_tables, positions_d[:, start], active, embeds=x)
                        prev_last = torch.where(active[:, None], hidden, prev_last)
                else:
                    prev_last = self._chunk_pass(start, end, plan, embeds, latent_mask, prev_last, block_tables)
                if plan.has_duplicates:
                    prev_last = prev_last[plan.source]
        return prev_last

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, options: GenerationOptions | None = None,
                 **option_overrides) -> torch.Tensor:
        """`engine.model.generation.generate` on this runner's pool and graphs: (B, n) new tokens, ended rows padded
        with the pad id. Options as a `GenerationOptions` and/or its fields by keyword."""
        options = dataclasses.replace(options or GenerationOptions(), kv_cache="paged", **option_overrides)
        return generate(self.model, input_ids, attention_mask, pixel_values, options, runner=self)

    @torch.no_grad()
    def generate_prepared(self, batch, pixel_values, out: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
        """Generate for a batch that `MultimodalCoconut.prepare` validated and scheduled, into ``out`` (B, n)."""
        rows, max_new_tokens = out.shape
        lengths = batch.attention_mask.sum(1).tolist()
        # worst case: no sharing, every row to its last token, plus one copy-on-write block per row
        worst_case = sum(-(-(n + max_new_tokens) // self.block_size) for n in lengths) + rows
        self.ensure_cache(worst_case)
        self.refresh_merged_projections()
        buf = self.graphs.bucket(rows, self.dtype, self.device) if self._graphs_enabled(rows) else None
        if buf is not None:
            buf.reset()
            block_tables = buf.block_tables[:rows]
        else:
            width = -(-(max(lengths) + max_new_tokens) // self.block_size)
            block_tables = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
        try:
            plan = plan_prompt(
                self.cache, batch, pixel_values, max_new_tokens=max_new_tokens, max_model_len=self.max_model_len,
                enable_prefix_sharing=self.enable_prefix_sharing, block_tables_out=block_tables,
            )
            self.stats = dict(plan.stats)
            prev_last = self._prompt_passes(batch, plan, block_tables, buf)
            self.model.padding_passes(prev_last, options.min_passes - batch.schedule.num_passes)
            return self._decode(self.lm_head(prev_last), plan, block_tables, buf, out, options)
        except PoolExhaustedError as e:  # only a fixed pool runs out: name the size that serves this whole call
            raise PoolExhaustedError(e.needed, e.free, e.block_size, e.num_blocks, enough=worst_case) from None
        finally:
            self.cache.free_all()

    def _decode(self, logits, plan: PromptPlan, block_tables, buf, out, options: GenerationOptions) -> torch.Tensor:
        rows = out.shape[0]
        cache = self.cache
        positions = to_device(torch.tensor(plan.lengths, dtype=torch.long), self.device)  # next position per row
        next_pos = list(plan.lengths)

        steps = 0

        def advance(token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
            nonlocal positions, steps
            steps += 1
            updates = []
            for b in range(rows):
                for index, block in cache.reserve(b, next_pos[b] + 1):
                    updates.append((b, index, block))
                next_pos[b] += 1
            if updates:
                u = to_device(torch.tensor(updates, dtype=torch.long).T.contiguous(), self.device)
                block_tables[u[0], u[1]] = u[2].to(torch.int32)
            logits = self.one_position(buf, block_tables, positions, ~finished, tokens=token)
            positions = positions + 1
            return logits

        timer = _Timer(self.device) if self.time_decode else None
        # checking every step for "all rows ended" would stall the host on the GPU each step
        out = decode_loop(logits, out, advance, options, sync_interval=self.sync_interval)
        self.stats["peak_blocks"] = cache.num_used_blocks
        self.stats["decode_steps"] = steps
        if timer is not None:
            self.stats["decode_ms"] = timer.stop()
        return out


class _Timer:
    """Elapsed device milliseconds from construction to `stop` (CUDA events; a host clock elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return (time.perf_counter() - self.start) * 1e3
