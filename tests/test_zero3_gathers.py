"""engine/training/zero3_gathers.py's one-kernel copy-out on hand-built coalesced buckets: the parameters equal those of
DeepSpeed's per-parameter copy-out for three ranks, odd sizes, a parameter smaller than the rank count and a
gather dtype other than the parameters'; what it was not written for goes to DeepSpeed's own. The step's release in
one pass on a one-rank engine; the parameter lists made once against DeepSpeed's walks. One process, CPU (the
two-rank comparison of real gathers and releases is in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from engine.training import zero3_gathers, zero_step
from engine.training.optim import destroy_engine
from engine.training.zero_step import deepspeed_release_checked

pytestmark = pytest.mark.skipif(not deepspeed_release_checked(),
                                reason="the copy-out applies to checked DeepSpeed releases only")

WORLD = 3
SHAPES = [(5,), (1,), (3, 3), (2, 2), (7,)]  # 1 element: two ranks hold only padding; 9 and 7: padded last pieces


class _Gather:  # the collective, already done: DeepSpeed's wait only waits on it
    def wait(self):
        pass


def bucket(gather_dtype: torch.dtype, param_dtype: torch.dtype, seed: int = 0):
    """A coalesced bucket after its all-gather: parameters INFLIGHT and the flat rank-major buffer filled with each
    rank's pieces (padding marked with a value no parameter holds), laid out as DeepSpeed's `_all_gather_dtype`."""
    from deepspeed.runtime.zero.partition_parameters import AllGatherCoalescedHandle, ZeroParamStatus

    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(shape, generator=gen).to(param_dtype) for shape in SHAPES]
    pieces = [-(-t.numel() // WORLD) for t in full]  # ceil: DeepSpeed's partition size
    per_rank = sum(pieces)
    flat = torch.full((WORLD * per_rank,), 1e4, dtype=gather_dtype)
    params = []
    offset = 0
    for t, piece in zip(full, pieces):
        values = t.reshape(-1).to(gather_dtype)
        for rank in range(WORLD):
            part = values[rank * piece:(rank + 1) * piece]
            flat[rank * per_rank + offset:rank * per_rank + offset + part.numel()] = part
        p = torch.nn.Parameter(torch.empty(0, dtype=param_dtype), requires_grad=False)
        p.ds_tensor = torch.empty(piece, dtype=param_dtype)
        p.ds_tensor.ds_numel = piece
        p.ds_numel, p.ds_shape, p.ds_status = t.numel(), t.shape, ZeroParamStatus.INFLIGHT
        p.ds_summary = lambda: "test parameter"
        params.append(p)
        offset += piece
    partitions = [flat.narrow(0, rank * per_rank, per_rank) for rank in range(WORLD)]
    handle = AllGatherCoalescedHandle(allgather_handle=_Gather(), params=params, partitions=partitions,
                                      world_size=WORLD)
    return handle, params, full


@pytest.fixture
def ours():
    assert zero3_gathers.use_split_copy_out() is None
    yield
    zero3_gathers.restore_deepspeed_copy_out()


@pytest.mark.parametrize("gather_dtype,param_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
])
def test_copy_out_equals_deepspeeds(ours, gather_dtype, param_dtype):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    handle, params, full = bucket(gather_dtype, param_dtype)
    theirs_handle, theirs, _ = bucket(gather_dtype, param_dtype)
    copies = []
    split_copy = torch.split_with_sizes_copy
    try:
        torch.split_with_sizes_copy = lambda *a, **k: copies.append(len(k["out"])) or split_copy(*a, **k)
        handle.wait()
    finally:
        torch.split_with_sizes_copy = split_copy
    zero3_gathers._DEEPSPEED_WAIT["wait"](theirs_handle)
    assert copies == [len(SHAPES)]  # one copy-out for the bucket
    for p, q, t in zip(params, theirs, full):
        assert p.ds_status == ZeroParamStatus.AVAILABLE
        assert p.dtype == q.dtype == param_dtype and p.shape == q.shape == t.shape
        assert p.is_contiguous()
        assert torch.equal(p.data, q.data)
        assert torch.equal(p.data, t.to(gather_dtype).to(param_dtype))  # the values, not the padding
    # each parameter its own storage: DeepSpeed frees them one at a time
    assert len({p.data.untyped_storage().data_ptr() for p in params}) == len(params)
    handle.wait()  # a second wait does nothing
    assert torch.equal(params[0].data, theirs[0].data)


@pytest.mark.parametrize("persistent,after_step", [("all", True), ("all but one", True), ("all", False)])
def test_persistent_gather_after_the_step_shares_one_buffer_and_equals_deepspeeds(ours, persistent, after_step,
                                                                                  monkeypatch):
    """The persistent parameters' gather after the step (released together at the next) is copied out into one
    buffer for the bucket, each parameter's piece 16-byte aligned; a bucket with a parameter that is not persistent,
    or persistent parameters gathered at any other time (a module's fetch, an export), keep a buffer per parameter.
    The values are DeepSpeed's."""
    monkeypatch.setitem(zero3_gathers._ONE_BUFFER, "persistent", after_step)
    handle, params, full = bucket(torch.bfloat16, torch.bfloat16)
    theirs_handle, theirs, _ = bucket(torch.bfloat16, torch.bfloat16)
    for i, p in enumerate(params):
        p.ds_persist = persistent == "all" or i != 2
    handle.wait()
    zero3_gathers._DEEPSPEED_WAIT["wait"](theirs_handle)
    for p, q, t in zip(params, theirs, full):
        assert p.shape == q.shape == t.shape and p.is_contiguous()
        assert torch.equal(p.data, q.data) and torch.equal(p.data, t)
    storages = {p.data.untyped_storage().data_ptr() for p in params}
    shared = persistent == "all" and after_step
    assert len(storages) == (1 if shared else len(params))
    if shared:  # each parameter's piece (its padding after it) aligned, none overlapping another's values
        assert all(p.data_ptr() % zero3_gathers._ALIGN_BYTES == 0 for p in params)
        ends = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params)
        assert all(end <= start for (_, end), (start, _) in zip(ends, ends[1:]))


