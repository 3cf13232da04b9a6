"""The staged-curriculum trainer: DeepSpeed ZeRO, validation with answer/A-OKVQA metrics, exact resume.

One `Trainer(config).run()` covers the three launches (plain `python`, `torchrun`, `deepspeed`), CPU and GPU:

- the stage of epoch e is `e // epochs_per_stage` (0 with `cot`/`no_cot`); the datasets are rebuilt per epoch
  for that stage, and the optimizer state is reset at stage boundaries when `reset_optimizer` is set;
- every epoch ends with validation (loss and batched generation) and an atomic DeepSpeed checkpoint; the
  best epoch is exported in the transformers format (`<run>/best`), the last one too (`<run>/final`). A failed
  validation does not lose the epoch: the checkpoint is written, the run stops with the reason, and a resume
  validates that epoch again before it trains on;
- data order depends only on (seed, epoch), and the checkpoint holds model, optimizer, LR schedule and the
  trainer's state, so a resumed run reaches the parameters an uninterrupted one reaches.

The trainer composes its parts: `data` (files and loaders), `model_setup` (the model and its fingerprint),
`optim` (optimizer, schedule, DeepSpeed engine), `validation` (`Validator`), `run_dir` (`RunDirectory`:
checkpoints, exports, reports) and `reporting` (the metrics log). What is left here is the epoch and step loop.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.data.dataset import check_stages, max_steps, stage_for_epoch, tokenize_records
from engine.data.records import DataError, load_records
from engine.eval.evaluate import official_predictions
from engine.eval.metrics import validation_score
from engine.eval.thoughts import thought_norm_stats
from engine.training import data
from engine.training.checkpoint import CheckpointMismatchError
from engine.training.config import ConfigError, TrainConfig
from engine.training.distributed import DistEnv, Lockstep, all_reduce_mean, init_distributed
from engine.training.errors import TrainingError
from engine.training.model_setup import load_training_model, model_fingerprint
from engine.training.pacing import HostPacer
from engine.training.lr_schedule import restart_warmup
from engine.training.optim import (
    build_engine,
    check_deepspeed_config,
    follow_launch_config,
    offloads_optimizer,
    reset_optimizer_state,
    trains_in_bf16,
)
from engine.training.reporting import (
    MetricsLogger,
    check_wandb_installed,
    format_summary_table,
    stage_summary,
    wandb_wanted,
)
from engine.training.run_dir import RunDirectory, unlock_run_directory
from engine.training.validation import Validator
from engine.training.zero_step import settle_skipped_steps
from engine.utils.io import atomic_write_json
from engine.utils.logging import get_logger
from engine.utils.profiling import profile_range

log = get_logger("train")

__all__ = ["Trainer", "TrainingError", "reset_optimizer_state"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochLosses:
    """The micro-step losses of an epoch. `add` keeps each on the device; `collect` copies the pending ones to
    the host in one transfer, raises on a non-finite one (naming its epoch and step) and returns the epoch's mean
    so far (summed in float64 in step order, as a running sum on the host would)."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.pending: list[torch.Tensor] = []
        self.pending_steps: list[int] = []
        self.total = 0.0
        self.count = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.pending.append(loss.detach())
        self.pending_steps.append(step)

    def collect(self) -> float:
        if self.pending:
            values = torch.stack(self.pending).tolist()
            for value, step in zip(values, self.pending_steps):
                if not math.isfinite(value):
                    raise TrainingError(f"non-finite loss {value} at epoch {self.epoch + 1}, step {step}")
                self.total += value
                self.count += 1
            self.pending, self.pending_steps = [], []
        return self.total / max(1, self.count)


# the curriculum settings an export records beside its stage (`coconut_training_state.json`)
EXPORT_SETTINGS = ("c_thought", "max_latent_stage", "pad_latent_to_max", "pause_as_thought", "cot", "no_cot",
                   "no_thoughts")


