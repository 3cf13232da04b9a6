"""Multimodal CoCoNuT engine: continuous latent reasoning for InternVL3."""

__version__ = "0.1.0"

from engine.model import MultimodalCoconut, load_model  # noqa: E402

__all__ = ["MultimodalCoconut", "load_model", "__version__"]
