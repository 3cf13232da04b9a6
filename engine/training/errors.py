"""The trainer's own error type (config, data and checkpoint errors have theirs, next to what they check)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on (an empty training set, a non-finite loss, a resume that does not fit)."""
