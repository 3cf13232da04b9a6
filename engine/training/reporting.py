"""What people watch during and after a run: a JSONL metrics log (and TensorBoard when installed), a plot of
loss and validation accuracy per epoch with the stage boundaries marked, and a per-stage summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.utils.io import atomic_write_bytes, atomic_write_text
from engine.utils.logging import get_logger

log = get_logger("report")


class MetricsLogger:
    """Appends one JSON object per event to `<run>/metrics.jsonl`; mirrors scalars to TensorBoard if present."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
                except Exception:  # tensorboard is optional
                    self._tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_training_curves(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """history: one dict per epoch with epoch, stage, train_loss, val_loss, val_accuracy. Writes a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [h.get("val_loss") for h in history], "s-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [h.get("val_accuracy") for h in history], "o-", color="tab:green", label="answer accuracy")
    if any(h.get("mc_accuracy") is not None for h in history):
        ax_acc.plot(epochs, [h.get("mc_accuracy") for h in history], "^--", color="tab:purple", label="MC accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend()
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
    """One row per stage: the stage's best-accuracy epoch with its generation statistics."""
    rows: dict[int, dict] = {}
    for h in history:
        if h.get("val_accuracy") is None:
            continue
        best = rows.get(h["stage"])
        if best is None or h["val_accuracy"] >= best["val_accuracy"]:
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
