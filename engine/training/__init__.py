"""Training: typed config, DeepSpeed set-up, the staged-curriculum trainer, checkpoints and reports."""

from engine.training.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
