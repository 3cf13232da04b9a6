"""The run's report: the per-stage table and the curves, also when not every epoch is validated."""

from __future__ import annotations

from engine.training.reporting import epoch_series, format_summary_table, plot_training_curves, stage_summary

# eval_every_epochs=2 over 5 epochs of stages 0, 0, 1, 2, 3: epochs 2 and 4 validated, 5 as the last one
HISTORY = [
    {"epoch": 1, "stage": 0, "train_loss": 2.0},
    {"epoch": 2, "stage": 0, "train_loss": 1.5, "val_loss": 1.6, "val_accuracy": 40.0, "tokens_per_answer": 30.0},
    {"epoch": 3, "stage": 1, "train_loss": 1.2},
    {"epoch": 4, "stage": 2, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 70.0, "tokens_per_answer": 10.0},
    {"epoch": 5, "stage": 3, "train_loss": 0.9, "val_loss": 1.0, "val_accuracy": 80.0, "tokens_per_answer": 3.0},
]


def test_every_stage_trained_has_a_row_validated_or_not():
    rows = stage_summary(HISTORY)
    assert [(r["stage"], r["epoch"]) for r in rows] == [(0, 2), (1, 3), (2, 4), (3, 5)]
    table = format_summary_table(rows)
    assert "| 1 | 3 | - | - | - | - | - |" in table and "| 3 | 5 | 80.0 |" in table


def test_validated_epochs_are_joined_in_the_curves(tmp_path):
    assert epoch_series(HISTORY, "val_accuracy") == ([2, 4, 5], [40.0, 70.0, 80.0])
    assert epoch_series(HISTORY, "train_loss") == ([1, 2, 3, 4, 5], [2.0, 1.5, 1.2, 1.0, 0.9])
    path = plot_training_curves(HISTORY, tmp_path / "curves.png", title="t")
    assert path.stat().st_size > 10_000
    single = plot_training_curves(HISTORY[1:2], tmp_path / "one.png")
    assert single.stat().st_size > 5_000
