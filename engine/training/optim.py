"""The trainer's optimizer, learning-rate schedule and DeepSpeed configuration.

`build_optimizer(model, config)` makes the AdamW of `config.optimizer` over two parameter groups (weight decay on
matrices, none on biases and norms), handed to `deepspeed.initialize` as a client optimizer. Under ZeRO 1-3
DeepSpeed steps it on its flat fp32 partitions (one tensor per group and rank), so a fused AdamW is one kernel per
group where the unfused update makes about ten elementwise passes over the fp32 master weights and both moments.

`deepspeed_config(config, use_bf16)` holds the per-stage ZeRO settings (`ZERO_DEFAULTS`, with the reason for each),
which the config's `deepspeed` dict overrides key by key. `build_engine` puts them together with the schedule and,
under ZeRO-1/2, gives DeepSpeed's optimizer multi-tensor gradient checks and, with torch's fused AdamW, a step
without host waits (`grad_checks`).
"""

from __future__ import annotations

import copy
import os

import torch

from engine.training.config import OPTIMIZERS, ConfigError, TrainConfig
from engine.training.errors import TrainingError
from engine.training.lr_schedule import LRFactor
from engine.utils.logging import get_logger

log = get_logger("optim")

# DeepSpeed's ZeRO settings per stage, before the user's `deepspeed` overrides. The GPU sweep that chooses between
# them: benchmarks/gpu/train_scale.sh (bench_train_step --zero-settings), results in benchmarks/RESULTS.md.
ZERO_DEFAULTS: dict[int, dict] = {
    0: {},
    # Stage 1 partitions the optimizer state only; gradients stay whole until the step. Without contiguous_gradients
    # and overlap_comm DeepSpeed registers no per-parameter gradient hook at all (under ZeRO-2 those hooks cost 45-83
    # ms of host time per step at the 1B geometry); the reduction is one bucketed pass after backward: nothing to
    # hide on one GPU, not overlapped with backward on several.
    1: dict(contiguous_gradients=False, overlap_comm=False, reduce_bucket_size=500_000_000,
            allgather_bucket_size=500_000_000),
    # Stage 2 partitions gradients as backward produces them, so one hook per parameter is inherent. Copying each
    # gradient into a contiguous bucket keeps memory unfragmented and the step's reads contiguous; overlap_comm
    # reduces a full bucket on a side stream while backward goes on (on several ranks: `deepspeed_config` turns it
    # off on one). 2e8-element buckets (DeepSpeed's recommended ZeRO-2 value, 5e8 by default) bound the
    # double-buffered bucket memory to about 4.5 x 2e8 x 2 bytes = 1.8 GB in bf16.
    2: dict(contiguous_gradients=True, overlap_comm=True, reduce_scatter=True, reduce_bucket_size=200_000_000,
            allgather_bucket_size=200_000_000),
    # Stage 3 gathers a module's parameters around each call, and the latent passes call every layer once per
    # pass. Parameters under 1e6 elements (norms, biases, the K/V projections; at the 1B geometry q and o too)
    # stay gathered instead of being fetched again in every pass, for at most 2 bytes per such element replicated
    # on each GPU (about 50 MB at the 1B geometry). Prefetch and reuse distances keep DeepSpeed's defaults;
    # overlap_comm is DeepSpeed's stage-3 default.
    3: dict(contiguous_gradients=True, overlap_comm=True, reduce_bucket_size=200_000_000,
            stage3_prefetch_bucket_size=50_000_000, stage3_param_persistence_threshold=1_000_000,
            stage3_max_live_parameters=1_000_000_000, stage3_max_reuse_distance=1_000_000_000,
            stage3_gather_16bit_weights_on_model_save=False),
}


def offloads_optimizer(config: TrainConfig) -> bool:
    """Whether the run's `deepspeed` overrides put the optimizer states on the host (or NVMe): ZeRO 1-3 only."""
    zero = config.deepspeed.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return (config.zero_stage > 0 and isinstance(offload, dict)
            and str(offload.get("device", "none")).lower() in ("cpu", "nvme"))


