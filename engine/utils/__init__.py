"""Small shared helpers: logging, atomic file writes, profiling ranges."""

from engine.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from engine.utils.logging import get_logger
from engine.utils.profiling import profile_range

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "get_logger", "profile_range"]
