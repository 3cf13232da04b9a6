"""Typed training configuration. YAML files and `--set key=value` overrides map onto `TrainConfig`.

Keys keep the original CoCoNuT names where they exist (c_thought, epochs_per_stage, max_latent_stage,
pad_latent_to_max, uniform_prob, cot, no_cot, no_thoughts, coconut, reset_optimizer, save_only_improve,
load_model_path, resume, only_eval, ...). An unknown key or a value of the wrong type is an error that
names the key (and the valid keys, or the expected type).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.data.synthetic import SyntheticSettings
from engine.utils.logging import first_line, get_logger

log = get_logger("config")


class ConfigError(ValueError):
    pass


# `optimizer`: see engine/training/optim.py (auto: deepspeed_cpu_adam when the optimizer states are offloaded,
# else adamw_fused on CUDA, adamw_foreach elsewhere)
OPTIMIZERS = ("auto", "adamw_fused", "adamw_foreach", "adamw", "deepspeed_fused_adam", "deepspeed_cpu_adam")


@dataclass
class TrainConfig:
    # ---- run, model and data (original CoCoNuT names)
    name: str = "coconut"
    model_id: str = "tiny"  # a load_model spec ("tiny", "internvl3-{1b,2b,8b}-geometry") or a local checkpoint
    model_overrides: dict = field(default_factory=dict)  # sizes of the "tiny" spec
    train_path: str | None = None
    val_path: str | None = None
    save_path: str = "runs"
    synthetic: dict | None = None  # generate the synthetic task into <run>/data when train_path is unset
    load_model_path: str | None = None  # a transformers-format export to start from
    # true: continue exactly from <run>/checkpoints/latest; an int N (the original's meaning): start a fresh
    # run at epoch N, i.e. at stage N // epochs_per_stage (used with load_model_path to skip the CoT stage)
    resume: bool | int = False
    overwrite: bool = False  # a fresh run may delete the checkpoints and exports of an earlier run in its directory
    allow_config_changes: list = field(default_factory=list)  # keys a resume may change in data, model, curriculum
    only_eval: bool = False
    predictions_path: str | None = None  # only_eval: where to write official-format predictions

    # ---- method (original CoCoNuT names)
    coconut: bool = True  # false without cot / no_cot / no_thoughts: thoughts not fed back (sets pause_as_thought)
    cot: bool = False
    no_cot: bool = False
    # the paper's ablations (Table 1): w/o thought (the stages drop steps, no thoughts in their place; the
    # original's key), pause as thought (the thought positions take the `<|latent|>` token's own learned
    # embedding: same curriculum, no feedback), w/o curriculum (after stage 0, every epoch at the final stage)
    no_thoughts: bool = False
    pause_as_thought: bool = False
    no_curriculum: bool = False
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 3
    pad_latent_to_max: bool = False
    # a random stage (0..steps) for this share of the training samples. 0.3, not the original's 0.0: trained from
    # stage 1 on, the final stage (answer from thoughts alone) no longer starts cold (benchmarks/RESULTS.md)
    uniform_prob: float = 0.3
    # the first scheduled stage whose samples are mixed: 1 keeps stage 0 a plain chain of thought (the original
    # mixes from stage 0: set 0 for that)
    uniform_prob_from_stage: int = 1
    max_length: int = 2048

    # ---- optimisation (original CoCoNuT names)
    num_epochs: int = 4
    batch_size_training: int = 8  # per process, per micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    # a fresh AdamW state, with warmup_steps of warmup again: true at every stage switch (the original's README);
    # every_epoch at the start of every epoch after the first (the original's code, which builds a new optimizer
    # in each epoch)
    reset_optimizer: bool | str = False
    save_only_improve: bool = False
    bf16: bool = False  # used on GPU; CPU runs train in fp32
    seed: int = 0

    # ---- engine settings
    zero_stage: int = 2
    warmup_steps: int = 0  # linear LR warmup at the start, and after every optimizer reset
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    # auto (adamw_fused on CUDA, adamw_foreach elsewhere) | adamw_fused | adamw_foreach | adamw (torch's per-tensor
    # loop) | deepspeed_fused_adam (DeepSpeed's CUDA extension, built with nvcc on first use)
    optimizer: str = "auto"
    # the gradient norm, overflow check and clipping of a ZeRO step (engine/training/zero_step.py): auto (where
    # the setup allows, on the device with no host wait, the fused AdamW skipping a non-finite step; else
    # multi_tensor) | multi_tensor (one pass over all gradients inside DeepSpeed's step) | deepspeed (its loops);
    # under ZeRO-3, auto and multi_tensor also release the persistent parameters in one pass and give the
    # parameter gathers one collective and one copy-out per bucket (engine/training/zero3_gathers.py)
    zero_grad_checks: str = "auto"
    # Liger-Kernel's Triton kernels (optional package): false | true (all) | a list of fused_linear_cross_entropy,
    # rms_norm, swiglu, rope. The fused loss needs zero_stage <= 2; rope replaces transformers' Qwen2 rotary
    # function process-wide (engine/model/liger.py)
    liger_kernels: bool | list = False
    max_tiles: int = 1
    num_workers: int = 0
    attn_implementation: str = "sdpa"
    # how the one-position latent passes run (MultimodalCoconut.set_latent_passes): auto (CUDA graphs on GPU; under
    # ZeRO-3 with the language model as a leaf they read staged copies of its weights, which also take their
    # gradients: a copy of the decoder layers' weights, and the graphs' activations, kept for good. Where those do
    # not fit beside the step's peak (measured over the first two steps, which run eagerly) the block runs eagerly,
    # with a warning) | transformers | static | cuda_graph;
    # the buckets trade captured graphs against padded work
    latent_passes: str = "auto"
    latent_prefix_bucket: int = 128
    latent_final_bucket: int = 32
    # the layers' elementwise work in training forwards: the decoder layers' norms, rotary embedding and SwiGLU
    # product (the latent block, and the multi-position passes, then run through the layer stack) and the vision
    # layers' LayerNorms with their layer-scaled residual adds (not when compile_vision_layers compiles them):
    # auto (Triton kernels with their backward on CUDA, after a self-check) | fused | reference (transformers'
    # modules and calls)
    layer_ops: str = "auto"
    # ZeRO-3: the language model as one leaf module, gathered once per forward and once per backward whatever the
    # number of latent passes (MultimodalCoconut.set_language_model_leaf); false: gathered per module and per pass
    zero3_leaf_language_model: bool = True
    # ZeRO-3: the vision tower as one leaf module, gathered once per forward and once per backward instead of per
    # module (MultimodalCoconut.set_vision_tower_leaf); false: DeepSpeed's per-module gathers
    zero3_leaf_vision_tower: bool = True
    # ZeRO-3: each leaf module's gradients reduced together when its backward is done (one layout kernel, one
    # reduce-scatter and multi-tensor adds per bucket, engine/training/zero3_gathers.py) instead of DeepSpeed's
    # per-parameter loop; the same parameters bit for bit (tests/test_distributed.py). On two H200s at the 1B
    # geometry: the backward 90-120 ms shorter at batch 16 (host-bound), level or 3% faster at batch 64
    # (benchmarks/RESULTS.md); false: DeepSpeed's loop
    zero3_flat_leaf_reduction: bool = True
    # checkpoint every decoder layer (only layer inputs kept for backward; the KV cache of the passes is kept):
    # less activation memory for one more forward of the layers; the latent passes then run as transformers calls
    activation_checkpointing: bool = False
    # torch.compile each vision-tower encoder layer (regional, in place: names and checkpoints unchanged) so that
    # Inductor fuses its LayerNorms, layer scales, residual adds and GELU around the matmuls; ZeRO 0-2 only
    # (engine/model/compiled.py)
    compile_vision_layers: bool = False
    eval_batch_size: int = 16
    # the KV cache of validation generation: auto (paged on GPU under ZeRO 0-2: Triton paged attention, prefix
    # sharing, CUDA-graphed steps) | dynamic (transformers' DynamicCache) | paged
    eval_kv_cache: str = "auto"
    max_new_tokens: int = 64
    eval_max_samples: int | None = None  # cap validation generation (None: the whole set)
    # how val_accuracy matches an answer: normalized (case, spaces, trailing punctuation, commas in numbers) |
    # original (the original CoCoNuT's exact match after its cut at the last '#' and removal of every comma)
    answer_match: str = "normalized"
    eval_every_epochs: int = 1
    keep_checkpoints: int = 2  # DeepSpeed checkpoints kept on disk (latest first)
    log_every_steps: int = 10
    device: str = "auto"  # auto | cpu | cuda
    # CUDA's caching allocator with expandable segments (less fragmentation near a full device: at the 8B geometry
    # under ZeRO-3 no allocator retries and ~12% faster steps), unless PYTORCH_ALLOC_CONF or
    # PYTORCH_CUDA_ALLOC_CONF is set (engine/training/distributed.py)
    cuda_expandable_segments: bool = True
    # only_eval: the curriculum stage of the prompts (default: the stage the loaded export was trained at, from its
    # coconut_training_state.json or its run's history; else max_latent_stage, whose prompts every later stage's
    # repeat; 0 with cot or no_cot)
    eval_stage: int | None = None
    overlong: str = "drop"  # samples longer than max_length: drop (counted, with a warning) | error
    check_images: bool = True  # decode every image of the train and val files before training starts
    deepspeed: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config
    # Weights & Biases logging beside metrics.jsonl and TensorBoard, e.g. {project: coconut, mode: offline};
    # keys: project, name (default: the run's name), entity, group, tags, notes, mode (online | offline | disabled)
    wandb: dict | None = None

    def __post_init__(self):
        modes = [name for name in ("cot", "no_cot", "no_thoughts") if getattr(self, name)]
        if len(modes) > 1:
            raise ConfigError(f"cot, no_cot and no_thoughts are exclusive; set at most one, got {' and '.join(modes)}")
        if self.pause_as_thought and modes:
            raise ConfigError(f"pause_as_thought needs thought positions in the sequences; it cannot go with {modes[0]}")
        if self.no_curriculum and (self.cot or self.no_cot):
            raise ConfigError("no_curriculum changes the latent stages; it does not apply to cot or no_cot")
        if modes:  # as in the original: no thoughts are fed back in these modes
            self.coconut = False
        elif not self.coconut:  # the original's latent curriculum without its Coconut wrapper (its special-token
            self.pause_as_thought = True  # run): <|latent|> an ordinary token, which is pause as thought
        positive = ("c_thought", "epochs_per_stage", "num_epochs", "batch_size_training", "gradient_accumulation_steps",
                    "max_length", "eval_batch_size", "max_tiles", "eval_every_epochs", "keep_checkpoints", "log_every_steps",
                    "latent_prefix_bucket", "latent_final_bucket")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.name or self.name in (".", "..") or any(sep in self.name for sep in ("/", "\\", "\0")):
            raise ConfigError(f"name must be one folder name (the run directory is save_path/name), got {self.name!r}")
        if not isinstance(self.resume, bool) and not 0 <= self.resume < self.num_epochs:
            raise ConfigError(f"resume as an epoch must be in [0, num_epochs={self.num_epochs}), got {self.resume}")
        if self.max_latent_stage < 0:
            raise ConfigError(f"max_latent_stage must be >= 0, got {self.max_latent_stage}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ConfigError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if self.uniform_prob_from_stage < 0:
            raise ConfigError(f"uniform_prob_from_stage must be >= 0, got {self.uniform_prob_from_stage}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.latent_passes not in ("auto", "transformers", "static", "cuda_graph"):
            raise ConfigError(
                f"latent_passes must be auto, transformers, static or cuda_graph, got {self.latent_passes!r}"
            )
        if self.layer_ops not in ("auto", "fused", "reference"):
            raise ConfigError(f"layer_ops must be auto, fused or reference, got {self.layer_ops!r}")
        if self.zero_stage == 3 and self.latent_passes == "cuda_graph" and not self.zero3_leaf_language_model:
            raise ConfigError(
                "latent_passes=cuda_graph with zero_stage=3 needs zero3_leaf_language_model=true (a graph cannot "
                "replay ZeRO-3's per-module gathers; with the leaf it reads staged copies of the gathered weights)"
            )
        if self.activation_checkpointing and self.latent_passes in ("static", "cuda_graph"):
            raise ConfigError(
                f"activation_checkpointing runs the latent passes as transformers calls, but latent_passes is "
                f"{self.latent_passes}; use auto or transformers"
            )
        if self.zero_stage == 3 and self.latent_passes == "static" and not self.zero3_leaf_language_model:
            raise ConfigError(
                "latent_passes=static with zero_stage=3 needs zero3_leaf_language_model=true (the block reads the "
                "layers' weights directly, which ZeRO-3 gathers only for the language model as one leaf module)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.compile_vision_layers and self.zero_stage == 3:
            raise ConfigError("compile_vision_layers needs zero_stage <= 2: ZeRO-3 fetches and releases each module's "
                              "weights around its call, which a compiled region cannot trace through")
        if self.deepspeed:
            check_deepspeed_overrides(self.deepspeed, self.zero_stage)
        if self.zero_grad_checks not in ("auto", "multi_tensor", "deepspeed"):
            raise ConfigError(f"zero_grad_checks must be auto, multi_tensor or deepspeed, got {self.zero_grad_checks!r}")
        pieces = self.liger_pieces
        if "fused_linear_cross_entropy" in pieces and self.zero_stage == 3:
            raise ConfigError(
                "liger_kernels: fused_linear_cross_entropy needs zero_stage <= 2 (it reads the lm_head weight outside "
                "the module call, where ZeRO-3 has it partitioned); drop it or use zero_stage 2"
            )
        if self.eval_kv_cache not in ("auto", "dynamic", "paged"):
            raise ConfigError(f"eval_kv_cache must be auto, dynamic or paged, got {self.eval_kv_cache!r}")
        if self.zero_stage == 3 and self.eval_kv_cache == "paged":
            raise ConfigError(
                "eval_kv_cache=paged needs zero_stage <= 2 (the paged runner reads the layers' weights directly, "
                "ZeRO-3 only gathers them inside module calls); use auto or dynamic"
            )
        if isinstance(self.reset_optimizer, str) and self.reset_optimizer != "every_epoch":
            raise ConfigError(f"reset_optimizer must be true (at every stage switch), false or every_epoch, "
                              f"got {self.reset_optimizer!r}")
        if self.answer_match not in ("normalized", "original"):
            raise ConfigError(f"answer_match must be normalized or original, got {self.answer_match!r}")
        if self.overlong not in ("drop", "error"):
            raise ConfigError(f"overlong must be drop or error, got {self.overlong!r}")
        if self.eval_stage is not None and self.eval_stage < 0:
            raise ConfigError(f"eval_stage must be >= 0, got {self.eval_stage}")
        for key in ("lr", "weight_decay", "min_lr_ratio", "max_grad_norm", "uniform_prob"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.seed >= 2**63:
            raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("warmup_steps", "num_workers", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            raise ConfigError(f"eval_max_samples must be >= 1 or null, got {self.eval_max_samples}")
        if self.synthetic is not None:
            try:
                SyntheticSettings.from_dict(self.synthetic)
            except ValueError as e:
                raise ConfigError(f"synthetic: {e}") from None
        unknown = [k for k in self.allow_config_changes if k not in _FIELD_NAMES]
        if unknown:
            raise ConfigError(f"allow_config_changes names unknown key(s) {unknown}; valid keys: {', '.join(_FIELD_NAMES)}")
        if self.wandb is not None:
            check_wandb_settings(self.wandb)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        from engine.model.loading import BUILTIN_SPECS  # here: the loader imports torch, this module does not

        if self.only_eval and not self.load_model_path and self.model_id in BUILTIN_SPECS:
            raise ConfigError("only_eval needs load_model_path (or a local checkpoint as model_id) to evaluate")

    @property
    def liger_pieces(self) -> tuple[str, ...]:
        """`liger_kernels` as a tuple of pieces (validated: an unknown name is an error naming the valid ones)."""
        from engine.model.liger import LIGER_KERNELS  # the model side owns the list (and imports torch)

        value = self.liger_kernels
        if isinstance(value, bool):
            return LIGER_KERNELS if value else ()
        unknown = [v for v in value if v not in LIGER_KERNELS]
        if unknown:
            raise ConfigError(f"liger_kernels: unknown piece(s) {unknown}; valid: {', '.join(LIGER_KERNELS)} (or true/false)")
        return tuple(dict.fromkeys(value))

    @property
    def synthetic_settings(self) -> SyntheticSettings:
        return SyntheticSettings.from_dict(self.synthetic)

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig)]

WANDB_KEYS = ("project", "name", "entity", "group", "tags", "notes", "mode")
WANDB_MODES = ("online", "offline", "disabled")


def check_wandb_settings(settings: dict) -> None:
    unknown = [k for k in settings if k not in WANDB_KEYS]
    if unknown:
        raise ConfigError(f"wandb: unknown key(s) {unknown}; valid keys: {', '.join(WANDB_KEYS)}")
    mode = settings.get("mode", "online")
    if mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    for key in ("project", "name", "entity", "group", "notes"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ConfigError(f"wandb.{key} must be a string, got {settings[key]!r}")
    tags = settings.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ConfigError(f"wandb.tags must be a list of strings, got {tags!r}")


# ---------------------------------------------------------------------- resume
# The keys a resumed run may not change silently: they decide what the saved weights and optimizer state mean.
RESUME_GUARDED_KEYS = {
    "data": ("train_path", "val_path", "synthetic", "seed", "max_tiles"),
    "model": ("model_id", "model_overrides", "load_model_path"),
    "curriculum": ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "no_curriculum", "c_thought",
                   "epochs_per_stage", "max_latent_stage", "pad_latent_to_max", "uniform_prob", "uniform_prob_from_stage",
                   "max_length", "overlong"),
}
# Keys of earlier versions, by their current names (a config that still uses one gets an error naming the new one).
RENAMED_KEYS = {"latent_block_ops": "layer_ops"}
# Keys of the original CoCoNuT's config files that mean nothing here: accepted, so that its files load as they are,
# and dropped with a warning that says why.
ORIGINAL_ONLY_KEYS = {
    "project": "its W&B project (W&B logging here: wandb: {project: ...})",
    "local": "a local copy of model_id (model_id and load_model_path are local paths here)",
    "local_path": "a local copy of model_id (model_id and load_model_path are local paths here)",
    "special_token": "not read by the original's training code",
    "debug": "the original's small-subset debug mode (not built here: cut the data files instead)",
}
# Keys that steer a launch rather than describe the run.
_LAUNCH_KEYS = ("resume", "overwrite", "allow_config_changes")


def guarded_config_changes(saved: dict, current: dict, *, every_key: bool = False) -> dict[str, tuple]:
    """{key: (saved value, current value)} for the data, model and curriculum keys that differ (every key but the
    launch keys with `every_key`). Keys the saved config does not have (an older version) are not compared."""
    keys = [k for group in RESUME_GUARDED_KEYS.values() for k in group]
    if every_key:
        keys = [k for k in _FIELD_NAMES if k not in _LAUNCH_KEYS]
    normal = json.loads(json.dumps(current))  # as it would be saved: tuples become lists, paths strings
    return {k: (saved[k], normal[k]) for k in keys if k in saved and k in normal and saved[k] != normal[k]}


# ---------------------------------------------------------------------- YAML / overrides
# DeepSpeed settings the trainer derives from its own keys: an override would make DeepSpeed count steps, clip or
# schedule differently from the trainer (precision sections, bf16 and fp16, stay open to overrides)
DEEPSPEED_KEYS_OF_THE_TRAINER = {
    "train_micro_batch_size_per_gpu": "batch_size_training",
    "train_batch_size": "batch_size_training (and gradient_accumulation_steps, world size)",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
    "optimizer": "optimizer, lr and weight_decay",
    "scheduler": "lr_schedule, warmup_steps and min_lr_ratio",
}
# top-level sections of a DeepSpeed config (besides the scalar keys of `deepspeed.runtime.constants`), to tell a
# misspelt key from one this list does not know
DEEPSPEED_SECTIONS = ("zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb",
                      "csv_monitor", "comet", "comms_logger", "aio", "compression_training", "data_efficiency",
                      "autotuning", "elasticity", "nebula", "checkpoint", "data_types", "pipeline", "amp", "timers",
                      "compile", "torch_autocast", "tensor_parallel", "weight_quantization", "hybrid_engine")  # fmt: skip


def check_deepspeed_overrides(overrides: dict, zero_stage: int = 2) -> None:
    """ConfigError for a `deepspeed` override that the trainer sets from its own keys (naming that key), one that
    would do nothing here (DeepSpeed's activation checkpointing, which the model does not call; ZeRO-3's settings
    under another stage), a section that is not a mapping, a `zero_optimization` that DeepSpeed's own schema
    refuses, or a top-level key that is a near miss of a DeepSpeed key (a misspelt key is otherwise ignored by
    DeepSpeed without a word). Keys this check does not know are passed through; `optim.check_deepspeed_config`
    then reads the whole config as DeepSpeed will."""
    import difflib

    for key, ours in DEEPSPEED_KEYS_OF_THE_TRAINER.items():
        if key in overrides:
            raise ConfigError(f"deepspeed.{key} is set by the trainer from {ours}; set that instead")
    for key in (*DEEPSPEED_SECTIONS, "bf16", "fp16"):
        if key in overrides and not isinstance(overrides[key], dict):
            raise ConfigError(f"deepspeed.{key} must be a mapping of its settings (--set deepspeed.{key}.<setting>="
                              f"<value>), got {overrides[key]!r}")
    if "activation_checkpointing" in overrides:
        raise ConfigError("deepspeed.activation_checkpointing: the model does not call DeepSpeed's activation "
                          "checkpointing, so these settings would do nothing; set activation_checkpointing: true (the "
                          "trainer's own, per decoder layer, through the cached multi-pass forward)")
    steps = overrides.get("steps_per_print")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ConfigError(f"deepspeed.steps_per_print must be an integer >= 1, got {steps!r}")
    zero = overrides.get("zero_optimization")
    if zero and "stage" in zero:
        raise ConfigError("deepspeed.zero_optimization.stage is set by the trainer from zero_stage; set that instead")
    if zero and zero_stage == 0 and ("offload_optimizer" in zero or "offload_param" in zero):
        raise ConfigError("deepspeed.zero_optimization: offloading needs ZeRO (zero_stage 1, 2 or 3); at zero_stage=0 "
                          "DeepSpeed ignores it")
    if zero and zero_stage < 3:
        only_three = sorted(k for k in zero if k.startswith("stage3_") or k in ("offload_param", "zero_hpz_partition_size",
                                                                                "zero_quantized_weights"))
        if only_three:
            raise ConfigError(f"deepspeed.zero_optimization: {only_three} apply to ZeRO-3 only and would do nothing "
                              f"at zero_stage={zero_stage}; drop them, or set zero_stage=3")
    try:
        import deepspeed.runtime.constants as constants
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # noqa: BLE001 - DeepSpeed missing or broken: the engine's build reports it
        return
    if zero:
        fields = set(DeepSpeedZeroConfig.model_fields) | {
            a.alias for a in DeepSpeedZeroConfig.model_fields.values() if a.alias
        }
        unknown = sorted(set(zero) - fields)
        if unknown:
            hints = {k: difflib.get_close_matches(k, sorted(fields), n=1) for k in unknown}
            listed = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ConfigError(f"deepspeed.zero_optimization: unknown key(s) {listed}")
    known = {v for n, v in vars(constants).items() if n.isupper() and isinstance(v, str)} | set(DEEPSPEED_SECTIONS)
    for key in overrides:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
            if near:
                raise ConfigError(f"deepspeed: unknown key {key!r}; did you mean {near[0]!r}?")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`) and refuses a key given twice in
    one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+$"),
    list("-+0123456789."),
)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if annotation is list or origin is list:
        return isinstance(value, list)
    return True


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    dropped = [k for k in data if k in ORIGINAL_ONLY_KEYS]
    if dropped:
        log.warning("%s: the original CoCoNuT's key(s) %s ignored: %s", where, dropped,
                    "; ".join(f"{k}: {ORIGINAL_ONLY_KEYS[k]}" for k in dropped))
        data = {k: v for k, v in data.items() if k not in ORIGINAL_ONLY_KEYS}
    if data.get("load_model_path") == "None":  # the original's spelling of "no model to load"
        data = {**data, "load_model_path": None}
    unknown = [k for k in data if k not in hints]
    renamed = {old: new for old, new in RENAMED_KEYS.items() if old in unknown}
    if renamed:
        raise ConfigError(f"{where}: " + "; ".join(f"key {old!r} was renamed {new!r}" for old, new in renamed.items()))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    for key, value in data.items():
        if not _type_ok(value, hints[key]):
            expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{where}: key {key!r} expects {expected}, got {value!r} ({type(value).__name__})")
    values = {k: (float(v) if hints[k] is float and isinstance(v, int) else v) for k, v in data.items()}
    return TrainConfig(**values)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["lr=3e-4", "cot=true"]` -> {"lr": 0.0003, "cot": True}; values are parsed as YAML scalars."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_Loader) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({first_line(e)}); quote a "
                              "string that starts with [ { or : as '\"...\"'") from e  # fmt: skip
        node = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):  # dotted keys reach into dict-valued keys: synthetic.hops=4
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {'.'.join(parts[: depth + 1])} was set to {node!r} by an earlier "
                                  "--set, so it has no keys to set")  # fmt: skip
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`: a mapping merges into the mapping it overrides (``--set synthetic.hops=4`` keeps the
    other synthetic keys), except an empty one, which clears it (``--set model_overrides={}``)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
        where = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        where += " + --set overrides"
    return config_from_dict(data, where)