def resolve_optimizer(name: str, device: torch.device | str, offload: bool = False) -> str:
    """The optimizer `name` stands for on `device` ("auto": DeepSpeed's CPU Adam when the optimizer states are
    offloaded (`offload`), which DeepSpeed requires there; else fused AdamW on CUDA, the multi-tensor one
    elsewhere)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "auto":
        if offload:
            return "deepspeed_cpu_adam"
        return "adamw_fused" if torch.device(device).type == "cuda" else "adamw_foreach"
    return name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on biases, norms and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of `config.optimizer` over `model`'s trainable parameters, on the device they are on."""
    device = next(model.parameters()).device
    name = resolve_optimizer(config.optimizer, device, offloads_optimizer(config))
    groups = param_groups(model, config.weight_decay)
    hyper = dict(lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    if name == "deepspeed_cpu_adam":  # the host's Adam for offloaded states (a C++ extension, built on first use)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        try:
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
        except Exception as e:  # noqa: BLE001 - the extension's build raises compiler and loader errors
            raise ConfigError(f"optimizer=deepspeed_cpu_adam: DeepSpeed's CPU Adam extension does not build here "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e})") from e
    if name == "deepspeed_fused_adam":
        if device.type != "cuda":
            raise ConfigError(f"optimizer=deepspeed_fused_adam needs CUDA (a CUDA extension), the model is on {device}; "
                              "use adamw_fused or auto")
        from deepspeed.ops.adam import FusedAdam  # builds the extension with nvcc on first use

        return FusedAdam(groups, adam_w_mode=True, **hyper)
    try:
        # foreach=False is torch's per-tensor reference loop; fused and foreach are the same update in fewer kernels
        return torch.optim.AdamW(groups, fused=name == "adamw_fused", foreach=name == "adamw_foreach", **hyper)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"optimizer={name} does not run on {device}: {e}") from e


def lr_lambda_for(config: TrainConfig, total_steps: int) -> LRFactor:
    """Linear warmup (restarted when the optimizer is reset), then constant, linear or cosine decay down to
    `min_lr_ratio` of the peak (engine/training/lr_schedule.py)."""
    return LRFactor(config.lr_schedule, config.warmup_steps, total_steps, config.min_lr_ratio)


def follow_launch_config(scheduler, config: TrainConfig, total_steps: int) -> dict[str, tuple]:
    """After a resume: the learning rate, weight decay and schedule of this launch's config (a checkpoint brings
    back the saved ones, and a resume with more epochs or another lr would silently keep them: a linear decay
    already at 0 trains nothing). The step count and the warmup's restart point stay the checkpoint's; unchanged
    settings give the checkpoint's rates exactly. Returns {setting: (saved, now)} for what changed."""
    changed: dict[str, tuple] = {}
    fresh = lr_lambda_for(config, max(1, total_steps))
    groups = scheduler.optimizer.param_groups
    for i, (group, factor) in enumerate(zip(groups, scheduler.lr_lambdas)):
        if not isinstance(factor, LRFactor):
            continue
        for attr in ("schedule", "warmup_steps", "total_steps", "min_ratio"):
            if getattr(factor, attr) != getattr(fresh, attr):
                changed.setdefault(attr, (getattr(factor, attr), getattr(fresh, attr)))
                setattr(factor, attr, getattr(fresh, attr))
        if scheduler.base_lrs[i] != config.lr:
            changed.setdefault("lr", (scheduler.base_lrs[i], config.lr))
            scheduler.base_lrs[i] = config.lr
        group["initial_lr"] = config.lr
        group["lr"] = scheduler.base_lrs[i] * factor(scheduler.last_epoch)  # LambdaLR's own rule for this step
    if len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] != config.weight_decay:
        changed["weight_decay"] = (groups[0]["weight_decay"], config.weight_decay)  # param_groups' decaying group
        groups[0]["weight_decay"] = config.weight_decay
    return changed


