"""What differs between the transformers releases the engine runs on (setup.py: transformers >= 5.17)."""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{keyword: cache}`` for a call of the transformers ``model``: its forward takes the KV cache as ``cache``
    from transformers 5.24 on (``past_key_values`` is deprecated there, to be removed in 5.40), as
    ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}
