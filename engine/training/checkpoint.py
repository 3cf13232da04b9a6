"""DeepSpeed checkpoints that are written atomically, verified at resume and resumed exactly.

Layout under `<run>/checkpoints/`:
    epoch_001/ epoch_002/ ...   one DeepSpeed checkpoint per finished epoch (model, optimizer, LR schedule,
                                and the trainer's state: epoch, stage, step, best metric, history)
    epoch_NNN/manifest.json     size and sha256 of every file of the checkpoint, and whose run and epoch it is
    latest                      the tag of the newest complete checkpoint

A checkpoint is first written under a temporary tag; its manifest is written, every file and folder fsynced,
and it is renamed into place; `latest` is replaced atomically last, then the run's oldest checkpoints beyond
`keep` are removed (only those of the same run, by epoch; never the one `latest` names). A crash at any point
leaves the previous checkpoint and `latest` intact.

At resume the newest checkpoint is verified against its manifest; a missing, truncated or altered file is named
and the newest older checkpoint that verifies is used instead, with a warning. DeepSpeed loads checkpoints with
`torch.load(weights_only=False)`, i.e. it unpickles them: only resume from checkpoint directories you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.training.distributed import barrier
from engine.utils.io import atomic_write_json, atomic_write_text, fsync_tree, replace_directory
from engine.training.zero_step import settle_skipped_steps
from engine.utils.logging import first_line, get_logger

log = get_logger("checkpoint")

LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp_"
_EPOCH_TAG = re.compile(r"^epoch_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file and what is wrong."""


class CheckpointMismatchError(CheckpointError):
    pass


def epoch_tag(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag `latest` names (None when there is no `latest`); a tag whose folder is gone is an error."""
    path = Path(checkpoint_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (Path(checkpoint_dir) / tag).is_dir():
        raise CheckpointError(f"{path} names checkpoint {tag!r}, which does not exist in {checkpoint_dir}")
    return tag


def checkpoint_tags(checkpoint_dir: str | Path) -> list[str]:
    """The epoch checkpoints on disk, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and _EPOCH_TAG.match(p.name)]
    return sorted(tags, key=lambda t: int(_EPOCH_TAG.match(t).group(1)))


def read_manifest(tag_dir: Path) -> dict | None:
    try:
        return json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)  # hashlib releases the GIL on large buffers: the threads below overlap
            size += len(chunk)
    return size, digest.hexdigest()


def _digests(root: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: _file_digest(root / name), names)))


def write_manifest(tag_dir: Path, info: dict) -> dict:
    """Record the size and sha256 of every file under `tag_dir` (and `info`: run, epoch, step) in its manifest."""
    names = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = {name: {"size": size, "sha256": sha} for name, (size, sha) in _digests(tag_dir, names).items()}
    manifest = {**info, "files": files}
    atomic_write_json(tag_dir / MANIFEST, manifest)
    return manifest


