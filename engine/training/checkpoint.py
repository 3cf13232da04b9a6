"""DeepSpeed checkpoints that are written atomically and resumed exactly.

Layout under `<run>/checkpoints/`:
    epoch_001/ epoch_002/ ...   one DeepSpeed checkpoint per finished epoch (model, optimizer, LR schedule,
                                and the trainer's state: epoch, stage, step, best metric, history)
    latest                      the tag of the newest complete checkpoint

A checkpoint is first written under a temporary tag, then renamed; `latest` is replaced atomically last. A
crash at any point leaves the previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.training.distributed import barrier
from engine.utils.io import atomic_write_text
from engine.utils.logging import get_logger

log = get_logger("checkpoint")

LATEST = "latest"


class CheckpointMismatchError(RuntimeError):
    pass


def epoch_tag(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    path = Path(checkpoint_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (Path(checkpoint_dir) / tag).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {tag!r}, which does not exist in {checkpoint_dir}")
    return tag


def save_checkpoint(engine, checkpoint_dir: str | Path, epoch: int, client_state: dict, *, is_main: bool, keep: int) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    tag = epoch_tag(epoch)
    tmp_tag = f".tmp_{tag}"
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(checkpoint_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    barrier()
    if is_main:
        final = checkpoint_dir / tag
        if final.exists():
            shutil.rmtree(final)
        (checkpoint_dir / tmp_tag).rename(final)
        atomic_write_text(checkpoint_dir / LATEST, tag + "\n")
        _prune(checkpoint_dir, keep)
    barrier()
    return checkpoint_dir / tag


def _prune(checkpoint_dir: Path, keep: int) -> None:
    tags = sorted(p for p in checkpoint_dir.glob("epoch_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """Load model, optimizer and LR-schedule state; returns the trainer's client state."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(
            f"resume was asked for but {checkpoint_dir} holds no complete checkpoint (no '{LATEST}' file)"
        )
    try:
        path, client_state = engine.load_checkpoint(
            str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except RuntimeError as e:
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint_dir / tag} was written for another model than the one configured: "
                f"{str(e).splitlines()[0]} ..."
            ) from e
        raise
    if path is None or client_state is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}")
    log.info("resumed from %s (epoch %s)", checkpoint_dir / tag, client_state.get("epoch"))
    return client_state
