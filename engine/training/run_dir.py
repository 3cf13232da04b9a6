"""The run directory `<save_path>/<name>`: what a run writes, how a fresh run, a resumed run and an evaluation
treat what is already there, and the checkpoints and exports. Rank 0 does the file work; every rank gets its
outcome (or its error).

    run.json                the run's id and one entry per launch (fresh or resumed, config file, config changes)
    config.json             the config of the latest launch; configs/NNN.json the config of each launch
    metrics.jsonl           one JSON object per logged event, tagged with run id and launch (tensorboard/ beside it)
    checkpoints/epoch_NNN/  DeepSpeed checkpoints with a manifest; `checkpoints/latest` names the newest
    best/ final/ epoch_NNN/ exports that `load_model` and transformers load
    history.json summary.md training_curves.png   per-epoch results, the per-stage table and the plot
    data/                   the generated synthetic task (when no train_path is given)
    .lock                   held by a training launch's rank 0 while it runs: one launch at a time

A fresh run refuses a directory that holds checkpoints or exports of an earlier run (continue it with
`resume=true`, choose another `name`, or delete it with `overwrite=true`, which deletes only once the new
launch's data and model have loaded); a directory with no checkpoint or export is cleaned and reused. A resumed
run keeps its run id; its config may differ from the saved one only outside the data, model and curriculum keys
unless `allow_config_changes` names the key; a config.json or run.json that is there but unreadable stops it (it
would lose that check or the run id). Temporaries of an interrupted write are removed at the next start.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from engine.model.loading import export_model
from engine.training.checkpoint import (
    LATEST,
    TMP_PREFIX,
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_epoch,
    checkpoint_tags,
    choose_resume_checkpoint,
    engine_precision,
    latest_tag,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    saved_precision,
)
from engine.training.config import ConfigError, TrainConfig, guarded_config_changes
from engine.training.distributed import DistEnv, barrier, run_on_main
from engine.training.optim import run_precision
from engine.training.reporting import plot_training_curves, write_summary
from engine.utils.io import atomic_write_json, remove_stale_temporaries
from engine.utils.logging import get_logger

log = get_logger("train")

# What a training run writes here (data/ is not listed: a synthetic set is reused when its settings match).
TRAINING_OUTPUTS = ("checkpoints", "best", "final", "metrics.jsonl", "tensorboard", "wandb", "history.json",
                    "summary.md", "training_curves.png", "config.json", "configs", "run.json")
# What only_eval writes here: removed by overwrite=true with the rest, kept by a fresh start over a directory
# without checkpoints (predictions_path may put the predictions elsewhere; those are the user's)
EVAL_OUTPUTS = ("predictions.json", "eval_records.json", "eval_summary.json", "eval_config.json")
_EPOCH_EXPORT = re.compile(r"^epoch_\d+$")
# temporaries of earlier versions: export folders from mkdtemp, the synthetic set's temporary folder
_LEGACY_TEMPORARY = re.compile(r"^\.((best|final|epoch_\d+)\.([a-z0-9_]{8}|old)|data\.tmp[a-z0-9_]{8})$")


@dataclass(frozen=True)
class RunInfo:
    """Which run this is (`run_id`, kept through resumes) and which launch of it (`attempt`, from 1)."""

    run_id: str
    attempt: int
    resumed: bool


def check_writable_folder(path: Path, what: str) -> None:
    """ConfigError unless ``path``, or the nearest folder above it that exists, is a folder this process can
    write (``what`` names the setting in the message)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path} is not writable")


_LOCK = ".lock"
_HELD_LOCKS: dict[str, int] = {}  # run directory -> the descriptor of its lock, held by this process


def lock_run_directory(path: Path) -> None:
    """Take the run directory's lock (an exclusive `flock` on `<run>/.lock`, held until `unlock_run_directory` or
    the process's exit), or ConfigError naming the launch that holds it: two launches in one directory would delete
    each other's temporaries and mix their checkpoints, exports and metrics. A process that holds it already passes
    (a trainer built again in the same process). Advisory, and local to one host on file systems without shared
    locks."""
    import fcntl

    key = str(path.resolve())
    if key in _HELD_LOCKS:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"run directory {path} is in use by another launch ({holder}): wait for it to end, or use "
                          "another name (--set name=...)") from None
    except OSError as e:  # a file system without locks (some network ones): the run goes on, unguarded
        os.close(fd)
        log.warning("cannot lock run directory %s (%s): a second launch into it would not be stopped", path, e)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd


