"""The model a run trains: built from `model_id` or initialised from `load_model_path` (checked to be the same
architecture), with the configured latent-pass mode, activation checkpointing, compiled vision layers and Liger
kernels (`configure_model`, which the training-step benchmark uses too); and the fingerprint a checkpoint must
match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig

from engine.model.loading import BUILTIN_SPECS, builtin_config, load_model
from engine.model.loading import CheckpointError as ModelPathError
from engine.training.config import ConfigError, TrainConfig
from engine.utils.logging import first_line, get_logger

log = get_logger("train")


def load_training_model(config: TrainConfig, device: torch.device):
    """(model, tokenizer, image_processor) in fp32 on `device` (DeepSpeed keeps fp32 master weights and casts
    for bf16 itself)."""
    kwargs = dict(
        dtype=torch.float32,
        device=device,
        seed=config.seed,
        attn_implementation=config.attn_implementation,
        max_tiles=config.max_tiles,
    )
    try:
        if config.load_model_path:
            path = Path(config.load_model_path)
            model, tok, proc = load_model(path, **kwargs)
            check_same_architecture(model, config, path)
            log.info("initialised from %s", path)
        else:
            model, tok, proc = load_model(config.model_id, model_overrides=config.model_overrides or None, **kwargs)
    except (ModelPathError, ConfigError):
        raise
    except ValueError as e:  # an unknown model override or attention backend: a config mistake
        raise ConfigError(f"model {config.load_model_path or config.model_id!r}: {e}") from e
    configure_model(model, config)
    return model, tok, proc


def configure_model(model, config: TrainConfig) -> None:
    """The config's model settings on a loaded model: thought feedback (off for pause as thought), the latent-pass
    mode, activation checkpointing, compiled vision layers and Liger kernels."""
    model.thought_feedback = not config.pause_as_thought  # pause as thought: <|latent|> is an ordinary token
    try:
        model.set_latent_passes(
            config.latent_passes,
            prefix_bucket=config.latent_prefix_bucket,
            final_bucket=config.latent_final_bucket,
            forwards_per_step=config.gradient_accumulation_steps,
        )
        model.set_layer_ops(config.layer_ops)
    except RuntimeError as e:
        raise ConfigError(f"latent_passes={config.latent_passes!r}, layer_ops={config.layer_ops!r}: {e}") from e
    model.set_activation_checkpointing(config.activation_checkpointing)
    if config.compile_vision_layers:
        from engine.model.compiled import compile_vision_layers

        log.info("compiled %d vision encoder layers (torch.compile, built at the first step)",
                 compile_vision_layers(model))
    try:
        model.set_liger_kernels(config.liger_pieces)  # also switches off a process-wide piece set earlier
    except (ImportError, ValueError) as e:
        raise ConfigError(f"liger_kernels={config.liger_kernels!r}: {e}") from e


def model_fingerprint(model, *, partitioned_as_empty: bool = False) -> str:
    """Names and shapes of the parameters: what a checkpoint must match to be loadable. A ZeRO-3 parameter's shape is
    its whole one (`ds_shape`): its own is (0,) while partitioned and whole while gathered, so the fingerprint saved
    with a checkpoint never matched the one after loading it. ``partitioned_as_empty``: that earlier fingerprint, which
    checkpoints written under ZeRO-3 before still carry."""
    def shape(p):
        if partitioned_as_empty and hasattr(p, "ds_shape"):
            return (0,)
        return tuple(getattr(p, "ds_shape", None) or p.shape)

    text = ";".join(f"{n}:{shape(p)}" for n, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_architecture(model, config: TrainConfig, path: Path) -> None:
    """`load_model_path` must hold the model that `model_id` describes (same sizes), else say what differs."""
    if config.model_id not in BUILTIN_SPECS:
        try:
            expected = AutoConfig.from_pretrained(config.model_id, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model_id {config.model_id!r} (the architecture load_model_path {path} is checked "
                              f"against) is neither a built-in spec {BUILTIN_SPECS} nor a local model folder with a "
                              f"config.json: {first_line(e)}") from e  # fmt: skip
    else:
        expected, _ = builtin_config(config.model_id, config.model_overrides or None)
    got = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    diffs = []
    if bool(getattr(expected, "tie_word_embeddings", False)) != bool(getattr(got, "tie_word_embeddings", False)):
        diffs.append(f"tie_word_embeddings: model_id {config.model_id!r} has {expected.tie_word_embeddings}, "
                     f"checkpoint has {got.tie_word_embeddings}")
    for part in ("text_config", "vision_config"):
        for key in keys:
            a, b = getattr(getattr(expected, part), key, None), getattr(getattr(got, part), key, None)
            if a != b:
                diffs.append(f"{part}.{key}: model_id {config.model_id!r} has {a}, checkpoint has {b}")
    if diffs:
        raise ConfigError(f"load_model_path {path} holds another model than model_id describes: " + "; ".join(diffs))
