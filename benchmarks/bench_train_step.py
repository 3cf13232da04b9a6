"""Training-step throughput: the engine's latent training step under DeepSpeed ZeRO, on 1 or N processes.

One step is exactly what `Trainer.train_epoch` does per micro-batch: the batch's copy to the device (from pinned
host memory), the ZeRO-3 pass-count agreement (`min_passes`, the max over ranks), ``engine(...).loss`` (causal
KV-cached latent forward, loss on the labelled positions only), ``engine.backward(loss)`` and ``engine.step()``
(the optimizer of `engine.training.optim.build_optimizer`, gradient clipping), with the DeepSpeed config of
`engine.training.optim.deepspeed_config`. Each rank trains on its own synthetic batch
(`engine.data.random_batch.synthetic_batch`, seed per rank). Per (ZeRO stage, optimizer, ZeRO settings, Liger kernels,
batch size, curriculum stage) it reports ms per step (median, p10/p90 of the slowest rank per step), global
samples/s and tokens/s, peak memory per GPU and MFU.

`--phases` adds, after the timed steps (which stay unsynchronised inside the step), `--phase-steps` steps with the
device synchronised after each phase (data, forward, backward, optimizer): per-phase ms, the host time each phase
took to issue its work (host ms close to ms: host-bound), and one more step under CUDA's sync debug mode counting
the host synchronisations of each phase. Numerics across variants: every engine starts from the same weights, so
``probe_loss`` (a no-grad forward on a fixed batch right after the build) and, row for row, the loss after the same
sequence of steps are compared with the first variant of each list (``Δ probe loss``, ``Δ loss``).

    python -m benchmarks.bench_train_step --model internvl3-1b-geometry --device cuda --dtype bfloat16 \\
        --zero-stages 2 --stages 0,3 --c-thought 2 --batch-size 8,16 --out results/train_step_1gpu
    torchrun --nproc_per_node 2 -m benchmarks.bench_train_step ... --zero-stages 2,3 --out results/train_step_2gpu
    deepspeed --num_gpus 2 --module benchmarks.bench_train_step ...
    python -m benchmarks.bench_train_step --smoke --out /tmp/ts          # tiny model, CPU, ZeRO-2, seconds
    python -m benchmarks.bench_train_step ... --phases --optimizers adamw,adamw_fused \
        --zero-settings default --zero-settings overlap_comm=false --liger none,fused_linear_cross_entropy,all

Only rank 0 writes ``train_step.json`` (settings, environment, command, world size, rows) and
``train_step.md`` into ``--out``, after every configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import os
import pstats
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    Timing,
    allocator_counts,
    command_line,
    dtype_name,
    environment_info,
    free_memory,
    guarded_time_fn,
    int_list,
    is_oom,
    markdown_table,
    natural_int_list,
    output_dir,
    peak_memory_gib,
    positive_int,
    positive_int_list,
    progress,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    str_list,
    synchronize,
    time_fn,
    use_triton_interpreter_without_cuda,
    write_results,
)
from benchmarks.device_timeline import GAP_US, device_timeline, trace_events
from engine.data.random_batch import synthetic_batch

use_triton_interpreter_without_cuda()  # before the engine can import a kernel

from engine.model.liger import LIGER_KERNELS  # noqa: E402
from engine.training.config import OPTIMIZERS, ConfigError, parse_overrides  # noqa: E402
from engine.utils.logging import get_logger  # noqa: E402
from engine.utils.profiling import profile_range  # noqa: E402

log = get_logger("bench")

RESULT_NAME = "train_step"
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, bf16 dense (no sparsity)
PHASES = ("data", "forward", "backward", "optimizer")

FLOPS_FORMULA = (
    "Model FLOPs per step (summed over ranks; forward + backward = 3x forward, every weight trained):\n"
    "  6 · N_lm · tokens                      N_lm = language-model parameters without the embedding table; tokens =\n"
    "                                         non-pad positions (text, image tokens and latents)\n"
    "+ 12 · L · H · Σ_rows T_row² / 2        causal attention of the language model (T_row = the row's tokens)\n"
    "+ 6 · H · V · labelled                   lm_head on the labelled positions only (the engine's loss path)\n"
    "+ 6 · N_vit · tiles · S_vit              vision tower; S_vit = patches + CLS per tile, i.e. before pixel shuffle\n"
    "+ 12 · L_vit · H_vit · tiles · S_vit²   its bidirectional attention\n"
    "+ 6 · N_proj · image_tokens              projector, after pixel shuffle\n"
    "The latent passes add no model FLOPs (each thought position is computed once, attending to the cache).\n"
    "MFU = model FLOPs per step / (step time · peak dense bf16 FLOP/s · world size); `MFU (matmul)` uses the\n"
    "measured 8192³ bf16 matmul rate of each GPU instead of the datasheet peak. n/a on CPU."
)


# ---------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train_step", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="tiny | internvl3-1b-geometry | internvl3-2b-geometry | "
                   "internvl3-8b-geometry | a local checkpoint dir (default: the 1B geometry on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available); under a launcher "
                   "each rank uses cuda:LOCAL_RANK")
    p.add_argument("--dtype", default=None, help="bfloat16 (DeepSpeed bf16, fp32 master weights; CUDA only) | "
                   "float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--zero-stages", type=int_list, default=None, help="DeepSpeed ZeRO stages to run (default 2)")
    p.add_argument("--stages", type=natural_int_list, default=None, help="curriculum stages (default 0,3)")
    p.add_argument("--c-thought", type=positive_int_list, default=None, help="latents per stage (default 2)")
    p.add_argument("--batch-size", "--batch-sizes", dest="batch_sizes", type=int_list, default=None,
                   help="micro-batch per rank, comma-separated for several (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens per row: half question, half answer "
                   "(+eos) (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--image-tokens", type=int, default=None, help="<IMG_CONTEXT> tokens per row, a multiple of the "
                   "model's tokens per tile (default: one tile: 256 for InternVL3's 448 px tile, 16 for tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="peak dense bf16 TFLOP/s per GPU for MFU (default 989: H100 SXM)")
    p.add_argument("--matmul-size", type=int, default=8192,
                   help="n of the n³ bf16 matmul whose measured rate is the second MFU reference (0: skip)")
    p.add_argument("--baseline", default=None, metavar="JSON|DIR",
                   help="train_step.json of an earlier run (e.g. 1 GPU): adds speed-up and scaling efficiency")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (the trainer's default)")
    p.add_argument("--cuda-expandable-segments", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA's caching allocator with expandable segments, as the trainer sets it "
                        "(cuda_expandable_segments; PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF in the "
                        "environment wins)")
    p.add_argument("--attn", default="sdpa", help="attention backend: sdpa | eager | flash_attention_2")
    p.add_argument("--seed", type=int, default=0, help="model seed; rank r's batches use seed + 1000·(r+1)")
    p.add_argument("--optimizers", type=str_list, default=None,
                   help=f"optimizers to compare, comma-separated: {', '.join(OPTIMIZERS)} (default auto, the trainer's "
                   "default: fused AdamW on CUDA)")
    p.add_argument("--zero-settings", action="append", default=None, metavar="default|KEY=VALUE[,KEY=VALUE...]",
                   help="zero_optimization settings over the trainer's per-stage defaults (engine/training/optim.py); "
                   "repeat the flag to sweep, one configuration per value, e.g. --zero-settings default "
                   "--zero-settings overlap_comm=false --zero-settings reduce_bucket_size=5e8,allgather_bucket_size=5e8;"
                   " eight keys are not ZeRO's: zero3_leaf_language_model=false and "
                   "zero3_leaf_vision_tower=false (ZeRO-3's per-module gathers), zero3_listed_parameters=false "
                   "(DeepSpeed's walk over a module's submodules at every hook, fetch and release), "
                   "zero3_flat_leaf_reduction=false (DeepSpeed's per-parameter reduction of each "
                   "ZeRO-3 leaf's gradients), grad_checks=multi_tensor (DeepSpeed's step "
                   "with multi-tensor checks: auto steps on the device where it can), grad_checks=deepspeed "
                   "(DeepSpeed's per-gradient norm and overflow loops; under ZeRO-3 also its per-parameter gathers and "
                   "releases and its linear), "
                   "compile_vision_layers=true (torch.compile of each vision encoder layer), "
                   "layer_ops=reference|fused (the decoder layers' norms, rotary and SwiGLU in the latent block and the "
                   "passes, and the vision layers' LayerNorms: modules and transformers calls, or Triton kernels) and "
                   "throughput_timer_synchronized=true (DeepSpeed's default: its throughput timer synchronises the "
                   "device at every forward and step; the trainer's false does not)")
    p.add_argument("--liger", type=str_list, default=None,
                   help="Liger-Kernel variants, comma-separated: none, all, or pieces joined by '+' from "
                   f"{', '.join(LIGER_KERNELS)} (default none)")
    p.add_argument("--phases", action="store_true",
                   help="also time each phase (data, forward, backward, optimizer) with the device synchronised, in "
                   "--phase-steps extra steps, and count host synchronisations per phase (CUDA)")
    p.add_argument("--phase-steps", type=int, default=3, help="synchronised steps per configuration with --phases")
    p.add_argument("--profile-phase", choices=PHASES, default=None,
                   help="one more step per configuration with this phase under torch.profiler: its top operators by "
                        "self device and host time and its kernel launches, logged and kept in the JSON (rank 0)")
    p.add_argument("--profile-tool", choices=("torch", "python"), default="torch",
                   help="for --profile-phase: torch.profiler (operators, kernels, the device timeline) or cProfile "
                        "(the Python functions that spend the host's time: DeepSpeed's per-parameter hooks, ...)")
    p.add_argument("--alternate", type=str_list, default=None, metavar="NAME[,NAME...]|all",
                   help="ZeRO-3 rows: after the timing, rounds of timed steps in the same engine alternating the "
                   "row's process-wide ZeRO-3 replacements as built with each named one switched back to "
                   f"DeepSpeed's own: {', '.join(REPLACEMENTS)} (engines built in turn differ by more than each saves)")
    p.add_argument("--alternate-rounds", type=int, default=6, help="rounds for --alternate (the order reversed "
                   "every other round)")
    p.add_argument("--alternate-steps", type=int, default=5,
                   help="timed steps per setting and round for --alternate, after one untimed step")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting new configurations after this many seconds (results so far are kept)")
    p.add_argument("--out", type=output_dir, default="bench_results/train_step", help="output directory (written by rank 0)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, CPU, fp32, ZeRO-2 (unless --zero-stages), stages 0,1, 2 timed steps")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return fill_defaults(p.parse_args(argv))


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.smoke:
        preset = dict(model="tiny", device="cpu", dtype="float32", zero_stages=[2], stages=[0, 1], c_thought=[2],
                      batch_sizes=[2], text_len=12, image_tokens=16, warmup=1, steps=2)
        for k, v in preset.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device_type = device.type
    args.dtype = resolve_dtype(args.dtype, device)
    if args.dtype not in (torch.float32, torch.bfloat16):
        raise SystemExit(f"--dtype must be float32 or bfloat16 (DeepSpeed bf16), got {dtype_name(args.dtype)}")
    if args.dtype == torch.bfloat16 and not cuda:
        raise SystemExit("--dtype bfloat16 trains with DeepSpeed bf16 on CUDA only (the trainer trains in fp32 on "
                         "CPU); use --dtype float32")
    defaults = dict(
        model="internvl3-1b-geometry" if cuda else "tiny", zero_stages=[2], stages=[0, 3], c_thought=[2],
        batch_sizes=[8] if cuda else [2], text_len=64 if cuda else 16,
        image_tokens=16 if (args.model or ("internvl3-1b-geometry" if cuda else "tiny")) == "tiny" else 256,
        warmup=3 if cuda else 1, steps=10 if cuda else 3,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    bad = [z for z in args.zero_stages if z not in (0, 1, 2, 3)]
    if bad:
        raise SystemExit(f"--zero-stages must be in 0..3, got {bad}")
    args.optimizers = args.optimizers or ["auto"]
    bad = [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad:
        raise SystemExit(f"--optimizers: unknown {bad}; valid: {', '.join(OPTIMIZERS)}")
    if args.alternate == ["all"]:
        args.alternate = list(REPLACEMENTS)
    unknown = sorted(set(args.alternate or ()) - set(REPLACEMENTS))
    if unknown:
        raise SystemExit(f"--alternate: unknown {unknown}; choose from {', '.join(REPLACEMENTS)} or all")
    if args.alternate and (args.alternate_rounds < 1 or args.alternate_steps < 1):
        raise SystemExit("--alternate-rounds and --alternate-steps must be >= 1")
    args.zero_settings = args.zero_settings or ["default"]
    for spec in args.zero_settings:
        parse_zero_settings(spec)  # fail now, not after an hour of other configurations
    args.liger = args.liger or ["none"]
    for spec in args.liger:
        parse_liger(spec)
    if any(spec != "none" for spec in args.liger):
        try:
            import liger_kernel  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"--liger needs the liger-kernel package (pip install 'multimodal-coconut[liger]'): {e}")
    if args.phase_steps < 1:
        raise SystemExit(f"--phase-steps must be >= 1, got {args.phase_steps}")
    if args.steps < 1 or args.warmup < 0 or args.text_len < 2 or min(args.batch_sizes) < 1:
        raise SystemExit("--steps >= 1, --warmup >= 0, --text-len >= 2 and batch sizes >= 1 are required")
    return args


# ---------------------------------------------------------------------- configurations
# The trainer's ZeRO-3 replacements that are process-wide and can be switched between two steps of one engine:
# name -> (module, install, restore, active); install returns None when installed, else why not
# (`optim.grad_checks`); active tells whether it is installed now
REPLACEMENTS = {
    "listed_parameters": ("engine.training.zero3_gathers", "use_listed_parameters",
                          "restore_deepspeed_parameter_walks", "listed_parameters_active"),
    "split_copy_out": ("engine.training.zero3_gathers", "use_split_copy_out", "restore_deepspeed_copy_out",
                       "split_copy_out_active"),
    "memory_efficient_linear": ("engine.training.zero3_linear", "use_memory_efficient_linear",
                                "restore_deepspeed_linear", "memory_efficient_linear_active"),
    "stream_calls": ("engine.training.accelerator_streams", "use_fast_streams", "restore_deepspeed_streams",
                     "fast_streams_active"),
    "flat_gradients": ("engine.training.zero_step", "use_flat_gradient_slices", "restore_per_gradient_loops",
                       "flat_gradient_slices_active"),
}


def _replacement_function(name: str, role: int):
    import importlib

    module, *functions = REPLACEMENTS[name]
    return getattr(importlib.import_module(module), functions[role])


def replacement(name: str, installed: bool) -> str | None:
    """Install (or restore DeepSpeed's own for) one of `REPLACEMENTS`; returns why it could not be installed."""
    if installed:
        return _replacement_function(name, 0)()
    _replacement_function(name, 1)()
    return None


def replacements_active() -> dict[str, bool]:
    """Which of `REPLACEMENTS` are installed in this process now."""
    return {name: bool(_replacement_function(name, 2)()) for name in REPLACEMENTS}


def parameter_walks() -> str:
    """How ZeRO-3's hooks list a module's parameters in this process: "listed" (walked once,
    `engine.training.zero3_gathers.use_listed_parameters`) or "deepspeed" (DeepSpeed's walk at every call)."""
    from engine.training.zero3_gathers import listed_parameters_active

    return "listed" if listed_parameters_active() else "deepspeed"


def parse_zero_settings(spec: str) -> dict:
    """'default' -> {}; 'overlap_comm=false,reduce_bucket_size=5e8' -> {'overlap_comm': False, 'reduce_bucket_size':
    500000000} (values read as the trainer's --set values; whole floats become ints, as DeepSpeed wants)."""
    if spec.strip() == "default":
        return {}
    pairs = [pair.strip() for pair in spec.split(",") if pair.strip()]
    if not pairs or any("=" not in pair or not pair.split("=", 1)[0] for pair in pairs):
        raise SystemExit(f"--zero-settings expects 'default' or KEY=VALUE[,KEY=VALUE...], got {spec!r}")
    try:
        values = parse_overrides(pairs)
    except ConfigError as e:
        raise SystemExit(f"--zero-settings {spec!r}: {e}") from e
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in values.items()}


