"""ZeRO-3's parameter gathers with fewer host operations, the same bytes.

At the InternVL3-1B geometry on two H200s the ZeRO-3 step is host-bound where DeepSpeed (0.19) handles parameters
one at a time (benchmarks/RESULTS.md, "ZeRO-3 on two GPUs: the gathers coalesced"):

- Persistent parameters (below `stage3_param_persistence_threshold` elements: biases, norms, small projections)
  stay whole on every rank, but the optimizer updates only this rank's partition of each; after the step DeepSpeed
  gathers them back with one collective per parameter (513 at the 1B geometry, ~70 ms per step).
  `use_coalesced_persistent_gather(optimizer)` gathers them first through DeepSpeed's own coalesced all-gather (one
  flat collective, the one that fetches a module's parameters), which leaves DeepSpeed's loop nothing to do.
- That coalesced all-gather lands every rank's partitions in one flat buffer, rank-major ([rank 0: p1, p2, ...]
  [rank 1: p1, p2, ...]); DeepSpeed then copies each parameter out with a `torch.cat` of its pieces, one kernel
  and its host work per parameter (~1,000 per gather of the language model and the vision tower, twice a step).
  `use_split_copy_out()` copies the whole bucket out with one `torch.split_with_sizes_copy` over the (ranks,
  elements) view, as PyTorch's FSDP2 does; each parameter still gets a buffer of its own (freed when DeepSpeed
  releases it), except the persistent parameters' gather after the step (released together: one buffer).
- DeepSpeed releases parameters (after each module's forward and backward, and all still whole before its step)
  through a general path that builds debug strings and looks up the rank several times per parameter whether or
  not it logs. `use_batched_release(optimizer)` does the same work without that (statuses, freed storage, the
  coordinator's count): the step's release in one pass, and each module's through a plain per-parameter release
  on its coordinator.
- DeepSpeed lists a module's parameters by walking its submodules at each hook, fetch and release: for a leaf module
  (the language model, the vision tower) a walk over a few hundred modules, several times per forward and backward.
  `use_listed_parameters()` walks each module once.

Each leaves to DeepSpeed's code what it was not written for: the persistent gather ZeRO++'s secondary or
quantized partitions, parameters gathered in an autocast dtype, and offloaded optimizers or parameters; the copy-out
quantized and secondary partitions (an offloaded partition is copied to the device before the collective, so the
flat buffer is the same); the releases a gather in flight, ZeRO++, NVMe and parameter offload. All apply to the
checked DeepSpeed releases only (`zero_step.CHECKED_DEEPSPEED`).
tests/test_distributed.py compares them with DeepSpeed's gathers and releases on two ranks, bit for bit (CPU, and
CUDA where two GPUs are); tests/test_zero3_gathers.py the copy-out on hand-built buckets (three ranks, odd sizes,
dtypes), the releases' hand-over on one rank, and the parameter lists with DeepSpeed's walks (every module, external
parameters, two steps of training bit for bit).
"""

from __future__ import annotations

import itertools

import torch

from engine.training.zero_step import not_the_checked_stage3, replace_method, unchecked_release


def persistent_gather_unsupported(optimizer) -> str | None:
    """Why the coalesced gather cannot stand in for the per-parameter gather of `optimizer`'s persistent parameters
    after its step (DeepSpeed's ZeRO-3 optimizer), or None when it can."""
    why = not_the_checked_stage3(optimizer, ("_post_step", "persistent_parameters"))
    if why is not None:
        return why
    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "offload_param", False):
        return "offloaded partitions are gathered by DeepSpeed's swap-aware loop"
    return None


def _plain(param) -> bool:
    """Whether `param`'s partition is a plain one, which DeepSpeed's post-step loop gathers as the coalesced gather
    does: not ZeRO++'s secondary (hpZ) or quantized partitions, and gathered in its own dtype (under torch autocast
    the coalesced gather would send some in the autocast dtype, where DeepSpeed's loop sends them whole)."""
    from deepspeed.runtime.zero.partition_parameters import get_allgather_dtype

    return (getattr(param, "ds_secondary_tensor", None) is None and not hasattr(param.ds_tensor, "ds_quant_scale")
            and get_allgather_dtype(param, param.ds_tensor) == param.ds_tensor.dtype)


