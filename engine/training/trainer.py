"""The staged-curriculum trainer: DeepSpeed ZeRO, validation with answer/A-OKVQA metrics, exact resume.

One `Trainer(config).run()` covers the three launches (plain `python`, `torchrun`, `deepspeed`), CPU and GPU:

- the stage of epoch e is `e // epochs_per_stage` (0 with `cot`/`no_cot`); the datasets are rebuilt per epoch
  for that stage, and the optimizer state is reset at stage boundaries (its LR warmup restarted) when
  `reset_optimizer` is set;
- every epoch ends with validation (loss and batched generation) and an atomic DeepSpeed checkpoint; the
  best epoch is exported in the transformers format (`<run>/best`), the last one too (`<run>/final`);
- data order depends only on (seed, epoch), and the checkpoint holds model, optimizer, LR schedule and the
  trainer's state, so a resumed run reaches the parameters an uninterrupted one reaches.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from engine.training.checkpoint import latest_tag, load_checkpoint, save_checkpoint
from engine.training.config import ConfigError, TrainConfig
from engine.training.lr_schedule import LRFactor, restart_warmup
from engine.training.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    init_distributed,
)
from engine.training.reporting import MetricsLogger, format_summary_table, plot_training_curves, stage_summary, write_summary
from engine.utils.io import atomic_write_json
from engine.utils.logging import get_logger
from engine.utils.profiling import profile_range

log = get_logger("train")


class TrainingError(RuntimeError):
    pass


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda_for(config: TrainConfig, total_steps: int) -> LRFactor:
    """Linear warmup (restarted when the optimizer is reset), then constant, linear or cosine decay down to
    `min_lr_ratio` of the peak (engine/training/lr_schedule.py)."""
    return LRFactor(config.lr_schedule, config.warmup_steps, total_steps, config.min_lr_ratio)


def reset_optimizer_state(engine) -> int:
    """Forget Adam's moments (the original CoCoNuT builds a new optimizer at each stage). Returns the number
    of parameter states cleared. Walks DeepSpeed's wrappers down to the torch optimizer that holds them."""
    opt = engine.optimizer
    seen = set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            cleared = len(opt.state)
            opt.state.clear()
            return cleared
        opt = getattr(opt, "optimizer", None)
    raise TrainingError(f"cannot find the torch optimizer inside {type(engine.optimizer).__name__} to reset")


def deepspeed_config(config: TrainConfig, use_bf16: bool) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": config.batch_size_training,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": use_bf16},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no fused-op JIT build
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    for key, value in config.deepspeed.items():  # user overrides win
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