@pytest.mark.parametrize("case", ["quantized", "secondary", "one rank", "scattered partitions", "sizes"])
def test_what_it_was_not_written_for_goes_to_deepspeeds_wait(ours, case, monkeypatch):
    handle, params, _ = bucket(torch.float32, torch.float32)
    if case == "quantized":
        handle.quantization = object()
    elif case == "secondary":
        handle.use_secondary_tensor = True
    elif case == "one rank":
        handle.world_size = 1
    elif case == "scattered partitions":  # not one buffer, back to back
        handle.partitions = [part.clone() for part in handle.partitions]
    else:
        params[0].ds_tensor.ds_numel += 1
    calls = []
    monkeypatch.setitem(zero3_gathers._DEEPSPEED_WAIT, "wait", lambda h, dep=True: calls.append((h, dep)))
    handle.wait(handle_dependency=False)
    assert calls == [(handle, False)]


def test_restore_gives_deepspeeds_wait_back():
    from deepspeed.runtime.zero.partition_parameters import AllGatherCoalescedHandle

    zero3_gathers.restore_deepspeed_copy_out()  # an earlier ZeRO-3 engine of this process may have installed it
    original = AllGatherCoalescedHandle.wait
    assert original.__module__.startswith("deepspeed")
    assert not zero3_gathers.split_copy_out_active()
    assert zero3_gathers.use_split_copy_out() is None
    assert AllGatherCoalescedHandle.wait is not original and zero3_gathers.split_copy_out_active()
    assert zero3_gathers.use_split_copy_out() is None  # twice: still one wrapper, DeepSpeed's kept
    zero3_gathers.restore_deepspeed_copy_out()
    assert AllGatherCoalescedHandle.wait is original and not zero3_gathers.split_copy_out_active()