def gather_persistent_parameters(params) -> int:
    """Gather every partitioned plain parameter of `params` whole with DeepSpeed's coalesced all-gather: one
    collective per dtype (DeepSpeed sorts each by id, so every rank sends the same layout). Returns how many."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    buckets: dict = {}
    for p in params:
        if p.ds_status == ZeroParamStatus.NOT_AVAILABLE and _plain(p):
            buckets.setdefault(p.ds_tensor.dtype, []).append(p)
    _ONE_BUFFER["persistent"] = True
    try:
        for bucket in buckets.values():
            bucket[0].all_gather_coalesced(bucket).wait()
    finally:
        _ONE_BUFFER["persistent"] = False
    return sum(len(bucket) for bucket in buckets.values())


def _post_step_coalesced(self, timer_names):
    """DeepSpeed's `_post_step` with its persistent parameters gathered in one collective first (its own loop then
    finds them available and gathers nothing)."""
    gather_persistent_parameters(self.persistent_parameters)
    return self._deepspeed_post_step(timer_names)


def use_coalesced_persistent_gather(optimizer) -> str | None:
    """Gather `optimizer`'s persistent parameters after its step in one coalesced collective (DeepSpeed's ZeRO-3
    optimizer). Returns None when done, else the reason it was left as it is."""
    why = persistent_gather_unsupported(optimizer)
    if why is not None:
        return why
    replace_method(optimizer, "_post_step", _post_step_coalesced)
    return None


_COORDINATOR_AVAILABLE = "_PartitionedParameterCoordinator__n_available_params"  # its count of gathered elements
_COORDINATOR_INFLIGHT = "_PartitionedParameterCoordinator__inflight_param_registry"  # gathers it has not waited on
_COORDINATOR_RELEASE = "_PartitionedParameterCoordinator__release_param"  # its release of one parameter

_DS = {}  # DeepSpeed's names the per-parameter release uses, imported once (it runs for every parameter)


def _ds() -> dict:
    if not _DS:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        _DS.update(accelerator=get_accelerator, nvme=OffloadDeviceEnum.nvme, available=ZeroParamStatus.AVAILABLE,
                   released=ZeroParamStatus.NOT_AVAILABLE)
    return _DS


def _plainly_releasable(p) -> bool:
    """Whether DeepSpeed's release of whole `p` is only `free_param` and the status: partitioned once already, no
    ZeRO++ secondary partition (nor a parameter group that would make one), not on NVMe."""
    return (p.ds_tensor is not None and getattr(p, "ds_secondary_tensor", None) is None
            and getattr(p, "ds_zero_param_process_group", None) is None
            and getattr(p.ds_tensor, "final_location", None) != _ds()["nvme"])


def _free_whole(coordinator, params, free_data: bool = True) -> None:
    """What DeepSpeed's release does to whole, plainly releasable `params` (`__release_param` -> `partition` ->
    `free_param`): the storage freed once the kernels queued on it have run, the status NOT_AVAILABLE, the
    coordinator's count of gathered elements lowered; without the debug strings and rank look-ups it makes per
    parameter whether or not it logs."""
    ds = _ds()
    accelerator, released_status = ds["accelerator"](), ds["released"]
    record = free_data and not accelerator.is_synchronized_device()
    stream = accelerator.current_stream() if record else None  # looked up once, not per parameter
    released = 0
    for p in params:
        if free_data:
            if record and accelerator.on_accelerator(p.data):
                p.data.record_stream(stream)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        p.ds_status = released_status
        released += p.ds_numel
    setattr(coordinator, _COORDINATOR_AVAILABLE, getattr(coordinator, _COORDINATOR_AVAILABLE) - released)


def _release_all_parameters(self) -> None:
    """DeepSpeed's `_partition_all_parameters` (the step's start: every parameter still whole is released, then all
    are checked released) in one pass: per parameter a status check, and `_free_whole` for the few still whole (the
    persistent ones), where DeepSpeed's release builds debug strings and looks up the rank several times per
    parameter (~60% of the step's host time on CPU ranks at 736 tensors). What it was not written for goes to
    DeepSpeed's: a gather in flight or one the coordinator still holds (a prefetch finished through another module's
    fetch), a parameter never partitioned, ZeRO++'s secondary partitions, NVMe."""
    ds = _ds()
    offload = self.parameter_offload
    coordinator = offload.get_param_coordinator()
    # DeepSpeed's list, the module walked once (a walk over the model's ~700 modules per step, where the release
    # itself touches ~500 parameters); an external parameter can also be a module parameter, hence the dedup
    params = list(dict.fromkeys(iter_params_listed(offload.module, recurse=True)))
    whole = [p for p in params if p.ds_status != ds["released"]]
    if (not hasattr(coordinator, _COORDINATOR_AVAILABLE) or getattr(coordinator, _COORDINATOR_INFLIGHT, None) is None
            or len(getattr(coordinator, _COORDINATOR_INFLIGHT)) > 0
            or any(p.ds_status != ds["available"] or not _plainly_releasable(p) for p in whole)):
        return self._deepspeed_partition_all_parameters()
    for p in params:  # DeepSpeed clears these for every parameter (a hook that never fired must not pin one)
        if p.ds_active_sub_modules:
            p.ds_active_sub_modules.clear()
    _free_whole(coordinator, whole)


