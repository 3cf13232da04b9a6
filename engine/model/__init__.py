"""The model: MultimodalCoconut around transformers' InternVL, its loading and its reference forwards."""

from engine.model.coconut import CoconutOutput, MultimodalCoconut
from engine.model.loading import TinyModelConfig, load_model
from engine.model.schedule import BatchLayoutError, PassSchedule
from engine.vocab import LATENT_TOKEN, LATENT_TOKENS

__all__ = [
    "BatchLayoutError",
    "CoconutOutput",
    "LATENT_TOKEN",
    "LATENT_TOKENS",
    "MultimodalCoconut",
    "PassSchedule",
    "TinyModelConfig",
    "load_model",
]