def parse_liger(spec: str) -> tuple[str, ...]:
    """'none' -> (); 'all' -> every piece; 'rms_norm+swiglu' -> those two."""
    if spec == "none":
        return ()
    if spec == "all":
        return LIGER_KERNELS
    pieces = tuple(p for p in spec.split("+") if p)
    unknown = [p for p in pieces if p not in LIGER_KERNELS]
    if unknown or not pieces:
        raise SystemExit(f"--liger: unknown piece(s) {unknown or [spec]}; valid: none, all, {', '.join(LIGER_KERNELS)}")
    return pieces


@dataclass(frozen=True)
class Config:
    zero_stage: int
    batch_size: int
    n_latents: int
    stage_c: tuple[str, ...]  # every "stage x c_thought" that gives this many latents
    optimizer: str = "auto"
    zero_settings: str = "default"  # a --zero-settings value
    liger: str = "none"  # a --liger value

    @property
    def engine_key(self) -> tuple:
        """What a DeepSpeed engine is built for; the batch size and latent count share it."""
        return (self.zero_stage, self.optimizer, self.zero_settings, self.liger)

    def label(self) -> str:
        variant = "".join(f" {k}={v}" for k, v in (("optimizer", self.optimizer), ("settings", self.zero_settings),
                                                    ("liger", self.liger)) if v not in ("auto", "default", "none"))
        return (f"zero={self.zero_stage}{variant} batch={self.batch_size} latents={self.n_latents} "
                f"({'/'.join(self.stage_c)})")