def reset_optimizer_state(engine) -> int:
    """Forget Adam's moments (the original CoCoNuT's code builds a new optimizer every epoch, its README says at
    each stage switch; the trainer calls this where `reset_optimizer` says). Returns the number
    of parameter states cleared. Walks DeepSpeed's wrappers down to the torch optimizer that holds them."""
    opt = engine.optimizer
    seen = set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            cleared = len(opt.state)
            opt.state.clear()
            return cleared
        opt = getattr(opt, "optimizer", None)
    raise TrainingError(f"cannot find the torch optimizer inside {type(engine.optimizer).__name__} to reset")


def _overlay(base: dict, overrides: dict) -> dict:
    """``overrides`` over ``base``, a mapping merged into the mapping it overrides at every depth
    (``timers.throughput.synchronized`` keeps ``timers.throughput.enabled``)."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _overlay(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def deepspeed_config(config: TrainConfig, use_bf16: bool, world_size: int | None = None) -> dict:
    """The DeepSpeed config of a run: the stage's `ZERO_DEFAULTS`, then the user's `deepspeed` overrides.
    ``world_size`` (None: the process group's, else $WORLD_SIZE, else 1): on one rank ZeRO-2 has no reduction to
    overlap with backward, and `overlap_comm`'s side-stream bookkeeping cost host time in every gradient hook
    (measured at the 1B geometry: backward host time 352 -> 263 ms, step 586 -> 575 ms without it), so it is off
    there."""
    zero = {"stage": config.zero_stage, **ZERO_DEFAULTS[config.zero_stage]}
    if world_size is None:  # the process group's, or before it exists the launcher's (torchrun, deepspeed)
        initialized = torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    if config.zero_stage == 2 and world_size == 1:
        zero["overlap_comm"] = False
    ds = {
        "train_micro_batch_size_per_gpu": config.batch_size_training,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "zero_allow_untested_optimizer": True,  # a client optimizer: no fused-op JIT build for a config "optimizer"
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward's start and every step's end by
        # default (from the third step on), so the host cannot queue the next step while the device finishes one;
        # its host clock is enough for the samples/s it reports (the trainer times steps itself)
        "timers": {"throughput": {"enabled": True, "synchronized": False}},
    }
    ds = _overlay(ds, config.deepspeed)  # user overrides win, key by key at every depth
    for monitor in ("tensorboard", "csv_monitor"):  # DeepSpeed's default is ./DeepSpeedJobName in the working folder
        section = ds.get(monitor)
        if isinstance(section, dict) and section.get("enabled"):
            ds[monitor] = {"output_path": str(config.run_dir / "deepspeed") + os.sep, "job_name": config.name, **section}
    return ds


def trains_in_bf16(config: TrainConfig, device_type: str) -> bool:
    """`bf16` is used on CUDA; CPU runs train in fp32."""
    return bool(config.bf16 and device_type == "cuda")


def run_precision(config: TrainConfig, device_type: str, world_size: int | None = None) -> str:
    """"bf16", "fp16" or "fp32": what a run of `config` trains in on a device of `device_type` (`bf16` on CUDA,
    or the `deepspeed` overrides' bf16 / fp16 sections), as its engine's `checkpoint.engine_precision` will say."""
    ds = deepspeed_config(config, trains_in_bf16(config, device_type), world_size)
    if (ds.get("bf16") or {}).get("enabled"):
        return "bf16"
    return "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32"


def check_deepspeed_config(config: TrainConfig, use_bf16: bool, device_type: str, world_size: int | None = None) -> None:
    """Read the run's DeepSpeed config as `deepspeed.initialize` will (its schema and its consistency rules), so
    that a bad override is a ConfigError before a run directory is started or an earlier run removed, not a
    traceback from inside the engine's build. Also refused: fp16 or bf16 switched on by an override where the
    trainer trains in fp32 (`bf16` on the CPU), and a monitor whose package is missing."""
    ds = deepspeed_config(config, use_bf16, world_size)
    if device_type != "cuda":
        for section in ("bf16", "fp16"):
            if (ds.get(section) or {}).get("enabled"):
                raise ConfigError(f"deepspeed.{section}.enabled: runs on {device_type} train in fp32 (the model is "
                                  f"fp32 there); drop the override, or run on a GPU")
    if offloads_optimizer(config) and ds.get("zero_force_ds_cpu_optimizer", True):
        name = resolve_optimizer(config.optimizer, device_type, offload=True)
        if name != "deepspeed_cpu_adam":
            raise ConfigError(f"optimizer={config.optimizer}: DeepSpeed takes only its CPU Adam over offloaded "
                              "optimizer states; set optimizer: auto (or deepspeed_cpu_adam), or --set "
                              "deepspeed.zero_force_ds_cpu_optimizer=false to step torch's optimizer on the host")
    if (ds.get("tensorboard") or {}).get("enabled"):
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ConfigError("deepspeed.tensorboard.enabled needs the tensorboard package (pip install "
                              "tensorboard)") from e
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except Exception:  # noqa: BLE001 - DeepSpeed missing or broken: the engine's build reports it
        return
    try:
        DeepSpeedConfig(copy.deepcopy(ds))
    except Exception as e:  # noqa: BLE001 - pydantic, assertions, type and value errors: each a refused setting
        detail = " ".join(str(e).split()).split(" For further information")[0][:400] or type(e).__name__
        raise ConfigError(f"deepspeed: DeepSpeed refuses the run's config ({type(e).__name__}: {detail}); the "
                          f"overrides given: {config.deepspeed}") from e


def build_engine(model, config: TrainConfig, total_steps: int, use_bf16: bool):
    """`deepspeed.initialize` with `build_optimizer`'s optimizer, the warmup/decay schedule over `total_steps` and
    `deepspeed_config`; under ZeRO-3 the language model and the vision tower first become leaf modules
    (`zero3_leaf_language_model`, `zero3_leaf_vision_tower`), whose gradients `zero3_flat_leaf_reduction` reduces
    together."""
    # deepspeed picks its accelerator when imported: init_distributed sets DS_ACCELERATOR first, so import it late
    import deepspeed

    if config.zero_stage == 3 and config.zero3_leaf_language_model:
        model.set_language_model_leaf(True)  # before deepspeed.initialize registers ZeRO-3's module hooks
    if config.zero_stage == 3 and config.zero3_leaf_vision_tower:
        model.set_vision_tower_leaf(True)
    optimizer = build_optimizer(model, config)
    factor = lr_lambda_for(config, max(1, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=deepspeed_config(config, use_bf16),
    )
    grad_checks(engine, config.zero_grad_checks)
    if config.zero_stage == 3 and config.zero3_flat_leaf_reduction:
        from engine.training.zero3_gathers import use_flat_leaf_reduction

        why = use_flat_leaf_reduction(engine.optimizer)
        log.info("ZeRO-3 leaf gradients: %s", "reduced together per leaf" if why is None
                 else f"DeepSpeed's per-parameter reduction ({why})")
    return engine


def destroy_engine(engine) -> None:
    """`engine.destroy()`, plus the two references DeepSpeed 0.19's ZeRO-3 keeps to the model past it: the module
    its set-up puts at the bottom of `parameter_offload.FWD_MODULE_STACK` (never popped), and the class-wide
    `lru_cache` of the coordinator's `__params_to_release`, keyed by (coordinator, module, step); a forward that raised
    half-way also leaves the submodules it had entered on that stack. Without them the
    model, its optimizer state and its CUDA graphs' pools outlive the engine: a process that builds engines one after
    another (the benchmarks, the tests) runs out of memory."""
    try:
        engine.destroy()
    finally:
        if engine.zero_optimization_stage() == 3:
            _drop_stage3_module_references(engine.module)


def _drop_stage3_module_references(module) -> None:
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):  # the root, and the submodules a forward that raised half-way left on it
        owned = {id(m) for m in module.modules()}
        stack[:] = [m for m in stack if id(m) not in owned]
    # the cache sits under DeepSpeed's nvtx wrapper (no functools.wraps): found in its closure; emptying it costs the
    # engines still alive one recomputation per (module, step)
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in (getattr(method, "__closure__", None) or ()):
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def grad_checks(engine, mode: str) -> str:
    """`zero_grad_checks` on a ZeRO engine's optimizer (engine/training/zero_step.py), logged once with the
    reason: auto gives the optimizer the step without host waits where the setup allows, else the multi-tensor
    checks; multi_tensor the checks inside DeepSpeed's own step (under ZeRO-3 the multi-tensor gradient norm; both
    modes add engine/training/zero3_gathers.py's releases and gathers and zero3_linear.py there, and on CUDA
    accelerator_streams.py's stream calls); deepspeed changes nothing. Returns the path taken: "device",
    "multi_tensor" or "deepspeed"."""
    from engine.training.accelerator_streams import restore_deepspeed_streams, use_fast_streams
    from engine.training.zero3_gathers import (
        restore_deepspeed_copy_out,
        restore_deepspeed_parameter_walks,
        use_batched_release,
        use_coalesced_persistent_gather,
        use_listed_parameters,
        use_split_copy_out,
    )
    from engine.training.zero3_linear import restore_deepspeed_linear, use_memory_efficient_linear
    from engine.training.zero_step import use_device_step, use_multi_tensor_grad_checks, use_stage3_multi_tensor_norm

    if mode == "deepspeed" or engine.zero_optimization_stage() not in (1, 2, 3):
        # DeepSpeed's own everywhere (the copy-out, the parameter walks, the linear and the stream calls are
        # process-wide)
        restore_deepspeed_copy_out()
        restore_deepspeed_parameter_walks()
        restore_deepspeed_linear()
        restore_deepspeed_streams()
        return "deepspeed"
    why_streams = use_fast_streams()
    if why_streams is None:
        log.info("stream calls: the current device asked directly, not through torch's device look-up per call")
    if engine.zero_optimization_stage() == 3:
        why_gather, why_copy = use_coalesced_persistent_gather(engine.optimizer), use_split_copy_out()
        why_release, why_listed = use_batched_release(engine.optimizer), use_listed_parameters()
        log.info("ZeRO-3 gathers: persistent parameters released before the step %s and gathered after it %s; "
                 "coalesced gathers copied out %s; each module's parameters listed %s",
                 "in one pass" if why_release is None else f"one by one ({why_release})",
                 "in one collective" if why_gather is None else f"one collective each ({why_gather})",
                 "in one kernel" if why_copy is None else f"one kernel per parameter ({why_copy})",
                 "once" if why_listed is None else f"by a walk at every hook ({why_listed})")
        why_linear = use_memory_efficient_linear()
        log.info("ZeRO-3 linear layers: %s", "torch's linear forward in DeepSpeed's memory-efficient function, no "
                 "argument binding per call" if why_linear is None else f"as DeepSpeed has them ({why_linear})")
    if mode == "auto":
        why_not_device = use_device_step(engine.optimizer, engine)
        if why_not_device is None:
            log.info("optimizer step: gradient checks and clipping on the device, no host wait (the fused Adam "
                     "kernel skips a non-finite step)")
            return "device"
    if engine.zero_optimization_stage() == 3:
        if mode == "auto":
            log.info("optimizer step: DeepSpeed's (not on the device: %s)", why_not_device)
        why = use_stage3_multi_tensor_norm(engine.optimizer)
        if why is None:
            log.info("gradient norm: multi-tensor (one pass over every gradient partition)")
            return "multi_tensor"
        log.info("gradient norm: DeepSpeed's per-gradient loop (%s)", why)
        return "deepspeed"
    why = use_multi_tensor_grad_checks(engine.optimizer)
    if why is None:
        if mode == "auto":
            log.info("optimizer step: DeepSpeed's, with multi-tensor gradient checks (not on the device: %s)",
                     why_not_device)
        else:
            log.info("gradient norm and overflow check: multi-tensor (one pass over every gradient)")
        return "multi_tensor"
    log.info("gradient norm and overflow check: DeepSpeed's per-gradient loops (%s)", why)
    return "deepspeed"