def verify_checkpoint(tag_dir: str | Path) -> str | None:
    """None when every file of the checkpoint matches its manifest, else what is wrong, naming the file."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    manifest = read_manifest(tag_dir)
    if manifest is None:
        if (tag_dir / MANIFEST).exists():
            return f"{tag_dir / MANIFEST} is not readable JSON"
        return None  # written before manifests existed: nothing to verify against (DeepSpeed's load still checks)
    files = manifest.get("files") or {}
    if not files:
        return f"{tag_dir / MANIFEST} lists no files"
    sizes = {}
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        sizes[name] = path.stat().st_size
        if sizes[name] != expected["size"]:
            return f"{path} has {sizes[name]} bytes, the manifest says {expected['size']} (truncated or replaced)"
    for name, (_, sha) in _digests(tag_dir, sorted(files)).items():
        if sha != files[name]["sha256"]:
            return f"{tag_dir / name} does not match its sha256 in the manifest (the file was altered or damaged)"
    return None


def checkpoint_epoch(tag_dir: Path) -> int:
    manifest = read_manifest(tag_dir) or {}
    if isinstance(manifest.get("epoch"), int):
        return manifest["epoch"]
    match = _EPOCH_TAG.match(tag_dir.name)
    return int(match.group(1)) if match else -1


def choose_resume_checkpoint(checkpoint_dir: str | Path) -> str:
    """The newest checkpoint that verifies: the one `latest` names, else the newest older one (with a warning
    naming what is wrong with each one skipped). CheckpointError when there is none."""
    checkpoint_dir = Path(checkpoint_dir)
    problems: list[str] = []
    candidates: list[str] = []
    try:
        named = latest_tag(checkpoint_dir)
    except CheckpointError as e:
        named = None
        problems.append(str(e))
    if named is not None:
        candidates.append(named)
    on_disk = sorted(checkpoint_tags(checkpoint_dir), key=lambda t: checkpoint_epoch(checkpoint_dir / t), reverse=True)
    candidates += [t for t in on_disk if t != named]
    if not candidates:
        raise CheckpointError(
            f"resume was asked for but {checkpoint_dir} holds no complete checkpoint"
            + (f" ({problems[0]})" if problems else f" (no '{LATEST}' file)")
        )
    for tag in candidates:
        problem = verify_checkpoint(checkpoint_dir / tag)
        if problem is None:
            if problems:
                log.warning("resuming from the older checkpoint %s instead; skipped: %s", checkpoint_dir / tag,
                            "; ".join(problems))
            return tag
        log.warning("checkpoint %s cannot be used: %s", checkpoint_dir / tag, problem)
        problems.append(f"{tag}: {problem}")
    raise CheckpointError(f"no checkpoint in {checkpoint_dir} verifies: " + "; ".join(problems))


def engine_precision(engine) -> str:
    """"bf16", "fp16" or "fp32": the precision a DeepSpeed engine trains in, which decides its checkpoint's files
    (a bf16 engine's ZeRO states are `bf16_zero_pp_rank_*`)."""
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def saved_precision(path: Path) -> str | None:
    """The precision checkpoint ``path`` was written in: its manifest's, else "bf16" or "not bf16" read from its
    ZeRO state files' names (manifests before the precision was recorded); None for a checkpoint without ZeRO
    state files (ZeRO-0), whose files do not depend on it."""
    recorded = (read_manifest(path) or {}).get("precision")
    if isinstance(recorded, str):
        return recorded
    if any(path.glob("bf16_zero_pp_rank_*")):
        return "bf16"
    return "not bf16" if any(path.glob("zero_pp_rank_*")) else None


def save_checkpoint(engine, checkpoint_dir: str | Path, epoch: int, client_state: dict, *, is_main: bool, keep: int,
                    run_id: str | None = None, world_size: int = 1) -> Path:
    """Save under a temporary tag, write the manifest (with ``world_size``, the ranks that wrote it: a resume needs
    the same), then move it into place and point `latest` at it."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = epoch_tag(epoch)
    tmp_tag = f"{TMP_PREFIX}{tag}"
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(checkpoint_dir / tmp_tag, ignore_errors=True)
    barrier()
    settle_skipped_steps(engine)  # the skipped-step count and the schedule saved as DeepSpeed's step would have them
    engine.save_checkpoint(str(checkpoint_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    barrier()
    if is_main:
        tmp = checkpoint_dir / tmp_tag
        info = {"tag": tag, "run_id": run_id, "epoch": epoch, "global_step": client_state.get("global_step"),
                "world_size": world_size, "precision": engine_precision(engine),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_manifest(tmp, info)
        fsync_tree(tmp)
        replace_directory(tmp, checkpoint_dir / tag)
        atomic_write_text(checkpoint_dir / LATEST, tag + "\n")
        prune_checkpoints(checkpoint_dir, keep, run_id)
    barrier()
    return checkpoint_dir / tag


def prune_checkpoints(checkpoint_dir: Path, keep: int, run_id: str | None) -> list[str]:
    """Remove this run's oldest checkpoints (by epoch) beyond the newest `keep`. Checkpoints of another run are
    left alone, and so is the one `latest` names. Returns the tags removed."""
    named = (checkpoint_dir / LATEST).read_text().strip() if (checkpoint_dir / LATEST).is_file() else None
    own = []
    for tag in checkpoint_tags(checkpoint_dir):
        manifest = read_manifest(checkpoint_dir / tag)
        owner = manifest.get("run_id") if manifest else None
        if owner == run_id or manifest is None:  # no manifest: written by this run before manifests existed
            own.append(tag)
    own.sort(key=lambda t: checkpoint_epoch(checkpoint_dir / t))
    removed = [t for t in own[: max(0, len(own) - keep)] if t != named]
    for tag in removed:
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    return removed


def load_checkpoint(engine, checkpoint_dir: str | Path, tag: str) -> dict:
    """Load model, optimizer and LR-schedule state; returns the trainer's client state."""
    checkpoint_dir = Path(checkpoint_dir)
    where = checkpoint_dir / tag
    try:
        path, client_state = engine.load_checkpoint(
            str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as e:  # torch.load and DeepSpeed raise many types for an unreadable file; name the checkpoint
        first = first_line(e)
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise CheckpointMismatchError(
                f"checkpoint {where} was written for another model than the one configured: {first} ..."
            ) from e
        raise CheckpointError(f"cannot load checkpoint {where}: {type(e).__name__}: {first}") from e
    if path is None or client_state is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {where}")
    log.info("resumed from %s (epoch %s)", where, client_state.get("epoch"))
    return client_state
