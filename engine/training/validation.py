"""Validation of a run: the loss on the validation records and batched generation scored with answer accuracy
and the A-OKVQA metrics, on the KV cache chosen for the device (`eval_kv_cache`).

`eval_kv_cache: auto` takes the paged cache on a GPU under ZeRO 0-2; if it fails there, the run validates on
transformers' dynamic cache from then on (all ranks together) instead of stopping: the fast path chosen by
default must not end a training run. An explicitly chosen cache raises.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from engine.data.collator import GenerationCollator, MultimodalCollator
from engine.data.dataset import CurriculumConfig, CurriculumDataset, QuestionDataset, tokenize_records
from engine.data.records import DataError
from engine.eval.evaluate import generate_answers, summarize
from engine.model import fast_paths
from engine.model.generation import positions_used
from engine.training.config import ConfigError, TrainConfig
from engine.training.data import batch_to_device, eval_loader, forward_batch
from engine.training.distributed import DistEnv, Lockstep, all_gather_objects, all_reduce_sum
from engine.utils.logging import get_logger
from engine.vocab import IGNORE_INDEX

log = get_logger("train")


class Validator:
    """Built with the run's config and ranks; `setup` hands it the tokenizer, image processor, curriculum and
    records once they are loaded."""

    def __init__(self, config: TrainConfig, env: DistEnv, lockstep: Lockstep):
        self.config = config
        self.env = env
        self.device = env.device
        self.lockstep = lockstep
        self.paged_eval_failed = False  # eval_kv_cache=auto falls back to the dynamic cache once it fails
        self.records: list[dict] = []
        self.tokenizer = self.image_processor = self.curriculum = None

    def setup(self, tokenizer, image_processor, curriculum: CurriculumConfig, records: list[dict],
              model=None, stages: Sequence[int] = (), source: str = "the validation records") -> None:
        """With `model`: what would fail only at a validation, after an epoch of training, is checked now, at
        every stage in ``stages`` that validation will prompt at: the settings, every prompt's room for
        max_new_tokens in the model's positions and, with `overlong: error`, every sequence's length. Records are
        named in ``source``, the file they come from."""
        self.tokenizer, self.image_processor, self.curriculum, self.records = tokenizer, image_processor, curriculum, records
        if model is None or not records:
            return
        cfg = self.config
        limit = getattr(model.language_model.config, "max_position_embeddings", None)
        if limit is not None and positions_used(1, cfg.max_new_tokens) > limit:  # even a one-token prompt
            raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
                              f"max_position_embeddings={limit}")
        try:  # the cache's decision, which refuses one that cannot run here
            fast_paths.eval_kv_cache(cfg.eval_kv_cache, self.device, cfg.zero_stage)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not stages:
            return
        if limit is not None:  # a stage's prompts are as long as the earlier ones' or longer (more thoughts)
            top = max(stages)
            prompts = QuestionDataset(self.eval_records(), tokenizer, image_processor, curriculum, top)
            lengths = prompts.lengths
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if positions_used(lengths[longest], cfg.max_new_tokens) > limit:
                record = prompts.records[longest]
                raise DataError(f"{source}: record {record['id']!r}: its prompt at stage {top} has {lengths[longest]} "
                                f"tokens; with max_new_tokens={cfg.max_new_tokens} its generation needs "
                                f"{positions_used(lengths[longest], cfg.max_new_tokens)} positions, more than the "
                                f"model's max_position_embeddings={limit}: shorten or drop the record, or lower "
                                "max_new_tokens")
        if cfg.overlong == "error":  # the validation loss's sequences, built as each validation will build them
            tokens = tokenize_records(tokenizer, self.eval_records())
            for stage in stages:
                try:
                    CurriculumDataset(self.eval_records(), tokenizer, image_processor, curriculum, stage,
                                      seed=cfg.seed, epoch=0, tokens=tokens)
                except DataError as e:
                    raise DataError(f"{source}: {e}") from None

    def eval_records(self) -> list[dict]:
        cap = self.config.eval_max_samples
        return self.records if cap is None else self.records[:cap]

    def eval_kv_cache(self) -> str:
        """The KV cache of validation generation (`eval_kv_cache`; auto: paged on GPU under ZeRO 0-2, unless it
        failed earlier in this run), decided by `engine.model.fast_paths`, which logs the reason once."""
        cfg = self.config
        return fast_paths.eval_kv_cache(cfg.eval_kv_cache, self.device, cfg.zero_stage, self.paged_eval_failed).choice

    def _loader(self, dataset, collate):
        return eval_loader(dataset, self.config.eval_batch_size, collate, num_workers=self.config.num_workers, env=self.env)

    @torch.no_grad()
    def loss(self, engine, stage: int) -> float | None:
        """Mean loss over the validation records at `stage` (None without records)."""
        if not self.records:
            return None
        model = engine.module
        dataset = CurriculumDataset(self.eval_records(), self.tokenizer, self.image_processor, self.curriculum, stage,
                                    seed=self.config.seed, epoch=0)
        if len(dataset) == 0:
            return None
        loader = self._loader(dataset, MultimodalCollator(self.tokenizer.pad_token_id, model.latent_id))
        # The mean over every labelled token of the set, whatever the batches and ranks. The sampler pads the last
        # shard with repeats of the first samples (every rank runs as many batches: ZeRO-3's lockstep); rank r's k-th
        # row is the padded order's k * world + r, a repeat from len(dataset) on: its labels are masked.
        world, rank = self.env.world_size, self.env.rank
        total, count, seen = 0.0, 0, 0
        for batch in tqdm(loader, desc="validation loss", disable=not self.env.is_main, leave=False):
            n = int(batch["input_ids"].shape[0])
            real = torch.tensor([(seen + j) * world + rank < len(dataset) for j in range(n)])
            seen += n
            if not bool(real.all()):
                batch["labels"] = batch["labels"].masked_fill(~real[:, None], IGNORE_INDEX)
            labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # what the loss averages (shifted), on the host
            batch = batch_to_device(batch, self.device)
            out = forward_batch(engine, batch, self.lockstep.min_passes(batch["input_ids"], model))
            if labelled:
                total += float(out.loss) * labelled
                count += labelled
        total, count = all_reduce_sum([total, float(count)], self.device)
        return total / max(1.0, count)

    def _generate_answers(self, model, loader, kv_cache: str):
        # a paged cache's runner (pool, graphs, merged weights) lives for this call only, not through training
        sync = self.lockstep.step_sync()
        return generate_answers(
            model,
            loader,
            self.tokenizer,
            device=self.device,
            max_new_tokens=self.config.max_new_tokens,
            total=len(loader),
            min_passes_fn=(lambda b: self.lockstep.min_passes(b["input_ids"], model)) if sync else None,
            step_sync=sync,
            progress=self.env.is_main,
            kv_cache=kv_cache,
            answer_match=self.config.answer_match,
        )

    @torch.no_grad()
    def generation_metrics(self, stage: int, model) -> tuple[dict, list[dict]]:
        """Generate an answer for every validation record at `stage`; returns (summary, one scored dict per record)."""
        dataset = QuestionDataset(self.eval_records(), self.tokenizer, self.image_processor, self.curriculum, stage)
        loader = self._loader(dataset, GenerationCollator(self.tokenizer.pad_token_id))
        was_training = model.training
        model.eval()
        kv_cache = self.eval_kv_cache()
        try:
            scored, seconds = self._generate_answers(model, loader, kv_cache)
        except Exception as e:
            if kv_cache != "paged" or self.config.eval_kv_cache != "auto":
                raise
            log.warning("validation on the paged KV cache failed (%s: %s); using the dynamic cache for the rest of "
                        "this run", type(e).__name__, e, exc_info=True)
            self.paged_eval_failed = True
            scored, seconds = self._generate_answers(model, loader, "dynamic")
        if kv_cache == "paged":  # every rank switches together (a failure can hit one rank only)
            self.paged_eval_failed = any(all_gather_objects(self.paged_eval_failed))
        model.train(was_training)
        gathered = all_gather_objects((scored, seconds))
        unique: dict[str, dict] = {}
        for part, _ in gathered:
            for s in part:
                unique.setdefault(str(s["id"]), s)  # the sampler pads ranks with repeats
        merged = list(unique.values())
        summary = summarize(merged, max(sec for _, sec in gathered))
        return summary, merged

    def validate(self, engine, stage: int) -> dict:
        """Loss and generation metrics of the model inside `engine`, logged on rank 0."""
        engine.eval()
        out = {"val_loss": self.loss(engine, stage)}
        if self.records:
            summary, _ = self.generation_metrics(stage, engine.module)
            out.update(summary)
        engine.train()
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