def unlock_run_directory(path: Path) -> None:
    """Give the run directory's lock back (a no-op when this process does not hold it): at the end of a run, so that
    a process that trained (a notebook, a sweep) does not keep other launches out while it lives on."""
    import fcntl

    fd = _HELD_LOCKS.pop(str(path.resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunDirectory:
    def __init__(self, path: Path, env: DistEnv):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.env = env
        self.last_checkpoint: Path | None = None
        self.info: RunInfo | None = None

    # ------------------------------------------------------------------ start
    def check(self, config: TrainConfig) -> None:
        """Whether this launch may use the directory (the refusals of `start`; it takes the directory's lock),
        changing nothing else: the trainer checks first and starts only once its data and model have loaded, so
        that a launch that fails on its inputs leaves an earlier run (which `overwrite=true` would delete) as it
        was."""
        run_on_main(lambda: self._start(config, write=False), self.env)

    def start(self, config: TrainConfig) -> RunInfo:
        """Prepare the directory for this launch (see the module docstring); every rank gets the same RunInfo."""
        self.info = run_on_main(lambda: self._start(config), self.env)
        return self.info

    def _start(self, config: TrainConfig, write: bool = True) -> RunInfo | None:
        check_writable_folder(self.path, f"run directory {self.path} (save_path/name)")
        if not config.only_eval:  # a training launch's rank 0, before it reads or changes anything here
            lock_run_directory(self.path)
        if write:
            cleaned = self._clean_interrupted_writes()
            if cleaned:
                log.info("removed %d temporaries of an interrupted write in %s: %s", len(cleaned), self.path,
                         ", ".join(str(p.relative_to(self.path)) for p in cleaned))
        if config.only_eval:  # an evaluation writes its own files and leaves a training run's alone
            if config.predictions_path:  # checked now, not once every answer has been generated
                predictions = Path(config.predictions_path)
                if predictions.is_dir():
                    raise ConfigError(f"predictions_path: {predictions} is a folder; give the .json file to write")
                check_writable_folder(predictions.parent, f"predictions_path {predictions}")
            if not write:
                return None
            atomic_write_json(self.path / "eval_config.json", config.to_dict())
            return RunInfo(run_id=new_run_id(), attempt=1, resumed=False)
        if config.resume is True:
            return self._start_resumed(config, write)
        return self._start_fresh(config, write)

    def _clean_interrupted_writes(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        touched = remove_stale_temporaries(self.path)
        for entry in sorted(self.path.iterdir()):
            if _LEGACY_TEMPORARY.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                touched.append(entry)
        if self.checkpoints.is_dir():
            touched += remove_stale_temporaries(self.checkpoints)
            for entry in sorted(self.checkpoints.glob(f"{TMP_PREFIX}*")):
                shutil.rmtree(entry, ignore_errors=True)
                touched.append(entry)
        return touched

    def earlier_run_outputs(self) -> list[str]:
        """Checkpoints and exports of an earlier run in this directory (what a fresh run must not destroy)."""
        held = [f"checkpoints/{t}" for t in checkpoint_tags(self.checkpoints)]
        if not held and (self.checkpoints / LATEST).is_file():
            held.append(f"checkpoints/{LATEST}")
        if self.path.is_dir():
            held += [p.name for p in sorted(self.path.iterdir())
                     if p.is_dir() and (p.name in ("best", "final") or _EPOCH_EXPORT.match(p.name))]
        return held

    def _remove_training_outputs(self, *, with_eval: bool) -> list[str]:
        removed = []
        if not self.path.is_dir():
            return removed
        names = TRAINING_OUTPUTS + (EVAL_OUTPUTS if with_eval else ())
        for entry in sorted(self.path.iterdir()):
            if entry.name in names or (entry.is_dir() and _EPOCH_EXPORT.match(entry.name)):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry.name)
        return removed

    def _start_fresh(self, config: TrainConfig, write: bool) -> RunInfo | None:
        held = self.earlier_run_outputs()
        if held and not config.overwrite:
            shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
            raise ConfigError(
                f"run directory {self.path} already holds a run ({shown}). To continue it: --set resume=true; to keep "
                f"it and start another: --set name=<another name>; to delete it and start over: --set overwrite=true"
            )
        if not write:
            return None
        removed = self._remove_training_outputs(with_eval=bool(config.overwrite))
        if removed:
            why = "overwrite=true" if held else "it held no checkpoint or export"
            log.warning("starting over in %s (%s): removed %s", self.path, why, ", ".join(removed))
        self.path.mkdir(parents=True, exist_ok=True)
        info = RunInfo(run_id=new_run_id(), attempt=1, resumed=False)
        record = {"run_id": info.run_id, "created_at": _now(), "launches": []}
        self._record_launch(record, config, info, changes={})
        return info

    def _start_resumed(self, config: TrainConfig, write: bool) -> RunInfo | None:
        if not checkpoint_tags(self.checkpoints):
            raise ConfigError(f"resume=true but {self.checkpoints} holds no checkpoint; start the run without resume")
        saved = self._read_saved("config.json")
        if saved is None:
            if write:
                log.warning("resume: %s is missing: the check that data, model and curriculum keys are unchanged is "
                            "skipped", self.path / "config.json")  # fmt: skip
            saved = {}
        if saved.get("zero_stage", config.zero_stage) != config.zero_stage:  # not allowed by allow_config_changes either
            raise ConfigError(
                f"resume: the checkpoints in {self.checkpoints} were written under zero_stage={saved['zero_stage']} "
                f"(each ZeRO stage saves its own layout) and this launch has zero_stage={config.zero_stage}: resume with "
                f"--set zero_stage={saved['zero_stage']}"
            )
        try:
            latest = latest_tag(self.checkpoints)
        except CheckpointError:
            latest = None  # a `latest` naming a lost checkpoint: the load chooses another and checks it then
        if latest is not None:  # before this launch is recorded: a refused one changes nothing here
            self._check_ranks(latest, self._ranks_of(latest))
            launch = run_precision(config, self.env.device.type, self.env.world_size)
            self._check_precision(latest, saved_precision(self.checkpoints / latest), launch)
        changes = guarded_config_changes(saved, config.to_dict())
        blocked = {k: v for k, v in changes.items() if k not in config.allow_config_changes}
        if blocked:
            listed = "; ".join(f"{k}: {old!r} (saved) -> {new!r}" for k, (old, new) in blocked.items())
            raise ConfigError(
                f"resume: the config differs from the one this run was trained with ({self.path / 'config.json'}) in "
                f"data, model or curriculum keys: {listed}. Use the saved values, or allow the change with "
                f"--set allow_config_changes=[{','.join(blocked)}] (recorded in {self.path / 'run.json'})"
            )
        record = self._read_saved("run.json")
        well_formed = record is None or (isinstance(record.get("run_id"), str)
                                         and isinstance(record.get("launches", []), list))  # fmt: skip
        if not well_formed:
            raise ConfigError(f"resume: {self.path / 'run.json'} has no run_id or no list of launches; restore it, or "
                              "move it away to resume under a new run id")  # fmt: skip
        if not write:
            return None
        if record is None:  # a run written before run.json existed, or the file moved away
            log.warning("resume: %s is missing: the run continues under a new run id", self.path / "run.json")
            record = {"run_id": new_run_id(), "created_at": _now(), "launches": []}
        info = RunInfo(run_id=record["run_id"], attempt=len(record.get("launches", [])) + 1, resumed=True)
        every_change = guarded_config_changes(saved, config.to_dict(), every_key=True)
        if every_change:
            log.info("resume: config changes against the saved run: %s",
                     "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in every_change.items()))
        self._record_launch(record, config, info, changes=every_change)
        return info

    def _record_launch(self, record: dict, config: TrainConfig, info: RunInfo, changes: dict) -> None:
        """configs/NNN.json and config.json hold this launch's config; run.json lists every launch."""
        config_file = f"configs/{info.attempt:03d}.json"
        atomic_write_json(self.path / config_file, config.to_dict())
        atomic_write_json(self.path / "config.json", config.to_dict())
        launch = {"attempt": info.attempt, "started_at": _now(), "resume": info.resumed, "config": config_file}
        if changes:
            launch["config_changes"] = {k: [old, new] for k, (old, new) in changes.items()}
        if config.allow_config_changes:
            launch["allowed_config_changes"] = list(config.allow_config_changes)
        record.setdefault("launches", []).append(launch)
        atomic_write_json(self.path / "run.json", record)

    def _read_saved(self, name: str) -> dict | None:
        """A JSON object the run keeps (config.json, run.json): None when the file is missing. One that is there
        but unreadable is an error naming it: a resume would otherwise lose its config check or its run id."""
        path = self.path / name
        if not path.exists():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"resume: {path} cannot be read ({type(e).__name__}: {e}); restore it, or move it away "
                              "to resume without it") from e  # fmt: skip
        if not isinstance(value, dict):
            raise ConfigError(f"resume: {path} holds a JSON {type(value).__name__}, not an object; restore it, or move "
                              "it away to resume without it")  # fmt: skip
        return value

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, engine, epoch: int, state: dict, *, keep: int) -> Path:
        run_id = self.info.run_id if self.info else None
        self.last_checkpoint = save_checkpoint(engine, self.checkpoints, epoch, state, is_main=self.env.is_main,
                                               keep=keep, run_id=run_id, world_size=self.env.world_size)
        return self.last_checkpoint

    def load_latest(self, engine) -> tuple[str, dict]:
        """Load the newest checkpoint that verifies into `engine` (rank 0 verifies, every rank loads the same one);
        returns (tag, the trainer state saved with it)."""
        def choose() -> tuple[str, int | None, str | None]:
            tag = choose_resume_checkpoint(self.checkpoints)
            return tag, self._ranks_of(tag), saved_precision(self.checkpoints / tag)

        tag, ranks, precision = run_on_main(choose, self.env)
        self._check_ranks(tag, ranks)
        self._check_precision(tag, precision, engine_precision(engine))
        state = load_checkpoint(engine, self.checkpoints, tag)
        self.last_checkpoint = self.checkpoints / tag
        return tag, state

    def _ranks_of(self, tag: str) -> int | None:
        """The ranks that wrote checkpoint ``tag``, from its manifest (None before manifests had them)."""
        return (read_manifest(self.checkpoints / tag) or {}).get("world_size")

    def _check_ranks(self, tag: str, ranks: int | None) -> None:
        """An exact resume needs the checkpoint's ranks: ZeRO-1/2/3 partition it per rank, and a ZeRO-0 one would load
        and go on with another global batch and data order (``ranks``: its manifest's; None before manifests had it)."""
        if ranks is not None and ranks != self.env.world_size:
            epoch = checkpoint_epoch(self.checkpoints / tag)
            raise CheckpointMismatchError(
                f"checkpoint {self.checkpoints / tag} was written by {ranks} ranks and this launch has "
                f"{self.env.world_size}: resume with {ranks}, or start a new run from its export (--set load_model_path="
                f"{self.path / f'epoch_{epoch:03d}'} --set resume={epoch} --set name=<another name>, with num_epochs "
                f"above {epoch})"
            )

    def _check_precision(self, tag: str, saved: str | None, launch: str) -> None:
        """A checkpoint loads into an engine of its own precision only: DeepSpeed names a bf16 engine's ZeRO states
        `bf16_zero_pp_rank_*`, and another engine looked for files that are not there. ``launch``: the precision of
        the engine (or of the launch's config, `optim.run_precision`)."""
        if saved is None or (saved == "bf16") == (launch == "bf16"):  # fp16 and fp32 write the same files
            return
        raise CheckpointMismatchError(
            f"checkpoint {self.checkpoints / tag} was written in {saved} and this launch trains in {launch} (a bf16 "
            "engine saves its optimizer states in other files): resume with the precision it was written in (bf16, "
            "and the deepspeed.bf16 / deepspeed.fp16 overrides, as before), or start a new run from its export"
        )

    def last_good_checkpoint(self) -> Path | None:
        """For error messages: the checkpoint a resume would continue from."""
        if self.last_checkpoint is not None:
            return self.last_checkpoint
        try:
            tag = latest_tag(self.checkpoints)
        except CheckpointError:
            return None
        return self.checkpoints / tag if tag else None

    # ------------------------------------------------------------------ exports
    def export(self, model, tokenizer, image_processor, name: str, *, zero_stage: int,
               training_state: dict | None = None) -> Path:
        """Export the current weights in the transformers format (gathered from all ranks under ZeRO-3), with
        `training_state` (epoch, stage, step) beside them."""
        out_dir = self.path / name
        gather = nullcontext()
        if zero_stage == 3:
            import deepspeed  # initialised by then; see optim.build_engine for why it is imported late

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with gather:
            if self.env.is_main:
                export_model(model, tokenizer, image_processor, out_dir, training_state=training_state)
                log.info("exported %s", out_dir)
        barrier()
        return out_dir

    # ------------------------------------------------------------------ reports
    def write_reports(self, history: list[dict], name: str) -> tuple[str, Path | None]:
        """summary.md (the per-stage table), training_curves.png and history.json; returns (table, plot)."""
        title = f"{name}: validation per stage"
        table = write_summary(history, self.path, title)
        plot = plot_training_curves(history, self.path / "training_curves.png", title=name)
        atomic_write_json(self.path / "history.json", history)
        return table, plot