def build_configs(zero_stages, batch_sizes, stages, c_thoughts, optimizers=("auto",), zero_settings=("default",),
                  liger=("none",)) -> list[Config]:
    """ZeRO stage outermost, then optimizer, ZeRO settings and Liger variant (one DeepSpeed engine each), then batch
    size, then distinct latent counts. Every engine runs the same batches in the same order, so row k of one variant
    and row k of another have the same training history (their losses are compared)."""
    by_latents: dict[int, list[str]] = {}
    for c in c_thoughts:
        for s in stages:
            by_latents.setdefault(s * c, []).append(f"{s}x{c}")
    return [Config(z, b, n, tuple(by_latents[n]), o, zs, lg) for z in zero_stages for o in optimizers
            for zs in zero_settings for lg in liger for b in batch_sizes for n in sorted(by_latents)]


# ---------------------------------------------------------------------- FLOPs
def _unique_numel(params, skip=()) -> int:
    skipped = {id(p) for p in skip}
    seen, total = set(), 0
    for p in params:
        if id(p) in skipped or id(p) in seen:
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions leave numel() == 0
    return total


def model_sizes(model) -> dict:
    """Parameter counts and shapes the FLOPs formula needs (read before DeepSpeed partitions anything)."""
    base = model.base
    lm = model.language_model
    embed = lm.get_input_embeddings().weight
    text, vision = model.config.text_config, model.config.vision_config
    size = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    patches = (size(vision.image_size) // size(vision.patch_size)) ** 2
    return dict(
        lm_params=_unique_numel(lm.parameters(), skip=[embed]),
        lm_layers=int(text.num_hidden_layers), lm_hidden=int(text.hidden_size),
        head_params=_unique_numel([base.lm_head.weight]),
        vision_params=_unique_numel(base.model.vision_tower.parameters()),
        vision_layers=int(vision.num_hidden_layers), vision_hidden=int(vision.hidden_size),
        vision_seq=patches + 1,  # + CLS, dropped after the tower
        projector_params=_unique_numel(base.model.multi_modal_projector.parameters()),
        total_params=_unique_numel(model.parameters()),
    )


def batch_flops(sizes: dict, batch, image_token_id: int) -> dict:
    """Model FLOPs of one training step on this batch (see FLOPS_FORMULA), per term."""
    mask = batch.attention_mask
    tokens = int(mask.sum())
    row_t = mask.sum(1).double()
    image_tokens = int((batch.input_ids == image_token_id).sum())
    labelled = int((batch.labels != -100).sum())
    tiles = 0 if batch.pixel_values is None else int(batch.pixel_values.shape[0])
    s = sizes
    terms = dict(
        lm=6.0 * s["lm_params"] * tokens,
        lm_attention=12.0 * s["lm_layers"] * s["lm_hidden"] * float((row_t**2 / 2).sum()),
        lm_head=6.0 * s["head_params"] * labelled,
        vision=6.0 * s["vision_params"] * tiles * s["vision_seq"],
        vision_attention=12.0 * s["vision_layers"] * s["vision_hidden"] * tiles * s["vision_seq"] ** 2,
        projector=6.0 * s["projector_params"] * image_tokens,
    )
    terms["total"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------------- distributed helpers
def gather(obj, env) -> list:
    from engine.training.distributed import all_gather_objects

    return all_gather_objects(obj) if env.world_size > 1 else [obj]


def launcher_name(world_size: int) -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "LOCAL_SIZE" in os.environ:  # set by deepspeed.launcher.launch
        return "deepspeed"
    return "python" if world_size == 1 else "launcher"


def launch_command(world_size: int, argv: list[str] | None = None) -> str:
    """The command as typed, launcher included; with `argv` (main called in-process) the module form of it."""
    if argv is None:
        cmd = command_line()
    else:
        import shlex

        cmd = " ".join(["python", "-m", "benchmarks.bench_train_step", *(shlex.quote(a) for a in argv)])
    name = launcher_name(world_size)
    if name == "torchrun":
        return cmd.replace("python -m", f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world_size)} -m", 1)
    if name == "deepspeed":
        args = [a for a in cmd.split(" ") if not a.startswith("--local_rank")]
        return " ".join(args).replace("python -m", f"deepspeed --num_gpus {world_size} --module", 1)
    return cmd


def matmul_tflops(device: torch.device, n: int) -> float | None:
    """Measured dense bf16 n³ matmul rate of this GPU (TFLOP/s); None on CPU or when skipped."""
    if device.type != "cuda" or n <= 0:
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    timing = time_fn(lambda: torch.mm(a, b, out=c), device, warmup=5, repeats=20)
    del a, b, c
    free_memory(device)
    return 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e12


# ---------------------------------------------------------------------- the engine and the step
class PhaseClock:
    """Phase boundaries of one step: host time to issue each phase, and its time with the device synchronised."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host_ms: dict[str, float] = {}
        self.ms: dict[str, float] = {}
        synchronize(device)
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        issued = time.perf_counter()
        synchronize(self.device)
        done = time.perf_counter()
        self.host_ms[phase] = (issued - self.last) * 1e3
        self.ms[phase] = (done - self.last) * 1e3
        self.last = done


class SyncCounter:
    """Host synchronisations per phase, without adding any: those CUDA's sync debug mode reports (warnings: an
    operator that waits, e.g. `.item()`, and a stream's `synchronize`) and the explicit waits it does not see
    (`torch.cuda.synchronize`, e.g. DeepSpeed's throughput timer, and an event's `synchronize`), counted while
    `counting()` is active."""

    WAITS = ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"))

    def __init__(self, caught: list):
        self.caught, self.seen = caught, 0
        self.counts: dict[str, int] = {}
        self.explicit = 0

    @contextlib.contextmanager
    def counting(self):
        originals = [(owner, name, getattr(owner, name)) for owner, name in self.WAITS]

        def counted(original):
            def wait(*args, **kwargs):
                self.explicit += 1
                return original(*args, **kwargs)

            return wait

        for owner, name, original in originals:
            setattr(owner, name, counted(original))
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def mark(self, phase: str) -> None:
        syncs = sum(1 for w in self.caught[self.seen:] if "synchroniz" in str(w.message))
        self.counts[phase] = syncs + self.explicit
        self.seen, self.explicit = len(self.caught), 0


class PhaseProfiler:
    """torch.profiler around one phase of one step (started at the previous phase's mark, stopped at its own): the
    phase's operators by self device time and by self host time, its launches from the host and the kernels the
    device ran. Where the optimizer phase's time goes is the question this answers (`--profile-phase optimizer`).
    With `tool="python"`, cProfile instead: the phase's Python functions by self and by cumulative time, for a
    host-bound phase whose time is spread over many small calls (cProfile's own cost inflates them: compare
    functions with each other, not with the unprofiled phase)."""

    LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")

    def __init__(self, device: torch.device, phase: str, tool: str = "torch"):
        self.device, self.phase, self.tool = device, phase, tool
        self.start_after = PHASES[PHASES.index(phase) - 1] if PHASES.index(phase) else None
        self.prof = None
        self.running = False
        self.wall_ms: float | None = None
        if self.start_after is None:
            self._start()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        synchronize(self.device)
        if self.tool == "python":
            self.prof = cProfile.Profile()
            self.prof.enable()
        else:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        self.running = True
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        """Stop the profiler if it runs (also when the step raised half-way)."""
        if self.running:
            self.running = False
            if self.tool == "python":
                self.prof.disable()
            else:
                self.prof.__exit__(None, None, None)

    def mark(self, phase: str) -> None:
        if phase == self.start_after:
            self._start()
        elif phase == self.phase and self.running:
            synchronize(self.device)
            self.wall_ms = (time.perf_counter() - self.t0) * 1e3
            self.stop()

    def python_summary(self, top: int) -> dict:
        """cProfile's functions of the phase: calls, self and cumulative ms, the top `top` by each."""
        stats = pstats.Stats(self.prof).stats
        rows = [dict(function=(name if file == "~" else f"{_short_path(file)}:{line}({name})")[:120], calls=calls,
                     self_ms=self_s * 1e3, cumulative_ms=cumulative_s * 1e3)
                for (file, line, name), (_, calls, self_s, cumulative_s, _) in stats.items()]
        return {
            "tool": "python", "phase": self.phase, "wall_ms": self.wall_ms,
            "function_calls": sum(r["calls"] for r in rows),
            "by_self": sorted(rows, key=lambda r: -r["self_ms"])[:top],
            "by_cumulative": sorted(rows, key=lambda r: -r["cumulative_ms"])[:top],
        }

    def summary(self, top: int = 25) -> dict:
        """The profiled phase's operators (self times: nested calls are not counted twice; the phase's own
        `train/...` range left out), the kernel launches issued by the host (a CUDA graph launch counts once) and
        the kernels the device ran (a graph's included; memory copies, sets and annotation spans are not kernels)."""
        if self.wall_ms is None:
            raise RuntimeError(f"the {self.phase} phase was not profiled to its end")
        if self.tool == "python":
            return self.python_summary(top)
        events = self.prof.key_averages()

        def device_ms(e) -> float:
            return float(getattr(e, "self_device_time_total", 0.0) or 0.0) / 1e3

        def is_kernel(e) -> bool:
            return (str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False)
                    and not e.key.startswith(("Memcpy", "Memset")))

        host_events = [e for e in events if not str(getattr(e, "device_type", "")).endswith("CUDA")]
        ops = [dict(name=e.key[:100], calls=e.count, device_ms=device_ms(e), host_ms=e.self_cpu_time_total / 1e3)
               for e in host_events if not e.key.startswith("train/")]
        kernels = [e for e in events if is_kernel(e)]
        cuda = self.device.type == "cuda"
        timeline = device_timeline(trace_events(self.prof), top) if cuda else None
        return {
            "timeline": timeline,
            "phase": self.phase, "wall_ms": self.wall_ms,
            "host_launches": sum(e.count for e in host_events if e.key in self.LAUNCH_CALLS) if cuda else None,
            "device_kernels": sum(e.count for e in kernels) if cuda else None,
            "kernel_ms": sum(device_ms(e) for e in kernels) if cuda else None,
            "host_ms": sum(r["host_ms"] for r in ops),
            "by_device": sorted(ops, key=lambda r: -r["device_ms"])[:top] if cuda else [],
            "by_host": sorted(ops, key=lambda r: -r["host_ms"])[:top],
        }


def _short_path(path: str) -> str:
    """A profiled function's file relative to site-packages or the repository, as people name it."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return path[len(root):] if path.startswith(root) else path


def profile_table(prof: dict) -> str:
    """The profiled phase as markdown: totals, then the top operators by self device and by self host time (or,
    under cProfile, the top functions by self and by cumulative time)."""
    if prof.get("tool") == "python":
        columns = [("function", "function"), ("calls", "calls"), ("self_ms", "self ms"), ("cumulative_ms", "cumulative ms")]
        lines = [f"{prof['phase']} phase under cProfile: {prof['wall_ms']:.1f} ms wall (profiled), "
                 f"{prof['function_calls']} function calls"]
        for key, title in (("by_self", "self time"), ("by_cumulative", "cumulative time")):
            lines.append(f"Top functions by {title}:\n\n" + markdown_table(prof[key], columns))
        return "\n\n".join(lines)
    lines = [f"{prof['phase']} phase under torch.profiler: {prof['wall_ms']:.1f} ms wall, host (self, all operators) "
             f"{prof['host_ms']:.1f} ms" + ("" if prof["kernel_ms"] is None else
                                            f", {prof['host_launches']} launches from the host, "
                                            f"{prof['device_kernels']} kernels on the device ({prof['kernel_ms']:.1f} ms)")]
    for key, title in (("by_device", "self device time"), ("by_host", "self host time")):
        if prof[key]:
            lines.append(f"Top operators by {title}:\n\n" + markdown_table(
                prof[key], [("name", "operator"), ("calls", "calls"), ("device_ms", "device ms"), ("host_ms", "host ms")]))
    timeline = prof.get("timeline")
    if timeline and timeline["kernels"]:
        lines.append(f"Device timeline (the profiler's trace): {timeline['kernels']} kernels and copies, "
                     f"{timeline['kernel_ms']:.1f} ms of them over a {timeline['span_ms']:.1f} ms span, idle "
                     f"{timeline['idle_ms']:.1f} ms in gaps over {GAP_US:.0f} us; {timeline['graph_kernels']} kernels "
                     "launched by CUDA graphs")
        columns = [("name", "kernel"), ("calls", "calls"), ("ms", "ms"), ("mean_us", "mean us")]
        for key, title in (("by_name", "Kernels by device time"), ("graph_by_name", "Kernels of CUDA graphs")):
            if timeline[key]:
                lines.append(f"{title}:\n\n" + markdown_table(timeline[key], columns))
        if timeline["gaps"]:
            lines.append("Device idle gaps, charged to the host operator that launched the next kernel:\n\n"
                         + markdown_table(timeline["gaps"], [("range", "range"), ("operator", "operator"),
                                                             ("gaps", "gaps"), ("ms", "ms")]))
    return "\n\n".join(lines)


class Bench:
    """One rank's state: the process group, the model (reloaded per engine variant) and its DeepSpeed engine."""

    def __init__(self, args, env):
        self.args, self.env = args, env
        self.device = env.device
        self.use_bf16 = args.dtype == torch.bfloat16
        self.engine = self.model = self.tok = None
        self.key: tuple | None = None
        self.zero_stage: int | None = None
        self.sizes: dict | None = None
        self.variant: dict = {}

    def build(self, cfg: "Config") -> None:
        """A fresh fp32 model (as the trainer loads it: DeepSpeed keeps fp32 master weights and casts for bf16), set
        up and wrapped exactly as the trainer does (`configure_model`, `build_engine`)."""
        from engine import load_model
        from engine.training.config import TrainConfig
        from engine.training.model_setup import configure_model
        from engine.training.optim import build_engine, deepspeed_config, offloads_optimizer, resolve_optimizer
        from engine.training.zero_step import device_step_active, multi_tensor_active

        self.release()
        t0 = time.perf_counter()
        pieces = parse_liger(cfg.liger)
        zero_settings = parse_zero_settings(cfg.zero_settings)
        # eight keys are not ZeRO's: one gather of the language model (and of the vision tower) per call or
        # ZeRO-3's per-module gathers, each module's parameters listed once or walked at every hook, a leaf's
        # gradients reduced together or per parameter, the multi-tensor gradient checks or DeepSpeed's per-gradient
        # loops, compiled vision layers, the training layers' ops, DeepSpeed's throughput timer synchronising the
        # device (its default) or not (the trainer's)
        leaf = bool(zero_settings.pop("zero3_leaf_language_model", True))
        vision_leaf = bool(zero_settings.pop("zero3_leaf_vision_tower", True))
        flat_reduction = bool(zero_settings.pop("zero3_flat_leaf_reduction", True))
        checks = self.requested_grad_checks = str(zero_settings.pop("grad_checks", "auto"))
        compile_vision = bool(zero_settings.pop("compile_vision_layers", False))
        layer_ops = str(zero_settings.pop("layer_ops", "auto"))
        listed = bool(zero_settings.pop("zero3_listed_parameters", True))
        timer_synchronized = zero_settings.pop("throughput_timer_synchronized", None)  # DeepSpeed's own: true
        train_cfg = TrainConfig(  # first: an invalid combination (the fused loss under ZeRO-3) costs nothing
            model_id=str(self.args.model), zero_stage=cfg.zero_stage, batch_size_training=cfg.batch_size, bf16=self.use_bf16,
            lr=self.args.lr, seed=self.args.seed, device=self.args.device_type, attn_implementation=self.args.attn,
            optimizer=cfg.optimizer, liger_kernels=list(pieces), zero3_leaf_language_model=leaf,
            zero3_leaf_vision_tower=vision_leaf, zero3_flat_leaf_reduction=flat_reduction,
            zero_grad_checks=checks, compile_vision_layers=compile_vision, layer_ops=layer_ops,
            deepspeed={"zero_optimization": zero_settings, **({} if timer_synchronized is None else {
                "timers": {"throughput": {"enabled": True, "synchronized": bool(timer_synchronized)}}})},
        )
        model, tok, _ = load_model(self.args.model, dtype=torch.float32, device=self.device, seed=self.args.seed,
                                   attn_implementation=self.args.attn)
        self.sizes = model_sizes(model)
        configure_model(model, train_cfg)  # every variant sets all Liger pieces: rope is process-wide
        self.engine = build_engine(model, train_cfg, 10**6, self.use_bf16)
        if not listed:  # DeepSpeed's parameter walk at every hook (process-wide; the next build installs ours again)
            from engine.training.zero3_gathers import restore_deepspeed_parameter_walks

            restore_deepspeed_parameter_walks()
        self.engine.train()
        self.model, self.tok, self.zero_stage, self.key = model, tok, cfg.zero_stage, cfg.engine_key
        self.variant = dict(
            optimizer_resolved=resolve_optimizer(cfg.optimizer, self.device, offloads_optimizer(train_cfg)),
            grad_checks=("device" if device_step_active(self.engine.optimizer)
                         else "multi_tensor" if multi_tensor_active(self.engine.optimizer) else "deepspeed"),
            zero_optimization=deepspeed_config(train_cfg, self.use_bf16)["zero_optimization"],
            grad_hooks=len(getattr(self.engine.optimizer, "_grad_acc_hooks", []) or []),
            trainable_tensors=sum(1 for p in model.parameters() if p.requires_grad),
            parameter_walks=parameter_walks(),
        )
        self.variant["probe_loss"] = self.probe_loss()
        if self.env.is_main:
            log.info("ZeRO-%d engine on %d rank(s): %s, %.1fM parameters, %s, %s, settings %s, Liger %s, built in "
                     "%.1f s", cfg.zero_stage, self.env.world_size, self.args.model, self.sizes["total_params"] / 1e6,
                     "bf16" if self.use_bf16 else "fp32", self.variant["optimizer_resolved"], cfg.zero_settings,
                     cfg.liger, time.perf_counter() - t0)

    @torch.no_grad()
    def probe_loss(self) -> float:
        """The fresh engine's loss on a fixed batch (no gradient, no step): equal weights in every variant, so the
        difference between variants is their forward numerics."""
        args = self.args
        batch = self.make_batch(Config(self.zero_stage, min(args.batch_sizes), args.max_latents, ()))
        mask = batch.attention_mask.to(self.device)
        from engine.model.schedule import position_ids_from_mask

        passes = 1 + int((batch.input_ids == self.model.latent_id).any(0).sum())
        loss = self.engine(input_ids=batch.input_ids.to(self.device), attention_mask=mask,
                           pixel_values=None if batch.pixel_values is None else batch.pixel_values.to(self.device),
                           labels=batch.labels.to(self.device), position_ids=position_ids_from_mask(mask),
                           return_logits=False, min_passes=self.min_passes(passes)).loss
        return float(loss)

    def try_build(self, cfg: "Config") -> dict | None:
        """`build`, with out-of-memory (on any rank) and an invalid combination (e.g. Liger's fused loss under
        ZeRO-3, or an optimizer the device lacks) returned as a status instead of raised."""
        try:
            self.build(cfg)
            mine = None
        except ConfigError as e:
            mine = {"status": "invalid", "error": str(e)[:300]}
            self.release()
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            mine = {"status": "oom", "error": "building the engine: " + (str(e).splitlines() or ["OOM"])[0][:300]}
            del e
            self.release()
        failed = [m for m in gather(mine, self.env) if m is not None]
        if failed and mine is None:
            self.release()
        return failed[0] if failed else None

    def release(self) -> None:
        from engine.training.optim import destroy_engine

        if self.engine is not None:
            try:
                destroy_engine(self.engine)
            except Exception:  # noqa: BLE001 - best effort; the references go anyway
                pass
        self.engine = self.model = None
        self.key = None
        free_memory(self.device)

    def min_passes(self, local: int) -> int:
        """`Lockstep.min_passes`: under ZeRO-3 with several ranks and per-module gathers, the max pass count over
        ranks, else 0."""
        from engine.training.distributed import all_reduce_max

        if self.zero_stage != 3 or self.env.world_size == 1 or self.model.language_model_in_one_call:
            return 0
        return all_reduce_max(local, self.device)

    def make_batch(self, cfg: "Config"):
        args = self.args
        question_len = max(1, args.text_len // 2)
        return synthetic_batch(
            self.model, self.tok, batch_size=cfg.batch_size, n_latents=cfg.n_latents, question_len=question_len,
            answer_len=max(1, args.text_len - question_len), image_tokens=args.image_tokens,
            seed=args.seed + 1000 * (self.env.rank + 1) + cfg.batch_size,
        )

    def make_step(self, batch, losses: list, grad_norms: list | None = None):
        """One trainer micro-step (`Trainer.train_epoch`): the batch to the device, pass agreement, forward, backward,
        optimizer step. `step(clock)` calls `clock.mark(phase)` after each phase (`PhaseClock`, `SyncCounter`).
        Each step's loss goes to `losses` and the engine's global gradient norm to `grad_norms` (as they are: a
        device tensor is read at the end of the row, not at each step)."""
        from engine.model.schedule import position_ids_from_mask
        from engine.training.pacing import HostPacer
        from engine.utils.device import to_device_keeping_host

        engine, dev = self.engine, self.device
        pacer = HostPacer(dev, self.zero_stage)  # as the trainer's
        host = [batch.input_ids, batch.attention_mask, batch.labels, position_ids_from_mask(batch.attention_mask)]
        host += [] if batch.pixel_values is None else [batch.pixel_values]
        if dev.type == "cuda":
            host = [t.pin_memory() for t in host]  # as the trainer's DataLoader (pin_memory on CUDA)
        local_passes = 1 + int((batch.input_ids == self.model.latent_id).any(0).sum())

        def step(clock=None):
            with profile_range("train/data"):
                ids, mask, labels, position_ids, *rest = [to_device_keeping_host(t, dev, non_blocking=True)
                                                          for t in host]  # as the trainer's batch_to_device
            if clock is not None:
                clock.mark("data")
            min_passes = self.min_passes(local_passes)
            with profile_range("train/forward"):
                loss = engine(input_ids=ids, attention_mask=mask, pixel_values=rest[0] if rest else None,
                              labels=labels, position_ids=position_ids, return_logits=False,
                              min_passes=min_passes).loss
            pacer.after_forward()
            if clock is not None:
                clock.mark("forward")
            with profile_range("train/backward"):
                pacer.before_backward()
                engine.backward(loss)
            if clock is not None:
                clock.mark("backward")
            with profile_range("train/optimizer"):
                engine.step()
            if clock is not None:
                clock.mark("optimizer")
            losses.append(loss.detach())
            if grad_norms is not None:
                norm = engine.get_global_grad_norm()
                grad_norms.append(norm.detach().clone() if isinstance(norm, torch.Tensor) else norm)

        return step, local_passes

    def measure_phases(self, step) -> dict:
        """`--phase-steps` synchronised steps (per-phase ms and host ms), then one step counting host syncs (CUDA)."""
        ms: dict[str, list[float]] = {p: [] for p in PHASES}
        host: dict[str, list[float]] = {p: [] for p in PHASES}
        for _ in range(self.args.phase_steps):
            clock = PhaseClock(self.device)
            step(clock)
            for phase in PHASES:
                ms[phase].append(clock.ms[phase])
                host[phase].append(clock.host_ms[phase])
        syncs = None
        if self.device.type == "cuda":
            synchronize(self.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                counter = SyncCounter(caught)
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with counter.counting():
                        step(counter)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = counter.counts
        return {"ms": ms, "host_ms": host, "syncs": syncs}

    def alternate_replacements(self, step, cfg: "Config", losses: list) -> dict:
        """`--alternate`: timed steps of this engine in rounds, alternating the row's ZeRO-3 replacements as built
        ("as built") with each of `args.alternate` switched back to DeepSpeed's own, the order reversed every other
        round; one untimed step after each switch. A replacement the row runs without (its settings, or the trainer
        could not install it) is not alternated, but its steps still run, as built and untimed: every ZeRO-3 row
        trains the same steps, so the rows of one engine after it compare their losses after the same sequence.
        Returns per setting the step times (ms, this rank) and which replacements were installed, and those
        installed at the end: the row's own again, also after an error. The alternation's losses are dropped from the
        row's. Every rank switches alike, so the collectives stay in lockstep."""
        args = self.args
        if cfg.zero_stage != 3:
            return {"settings": {"as built": {"unavailable": "ZeRO-3 rows only"}}}
        keys = ["as built"] + [f"{name} off" for name in args.alternate]
        if self.requested_grad_checks == "deepspeed":
            built, settings = {}, dict.fromkeys(keys, "DeepSpeed's own throughout (grad_checks=deepspeed)")
        else:
            built = replacements_active()
            settings = {"as built": None}
            for name in args.alternate:
                settings[f"{name} off"] = None if built[name] else "not installed in this row"
        names = [name for name in args.alternate if built.get(name)]
        samples: dict[str, list[list[float]]] = {key: [] for key, why in settings.items() if why is None}
        active: dict[str, dict] = {}

        def switch(to: str) -> None:
            for name in names:
                replacement(name, to != f"{name} off")

        kept = len(losses)
        try:
            for round_ in range(args.alternate_rounds):
                for key in (keys if round_ % 2 == 0 else keys[::-1]):
                    switch(key if key in samples else "as built")
                    if key in samples:
                        active.setdefault(key, replacements_active())
                    timing = time_fn(step, self.device, warmup=1, repeats=args.alternate_steps)
                    if key in samples:
                        samples[key].append(list(timing.samples_ms))
        finally:
            switch("as built")
            del losses[kept:]
        out = {key: ({"rounds_ms": samples[key], "active": active[key]} if why is None else {"unavailable": why})
               for key, why in settings.items()}
        return {"settings": out, "active_after": replacements_active()}

    def profile_phase(self, step, phase: str) -> dict:
        """One more step with `phase` under torch.profiler or cProfile (`PhaseProfiler`)."""
        profiler = PhaseProfiler(self.device, phase, self.args.profile_tool)
        try:
            step(profiler)
        finally:
            profiler.stop()
        return profiler.summary()

    def run_config(self, cfg: Config) -> dict:
        """Time one configuration on every rank; returns the merged row (every rank gets the same)."""
        from engine.training.zero_step import settle_skipped_steps

        args, env = self.args, self.env
        batch = self.make_batch(cfg)
        flops = batch_flops(self.sizes, batch, self.model.image_token_id)
        losses: list[torch.Tensor] = []
        grad_norms: list = []  # per step, to compare two rows' training step by step (one batch, the same start)
        step, local_passes = self.make_step(batch, losses, grad_norms)
        # each row sizes its own latent graphs: an earlier row's shapes and measurements do not carry over
        self.model.release_latent_graphs()
        reset_peak_memory(self.device)
        skipped_before = int(getattr(self.engine, "skipped_steps", 0))  # DeepSpeed's overflow-skipped steps
        if env.world_size > 1:
            torch.distributed.barrier()
        counts_before = allocator_counts(self.device)
        timing, status = guarded_time_fn(step, self.device, warmup=args.warmup, repeats=args.steps, log=log)
        # memory pressure over the warmup and timed steps: each retry flushed the allocator's cache (a device sync)
        allocator = None if counts_before is None else {
            k: v - counts_before[k] for k, v in allocator_counts(self.device).items()}
        phases = None
        if status["status"] == "ok" and args.phases:
            try:
                phases = self.measure_phases(step)
            except Exception as e:  # noqa: BLE001 - an OOM here keeps the timing; other errors fail the row
                if not is_oom(e):
                    log.exception("phase measurement failed")
                status = {"status": "oom" if is_oom(e) else "error", "error": "phases: " + str(e).splitlines()[0][:300]}
                del e
                free_memory(self.device)
        profile = None
        if status["status"] == "ok" and args.profile_phase:
            try:
                profile = self.profile_phase(step, args.profile_phase)
                if env.is_main:
                    log.info("%s\n%s", cfg.label(), profile_table(profile))
            except Exception as e:  # noqa: BLE001 - as for the phases: an OOM keeps the timing, other errors fail
                if not is_oom(e):
                    log.exception("profiling the %s phase failed", args.profile_phase)
                status = {"status": "oom" if is_oom(e) else "error", "error": "profile: " + str(e).splitlines()[0][:300]}
                del e
                free_memory(self.device)
        alternation = None
        if status["status"] == "ok" and args.alternate:
            try:
                alternation = self.alternate_replacements(step, cfg, losses)
            except Exception as e:  # noqa: BLE001 - the row's timing stands; the alternation records its error
                if not is_oom(e):
                    log.exception("alternating the ZeRO-3 replacements failed")
                alternation = {"error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
                del e
                free_memory(self.device)
        del grad_norms[len(losses):]  # the alternation's steps, whose losses it dropped
        last_loss = float(losses[-1]) if losses else None
        settle_skipped_steps(self.engine)  # steps the device step skipped, into DeepSpeed's count read below
        mine = dict(
            status=status, samples_ms=None if timing is None else timing.samples_ms,
            peak_gib=peak_memory_gib(self.device), tokens=batch.num_tokens, samples=batch.batch_size,
            seq_len=batch.seq_len, flops=flops, loss=last_loss,
            loss_finite=all(bool(torch.isfinite(v)) for v in losses),
            step_losses=[float(v) for v in losses],
            step_grad_norms=[None if n is None else float(n) for n in grad_norms],
            passes=local_passes, phases=phases, profile=profile, alternation=alternation,
            latent_block=self.model.latent_blocks_described(), allocator=allocator,
            skipped_steps=int(getattr(self.engine, "skipped_steps", 0)) - skipped_before,
        )
        del losses, grad_norms, step
        ranks = gather(mine, env)
        row = merge_ranks(cfg, ranks, args, env.world_size)
        row.update(self.variant)
        if row["status"] != "ok":
            self.release()  # a step that failed half-way leaves ZeRO buffers behind: rebuild for the next config
        free_memory(self.device)
        return row


def config_fields(cfg: Config, args, world_size: int) -> dict:
    return dict(zero_stage=cfg.zero_stage, optimizer=cfg.optimizer, zero_settings=cfg.zero_settings, liger=cfg.liger,
                world_size=world_size, stage_c="/".join(cfg.stage_c), n_latents=cfg.n_latents,
                batch_size=cfg.batch_size, text_len=args.text_len, image_tokens=args.image_tokens)


def merge_ranks(cfg: Config, ranks: list[dict], args, world_size: int) -> dict:
    """One row from every rank's measurements: the step time is the slowest rank's per step; tokens, samples
    and FLOPs are summed over ranks; peak memory is per GPU (max, and the list)."""
    statuses = [r["status"] for r in ranks]
    bad = next((s for s in statuses if s["status"] == "error"), None) or next(
        (s for s in statuses if s["status"] != "ok"), None)
    tokens = sum(r["tokens"] for r in ranks)
    samples = sum(r["samples"] for r in ranks)
    flops = {k: sum(r["flops"][k] for r in ranks) for k in ranks[0]["flops"]}
    peaks = [r["peak_gib"] for r in ranks]
    row = dict(
        config_fields(cfg, args, world_size), global_batch=samples, seq_len=max(r["seq_len"] for r in ranks), passes=max(r["passes"] for r in ranks),
        tokens_per_step=tokens, mean_tokens_per_sample=tokens / samples,
        model_tflop_per_step=flops["total"] / 1e12, flops_terms=flops,
        status="ok" if bad is None else bad["status"],
        skipped_steps=max(r.get("skipped_steps", 0) for r in ranks),  # non-finite gradients: the update was skipped
        # how the latent passes ran: the graphs, eagerly, or eagerly because the graphs did not fit (per rank)
        latent_block=" | ".join(dict.fromkeys(r.get("latent_block") or "-" for r in ranks)),
    )
    if all(r.get("allocator") for r in ranks):  # the worst rank's, over the warmup and timed steps
        row.update(alloc_retries=max(r["allocator"]["num_alloc_retries"] for r in ranks),
                   driver_allocs=max(r["allocator"]["num_device_alloc"] for r in ranks))
    if bad is not None:
        row["error"] = bad.get("error")
        row["failed_ranks"] = [i for i, s in enumerate(statuses) if s["status"] != "ok"]
    row.update(peak_gib=None if None in peaks else max(peaks), peak_gib_per_rank=peaks)  # None: CPU, not tracked
    if bad is None:
        per_step = [max(ms) for ms in zip(*(r["samples_ms"] for r in ranks))]  # the slowest rank sets the pace
        timing = timing_of(per_step)
        seconds = timing.median_ms / 1e3
        row.update(
            median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, steps=timing.repeats,
            samples_per_s=samples / seconds, tokens_per_s=tokens / seconds,
            achieved_tflops_per_gpu=flops["total"] / seconds / world_size / 1e12,
            loss=ranks[0]["loss"], loss_finite=all(r["loss_finite"] for r in ranks),
            step_losses=ranks[0].get("step_losses"), step_grad_norms=ranks[0].get("step_grad_norms"),
        )
    if bad is None and all(r.get("phases") for r in ranks):
        row.update(merge_phases([r["phases"] for r in ranks]))
    if ranks[0].get("profile"):
        row["profile_rank0"] = ranks[0]["profile"]
    if bad is None and all(r.get("alternation") for r in ranks):
        row["alternate"] = merge_alternation([r["alternation"] for r in ranks])
    return row


def merge_alternation(per_rank: list[dict]) -> dict:
    """`--alternate` over ranks: each step's time is the slowest rank's; per setting the median, p10/p90 and each
    round's median, the median against the "as built" setting's, and which replacements were installed (rank 0's).
    A setting one rank did not run is not run; an error on any rank is the row's alternation error."""
    import statistics

    errors = [r["error"] for r in per_rank if "error" in r]
    if errors:
        return {"error": errors[0]}
    keys = list(per_rank[0]["settings"])
    if any(list(r["settings"]) != keys for r in per_rank):
        return {"error": "the ranks alternated different settings"}
    settings: dict = {}
    for key in keys:
        mine = [r["settings"][key] for r in per_rank]
        missing = [m["unavailable"] for m in mine if "rounds_ms" not in m]
        if missing:
            settings[key] = {"unavailable": missing[0]}
            continue
        shapes = {tuple(len(steps) for steps in m["rounds_ms"]) for m in mine}
        if len(shapes) != 1:
            return {"error": f"the ranks timed different numbers of steps for {key!r}"}
        rounds = [[max(steps) for steps in zip(*(m["rounds_ms"][i] for m in mine))] for i in range(len(mine[0]["rounds_ms"]))]
        timing = timing_of([ms for one in rounds for ms in one])
        settings[key] = dict(median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                             round_medians_ms=[statistics.median(one) for one in rounds], steps=timing.repeats,
                             active=mine[0]["active"])
    base = settings.get("as built", {}).get("median_ms")
    for value in settings.values():
        if base and "median_ms" in value:
            value["vs_built"] = value["median_ms"] / base
    return {"settings": settings, "active_after": per_rank[0].get("active_after")}


def merge_phases(per_rank: list[dict]) -> dict:
    """Per phase, the median over the synchronised steps of the slowest rank; host syncs of rank 0."""
    import statistics

    out: dict = {}
    for phase in PHASES:
        out[f"phase_{phase}_ms"] = max(statistics.median(r["ms"][phase]) for r in per_rank)
        out[f"phase_{phase}_host_ms"] = max(statistics.median(r["host_ms"][phase]) for r in per_rank)
    total = sum(out[f"phase_{p}_ms"] for p in PHASES)
    out["phase_step_ms"] = total
    out["optimizer_share"] = out["phase_optimizer_ms"] / total if total > 0 else None
    syncs = per_rank[0].get("syncs")
    if syncs is not None:
        out["host_syncs"] = dict(syncs)
        out["host_syncs_per_step"] = sum(syncs.values())
    return out


def add_loss_diffs(rows: list[dict]) -> None:
    """`probe_loss_diff` and `loss_diff`: against the first variant (optimizer, settings, Liger) run at the same
    ZeRO stage, for the probe; against the row of that variant with the same batch and latents, for the loss after
    the same sequence of steps."""
    first: dict[int, dict] = {}
    for r in rows:
        if r.get("probe_loss") is not None:
            first.setdefault(r["zero_stage"], r)
    for r in rows:
        ref = first.get(r["zero_stage"])
        if ref is None or r.get("probe_loss") is None:
            continue
        variant = lambda x: (x["optimizer"], x["zero_settings"], x["liger"])  # noqa: E731
        r["reference_variant"] = "/".join(variant(ref))
        r["probe_loss_diff"] = r["probe_loss"] - ref["probe_loss"]
        same = [x for x in rows if variant(x) == variant(ref) and x["zero_stage"] == r["zero_stage"]
                and x["batch_size"] == r["batch_size"] and x["n_latents"] == r["n_latents"]]
        if same and same[0].get("loss") is not None and r.get("loss") is not None:
            r["loss_diff"] = r["loss"] - same[0]["loss"]


def add_zero3_ratios(rows: list[dict]) -> None:
    """`zero3_vs_zero2`: a ZeRO-3 row's samples/s over those of the ZeRO-2 row of this run with the same GPUs,
    per-rank batch, latents, optimizer and Liger variant (the one with the same ZeRO settings label, else the
    default's): ZeRO-3's cost on the same GPUs, measured in one process."""
    def key(r):
        return r["world_size"], r["batch_size"], r["n_latents"], r["optimizer"], r["liger"]

    zero2 = {}
    for r in rows:
        if r["zero_stage"] == 2 and r.get("samples_per_s") is not None:
            zero2.setdefault((key(r), r["zero_settings"]), r)
    for r in rows:
        if r["zero_stage"] != 3 or r.get("samples_per_s") is None:
            continue
        ref = zero2.get((key(r), r["zero_settings"])) or zero2.get((key(r), "default"))
        if ref is not None:
            r["zero3_vs_zero2"] = r["samples_per_s"] / ref["samples_per_s"]


def timing_of(samples: list[float]) -> Timing:
    """Median and p10/p90 exactly as `benchmarks.common.time_fn` computes them."""
    import statistics

    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(s), q(0.1), q(0.9), len(s), s)


def add_mfu(row: dict, peak_tflops: float | None, matmul_tflops_sum: float | None, cuda: bool) -> None:
    """MFU against the datasheet peak (× world size) and against the measured matmul rates (summed over GPUs);
    None (n/a) on CPU or without a timing."""
    row["mfu"] = row["mfu_matmul"] = None
    if not cuda or row.get("median_ms") is None:
        return
    flop_per_s = row["model_tflop_per_step"] * 1e12 / (row["median_ms"] / 1e3)
    if peak_tflops:
        row["mfu"] = flop_per_s / (peak_tflops * 1e12 * row["world_size"])
    if matmul_tflops_sum:
        row["mfu_matmul"] = flop_per_s / (matmul_tflops_sum * 1e12)


def load_baseline(path: str | None, args) -> list[dict]:
    """The rows of an earlier run (typically 1 GPU) to compute scaling against; [] without --baseline."""
    if not path:
        return []
    import json

    p = Path(path)
    payload = json.loads((p / f"{RESULT_NAME}.json" if p.is_dir() else p).read_text())
    settings = payload.get("settings", {})
    for key in ("model", "dtype"):
        if settings.get(key) != (dtype_name(args.dtype) if key == "dtype" else args.model):
            log.warning("--baseline %s was measured with %s=%s, this run uses %s", path, key, settings.get(key),
                        getattr(args, key))
    return [dict(r, baseline_world_size=payload.get("world_size", 1)) for r in payload.get("rows", [])
            if r.get("status") == "ok" and r.get("samples_per_s")]


def add_scaling(row: dict, baseline: list[dict]) -> None:
    """Speed-up in global samples/s over the baseline row of the same per-rank batch, latents, text and image
    tokens (same ZeRO stage when the baseline has it, else its fastest), and the scaling efficiency
    speed-up / (world size / baseline world size)."""
    if not baseline or row.get("samples_per_s") is None:
        return
    key = lambda r: (r["batch_size"], r["n_latents"], r["text_len"], r["image_tokens"])  # noqa: E731
    same = [r for r in baseline if key(r) == key(row)]
    if not same:
        return
    ref = next((r for r in same if r["zero_stage"] == row["zero_stage"]), None) or max(
        same, key=lambda r: r["samples_per_s"])
    speedup = row["samples_per_s"] / ref["samples_per_s"]
    row.update(baseline_zero_stage=ref["zero_stage"], baseline_world_size=ref["baseline_world_size"],
               speedup_vs_baseline=speedup,
               scaling_efficiency=speedup / (row["world_size"] / ref["baseline_world_size"]))


# ---------------------------------------------------------------------- report
COLUMNS = [
    ("zero_stage", "ZeRO"), ("optimizer_resolved", "optimizer"), ("zero_settings", "ZeRO settings"),
    ("liger", "Liger"), ("world_size", "GPUs"), ("stage_c", "stage×c"), ("n_latents", "latents"),
    ("batch_size", "batch/rank"), ("seq_len", "T"), ("passes", "passes"), ("latent_block", "latent block"),
    ("status", "status"),
    ("skipped_steps", "skipped steps"),
    ("median_ms", "ms/step"), ("p10_ms", "p10"), ("p90_ms", "p90"), ("samples_per_s", "samples/s"),
    ("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB/GPU"), ("alloc_retries", "alloc retries"),
    ("driver_allocs", "driver allocs"), ("achieved_tflops_per_gpu", "TFLOP/s/GPU"),
    ("mfu", "MFU"), ("mfu_matmul", "MFU (matmul)"), ("speedup_vs_baseline", "× baseline"),
    ("baseline_zero_stage", "baseline ZeRO"), ("scaling_efficiency", "scaling eff."),
    ("zero3_vs_zero2", "× ZeRO-2"), ("phase_data_ms", "data ms"), ("phase_forward_ms", "fwd ms"), ("phase_backward_ms", "bwd ms"),
    ("phase_backward_host_ms", "bwd host ms"), ("phase_optimizer_ms", "opt ms"),
    ("phase_optimizer_host_ms", "opt host ms"), ("optimizer_share", "opt share"),
    ("host_syncs_per_step", "syncs/step"), ("grad_hooks", "grad hooks"), ("grad_checks", "grad checks"),
    ("loss", "loss"),
    ("probe_loss_diff", "Δ probe loss"), ("loss_diff", "Δ loss"),
]
STDOUT_COLUMNS = [c for c in COLUMNS if c[0] not in ("p10_ms", "p90_ms", "passes", "latent_block", "loss", "driver_allocs",
                                                     "baseline_zero_stage", "phase_backward_host_ms",
                                                     "phase_optimizer_host_ms")]


def header(payload: dict) -> str:
    s = payload["settings"]
    ref = payload.get("matmul_tflops")
    ref_text = "not measured" if ref is None else ", ".join(f"{v:.0f}" for v in ref) + " TFLOP/s (per rank)"
    return (
        f"# Training step (DeepSpeed)\n\n{s['model']}, {s['dtype']}, world size {payload['world_size']} "
        f"({payload['launcher']}), text {s['text_len']} + {s['image_tokens']} image tokens per row, "
        f"warmup {s['warmup']}, {s['steps']} timed steps. Peak for MFU: {s['peak_tflops']} TFLOP/s per GPU; "
        f"measured {payload['settings']['matmul_size']}³ bf16 matmul: {ref_text}.\n\n```\n{FLOPS_FORMULA}\n```"
    )


BASELINE_KEYS = ("speedup_vs_baseline", "baseline_zero_stage", "scaling_efficiency")


# shown when some row differs from this value
OPTIONAL_KEYS = {"zero_settings": "default", "liger": "none", "skipped_steps": 0, "alloc_retries": 0}


def columns_for(rows: list[dict], columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The scaling columns only when some row was compared with a --baseline; phase, sync and variant columns only
    when some row has them."""
    keep = []
    for key, title in columns:
        if key in BASELINE_KEYS and not any("speedup_vs_baseline" in r for r in rows):
            continue
        if key in OPTIONAL_KEYS and all(r.get(key, OPTIONAL_KEYS[key]) == OPTIONAL_KEYS[key] for r in rows):
            continue
        optional = key.startswith("phase_") or key in ("optimizer_share", "host_syncs_per_step", "probe_loss_diff",
                                                       "loss_diff", "zero3_vs_zero2", "driver_allocs")
        if optional and all(r.get(key) is None for r in rows):
            continue
        keep.append((key, title))
    return keep


def report(payload: dict) -> str:
    parts = ["## All rows\n\n" + markdown_table(payload["rows"], columns_for(payload["rows"], COLUMNS))]
    alternated = []
    for r in payload["rows"]:
        alternation = r.get("alternate") or {}
        label = " ".join(str(v) for v in (f"ZeRO-{r['zero_stage']}", r["optimizer"], r["zero_settings"], r["liger"],
                                          f"batch {r['batch_size']}", f"latents {r['n_latents']}"))
        if "error" in alternation:
            alternated.append(dict(config=label, setting="—", median="failed: " + alternation["error"]))
        for key, value in alternation.get("settings", {}).items():
            if "median_ms" not in value:
                alternated.append(dict(config=label, setting=key, median="not run: " + str(value["unavailable"])))
                continue
            alternated.append(dict(
                config=label, setting=key, median=f"{value['median_ms']:.1f}",
                spread=f"{value['p10_ms']:.1f}-{value['p90_ms']:.1f}", ratio=f"{value.get('vs_built', float('nan')):.3f}",
                rounds=", ".join(f"{ms:.1f}" for ms in value["round_medians_ms"])))
    if alternated:
        parts.append("## ZeRO-3 replacements alternated in one engine (--alternate)\n\nSteps of the same engine in "
                     "rounds, each setting in every round: the row's replacements as built, or one switched back "
                     "to DeepSpeed's own; ms per step (the slowest rank's).\n\n" + markdown_table(alternated, [
                         ("config", "config"), ("setting", "setting"), ("median", "median ms"),
                         ("spread", "p10-p90 ms"), ("ratio", "× as built"), ("rounds", "round medians ms")]))
    if payload.get("skipped_configs"):
        parts.append("Not run (time budget): " + "; ".join(payload["skipped_configs"]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.training.distributed import all_reduce_max, init_distributed

    if args.device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # steadier CPU timings; set OMP_NUM_THREADS to choose otherwise
    env = init_distributed(args.device_type, args.local_rank, expandable_segments=args.cuda_expandable_segments)
    cuda = env.device.type == "cuda"
    if not env.is_main:
        log.setLevel(logging.WARNING)
    rates = gather(matmul_tflops(env.device, args.matmul_size), env)
    matmul = None if None in rates else rates
    out_dir = Path(args.out)
    payload = {
        "benchmark": RESULT_NAME,
        "command": launch_command(env.world_size, argv),
        "launcher": launcher_name(env.world_size),
        "world_size": env.world_size,
        "environment": environment_info(env.device),
        "settings": {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()
                     if k != "local_rank"},
        "flops_formula": FLOPS_FORMULA,
        "matmul_tflops": matmul,
        "rows": [],
        "skipped_configs": [],
    }
    configs = build_configs(args.zero_stages, args.batch_sizes, args.stages, args.c_thought, args.optimizers,
                            args.zero_settings, args.liger)
    args.max_latents = max(c.n_latents for c in configs)
    bench = Bench(args, env)
    baseline = load_baseline(args.baseline, args)
    build_failed: dict[tuple, dict] = {}
    start = time.perf_counter()
    for i, cfg in enumerate(progress(configs, desc="train step", unit="config", disable=None if env.is_main else True)):
        # every rank must take the same decision, or the collectives of the next step would hang
        over = all_reduce_max(int(args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s),
                              env.device)
        if over:
            payload["skipped_configs"].append(cfg.label())
            continue
        if env.is_main:
            log.info("[%d/%d, %.0f s] %s", i + 1, len(configs), time.perf_counter() - start, cfg.label())
        if cfg.engine_key in build_failed:
            row = dict(config_fields(cfg, args, env.world_size), **build_failed[cfg.engine_key])
        else:
            if bench.engine is None or bench.key != cfg.engine_key:
                failure = bench.try_build(cfg)
                if failure is not None:  # out of memory before any step: every config of this engine variant
                    build_failed[cfg.engine_key] = failure
                    row = dict(config_fields(cfg, args, env.world_size), **failure)
                payload["model_sizes"] = bench.sizes
            if cfg.engine_key not in build_failed:
                row = bench.run_config(cfg)
                add_mfu(row, args.peak_tflops, None if matmul is None else sum(matmul), cuda)
                add_scaling(row, baseline)
        payload["rows"].append(row)
        add_loss_diffs(payload["rows"])
        add_zero3_ratios(payload["rows"])
        if env.is_main:
            if row["status"] != "ok":
                log.warning("%s: %s (%s)", cfg.label(), row["status"], row.get("error"))
            if row.get("skipped_steps"):
                log.warning("%s: %d optimizer steps skipped for non-finite gradients (its times and losses include "
                            "steps that updated nothing)", cfg.label(), row["skipped_steps"])
            write_results(out_dir, RESULT_NAME, payload, report(payload), header=header(payload))
    bench.release()
    # an error or a non-finite loss fails the run; so does a sweep in which nothing could be measured (every
    # configuration invalid or out of memory: a mistyped setting, say), where single invalid combinations do not
    nothing_measured = bool(payload["rows"]) and not any(r["status"] == "ok" for r in payload["rows"])
    rc = 1 if nothing_measured or any(r["status"] == "error" or r.get("loss_finite") is False
                                      for r in payload["rows"]) else 0  # fmt: skip
    if env.is_main:
        paths = write_results(out_dir, RESULT_NAME, payload, report(payload), header=header(payload))
        print(f"\n{FLOPS_FORMULA}\n\n{markdown_table(payload['rows'], columns_for(payload['rows'], STDOUT_COLUMNS))}\n", flush=True)
        log.info("wrote %s and %s", paths["json"], paths["md"])
        if payload["skipped_configs"]:
            log.warning("time budget reached: %d configuration(s) not run", len(payload["skipped_configs"]))
        if rc:
            log.error("no configuration could be measured, or one raised an error or gave a non-finite loss (see "
                      "status/loss_finite in %s)", paths["json"])  # fmt: skip
    return rc


if __name__ == "__main__":
    from benchmarks.common import run_harness
    logging.captureWarnings(True)
    from engine.training.distributed import shutdown_distributed

    code = None
    try:
        code = run_harness(main)
    finally:  # a process group left to exit-time destruction can abort the process after a good run
        # the statuses main returns itself; after an error (run_harness's 2) a peer may never reach a barrier
        shutdown_distributed(wait_for_peers=code in (0, 1))
    sys.exit(code)
