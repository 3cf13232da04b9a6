"""The run directory `<save_path>/<name>`: its config, DeepSpeed checkpoints, transformers-format exports and
reports. Rank 0 writes the files; the collective parts (checkpoints, ZeRO-3 gathers) run on every rank.

    config.json             the run's config
    metrics.jsonl           one JSON object per logged event (tensorboard/ beside it when installed)
    checkpoints/epoch_NNN/  DeepSpeed checkpoints (model, optimizer, LR schedule, trainer state); `latest` names one
    best/ final/ epoch_NNN/ exports that `load_model` and transformers load
    history.json summary.md training_curves.png   per-epoch results, the per-stage table and the plot
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from engine.model.loading import export_model
from engine.training.checkpoint import latest_tag, load_checkpoint, save_checkpoint
from engine.training.config import ConfigError, TrainConfig
from engine.training.distributed import DistEnv, barrier
from engine.training.reporting import plot_training_curves, write_summary
from engine.utils.io import atomic_write_json
from engine.utils.logging import get_logger

log = get_logger("train")


class RunDirectory:
    def __init__(self, path: Path, env: DistEnv):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.env = env
        self.last_checkpoint: Path | None = None

    def prepare(self, config: TrainConfig) -> None:
        if self.env.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / "config.json", config.to_dict())

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, engine, epoch: int, state: dict, *, keep: int) -> Path:
        self.last_checkpoint = save_checkpoint(engine, self.checkpoints, epoch, state, is_main=self.env.is_main, keep=keep)
        return self.last_checkpoint

    def load_latest(self, engine) -> tuple[str, dict]:
        """Load the newest checkpoint into `engine`; returns (tag, the trainer state saved with it)."""
        tag = latest_tag(self.checkpoints)
        if tag is None:
            raise ConfigError(f"resume=true but {self.checkpoints} holds no complete checkpoint")
        state = load_checkpoint(engine, self.checkpoints, tag)
        self.last_checkpoint = self.checkpoints / tag
        return tag, state

    def last_good_checkpoint(self) -> Path | None:
        """For error messages: the checkpoint a resume would continue from."""
        return self.last_checkpoint or (latest_tag(self.checkpoints) and self.checkpoints)

    # ------------------------------------------------------------------ exports
    def export(self, model, tokenizer, image_processor, name: str, *, zero_stage: int) -> Path:
        """Export the current weights in the transformers format (gathered from all ranks under ZeRO-3)."""
        out_dir = self.path / name
        gather = nullcontext()
        if zero_stage == 3:
            import deepspeed  # initialised by then; see optim.build_engine for why it is imported late

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with gather:
            if self.env.is_main:
                export_model(model, tokenizer, image_processor, out_dir)
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