def _release_param(coordinator, param, free_data: bool = True) -> None:
    """The coordinator's `__release_param` (called per parameter when a module's forward or backward is done):
    `_free_whole` for a plainly releasable parameter, DeepSpeed's own otherwise."""
    if param.ds_status != _ds()["available"] or param.ds_active_sub_modules:
        return None  # DeepSpeed releases nothing here either
    if not _plainly_releasable(param):
        return coordinator._deepspeed_release_param(param, free_data)
    _free_whole(coordinator, (param,), free_data)


def use_batched_release(optimizer) -> str | None:
    """Release `optimizer`'s parameters at the start of its step in one pass (`_release_all_parameters`), and each
    module's parameters after its forward and backward without DeepSpeed's per-parameter debug work
    (`_release_param` on its parameter coordinator; DeepSpeed's ZeRO-3 optimizer). Returns None when done, else the
    reason it was left as it is."""
    why = not_the_checked_stage3(optimizer, ("_partition_all_parameters", "parameter_offload"))
    if why is not None:
        return why
    if getattr(optimizer, "offload_param", False):
        return "offloaded parameters are released by DeepSpeed's swap-aware code"
    if getattr(optimizer, "zero_hpz_partition_size", 1) > 1:
        return "ZeRO++'s secondary partitions are kept by DeepSpeed's release"
    coordinator = optimizer.parameter_offload.get_param_coordinator()
    if not hasattr(coordinator, _COORDINATOR_AVAILABLE) or not hasattr(coordinator, _COORDINATOR_RELEASE):
        return "this deepspeed's parameter coordinator has no per-parameter release or count to keep"
    replace_method(optimizer, "_partition_all_parameters", _release_all_parameters)
    replace_method(coordinator, _COORDINATOR_RELEASE, _release_param, kept_as="_deepspeed_release_param")
    return None


_DEEPSPEED_WAIT = {}  # the replaced AllGatherCoalescedHandle.wait, kept to fall back on and to restore
# set while `gather_persistent_parameters` waits on its gathers: their persistent parameters, gathered together
# after the step and released together at the next, are copied out into one buffer
_ONE_BUFFER = {"persistent": False}
_ALIGN_BYTES = 16  # each parameter's piece of that buffer starts at a multiple (vectorised loads)


def _contiguous_ranks(handle) -> torch.Tensor | None:
    """The handle's flat buffer as a (ranks, elements per rank) view when its partitions lie back to back in one
    buffer (how DeepSpeed's coalesced gather lays them out), else None."""
    parts = handle.partitions
    first = parts[0]
    step = first.numel() * first.element_size()
    if any(p.numel() != first.numel() or p.dtype != first.dtype or not p.is_contiguous()
           or p.data_ptr() != first.data_ptr() + i * step for i, p in enumerate(parts)):
        return None
    return first.as_strided((len(parts), first.numel()), (first.numel(), 1))


