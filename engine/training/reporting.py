"""What people watch during and after a run: a JSONL metrics log (mirrored to TensorBoard when installed and to
Weights & Biases when configured), a plot of loss and validation accuracy per epoch with the stage boundaries
marked, and a per-stage summary table."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

from engine.training.config import ConfigError
from engine.utils.io import atomic_write_bytes, atomic_write_text
from engine.utils.logging import get_logger

log = get_logger("report")


def wandb_wanted(settings: dict | None) -> bool:
    """Whether the `wandb` settings ask for logging: given, and not `mode: disabled` (which needs no package)."""
    return settings is not None and settings.get("mode") != "disabled"


def check_wandb_installed() -> None:
    """Weights & Biases is optional: a config that asks for it needs the package (checked before a run starts)."""
    if "wandb" in sys.modules:  # imported already (or blocked: None)
        installed = sys.modules["wandb"] is not None
    else:
        installed = importlib.util.find_spec("wandb") is not None
    if not installed:
        raise ConfigError("the config asks for Weights & Biases logging (wandb: ...) but the wandb package is not "
                          "installed: pip install wandb, or remove the wandb key")


def start_wandb(settings: dict, run_dir: Path, *, run_id: str | None, default_name: str, config: dict | None):
    """A W&B run for this training run: the same W&B run across resumes (its id is the run id). Offline mode
    (`mode: offline`) writes under `<run>/wandb` and needs no network (`wandb sync` uploads it later)."""
    import wandb  # optional dependency, imported only when configured

    return wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        group=settings.get("group"),
        tags=settings.get("tags"),
        notes=settings.get("notes"),
        name=settings.get("name") or default_name,
        mode=settings.get("mode", "online"),
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
    )


class MetricsLogger:
    """Appends one JSON object per event to `<run>/metrics.jsonl`: `{"kind", "step", "run_id", "attempt", ...}`
    (the run id is kept through resumes, `attempt` counts the launches). Scalars also go to TensorBoard (if
    installed) and to Weights & Biases (`wandb` settings, if given).

    `resumed_at=(step, epoch)`: this launch continues from the checkpoint of that step and epoch. The rows an
    earlier launch logged after it (work that is done again now) are dropped, so the log keeps one row per kind
    and step; TensorBoard purges those events too (`purge_step`). W&B keeps its rows for those steps (it ignores
    a step lower than one it has seen); with an exact resume they are the same numbers."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, *, run_id: str | None = None,
                 attempt: int | None = None, resumed_at: tuple[int, int] | None = None, wandb: dict | None = None,
                 name: str = "coconut", config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tags = {k: v for k, v in (("run_id", run_id), ("attempt", attempt)) if v is not None}
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            self._rewind(*resumed_at)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                purge = resumed_at[0] + 1 if resumed_at is not None else None
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except Exception:  # tensorboard is optional
                self._tb = None
        if wandb_wanted(wandb):
            self._wandb = start_wandb(wandb, Path(run_dir), run_id=run_id, default_name=name, config=config)

    def _rewind(self, step: int, epoch: int) -> None:
        """Keep this run's rows up to the checkpoint (`step`, `epoch`); drop the rest."""
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a crash
                dropped += 1
                continue
            same_run = row.get("run_id") in (None, self.tags.get("run_id"))
            before = row.get("epoch", 0) <= epoch if row.get("kind") == "epoch" else row.get("step", 0) <= step
            if same_run and before:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
            log.info("metrics.jsonl: dropped %d rows logged after the checkpoint this run resumes from", dropped)

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **self.tags, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def epoch_series(history: list[dict], key: str) -> tuple[list, list]:
    """The epochs that have `key` and its values: with eval_every_epochs > 1 the validated epochs are joined, not
    broken by the epochs in between."""
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    return [e for e, _ in points], [v for _, v in points]


def plot_training_curves(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """history: one dict per epoch with epoch, stage, train_loss, val_loss, val_accuracy. Writes a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: files only, no display (chosen only once a plot is made)
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        return epoch_series(history, key)

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)  # one epoch axis for both
    ax_loss.plot(*series("train_loss"), "o-", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(*series("val_loss"), "s-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(*series("val_accuracy"), "o-", color="tab:green", label="answer accuracy")
    if any(h.get("mc_accuracy") is not None for h in history):
        ax_acc.plot(*series("mc_accuracy"), "^--", color="tab:purple", label="MC accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend()
    ax_acc.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax_acc.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    # Stage boundaries: a dashed line where the stage changes, labelled with the new stage.
    for prev, cur in zip(history, history[1:]):
        if cur["stage"] != prev["stage"]:
            x = (prev["epoch"] + cur["epoch"]) / 2
            for ax in (ax_loss, ax_acc):
                ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
            ax_acc.text(x, 97, f"stage {cur['stage']}", rotation=90, va="top", ha="right", fontsize=8, color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def stage_summary(history: list[dict]) -> list[dict]:
    """One row per stage trained: the stage's best-accuracy epoch with its generation statistics, or its last epoch
    when none of its epochs was validated (eval_every_epochs > 1: its accuracy then shows as "-")."""
    rows: dict[int, dict] = {}
    for h in history:
        best = rows.get(h["stage"])
        if h.get("val_accuracy") is None:
            if best is None or best.get("val_accuracy") is None:
                rows[h["stage"]] = h
            continue
        if best is None or best.get("val_accuracy") is None or h["val_accuracy"] >= best["val_accuracy"]:
            rows[h["stage"]] = h
    return [rows[s] for s in sorted(rows)]


def format_summary_table(rows: list[dict]) -> str:
    header = "| stage | epoch | val accuracy (%) | MC accuracy (%) | tokens / answer | answers / s | val loss |"
    lines = [header, "|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['epoch']} | {fmt(r.get('val_accuracy'), '.1f')} | {fmt(r.get('mc_accuracy'), '.1f')} "
            f"| {fmt(r.get('tokens_per_answer'), '.1f')} | {fmt(r.get('answers_per_second'), '.1f')} "
            f"| {fmt(r.get('val_loss'), '.3f')} |"
        )
    return "\n".join(lines)


def write_summary(history: list[dict], run_dir: str | Path, title: str) -> str:
    table = format_summary_table(stage_summary(history))
    atomic_write_text(Path(run_dir) / "summary.md", f"# {title}\n\n{table}\n")
    return table
