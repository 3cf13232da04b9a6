"""Typed training configuration. YAML files and `--set key=value` overrides map onto `TrainConfig`.

Keys keep the original CoCoNuT names where they exist (c_thought, epochs_per_stage, max_latent_stage,
pad_latent_to_max, uniform_prob, cot, no_cot, no_thoughts, coconut, reset_optimizer, save_only_improve,
load_model_path, resume, only_eval, ...). An unknown key or a value of the wrong type is an error that
names the key (and the valid keys, or the expected type).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # ---- run, model and data (original CoCoNuT names)
    name: str = "coconut"
    model_id: str = "tiny"  # a load_model spec ("tiny", "internvl3-1b-geometry") or a local checkpoint
    model_overrides: dict = field(default_factory=dict)  # sizes of the "tiny" spec
    train_path: str | None = None
    val_path: str | None = None
    save_path: str = "runs"
    synthetic: dict | None = None  # generate the synthetic task into <run>/data when train_path is unset
    load_model_path: str | None = None  # a transformers-format export to start from
    # true: continue exactly from <run>/checkpoints/latest; an int N (the original's meaning): start a fresh
    # run at epoch N, i.e. at stage N // epochs_per_stage (used with load_model_path to skip the CoT stage)
    resume: bool | int = False
    only_eval: bool = False
    predictions_path: str | None = None  # only_eval: where to write official-format predictions

    # ---- method (original CoCoNuT names)
    coconut: bool = True
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
    max_length: int = 2048

    # ---- optimisation (original CoCoNuT names)
    num_epochs: int = 4
    batch_size_training: int = 8  # per process, per micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    reset_optimizer: bool = False  # a fresh AdamW state at every stage switch, with warmup_steps of warmup again
    save_only_improve: bool = False
    bf16: bool = False  # used on GPU; CPU runs train in fp32
    seed: int = 0

    # ---- engine settings
    zero_stage: int = 2
    warmup_steps: int = 0  # linear LR warmup at the start, and after every optimizer reset
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_tiles: int = 1
    num_workers: int = 0
    attn_implementation: str = "sdpa"
    # how the one-position latent passes run (MultimodalCoconut.set_latent_passes): auto (CUDA graphs on GPU under
    # ZeRO 0-2) | transformers | static | cuda_graph; the buckets trade captured graphs against padded work
    latent_passes: str = "auto"
    latent_prefix_bucket: int = 128
    latent_final_bucket: int = 32
    eval_batch_size: int = 16
    # the KV cache of validation generation: auto (paged on GPU under ZeRO 0-2: Triton paged attention, prefix
    # sharing, CUDA-graphed steps) | dynamic (transformers' DynamicCache) | paged
    eval_kv_cache: str = "auto"
    max_new_tokens: int = 64
    eval_max_samples: int | None = None  # cap validation generation (None: the whole set)
    eval_every_epochs: int = 1
    keep_checkpoints: int = 2  # DeepSpeed checkpoints kept on disk (latest first)
    log_every_steps: int = 10
    device: str = "auto"  # auto | cpu | cuda
    eval_stage: int | None = None  # only_eval: the curriculum stage of the prompts (default: the last one)
    overlong: str = "drop"  # samples longer than max_length: drop (counted, with a warning) | error
    deepspeed: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config

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
        positive = ("c_thought", "epochs_per_stage", "num_epochs", "batch_size_training", "gradient_accumulation_steps",
                    "max_length", "eval_batch_size", "max_tiles", "eval_every_epochs", "keep_checkpoints", "log_every_steps",
                    "latent_prefix_bucket", "latent_final_bucket")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not isinstance(self.resume, bool) and not 0 <= self.resume < self.num_epochs:
            raise ConfigError(f"resume as an epoch must be in [0, num_epochs={self.num_epochs}), got {self.resume}")
        if self.max_latent_stage < 0:
            raise ConfigError(f"max_latent_stage must be >= 0, got {self.max_latent_stage}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ConfigError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
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
        if self.zero_stage == 3 and self.latent_passes in ("static", "cuda_graph"):
            raise ConfigError(
                f"latent_passes={self.latent_passes} needs zero_stage <= 2 (ZeRO-3 gathers parameters per module call, "
                "which the latent block's graphs cannot replay); use auto or transformers"
            )
        if self.eval_kv_cache not in ("auto", "dynamic", "paged"):
            raise ConfigError(f"eval_kv_cache must be auto, dynamic or paged, got {self.eval_kv_cache!r}")
        if self.zero_stage == 3 and self.eval_kv_cache == "paged":
            raise ConfigError(
                "eval_kv_cache=paged needs zero_stage <= 2 (the paged runner reads the layers' weights directly, "
                "ZeRO-3 only gathers them inside module calls); use auto or dynamic"
            )
        if self.overlong not in ("drop", "error"):
            raise ConfigError(f"overlong must be drop or error, got {self.overlong!r}")
        if self.eval_stage is not None and self.eval_stage < 0:
            raise ConfigError(f"eval_stage must be >= 0, got {self.eval_stage}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.only_eval and not self.load_model_path and self.model_id in ("tiny", "internvl3-1b-geometry"):
            raise ConfigError("only_eval needs load_model_path (or a local checkpoint as model_id) to evaluate")

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- YAML / overrides
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


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
    unknown = [k for k in data if k not in hints]
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
        value = yaml.load(raw, Loader=_Loader) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:  # dotted keys reach into dict-valued keys: synthetic.hops=4
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
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
            data = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        where = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        where += " + --set overrides"
    return config_from_dict(data, where)