class Trainer:
    def __init__(self, config: TrainConfig, *, local_rank: int | None = None):
        self.config = config
        if wandb_wanted(config.wandb):
            check_wandb_installed()
        self.env: DistEnv = init_distributed(config.device, local_rank,
                                             expandable_segments=config.cuda_expandable_segments)
        self.device = self.env.device
        if self.device.type == "cuda" and self.env.is_main:
            log.info("CUDA allocator: %s", self.env.cuda_allocator)
        self.run_dir = config.run_dir
        self.use_bf16 = trains_in_bf16(config, self.device.type)
        if config.bf16 and not self.use_bf16 and self.env.is_main:
            log.info("bf16 asked for but running on CPU: training in fp32")
        if not config.only_eval:  # before the run directory changes: a refused setting leaves an earlier run intact
            check_deepspeed_config(config, self.use_bf16, self.device.type, self.env.world_size)
        seed_everything(config.seed)
        self.run_directory = RunDirectory(self.run_dir, self.env)
        self.run_directory.check(config)  # refusals now; the directory is changed once the inputs have loaded
        self.run_info = None  # `setup` starts the run directory
        self.lockstep = Lockstep.for_run(config.zero_stage, self.env)
        self.pacer = HostPacer(self.device, config.zero_stage)  # ZeRO-3: the backward queued once the forward is done
        self.validator = Validator(config, self.env, self.lockstep)
        self.metrics = MetricsLogger(self.run_dir, enabled=False)  # opened by prepare_training
        self.history: list[dict] = []
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.global_step = 0
        self.start_epoch = 0
        self.first_epoch = 0  # the epoch the run's learning-rate schedule starts at (resume=N)
        self.validation_final_stage: int | None = None  # `final_stage` counting the validation records' steps too
        self.train_tokens: list[list[int]] | None = None  # `tokenize_records` of the training records, made once
        self.epoch_samples: dict[int, int] = {}  # epoch -> the samples it keeps (`_count_epoch_samples`)

    # ------------------------------------------------------------------ set-up
    def stage_for_epoch(self, epoch: int) -> int:
        return stage_for_epoch(epoch, self.config.epochs_per_stage, self.curriculum, self.final_stage)

    def resets_optimizer_before(self, epoch: int) -> bool:
        """Whether `reset_optimizer` clears Adam's state before ``epoch``: never before the first epoch; before
        every later one with every_epoch; with true, where the training stage changes."""
        mode = self.config.reset_optimizer
        if epoch == 0 or not mode:
            return False
        return mode == "every_epoch" or self.stage_for_epoch(epoch) != self.stage_for_epoch(epoch - 1)

    def validation_stage(self, epoch: int) -> int:
        """The stage epoch's validation is built at: its training stage, except past the training records' last
        distinct stage, where validation records with more steps still lose them (`validation_final_stage`)."""
        return stage_for_epoch(epoch, self.config.epochs_per_stage, self.curriculum, self.validation_final_stage)

    def setup(self) -> None:
        cfg = self.config
        self.curriculum = data.curriculum_from_config(cfg)
        train_path, val_path = data.data_paths(cfg, self.run_dir, self.env)
        self.train_path = train_path
        self.train_records = load_records(train_path) if train_path and not cfg.only_eval else []
        self.val_records = load_records(val_path, need_answer=not cfg.only_eval) if val_path else []
        if cfg.check_images:  # a bad image fails now, naming its record, not in an epoch or a validation
            for path, records in ((train_path, self.train_records), (val_path, self.val_records)):
                if records:
                    data.check_record_images(path, records, self.env)
        if self.train_records:
            check_stages(self.train_records, self.curriculum)
        # epochs past the curriculum's last distinct stage lengthen the final stage (as the original's recipes do).
        # The validation's own cap counts its records too: one with more steps than any training record still has
        # steps to remove at max_latent_stage + 1, and its loss is measured without them there, as the original's;
        # the training stage (what reset_optimizer and the history follow) stays where its sequences stop changing
        self.final_stage = self.curriculum.final_stage(max_steps(self.train_records)) if self.train_records else None
        most = max(max_steps(self.train_records), max_steps(self.val_records))
        self.validation_final_stage = self.curriculum.final_stage(most) if self.train_records else None
        self.model, self.tokenizer, self.image_processor = load_training_model(cfg, self.device)
        records = self.train_records + self.val_records
        with_image = sum(r.get("image") is not None for r in records)
        offload_accumulation = offloads_optimizer(cfg) and cfg.gradient_accumulation_steps > 1 and cfg.zero_stage > 0
        if (self.env.world_size > 1 or offload_accumulation) and 0 < with_image < len(records):
            # a rank whose batch has no image would skip the vision tower while another runs it: ZeRO's
            # collectives would no longer pair up (a size mismatch under ZeRO-2, a hang under ZeRO-3); and with the
            # optimizer states offloaded, DeepSpeed (0.19) drops the accumulated gradients of parameters that the
            # last micro-batch of a cycle leaves unused (measured: the vision tower not updated at all)
            self.model.vision_every_batch = True
            if self.env.is_main:
                why = "the ranks' collectives pair up" if self.env.world_size > 1 else (
                    "the offloaded optimizer keeps every micro-batch's vision gradients")
                log.info("%d of %d records have no image: batches without one run the vision tower on a blank tile "
                         "at weight zero, so that %s", len(records) - with_image, len(records), why)
        if self.train_records:
            self._count_epoch_samples()
        if cfg.only_eval:
            self.only_eval_stage = self._eval_stage()
            stages = [self.only_eval_stage]
        else:  # every stage a validation of this launch may prompt at (resume=true: from the first epoch on)
            first = 0 if isinstance(cfg.resume, bool) else int(cfg.resume)
            stages = sorted({self.validation_stage(e) for e in range(first, cfg.num_epochs)}) if self.train_records else []
        self.validator.setup(self.tokenizer, self.image_processor, self.curriculum, self.val_records, self.model,
                             stages=stages, source=str(val_path))
        # only now, with the data and the model loaded: a bad input leaves an earlier run (overwrite=true) intact
        self.run_info = self.run_directory.start(cfg)
        if self.env.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info(
                "model %s: %.2fM parameters | %d train / %d val records | world %d on %s",
                cfg.load_model_path or cfg.model_id, n_params / 1e6, len(self.train_records), len(self.val_records),
                self.env.world_size, self.device,
            )

    def steps_per_epoch(self, num_samples: int) -> int:
        return data.steps_per_epoch(num_samples, self.config, self.env.world_size)

    def _count_epoch_samples(self) -> None:
        """The samples each epoch this launch may train keeps once those over max_length are dropped (from the
        records' tokens, made once here for every epoch's data set). A fresh run's epochs are checked now, before
        the run directory changes (overwrite=true), not when they come; a resumed run's once its checkpoint says
        which epochs are left (`prepare_training`)."""
        cfg = self.config
        # resume=N (an epoch) starts a fresh run at epoch N: its schedule spans the epochs it trains (resumed later,
        # the run keeps that first epoch: its checkpoints say which, `_resume`)
        self.first_epoch = 0 if isinstance(cfg.resume, bool) else int(cfg.resume)
        self.train_tokens = tokenize_records(self.tokenizer, self.train_records)
        stages = {e: self.stage_for_epoch(e) for e in range(self.first_epoch, cfg.num_epochs)}
        try:
            self.epoch_samples = data.samples_per_epoch(self.train_records, self.tokenizer, self.image_processor,
                                                        self.curriculum, stages, seed=cfg.seed, tokens=self.train_tokens)
        except DataError as e:  # overlong=error: the record, named in the file that holds it
            raise DataError(f"{self.train_path}: {e}") from None
        if cfg.resume is not True:
            self._check_epochs(range(self.first_epoch, cfg.num_epochs))

    def _check_epochs(self, epochs: range) -> None:
        """Each epoch to train keeps samples, and enough micro-batches for an optimizer step (as train_epoch checks
        it, but before anything is trained)."""
        cfg = self.config
        empty = sorted({self.stage_for_epoch(e) for e in epochs if self.epoch_samples[e] == 0})
        if empty:
            raise DataError(f"every one of the {len(self.train_records)} training records is longer than "
                            f"max_length={cfg.max_length} at stage(s) {empty} (image tokens included): raise "
                            "max_length, or shorten the records")  # fmt: skip
        left_out = set()
        for epoch in epochs:
            n = self.epoch_samples[epoch]
            micro = data.micro_batches_per_epoch(n, cfg, self.env.world_size)
            data.check_accumulation(micro, cfg.gradient_accumulation_steps,
                                    f"epoch {epoch + 1} (stage {self.stage_for_epoch(epoch)}, {n} samples kept of "
                                    f"{len(self.train_records)})")  # fmt: skip
            if micro % cfg.gradient_accumulation_steps:
                left_out.add((micro % cfg.gradient_accumulation_steps, micro))
        if left_out and self.env.is_main:  # train_epoch runs whole accumulation cycles only
            shown = ", ".join(f"{k} of {m}" for k, m in sorted(left_out))
            log.warning("the last micro-batches of an epoch that fill no whole accumulation cycle are left out (%s per "
                        "rank, gradient_accumulation_steps=%d): batch_size_training or gradient_accumulation_steps "
                        "that divide the epoch use every sample", shown, cfg.gradient_accumulation_steps)

    def scheduled_steps(self) -> int:
        """Optimizer steps from the schedule's first epoch to the last: each epoch's, from the samples its stage
        keeps (samples over max_length are dropped, more of them at the early stages' longer sequences), so that
        a decaying learning rate ends its decay at the run's last step."""
        return sum(self.steps_per_epoch(self.epoch_samples[e]) for e in range(self.first_epoch, self.config.num_epochs))

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        try:
            self.setup()
            if self.config.only_eval:
                return self.evaluate_only()
            return self.train()
        finally:
            unlock_run_directory(self.run_dir)  # rank 0's lock (a no-op on the others)

    def prepare_training(self) -> None:
        """The DeepSpeed engine, the state of the checkpoint resumed from (`resume=true`), the metrics log."""
        cfg = self.config
        data.check_accumulation(data.micro_batches_per_epoch(len(self.train_records), cfg, self.env.world_size),
                                cfg.gradient_accumulation_steps, f"an epoch of the {len(self.train_records)} training records")
        total_steps = self.scheduled_steps()
        self.engine = build_engine(self.model, cfg, total_steps, self.use_bf16)
        if self.env.is_main:  # what DeepSpeed was given: the stage's defaults with the run's overrides
            atomic_write_json(self.run_dir / "deepspeed_config.json", self.engine.config)
        resumed_at = None
        if cfg.resume is True:
            self._resume()
            self._check_epochs(range(self.start_epoch, cfg.num_epochs))  # the epochs the checkpoint leaves
            resumed_at = (self.global_step, self.start_epoch)
            total_steps = self.scheduled_steps()  # the run's first epoch comes from its checkpoint
            changed = follow_launch_config(self.engine.lr_scheduler, cfg, total_steps)
            if changed and self.env.is_main:
                log.info("the optimizer follows this launch's config: %s",
                         "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items()))
        elif cfg.resume:  # an epoch number, as in the original: skip the epochs before it
            self.start_epoch = int(cfg.resume)
            if self.env.is_main:
                log.info("starting at epoch %d (stage %d)", self.start_epoch + 1, self.stage_for_epoch(self.start_epoch))
        self.metrics = MetricsLogger(
            self.run_dir, enabled=self.env.is_main, run_id=self.run_info.run_id, attempt=self.run_info.attempt,
            resumed_at=resumed_at, wandb=cfg.wandb, name=cfg.name, config=cfg.to_dict(),
        )

    def train(self) -> dict:
        cfg = self.config
        self.prepare_training()
        epoch = self.start_epoch
        if epoch >= cfg.num_epochs and self.env.is_main:
            log.warning("the run has trained its num_epochs=%d already: nothing left to train (raise num_epochs to "
                        "train on)", cfg.num_epochs)
        try:
            if self.history and "validation_error" in self.history[-1]:
                self._validate_again(self.history[-1])
            for epoch in range(self.start_epoch, cfg.num_epochs):
                stage = self.stage_for_epoch(epoch)
                if self.resets_optimizer_before(epoch):
                    cleared = reset_optimizer_state(self.engine)
                    restart_warmup(self.engine.lr_scheduler)  # a fresh Adam gets its warmup again
                    log.info("%s %d begins: optimizer state reset (%d parameter states cleared)",
                             *(("epoch", epoch + 1) if cfg.reset_optimizer == "every_epoch" else ("stage", stage)),
                             cleared)
                train_stats = self.train_epoch(epoch, stage)
                record = {"epoch": epoch + 1, "stage": stage, **train_stats}
                failure = None
                if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.num_epochs:
                    try:
                        record.update(self.validator.validate(self.engine, self.validation_stage(epoch)))
                    except Exception as e:  # the trained epoch is saved below before the run stops
                        failure = e
                        record["validation_error"] = f"{type(e).__name__}: {e}"
                self.history.append(record)
                self.metrics.log("epoch", self.global_step, **record)
                self._after_epoch(epoch, record)
                if failure is not None:
                    raise TrainingError(
                        f"validation after epoch {epoch + 1} failed ({record['validation_error']}); the trained epoch "
                        f"is saved in {self.run_directory.last_checkpoint}: fix the cause and continue with "
                        "--set resume=true (that epoch is validated again first)"
                    ) from failure
        except (Exception, KeyboardInterrupt) as e:
            if self.env.is_main:
                where = self.run_directory.last_good_checkpoint()
                hint = f"last good checkpoint: {where} (continue with --set resume=true)" if where else "no checkpoint was written yet"
                # the error itself is the exception's (the recipe prints it once); this says where and how to go on
                log.error("training stopped in epoch %d (step %d) by %s; %s", epoch + 1, self.global_step, type(e).__name__, hint)
            raise
        finally:
            self.metrics.close()
        return self._finish()

    def _resume(self) -> None:
        tag, state = self.run_directory.load_latest(self.engine)
        known = (None, model_fingerprint(self.model), model_fingerprint(self.model, partitioned_as_empty=True))
        if state.get("model_fingerprint") not in known:
            raise CheckpointMismatchError(
                f"checkpoint {self.run_directory.checkpoints / tag} was written for another model configuration"
            )
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        # the epoch the run's schedule starts at (resume=N): an earlier version's checkpoint has it in its history
        self.first_epoch = int(state.get("first_epoch", self.history[0]["epoch"] - 1 if self.history else 0))
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        if self.env.is_main:
            log.info("resuming at epoch %d (stage %d), step %d", self.start_epoch + 1, self.stage_for_epoch(self.start_epoch), self.global_step)

    def _validate_again(self, record: dict) -> None:
        """The validation of the checkpoint's epoch failed before the run stopped: run it now, on the same weights."""
        if self.env.is_main:
            log.info("validating epoch %d again (%s stopped the run before)", record["epoch"], record["validation_error"])
        result = self.validator.validate(self.engine, self.validation_stage(record["epoch"] - 1))
        del record["validation_error"]
        record.update(result)
        self.metrics.log("validation", self.global_step, **record)
        self._update_best(record)

    def train_epoch(self, epoch: int, stage: int) -> dict:
        """One epoch of optimizer steps. The losses stay on the device and come to the host once per
        `log_every_steps` (and at the end of the epoch), where they are checked to be finite: no host
        synchronisation per step for the loop's own bookkeeping."""
        cfg = self.config
        engine = self.engine
        engine.train()
        loader = data.train_loader(self.train_records, self.tokenizer, self.image_processor, self.curriculum, stage,
                                   epoch, latent_id=self.model.latent_id, config=cfg, env=self.env,
                                   tokens=self.train_tokens)  # fmt: skip
        gas = cfg.gradient_accumulation_steps
        data.check_accumulation(len(loader), gas, f"epoch {epoch + 1} (stage {stage})")
        micro_steps = (len(loader) // gas) * gas  # whole accumulation cycles only
        bar = tqdm(total=micro_steps, desc=f"epoch {epoch + 1}/{cfg.num_epochs} stage {stage}", disable=not self.env.is_main, dynamic_ncols=True)
        losses = EpochLosses(epoch)
        samples, tokens = 0, 0
        skipped_before = int(getattr(engine, "skipped_steps", 0))  # DeepSpeed's count of steps skipped on overflow
        start = time.perf_counter()
        step_lr = engine.get_lr()[0]
        data_iter = iter(loader)
        for micro in range(micro_steps):
            with profile_range("train/data"):
                batch = next(data_iter)
                samples += int(batch["input_ids"].shape[0])
                tokens += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
                batch = data.batch_to_device(batch, self.device, non_blocking=True)
            min_passes = self.lockstep.min_passes(batch["input_ids"], self.model)
            with profile_range("train/forward"):
                out = data.forward_batch(engine, batch, min_passes)
                loss = out.loss
            self.pacer.after_forward()
            with profile_range("train/backward"):
                self.pacer.before_backward()
                engine.backward(loss)
            boundary = (micro + 1) % gas == 0
            if boundary:
                step_lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves on inside step())
            with profile_range("train/optimizer"):
                engine.step()
            losses.add(loss, self.global_step)
            # an optimizer step ended here (DeepSpeed's is_gradient_accumulation_boundary, read after step(), is about
            # the next micro-batch)
            if boundary:
                self.global_step += 1
                if self.global_step % cfg.log_every_steps == 0:
                    mean = losses.collect()  # the one synchronisation of a log interval
                    settle_skipped_steps(engine)  # the device step's skips, read while the host waits anyway
                    thoughts = self._thought_stats(out.hidden_states, batch["input_ids"])
                    self.metrics.log("train", self.global_step, loss=mean, lr=step_lr, stage=stage, **thoughts)
                    rate = samples * self.env.world_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{mean:.3f}", stage=stage, samples_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
        bar.close()
        mean = losses.collect()
        settle_skipped_steps(engine)
        elapsed = time.perf_counter() - start
        mean_loss, = all_reduce_mean([mean], self.device)
        skipped = int(getattr(engine, "skipped_steps", 0)) - skipped_before
        if skipped and self.env.is_main:
            # a finite loss with non-finite gradients (e.g. an attention kernel's backward): the optimizer's
            # overflow check skipped the update, which a loss curve alone would not show
            log.warning("epoch %d: %d of %d optimizer steps skipped for non-finite gradients", epoch + 1, skipped,
                        micro_steps // gas or 1)
        return {
            "train_loss": mean_loss,
            "train_skipped_steps": skipped,
            "train_samples_per_second": samples * self.env.world_size / elapsed,
            "train_tokens_per_second": tokens * self.env.world_size / elapsed,
            "train_seconds": elapsed,
            "lr": step_lr,  # the rate of the epoch's last step
        }

    def _thought_stats(self, hidden_states, input_ids) -> dict:
        """Norms of this batch's continuous thoughts against the token embeddings' (`engine.eval.thoughts`); the
        embedding scale is left out when ZeRO-3 partitions the embeddings."""
        weight = None if self.config.zero_stage == 3 else self.model.base.get_input_embeddings().weight
        return thought_norm_stats(hidden_states, input_ids, self.model.latent_id, weight)

    # ------------------------------------------------------------------ checkpoints and exports
    def export(self, name: str, record: dict | None = None) -> Path:
        """`record`: the history row of the epoch whose weights these are (none before the first epoch)."""
        state = None
        if record is not None:
            cfg = self.config
            # what prompting these weights needs, kept with them: a copied export has no run config beside it
            state = {"run_id": self.run_info.run_id, "epoch": record["epoch"], "stage": record["stage"],
                     "global_step": self.global_step, "max_tiles": self.image_processor.max_tiles,
                     **{k: getattr(cfg, k) for k in EXPORT_SETTINGS}}
        return self.run_directory.export(self.model, self.tokenizer, self.image_processor, name,
                                         zero_stage=self.config.zero_stage, training_state=state)

    def _update_best(self, record: dict) -> None:
        """Export `<run>/best` when this epoch's validation (accuracy, else loss) is the best so far."""
        metric = validation_score(record)
        if metric is not None and (self.best_metric is None or metric > self.best_metric):
            self.best_metric, self.best_epoch = metric, record["epoch"]
            self.export("best", record)

    def _after_epoch(self, epoch: int, record: dict) -> None:
        cfg = self.config
        self._update_best(record)
        if not cfg.save_only_improve:  # the original's per-epoch weights, as a loadable export
            self.export(f"epoch_{epoch + 1:03d}", record)
        state = {
            "epoch": epoch + 1,
            "stage": record["stage"],
            "global_step": self.global_step,
            "history": self.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "model_fingerprint": model_fingerprint(self.model),
            "run_id": self.run_info.run_id,
            "first_epoch": self.first_epoch,
        }
        self.run_directory.save_checkpoint(self.engine, epoch + 1, state, keep=cfg.keep_checkpoints)

    def _finish(self) -> dict:
        self.export("final", self.history[-1] if self.history else None)
        result = {"history": self.history, "best_epoch": self.best_epoch, "run_dir": str(self.run_dir)}
        if self.env.is_main:
            table, plot = self.run_directory.write_reports(self.history, self.config.name)
            print(f"\n{self.config.name}: validation per stage\n{table}\n")
            log.info("run directory %s (curves: %s, best epoch: %s)", self.run_dir, plot, self.best_epoch)
        return result

    # ------------------------------------------------------------------ only_eval
    def _eval_stage(self) -> int:
        """The stage `only_eval` prompts at: `eval_stage`; else 0 for a run without thoughts (cot, no_cot); else,
        with `resume: N`, epoch N's stage (the original CoCoNuT's eval configs pick their stage so); else the stage
        the loaded export was trained at (`export_stage`: `<run>/best` is often an earlier stage's epoch than the
        last, and its weights never saw the later stages' thoughts); else `max_latent_stage`."""
        from engine.model.loading import export_stage

        cfg = self.config
        loaded = cfg.load_model_path or cfg.model_id  # model_id may be an export too
        trained = export_stage(loaded) if Path(loaded).is_dir() else None
        chosen, key, source = cfg.eval_stage, "eval_stage", "eval_stage"
        if chosen is None and not (cfg.cot or cfg.no_cot) and not isinstance(cfg.resume, bool) and cfg.resume > 0:
            final = self.curriculum.final_stage(max_steps(self.val_records))
            chosen = stage_for_epoch(cfg.resume, cfg.epochs_per_stage, self.curriculum, final)
            key, source = "resume", f"resume={cfg.resume} (epoch {cfg.resume}'s stage)"
        if chosen is not None:
            if trained is not None and trained != chosen and not (cfg.cot or cfg.no_cot):
                log.warning("only_eval: %s gives stage %d, but %s was trained at stage %d: its prompts differ from "
                            "the ones it was trained on (leave %s unset to use that stage)", source, chosen,
                            loaded, trained, key)
            return chosen
        if cfg.cot or cfg.no_cot:
            return 0
        if trained is not None:
            log.info("only_eval: %s was trained at stage %d; evaluating at that stage (eval_stage sets another)",
                     loaded, trained)
            return trained
        return cfg.max_latent_stage

    def evaluate_only(self) -> dict:
        cfg = self.config
        stage = self.only_eval_stage  # chosen (and logged) in setup, whose checks ran at it
        if not self.val_records:
            raise ConfigError("only_eval: val_path holds no records to evaluate")
        self.model.to(torch.bfloat16 if self.use_bf16 else torch.float32)
        summary, scored = self.validator.generation_metrics(stage, self.model)
        if self.env.is_main:
            preds_path = Path(cfg.predictions_path) if cfg.predictions_path else self.run_dir / "predictions.json"
            atomic_write_json(preds_path, official_predictions(scored))
            atomic_write_json(self.run_dir / "eval_records.json", scored)
            atomic_write_json(self.run_dir / "eval_summary.json", {"stage": stage, **summary})
            row = {"epoch": 0, "stage": stage, **summary}
            print("\n" + format_summary_table(stage_summary([row])) + "\n")
            log.info("predictions written to %s", preds_path)
        return {"stage": stage, **summary}
