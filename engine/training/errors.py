"""The trainer's own error type, and the errors a user can cause and fix (`EXPECTED_ERRORS`): a bad config, bad
data or images, an unusable checkpoint. Their messages name what and where, so the recipe prints the message
alone, once, instead of a traceback per rank (`--debug` or COCONUT_DEBUG=1 keeps the traceback)."""

from __future__ import annotations

import os

from engine.data.images import ImageError
from engine.data.records import DataError
from engine.model.loading import CheckpointError as ModelPathError
from engine.model.schedule import BatchLayoutError
from engine.training.checkpoint import CheckpointError
from engine.training.config import ConfigError


class TrainingError(RuntimeError):
    """A run that cannot go on (an empty training set, a non-finite loss, a failed validation)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what torchrun, a job scheduler or `kill` sends) raised as the interrupt Ctrl-C gives: the run says
    where it stopped and which checkpoint to resume from, and closes its logs, instead of vanishing."""


EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    ImageError,
    BatchLayoutError,
    CheckpointError,
    ModelPathError,
    TrainingError,
)


def traceback_requested() -> bool:
    """COCONUT_DEBUG set (to anything but 0, false or no): the commands show an expected error's traceback too."""
    return os.environ.get("COCONUT_DEBUG", "").lower() not in ("", "0", "false", "no")