def _split_copy_wait(self, handle_dependency=True) -> None:
    """`AllGatherCoalescedHandle.wait` with one copy-out kernel for the whole bucket; DeepSpeed's own wait for
    what it was not written for."""
    if self.complete:
        return None
    deepspeed_wait = _DEEPSPEED_WAIT["wait"]
    if self.quantization or self.use_secondary_tensor or self.world_size < 2:
        return deepspeed_wait(self, handle_dependency)
    ranks = _contiguous_ranks(self)
    sizes = [p.ds_tensor.ds_numel for p in self.params]
    if ranks is None or sum(sizes) != ranks.shape[1]:
        return deepspeed_wait(self, handle_dependency)
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    self.allgather_handle.wait()
    # each parameter's buffer holds its pieces from every rank in rank order: (ranks, partition) row-major is the
    # parameter's flattened values (and the padding of the last rank's piece, cut off below)
    if _ONE_BUFFER["persistent"] and all(getattr(p, "ds_persist", False) for p in self.params):
        # the persistent parameters' gather after the step: released together at the next step, so one buffer for
        # the bucket saves an allocation per parameter (~1,000 per step at the 1B geometry); a parameter released
        # alone (a module's release before the trace is complete, an export's gather) keeps it until the last goes
        lengths = [ranks.shape[0] * size for size in sizes]
        align = max(1, _ALIGN_BYTES // ranks.element_size())
        padded = [-(-n // align) * align for n in lengths]
        flat = torch.empty(sum(padded), dtype=ranks.dtype, device=ranks.device)
        whole = [piece.narrow(0, 0, n) for piece, n in zip(flat.split(padded), lengths)]
        del flat
    else:  # a buffer per parameter: DeepSpeed releases a module's parameters one at a time
        whole = [torch.empty(ranks.shape[0] * size, dtype=ranks.dtype, device=ranks.device) for size in sizes]
    torch.split_with_sizes_copy(ranks, sizes, dim=1, out=[w.view(ranks.shape[0], size) for w, size in zip(whole, sizes)])
    for i, param in enumerate(self.params):
        if param.ds_status != ZeroParamStatus.INFLIGHT:
            raise RuntimeError(f"expected param {param.ds_summary()} to be inflight")
        param.data = whole[i].narrow(0, 0, param.ds_numel).view(param.ds_shape).to(param.ds_tensor.dtype)
        whole[i] = None  # a buffer converted to the parameter's dtype is freed now, as DeepSpeed's cat output is
        param.ds_status = ZeroParamStatus.AVAILABLE
    accelerator = get_accelerator()
    if not accelerator.is_synchronized_device():
        if handle_dependency:
            ranks.record_stream(accelerator.current_stream())
        else:  # the caller orders the streams; DeepSpeed keeps the flat buffer alive until then
            type(self).data_buffer.append(self.partitions)
    self.complete = True
    return None


def split_copy_unsupported() -> str | None:
    """Why the one-kernel copy-out cannot stand in for DeepSpeed's, or None when it can."""
    unchecked = unchecked_release("the copy-out was")
    if unchecked is not None:
        return unchecked
    from deepspeed.runtime.zero import partition_parameters

    handle = getattr(partition_parameters, "AllGatherCoalescedHandle", None)
    if handle is None or not hasattr(handle, "wait") or not hasattr(handle, "data_buffer"):
        return "this deepspeed has no AllGatherCoalescedHandle.wait to replace"
    return None


def use_split_copy_out() -> str | None:
    """Copy every coalesced ZeRO-3 gather out in one kernel (process-wide: DeepSpeed's handle class). Returns None
    when done, else the reason it was left as it is."""
    why = split_copy_unsupported()
    if why is not None:
        return why
    from deepspeed.runtime.zero.partition_parameters import AllGatherCoalescedHandle
    from deepspeed.utils.nvtx import instrument_w_nvtx

    if "wait" not in _DEEPSPEED_WAIT:
        _DEEPSPEED_WAIT["wait"] = AllGatherCoalescedHandle.wait
        _DEEPSPEED_WAIT["ours"] = instrument_w_nvtx(_split_copy_wait)  # DeepSpeed's NVTX range, as its wait has
    AllGatherCoalescedHandle.wait = _DEEPSPEED_WAIT["ours"]
    return None


def split_copy_out_active() -> bool:
    """Whether `use_split_copy_out` is installed in this process now."""
    from deepspeed.runtime.zero.partition_parameters import AllGatherCoalescedHandle

    return "ours" in _DEEPSPEED_WAIT and AllGatherCoalescedHandle.wait is _DEEPSPEED_WAIT["ours"]


def restore_deepspeed_copy_out() -> None:
    """Undo `use_split_copy_out` (DeepSpeed's per-parameter copy-out again)."""
    if "wait" in _DEEPSPEED_WAIT:
        from deepspeed.runtime.zero.partition_parameters import AllGatherCoalescedHandle

        AllGatherCoalescedHandle.wait = _DEEPSPEED_WAIT["wait"]


# ---------------------------------------------------------------------- the leaves' parameter lists
# DeepSpeed lists a module's parameters with `iter_params(module, recurse)` at each of its hooks, fetches and
# releases; for a leaf module (the language model, the vision tower) that is a recursive walk over its few hundred
# submodules, several times per forward and per backward. `use_listed_parameters()` gives the two DeepSpeed modules
# that call it a version that walks each module once: the module's own parameters (recursively) are fixed once
# ZeRO-3 has partitioned them (a parameter added later would not be partitioned either), while its external
# parameters, which DeepSpeed registers during forwards, are read at every call as DeepSpeed reads them.

_ITER_PARAMS_USERS = ("deepspeed.runtime.zero.partitioned_param_coordinator", "deepspeed.runtime.zero.parameter_offload")
_DEEPSPEED_ITER_PARAMS = {}  # module name -> DeepSpeed's iter_params there, kept to restore
_LISTED = "_zero3_parameters_listed"  # the module attribute that holds the list (it goes with the module: a weak
# mapping would not let it go, as DeepSpeed's parameters refer back to their modules)


def listed_parameters(module) -> list:
    """`module`'s parameters, recursively, in `named_parameters` order: walked once per module."""
    listed = module.__dict__.get(_LISTED)
    if listed is None:
        listed = module.__dict__[_LISTED] = [p for _, p in module.named_parameters(recurse=True)]
    return listed


def iter_params_listed(module, recurse=False):
    """DeepSpeed's `iter_params(module, recurse)`: the module's parameters (recursively: `listed_parameters`), then
    its external ones."""
    own = listed_parameters(module) if recurse else (p for _, p in module.named_parameters(recurse=False))
    return itertools.chain(own, (p for _, p in module.ds_external_parameters()))


def listed_parameters_unsupported() -> str | None:
    """Why DeepSpeed's parameter walks stay, or None when the listed ones can stand in."""
    unchecked = unchecked_release("the parameter lists were")
    if unchecked is not None:
        return unchecked
    import importlib

    for name in _ITER_PARAMS_USERS:
        if not callable(getattr(importlib.import_module(name), "iter_params", None)):
            return f"{name} has no iter_params to replace"
    return None


def use_listed_parameters() -> str | None:
    """Walk each module's parameters once (process-wide: the two DeepSpeed modules' `iter_params`). Returns None
    when done, else the reason it was left as it is."""
    why = listed_parameters_unsupported()
    if why is not None:
        return why
    import importlib

    for name in _ITER_PARAMS_USERS:
        module = importlib.import_module(name)
        _DEEPSPEED_ITER_PARAMS.setdefault(name, module.iter_params)
        module.iter_params = iter_params_listed
    return None


def listed_parameters_active() -> bool:
    """Whether `use_listed_parameters` is installed in this process now (in both modules that walk)."""
    import importlib

    return all(importlib.import_module(name).iter_params is iter_params_listed for name in _ITER_PARAMS_USERS)


def restore_deepspeed_parameter_walks() -> None:
    """Undo `use_listed_parameters` (DeepSpeed's walk at every call again)."""
    import importlib

    for name, original in _DEEPSPEED_ITER_PARAMS.items():
        importlib.import_module(name).iter_params = original


# ---------------------------------------------------------------------- the leaves' gradient reduction
# DeepSpeed reduces a ZeRO-3 leaf module's gradients in the leaf's backward hook one parameter at a time: each is
# copied into a bucket, the bucket reduce-scattered when full, and each partition copied into its fp32 gradient
# buffer, with stream and event bookkeeping per parameter (55 ms of host time per step over the 1B geometry's 733
# leaf parameters on two H200s). `use_flat_leaf_reduction` collects a leaf's parameters as DeepSpeed hands them over
# and reduces them when the hook is done: the same pre-divided reduce-scatter, its input laid out by one
# `torch._chunk_cat` per bucket (DeepSpeed's interleaved, padded layout) and the partitions added to their buffers by
# multi-tensor kernels.

def flat_reduction_unsupported(optimizer) -> str | None:
    """Why the flat reduction cannot stand in for DeepSpeed's per-parameter reduction of `optimizer`'s leaf modules,
    or None when it can."""
    why = not_the_checked_stage3(
        optimizer,
        ("reduce_ready_partitions_and_remove_grads", "update_hook_state_and_maybe_run_epilogue",
         "independent_gradient_partition_epilogue", "reduce_and_partition_stream", "param_reduce_events",
         "max_param_reduce_events", "micro_step_id", "gradient_accumulation_dtype", "reduce_bucket_size",
         "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
         "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", "_offload_boundary_param_ids"),
    )
    if why is not None:
        return why
    if getattr(optimizer, "offload_optimizer", False):
        return "offloaded gradients are copied out per parameter"
    if getattr(optimizer, "zenflow", False):
        return "ZenFlow selects gradient channels per parameter"
    if getattr(optimizer, "all2all_process_group", None) is not None:
        return "ZeRO++'s quantized all-to-all reduction"
    if getattr(optimizer, "autoep_folding_tp_group", None) is not None:
        return "AutoEP folding corrects gradients per parameter"
    if getattr(optimizer, "postscale_gradients", True) and getattr(optimizer, "gradient_predivide_factor", 1.0) != 1.0:
        return "a gradient pre-divide factor"
    if not getattr(optimizer, "reduce_scatter", True):
        return "reduce_scatter=false reduces by all-reduce"
    if getattr(optimizer, "enable_sanity_checks", False):
        return "sanity checks compare each bucket's parameter ids across ranks"
    return None


def _collect_or_reduce(self, param):
    """DeepSpeed's `reduce_ready_partitions_and_remove_grads` for parameters outside leaf modules; a leaf's are
    collected, reduced together when its hook is done."""
    from deepspeed.utils import z3_leaf_parameter

    if self._coalesce_grad_reduction:
        return None
    if z3_leaf_parameter(param) and getattr(param, "ds_grad_is_ready", True):
        self._flat_leaf_pending.append(param)
        return None
    return self._deepspeed_reduce_ready_partitions_and_remove_grads(param)


def _reduce_pending(self) -> None:
    pending, self._flat_leaf_pending = self._flat_leaf_pending, []
    if not pending:
        return
    groups: dict = {}
    for p in pending:  # one flat reduction per (communication dtype, partition group), in DeepSpeed's id order
        groups.setdefault((self.get_param_comm_dtype(p), id(self._get_param_partition_group(p))), []).append(p)
    for (comm_dtype, _), params in groups.items():
        params.sort(key=lambda p: p.ds_id)
        # what DeepSpeed has bucketed so far goes first, as its own loop would have sent it
        self._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads(comm_dtype)
        bucket, size = [], 0
        for p in params:
            if bucket and size + p.ds_numel > self.reduce_bucket_size:
                _reduce_bucket(self, bucket, comm_dtype)
                bucket, size = [], 0
            bucket.append(p)
            size += p.ds_numel
        _reduce_bucket(self, bucket, comm_dtype)


@torch.no_grad()
def _reduce_bucket(self, params, comm_dtype) -> None:
    """DeepSpeed's `__reduce_and_partition_ipg_grads` + `__avg_scatter_grads` + `partition_grads` for `params` of
    one partition group, with one layout kernel, one collective and multi-tensor copies or adds."""
    import math

    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.comm.coalesced_collectives import _torch_reduce_scatter_fn

    accelerator = get_accelerator()
    group = self._get_param_partition_group(params[0])
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if self._gradient_averaging_world_size(params, world) != world:  # MoE experts: DeepSpeed's own scaling
        for p in params:
            self._deepspeed_reduce_ready_partitions_and_remove_grads(p)
        return
    while self.param_reduce_events and self.param_reduce_events[0].query():
        self.param_reduce_events.popleft()
    if len(self.param_reduce_events) > self.max_param_reduce_events:
        self.param_reduce_events.popleft().synchronize()
    if not accelerator.resolves_data_dependency():
        self.reduce_and_partition_stream.wait_stream(accelerator.current_stream())
    with accelerator.stream(self.reduce_and_partition_stream):
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if p.grad.numel() != p.ds_numel:
                raise RuntimeError(f"{p.grad.numel()} != {p.ds_numel} Cannot reduce scatter gradients whose size "
                                   "is not same as the params")
            g = p.grad.reshape(-1)
            grads.append(g if g.dtype == comm_dtype else g.to(comm_dtype))
        # rank-major: [rank 0: p1's chunk, p2's chunk, ...][rank 1: ...], each chunk ceil(numel / world), padded
        flat = torch._chunk_cat(grads, dim=0, num_chunks=world)
        flat.div_(world)  # pre-divide, as DeepSpeed's reduce_scatter_coalesced
        mine = flat[rank]
        _torch_reduce_scatter_fn(flat.view(-1), mine, group=group)
        if comm_dtype != self.gradient_accumulation_dtype:
            mine = mine.to(self.gradient_accumulation_dtype)
        buffers, parts, offset = [], [], 0
        grad_partition = self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        for p in params:
            chunk = math.ceil(p.ds_numel / world)
            real = min(chunk, p.ds_numel - rank * chunk)  # none on a rank past the parameter's end
            if real > 0:
                buffers.append(grad_partition[p.ds_id].narrow(0, 0, real))
                parts.append(mine.narrow(0, offset, real))
                self._offload_boundary_param_ids.add(p.ds_id)
            offset += chunk
        if buffers:
            if self.micro_step_id == 0:
                torch._foreach_copy_(buffers, parts)
            else:
                torch._foreach_add_(buffers, parts)
        synchronized = accelerator.is_synchronized_device()
        for p in params:
            if not synchronized:
                p.grad.record_stream(accelerator.current_stream())
            p.grad = None
        if not accelerator.handles_memory_backpressure():
            event = accelerator.Event()
            event.record()
            self.param_reduce_events.append(event)


def _reduce_then_update(self, current_expected_count):
    _reduce_pending(self)
    return self._deepspeed_update_hook_state_and_maybe_run_epilogue(current_expected_count)


def _reduce_then_epilogue(self):
    _reduce_pending(self)
    return self._epilogue_after_flat_reduction()


def use_flat_leaf_reduction(optimizer) -> str | None:
    """Reduce each ZeRO-3 leaf module's gradients together when its backward hook is done (DeepSpeed's ZeRO-3
    optimizer). Returns None when done, else the reason it was left as it is."""
    why = flat_reduction_unsupported(optimizer)
    if why is not None:
        return why
    optimizer._flat_leaf_pending = []  # a leaf's parameters as its hook hands them over
    replace_method(optimizer, "reduce_ready_partitions_and_remove_grads", _collect_or_reduce)
    replace_method(optimizer, "update_hook_state_and_maybe_run_epilogue", _reduce_then_update)
    # the epilogue installed before (DeepSpeed's, or the device step's without a host wait) runs after the reduction
    replace_method(optimizer, "independent_gradient_partition_epilogue", _reduce_then_epilogue,
                   kept_as="_epilogue_after_flat_reduction")
    return None
