"""One logger for the engine, with a fixed prefix, so users can filter it; errors told in one line."""

from __future__ import annotations

import logging

_ROOT = "coconut"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the engine logger (or a child of it). Configures a stderr handler once."""
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[coconut] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root if not name else root.getChild(name)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a library's can run to pages), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