def test_release_in_one_pass_equals_deepspeeds_and_hands_back_what_it_was_not_written_for(monkeypatch):
    """The step's release (`use_batched_release`) on a one-rank ZeRO-3 engine: the parameters still whole end
    released as DeepSpeed's release leaves them; a gather the coordinator still holds, or a parameter in flight,
    goes to DeepSpeed's release instead; installing it is refused where it does not apply."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from tests.test_zero_step import engine_after_backward

    engine = engine_after_backward(3, "auto")  # one rank: every parameter persistent-whole or released
    try:
        opt = engine.optimizer
        params = list(engine.module.parameters())
        assert zero3_gathers.use_batched_release(opt) is None
        handed_back = []
        monkeypatch.setattr(opt, "_deepspeed_partition_all_parameters", lambda: handed_back.append(1))
        whole = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        assert whole, "the persistent parameters are whole after the backward"
        opt._partition_all_parameters()
        assert not handed_back
        assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in params)
        coordinator = opt.parameter_offload.get_param_coordinator()
        registry = getattr(coordinator, zero3_gathers._COORDINATOR_INFLIGHT)
        registry.data[params[0]] = object()  # a finished prefetch the coordinator has not waited on
        opt._partition_all_parameters()
        assert handed_back == [1]
        del registry.data[params[0]]
        params[1].ds_status = ZeroParamStatus.INFLIGHT
        opt._partition_all_parameters()
        assert handed_back == [1, 1]
        params[1].ds_status = ZeroParamStatus.NOT_AVAILABLE
        # each module's release: a plain parameter freed here, any other handed to DeepSpeed's
        release = getattr(coordinator, zero3_gathers._COORDINATOR_RELEASE)
        assert release.__func__ is zero3_gathers._release_param
        to_deepspeed = []
        monkeypatch.setattr(coordinator, "_deepspeed_release_param", lambda p, free_data=True: to_deepspeed.append(p))
        whole = params[0]
        whole.data, whole.ds_status = torch.zeros(whole.ds_shape), ZeroParamStatus.AVAILABLE
        monkeypatch.setattr(zero3_gathers, "_plainly_releasable", lambda p: False)
        release(whole)
        assert to_deepspeed == [whole] and whole.ds_status == ZeroParamStatus.AVAILABLE
        monkeypatch.undo()
        release(whole)
        assert whole.ds_status == ZeroParamStatus.NOT_AVAILABLE and whole.numel() == 0
        opt.zero_hpz_partition_size = 2
        assert "ZeRO++" in zero3_gathers.use_batched_release(opt)
        opt.zero_hpz_partition_size = 1
        assert "not DeepSpeed's ZeRO-3" in zero3_gathers.use_batched_release(torch.optim.SGD([torch.zeros(1)], lr=1.0))
    finally:
        destroy_engine(engine)


def leaf_engine():
    """A one-rank ZeRO-3 engine built as the trainer builds it: the language model and the vision tower as leaves."""
    from engine.training.distributed import init_distributed
    from engine.training.optim import build_engine
    from tests.test_optim import fresh_model, train_config

    init_distributed("cpu")
    model, tok = fresh_model()
    return build_engine(model, train_config(zero_stage=3), 4, use_bf16=False), model, tok


def test_listed_parameters_equal_deepspeeds_walks():
    """Every module's listed parameters are DeepSpeed's `iter_params`, recursive or not, before and after external
    parameters are registered on the root and on a leaf (read anew at every call, as DeepSpeed reads them)."""
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    engine, model, _ = leaf_engine()
    try:
        assert partitioned_param_coordinator.iter_params is zero3_gathers.iter_params_listed
        assert parameter_offload.iter_params is zero3_gathers.iter_params_listed
        walk = zero3_gathers._DEEPSPEED_ITER_PARAMS["deepspeed.runtime.zero.partitioned_param_coordinator"]
        leaf = model.get_submodule("base.model.language_model")

        def check():
            for module in model.modules():
                for recurse in (False, True):
                    ours, theirs = list(zero3_gathers.iter_params_listed(module, recurse)), list(walk(module, recurse))
                    assert len(ours) == len(theirs) and all(a is b for a, b in zip(ours, theirs)), (module, recurse)

        check()
        assert len(zero3_gathers.listed_parameters(model)) == len(list(model.parameters()))
        # external parameters: one that is another module's (the tied case) and one of no module
        deepspeed.zero.register_external_parameter(leaf, next(model.get_submodule("base.model.vision_tower").parameters()))
        deepspeed.zero.register_external_parameter(model, next(leaf.parameters()))
        check()
        assert len(list(zero3_gathers.iter_params_listed(leaf, True))) == len(list(leaf.parameters())) + 1
    finally:
        destroy_engine(engine)


def test_listed_parameters_install_and_restore(monkeypatch):
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    zero3_gathers.restore_deepspeed_parameter_walks()
    original = partitioned_param_coordinator.iter_params
    assert zero3_gathers.use_listed_parameters() is None
    assert zero3_gathers.use_listed_parameters() is None  # twice: DeepSpeed's kept, not ours
    assert partitioned_param_coordinator.iter_params is parameter_offload.iter_params is zero3_gathers.iter_params_listed
    assert zero3_gathers.listed_parameters_active()
    parameter_offload.iter_params = original  # in one of the two modules only: not installed (restored just below)
    assert not zero3_gathers.listed_parameters_active()
    zero3_gathers.restore_deepspeed_parameter_walks()
    assert partitioned_param_coordinator.iter_params is parameter_offload.iter_params is original
    assert not zero3_gathers.listed_parameters_active()
    monkeypatch.setattr(zero_step, "deepspeed_release_checked", lambda: False)  # the release check zero3_gathers asks
    assert "checked against 0.19 only" in zero3_gathers.use_listed_parameters()
    assert partitioned_param_coordinator.iter_params is original


def test_training_with_listed_parameters_equals_deepspeeds_walks():
    """Two steps of a leaf engine with the listed parameters and two with DeepSpeed's walks: the same weights, bit
    for bit (the lists change which Python walks, not what is gathered, released or reduced)."""
    import deepspeed

    from tests.test_optim import batch_for

    weights = []
    for listed in (True, False):
        engine, model, tok = leaf_engine()
        try:
            if not listed:
                zero3_gathers.restore_deepspeed_parameter_walks()
            ids, mask, labels, pv = batch_for(model, tok)
            for _ in range(2):
                engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
                engine.step()
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                weights.append([p.detach().clone() for p in model.parameters()])
        finally:
            destroy_engine(engine)
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert zero3_gathers.use_listed_parameters() is None  # as the trainer leaves it
