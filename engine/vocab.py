"""The sequence vocabulary shared by data and model: special tokens, the label ignore index, image tokens per tile.

A training sequence is

    <img> <IMG_CONTEXT>*(tokens_per_tile * tiles) </img> question \\n
    <|start-latent|> <|latent|>*(k * c_thought) <|end-latent|> step_{k+1} \\n ... ### answer <eos>

The image tokens are InternVL's own; the three latent tokens are added to every tokenizer by `load_model`. This
module imports nothing from the engine, so that data and model can both read it.
"""

from __future__ import annotations

# InternVL's image tokens (the model's config names the id of IMAGE_CONTEXT_TOKEN as image_token_id)
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"

# the continuous-thought markers; at a LATENT_TOKEN position the input is the previous position's last hidden state
START_LATENT_TOKEN = "<|start-latent|>"
END_LATENT_TOKEN = "<|end-latent|>"
LATENT_TOKEN = "<|latent|>"
LATENT_TOKENS = (START_LATENT_TOKEN, END_LATENT_TOKEN, LATENT_TOKEN)

# label of positions without a loss (image, question, latent markers, padding), as in transformers
IGNORE_INDEX = -100


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def tokens_per_tile_from_config(config) -> int:
    """`<IMG_CONTEXT>` tokens one image tile costs in an InternVL config:
    (image_size / patch_size)^2 * downsample_ratio^2 (256 at 448 px with 14 px patches)."""
    vision = config.vision_config
    patches_per_side = _first(vision.image_size) // _first(vision.patch_size)
    return int(round(patches_per_side**2 * config.downsample_ratio**2))


def tile_size_from_config(config) -> int:
    """Side of one image tile in pixels."""
    return _first(config.vision_config.image_size)