class Trainer:
    def __init__(self, config: TrainConfig, *, local_rank: int | None = None):
        self.config = config
        self.env: DistEnv = init_distributed(config.device, local_rank)
        self.device = self.env.device
        self.run_dir = config.run_dir
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.use_bf16 = bool(config.bf16 and self.device.type == "cuda")
        self._paged_eval_failed = False  # eval_kv_cache=auto falls back to the dynamic cache once it fails
        if config.bf16 and not self.use_bf16 and self.env.is_main:
            log.info("bf16 asked for but running on CPU: training in fp32")
        _seed_everything(config.seed)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json", config.to_dict())
        self.metrics = MetricsLogger(self.run_dir, enabled=self.env.is_main)
        self.history: list[dict] = []
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.global_step = 0
        self.start_epoch = 0
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ data
    def _data_paths(self) -> tuple[Path, Path | None]:
        cfg = self.config
        if cfg.train_path is None and not cfg.only_eval:
            from engine.data.synthetic import generate_synthetic

            data_dir = self.run_dir / "data"
            opts = dict(cfg.synthetic or {})
            if self.env.is_main and not (data_dir / "train.jsonl").is_file():
                log.info("generating the synthetic task into %s (%s)", data_dir, opts or "defaults")
                generate_synthetic(data_dir, **opts)
            barrier()
            return data_dir / "train.jsonl", data_dir / "val.jsonl"
        if cfg.only_eval and cfg.val_path is None:
            raise ConfigError("only_eval needs val_path (the records to evaluate)")
        train = Path(cfg.train_path) if cfg.train_path else None
        val = Path(cfg.val_path) if cfg.val_path else None
        for key, path in (("train_path", train), ("val_path", val)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{key}: data file not found: {path}")
        return train, val

    def _curriculum(self):
        from engine.data.dataset import CurriculumConfig

        cfg = self.config
        return CurriculumConfig(
            c_thought=cfg.c_thought,
            max_latent_stage=cfg.max_latent_stage,
            pad_latent_to_max=cfg.pad_latent_to_max,
            uniform_prob=cfg.uniform_prob,
            cot=cfg.cot,
            no_cot=cfg.no_cot,
            no_thoughts=cfg.no_thoughts,
            no_curriculum=cfg.no_curriculum,
            coconut=cfg.coconut,
            max_length=cfg.max_length,
            overlong=cfg.overlong,
        )

    def stage_for_epoch(self, epoch: int) -> int:
        from engine.data.dataset import stage_for_epoch

        return stage_for_epoch(epoch, self.config.epochs_per_stage, self.curriculum, self.final_stage)

    # ------------------------------------------------------------------ model
    def _load_model(self):
        from engine.model.loading import load_model

        cfg = self.config
        kwargs = dict(
            dtype=torch.float32,  # DeepSpeed keeps fp32 master weights and casts for bf16 itself
            device=self.device,
            seed=cfg.seed,
            attn_implementation=cfg.attn_implementation,
            max_tiles=cfg.max_tiles,
        )
        if cfg.load_model_path:
            path = Path(cfg.load_model_path)
            model, tok, proc = load_model(path, **kwargs)
            check_same_architecture(model, cfg, path)
            log.info("initialised from %s", path)
        else:
            model, tok, proc = load_model(cfg.model_id, model_overrides=cfg.model_overrides or None, **kwargs)
        model.thought_feedback = not cfg.pause_as_thought
        try:
            model.set_latent_passes(
                cfg.latent_passes, prefix_bucket=cfg.latent_prefix_bucket, final_bucket=cfg.latent_final_bucket
            )
        except RuntimeError as e:
            raise ConfigError(f"latent_passes={cfg.latent_passes!r}: {e}") from e
        return model, tok, proc

    def _init_engine(self, model, steps_per_epoch: int):
        import deepspeed

        cfg = self.config
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        # resume=N (an epoch) starts a fresh run at epoch N: its schedule spans the epochs it trains
        epochs = cfg.num_epochs - (0 if isinstance(cfg.resume, bool) else cfg.resume)
        total_steps = max(1, steps_per_epoch * epochs)
        factor = lr_lambda_for(cfg, total_steps)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=deepspeed_config(cfg, self.use_bf16),
        )
        return engine

    # ------------------------------------------------------------------ loaders
    def _train_loader(self, records, stage: int, epoch: int):
        from engine.data.collator import MultimodalCollator
        from engine.data.dataset import CurriculumDataset

        cfg = self.config
        dataset = CurriculumDataset(records, self.tokenizer, self.image_processor, self.curriculum, stage, seed=cfg.seed, epoch=epoch)
        if len(dataset) == 0:
            raise TrainingError(f"the training set is empty at stage {stage} (all samples dropped or none given)")
        sampler = DistributedSampler(
            dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size_training,
            sampler=sampler,
            collate_fn=MultimodalCollator(self.tokenizer.pad_token_id, self.model.latent_id),
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def _eval_loader(self, dataset, batch_size: int, collate):
        sampler = DistributedSampler(dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=self.config.num_workers)

    def steps_per_epoch(self, num_samples: int) -> int:
        """Optimizer steps per epoch: micro-batches per rank, rounded down to whole accumulation cycles."""
        per_rank = math.ceil(num_samples / self.env.world_size)
        micro = math.ceil(per_rank / self.config.batch_size_training)
        return max(1, micro // self.config.gradient_accumulation_steps)

    # ------------------------------------------------------------------ ZeRO-3 lockstep
    def _min_passes(self, input_ids: torch.Tensor) -> int:
        """Under ZeRO-3 every rank must run the same number of passes (parameter gathers) per step."""
        if self.config.zero_stage != 3 or self.env.world_size == 1:
            return 0
        local = 1 + int((input_ids == self.model.latent_id).any(0).sum())
        return all_reduce_max(local, self.device)

    def _step_sync(self):
        if self.config.zero_stage != 3 or self.env.world_size == 1:
            return None
        device = self.device

        def sync(local_done: bool) -> bool:
            flag = torch.tensor([0 if local_done else 1], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return int(flag.item()) == 0

        return sync

    # ------------------------------------------------------------------ run
    def setup(self) -> None:
        from engine.data.dataset import check_stages, max_steps
        from engine.data.records import load_records

        cfg = self.config
        self.curriculum = self._curriculum()
        train_path, val_path = self._data_paths()
        self.train_records = load_records(train_path) if train_path and not cfg.only_eval else []
        self.val_records = load_records(val_path, need_answer=not cfg.only_eval) if val_path else []
        if self.train_records and cfg.coconut:
            check_stages(self.train_records, self.curriculum)
        self.final_stage = self.curriculum.final_stage(max_steps(self.train_records))
        self.model, self.tokenizer, self.image_processor = self._load_model()
        if self.env.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info(
                "model %s: %.2fM parameters | %d train / %d val records | world %d on %s",
                cfg.load_model_path or cfg.model_id, n_params / 1e6, len(self.train_records), len(self.val_records),
                self.env.world_size, self.device,
            )

    def run(self) -> dict:
        self.setup()
        if self.config.only_eval:
            return self.evaluate_only()
        return self.train()

    def train(self) -> dict:
        cfg = self.config
        steps_per_epoch = self.steps_per_epoch(len(self.train_records))
        self.engine = self._init_engine(self.model, steps_per_epoch)
        if cfg.resume is True:
            self._resume()
        elif cfg.resume:  # an epoch number, as in the original: skip the epochs before it
            self.start_epoch = int(cfg.resume)
            if self.env.is_main:
                log.info("starting at epoch %d (stage %d)", self.start_epoch + 1, self.stage_for_epoch(self.start_epoch))
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, cfg.num_epochs):
                stage = self.stage_for_epoch(epoch)
                if epoch > 0 and cfg.reset_optimizer and stage != self.stage_for_epoch(epoch - 1):
                    cleared = reset_optimizer_state(self.engine)
                    restart_warmup(self.engine.lr_scheduler)  # a fresh Adam gets its warmup again
                    log.info("stage %d begins: optimizer state reset (%d parameter states cleared)", stage, cleared)
                train_stats = self.train_epoch(epoch, stage)
                record = {"epoch": epoch + 1, "stage": stage, **train_stats}
                if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.num_epochs:
                    record.update(self.validate(stage))
                self.history.append(record)
                self.metrics.log("epoch", self.global_step, **record)
                self._after_epoch(epoch, record)
        except (Exception, KeyboardInterrupt) as e:
            where = self.last_checkpoint or (latest_tag(self.checkpoint_dir) and self.checkpoint_dir)
            hint = f"last good checkpoint: {where} (continue with --set resume=true)" if where else "no checkpoint was written yet"
            log.error("training stopped in epoch %d (step %d): %s: %s; %s", epoch + 1, self.global_step, type(e).__name__, e, hint)
            raise
        finally:
            self.metrics.close()
        return self._finish()

    def _resume(self) -> None:
        tag = latest_tag(self.checkpoint_dir)
        if tag is None:
            raise ConfigError(f"resume=true but {self.checkpoint_dir} holds no complete checkpoint")
        state = load_checkpoint(self.engine, self.checkpoint_dir, tag)
        if state.get("model_fingerprint") not in (None, model_fingerprint(self.model)):
            raise TrainingError(f"checkpoint {self.checkpoint_dir / tag} was written for another model configuration")
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.last_checkpoint = self.checkpoint_dir / tag
        if self.env.is_main:
            log.info("resuming at epoch %d (stage %d), step %d", self.start_epoch + 1, self.stage_for_epoch(self.start_epoch), self.global_step)

    def train_epoch(self, epoch: int, stage: int) -> dict:
        cfg = self.config
        engine = self.engine
        engine.train()
        loader = self._train_loader(self.train_records, stage, epoch)
        gas = cfg.gradient_accumulation_steps
        micro_steps = (len(loader) // gas) * gas or len(loader)  # whole accumulation cycles only
        bar = tqdm(total=micro_steps, desc=f"epoch {epoch + 1}/{cfg.num_epochs} stage {stage}", disable=not self.env.is_main, dynamic_ncols=True)
        loss_sum, loss_count, samples, tokens = 0.0, 0, 0, 0
        start = time.perf_counter()
        data_iter = iter(loader)
        for micro in range(micro_steps):
            with profile_range("train/data"):
                batch = next(data_iter)
                batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            min_passes = self._min_passes(batch["input_ids"])
            with profile_range("train/forward"):
                out = engine(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch.get("pixel_values"),
                    labels=batch["labels"],
                    position_ids=batch["position_ids"],
                    return_logits=False,
                    min_passes=min_passes,
                )
                loss = out.loss
            if not torch.isfinite(loss.detach()):
                raise TrainingError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {self.global_step}")
            with profile_range("train/backward"):
                engine.backward(loss)
            with profile_range("train/optimizer"):
                engine.step()
            loss_sum += float(loss.detach())
            loss_count += 1
            samples += int(batch["input_ids"].shape[0])
            tokens += int(batch["attention_mask"].sum())
            if engine.is_gradient_accumulation_boundary() or (micro + 1) % gas == 0:
                self.global_step += 1
                if self.global_step % cfg.log_every_steps == 0:
                    thoughts = self._thought_stats(out.hidden_states, batch["input_ids"])
                    self.metrics.log("train", self.global_step, loss=loss_sum / loss_count, lr=engine.get_lr()[0], stage=stage, **thoughts)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}", stage=stage, samples_s=f"{samples * self.env.world_size / elapsed:.1f}")
            bar.update(1)
        bar.close()
        elapsed = time.perf_counter() - start
        mean_loss, = all_reduce_mean([loss_sum / max(1, loss_count)], self.device)
        return {
            "train_loss": mean_loss,
            "train_samples_per_second": samples * self.env.world_size / elapsed,
            "train_tokens_per_second": tokens * self.env.world_size / elapsed,
            "train_seconds": elapsed,
            "lr": engine.get_lr()[0],
        }

    def _thought_stats(self, hidden_states, input_ids) -> dict:
        """Norms of this batch's continuous thoughts (engine.eval.thoughts); the embedding scale unless ZeRO-3
        partitions the embeddings."""
        from engine.eval.thoughts import thought_norm_stats

        weight = None if self.config.zero_stage == 3 else self.model.base.get_input_embeddings().weight
        return thought_norm_stats(hidden_states, input_ids, self.model.latent_id, weight)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_loss(self, stage: int) -> float | None:
        from engine.data.collator import MultimodalCollator
        from engine.data.dataset import CurriculumDataset

        if not self.val_records:
            return None
        records = self._eval_records()
        dataset = CurriculumDataset(records, self.tokenizer, self.image_processor, self.curriculum, stage, seed=self.config.seed, epoch=0)
        if len(dataset) == 0:
            return None
        loader = self._eval_loader(dataset, self.config.eval_batch_size, MultimodalCollator(self.tokenizer.pad_token_id, self.model.latent_id))
        total, count = 0.0, 0
        for batch in tqdm(loader, desc="validation loss", disable=not self.env.is_main, leave=False):
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            out = self.engine(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
                labels=batch["labels"],
                position_ids=batch["position_ids"],
                return_logits=False,
                min_passes=self._min_passes(batch["input_ids"]),
            )
            n = int(batch["input_ids"].shape[0])
            total += float(out.loss) * n
            count += n
        (mean,) = all_reduce_mean([total / max(1, count)], self.device)
        return mean

    def _eval_records(self) -> list[dict]:
        cap = self.config.eval_max_samples
        return self.val_records if cap is None else self.val_records[:cap]

    def eval_kv_cache(self) -> str:
        """The KV cache of validation generation (`eval_kv_cache`; auto: paged on GPU under ZeRO 0-2, unless it
        failed earlier in this run)."""
        choice = self.config.eval_kv_cache
        if choice == "auto":
            paged_ok = self.device.type == "cuda" and self.config.zero_stage < 3 and not self._paged_eval_failed
            return "paged" if paged_ok else "dynamic"
        return choice

    def _generate_answers(self, model, loader, kv_cache: str):
        from engine.eval.evaluate import generate_answers

        try:
            return generate_answers(
                model,
                loader,
                self.tokenizer,
                device=self.device,
                max_new_tokens=self.config.max_new_tokens,
                total=len(loader),
                min_passes_fn=(lambda b: self._min_passes(b["input_ids"])) if self._step_sync() else None,
                step_sync=self._step_sync(),
                progress=self.env.is_main,
                kv_cache=kv_cache,
            )
        finally:
            if kv_cache == "paged":  # its pool, graphs and merged weights are not kept through training
                from engine.model.paged_runner import release_paged_runner

                release_paged_runner(model)

    @torch.no_grad()
    def generation_metrics(self, stage: int, model=None) -> tuple[dict, list[dict]]:
        from engine.data.collator import GenerationCollator
        from engine.data.dataset import QuestionDataset
        from engine.eval.evaluate import summarize

        model = model or self.model
        records = self._eval_records()
        dataset = QuestionDataset(records, self.tokenizer, self.image_processor, self.curriculum, stage)
        loader = self._eval_loader(dataset, self.config.eval_batch_size, GenerationCollator(self.tokenizer.pad_token_id))
        was_training = model.training
        model.eval()
        kv_cache = self.eval_kv_cache()
        try:
            scored, seconds = self._generate_answers(model, loader, kv_cache)
        except Exception as e:
            if kv_cache != "paged" or self.config.eval_kv_cache != "auto":
                raise
            # the fast path chosen by default must not end a training run: validate on the dynamic cache
            log.warning("validation on the paged KV cache failed (%s: %s); using the dynamic cache for the rest of "
                        "this run", type(e).__name__, e, exc_info=True)
            self._paged_eval_failed = True
            scored, seconds = self._generate_answers(model, loader, "dynamic")
        if kv_cache == "paged":  # every rank switches together (a failure can hit one rank only)
            self._paged_eval_failed = any(all_gather_objects(self._paged_eval_failed))
        model.train(was_training)
        gathered = all_gather_objects((scored, seconds))
        unique: dict[str, dict] = {}
        for part, _ in gathered:
            for s in part:
                unique.setdefault(str(s["id"]), s)  # the sampler pads ranks with repeats
        merged = list(unique.values())
        summary = summarize(merged, max(sec for _, sec in gathered))
        return summary, merged

    def validate(self, stage: int) -> dict:
        self.engine.eval()
        out = {"val_loss": self.validation_loss(stage)}
        if self.val_records:
            summary, _ = self.generation_metrics(stage, self.engine.module)
            out.update(summary)
        self.engine.train()
        if self.env.is_main:
            acc = out.get("val_accuracy")
            log.info(
                "stage %d validation: loss %s | accuracy %s%% | %.1f tokens/answer | %.1f answers/s",
                stage,
                "-" if out["val_loss"] is None else f"{out['val_loss']:.4f}",
                "-" if acc is None else f"{acc:.1f}",
                out.get("tokens_per_answer") or 0.0,
                out.get("answers_per_second") or 0.0,
            )
        return out

    # ------------------------------------------------------------------ checkpoints and exports
    def _after_epoch(self, epoch: int, record: dict) -> None:
        cfg = self.config
        metric = record.get("val_accuracy")
        if metric is None and record.get("val_loss") is not None:
            metric = -record["val_loss"]
        improved = metric is not None and (self.best_metric is None or metric > self.best_metric)
        if improved:
            self.best_metric, self.best_epoch = metric, epoch + 1
        if improved:
            self.export(self.run_dir / "best")
        if not cfg.save_only_improve:  # the original's per-epoch weights, as a loadable export
            self.export(self.run_dir / f"epoch_{epoch + 1:03d}")
        state = {
            "epoch": epoch + 1,
            "stage": record["stage"],
            "global_step": self.global_step,
            "history": self.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "model_fingerprint": model_fingerprint(self.model),
        }
        self.last_checkpoint = save_checkpoint(
            self.engine, self.checkpoint_dir, epoch + 1, state, is_main=self.env.is_main, keep=cfg.keep_checkpoints
        )

    def export(self, out_dir: Path | None) -> None:
        """Export the current weights in the transformers format (gathered from all ranks under ZeRO-3)."""
        if out_dir is None:
            return
        from engine.model.loading import export_model

        gather = nullcontext()
        if self.config.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        with gather:
            if self.env.is_main:
                export_model(self.model, self.tokenizer, self.image_processor, out_dir)
                log.info("exported %s", out_dir)
        barrier()

    def _finish(self) -> dict:
        self.export(self.run_dir / "final")
        result = {"history": self.history, "best_epoch": self.best_epoch, "run_dir": str(self.run_dir)}
        if self.env.is_main:
            title = f"{self.config.name}: validation per stage"
            table = write_summary(self.history, self.run_dir, title)
            plot = plot_training_curves(self.history, self.run_dir / "training_curves.png", title=self.config.name)
            atomic_write_json(self.run_dir / "history.json", self.history)
            print(f"\n{title}\n{table}\n")
            log.info("run directory %s (curves: %s, best epoch: %s)", self.run_dir, plot, self.best_epoch)
        return result

    # ------------------------------------------------------------------ only_eval
    def evaluate_only(self) -> dict:
        cfg = self.config
        stage = cfg.eval_stage if cfg.eval_stage is not None else (0 if (cfg.cot or cfg.no_cot) else cfg.max_latent_stage)
        if not self.val_records:
            raise ConfigError("only_eval: val_path holds no records to evaluate")
        self.model.to(torch.bfloat16 if self.use_bf16 else torch.float32)
        summary, scored = self.generation_metrics(stage)
        if self.env.is_main:
            from engine.eval.evaluate import official_predictions

            preds_path = Path(cfg.predictions_path) if cfg.predictions_path else self.run_dir / "predictions.json"
            atomic_write_json(preds_path, official_predictions(scored))
            atomic_write_json(self.run_dir / "eval_records.json", scored)
            atomic_write_json(self.run_dir / "eval_summary.json", {"stage": stage, **summary})
            row = {"epoch": 0, "stage": stage, **summary}
            print("\n" + format_summary_table(stage_summary([row])) + "\n")
            log.info("predictions written to %s", preds_path)
        return {"stage": stage, **summary}


def model_fingerprint(model) -> str:
    """Names and shapes of the parameters: what a checkpoint must match to be loadable."""
    import hashlib

    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_architecture(model, config: TrainConfig, path: Path) -> None:
    """`load_model_path` must hold the model that `model_id` describes (same sizes), else say what differs."""
    from engine.model.loading import BUILTIN_SPECS, TinyModelConfig, internvl3_1b_geometry_config, tiny_internvl_config
    from engine.model.tiny_tokenizer import build_tiny_tokenizer

    if config.model_id not in BUILTIN_SPECS:
        from transformers import AutoConfig

        expected = AutoConfig.from_pretrained(config.model_id, local_files_only=True)
    elif config.model_id == "tiny":
        tiny = TinyModelConfig.from_overrides(config.model_overrides)
        expected = tiny_internvl_config(build_tiny_tokenizer(tiny.tokenizer_vocab_size), tiny)
    else:
        expected = internvl3_1b_geometry_config(build_tiny_tokenizer())
    got = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    diffs = []
    for part in ("text_config", "vision_config"):
        for key in keys:
            a, b = getattr(getattr(expected, part), key, None), getattr(getattr(got, part), key, None)
            if a != b:
                diffs.append(f"{part}.{key}: model_id {config.model_id!r} has {a}, checkpoint has {b}")
    if diffs:
        raise ConfigError(f"load_model_path {path} holds another model than model_id describes: " + "; ".join(diffs))


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from engine.training.config import load_config

    parser = argparse.ArgumentParser(description="Train or evaluate Multimodal CoCoNuT (staged latent curriculum).")
    parser.add_argument("--config", help="YAML config (keys of engine.training.config.TrainConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; dotted keys reach into dicts: synthetic.hops=4)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    config = load_config(args.config, args.overrides)
    return Trainer(config, local_rank=args.local_rank).run()


if __name__ == "__main__":
    main()
