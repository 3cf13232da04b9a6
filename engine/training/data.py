"""The trainer's data: which files (the synthetic task generated into the run directory when no data is given),
the curriculum settings, and the data loaders of one stage and epoch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from engine.data.collator import MultimodalCollator
from engine.data.dataset import CurriculumConfig, CurriculumDataset
from engine.data.images import find_image_problems
from engine.data.records import DataError, iter_record_file
from engine.data.synthetic import ensure_synthetic
from engine.training.config import ConfigError, TrainConfig
from engine.training.distributed import DistEnv, all_gather_objects, run_on_main
from engine.training.errors import TrainingError
from engine.utils.device import to_device_keeping_host
from engine.utils.logging import get_logger

log = get_logger("train")


def curriculum_from_config(config: TrainConfig) -> CurriculumConfig:
    return CurriculumConfig(
        c_thought=config.c_thought,
        max_latent_stage=config.max_latent_stage,
        pad_latent_to_max=config.pad_latent_to_max,
        uniform_prob=config.uniform_prob,
        uniform_prob_from_stage=config.uniform_prob_from_stage,
        cot=config.cot,
        no_cot=config.no_cot,
        no_thoughts=config.no_thoughts,
        no_curriculum=config.no_curriculum,
        coconut=config.coconut,
        max_length=config.max_length,
        overlong=config.overlong,
    )


def data_paths(config: TrainConfig, run_dir: Path, env: DistEnv) -> tuple[Path | None, Path | None]:
    """(train, val) record files. Without `train_path` the synthetic task is generated into `<run>/data`, or
    reused when `<run>/data/synthetic.json` records exactly the `synthetic` settings asked for."""
    if config.train_path is None and not config.only_eval:
        data_dir = run_dir / "data"
        run_on_main(lambda: ensure_synthetic(data_dir, config.synthetic_settings), env)
        # synthetic.n_val=0: a run without validation, as one without val_path
        val = data_dir / "val.jsonl" if config.synthetic_settings.n_val else None
        return data_dir / "train.jsonl", val
    if config.only_eval and config.val_path is None:
        raise ConfigError("only_eval needs val_path (the records to evaluate)")
    train = Path(config.train_path) if config.train_path else None
    val = Path(config.val_path) if config.val_path else None
    for key, path in (("train_path", train), ("val_path", val)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: data file not found: {path}")
    return train, val


def check_record_images(path: Path, records: list[dict], env: DistEnv) -> None:
    """Decode every image the records of `path` use, before any training: the ranks share the files, each on a
    pool of threads. DataError naming `file:line`, the record and the problem of each bad one."""
    images = sorted({r["image"] for r in records if r.get("image")})
    problems: dict[str, str] = {}
    for part in all_gather_objects(find_image_problems(images[env.rank :: env.world_size], progress=env.is_main)):
        problems.update(part)
    if not problems:
        return
    places = {str(record.get("id")): where for where, record in iter_record_file(path)}
    bad = [f"{places.get(str(r['id']), path)}: record {r['id']!r}: {problems[r['image']]}"
           for r in records if r.get("image") in problems]
    listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    head = "" if len(bad) == 1 else f"{len(bad)} records of {path} have images that cannot be used: "
    raise DataError(f"{head}{listed} (fix or remove the record; check_images=false skips this check)")


def train_loader(records, tokenizer, image_processor, curriculum, stage: int, epoch: int, *, latent_id: int,
                 config: TrainConfig, env: DistEnv, tokens: list[list[int]] | None = None) -> DataLoader:
    """The shuffled loader of one epoch; the order depends only on (seed, epoch), so a resumed run sees the same.
    ``tokens``: `tokenize_records` of ``records``, when the caller has them."""
    dataset = CurriculumDataset(records, tokenizer, image_processor, curriculum, stage, seed=config.seed, epoch=epoch,
                                tokens=tokens)
    if len(dataset) == 0:
        raise TrainingError(f"the training set is empty at stage {stage} (all samples dropped or none given)")
    sampler = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size_training,
        sampler=sampler,
        collate_fn=MultimodalCollator(tokenizer.pad_token_id, latent_id),
        num_workers=config.num_workers,
        pin_memory=env.device.type == "cuda",
        drop_last=False,
    )


def eval_loader(dataset, batch_size: int, collate, *, num_workers: int, env: DistEnv) -> DataLoader:
    """In order, sharded over the ranks (the sampler pads the last shard with repeats: callers deduplicate)."""
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers)


def samples_per_epoch(records, tokenizer, image_processor, curriculum, stages: dict[int, int], *, seed: int,
                      tokens: list[list[int]]) -> dict[int, int]:
    """The samples each epoch of ``stages`` (epoch -> stage) trains on once samples over max_length are dropped:
    what its optimizer steps, and so the learning-rate schedule's length, follow from. Counted from the
    records' tokens (no image is decoded); without uniform_prob an epoch's count depends on its stage only."""
    per_epoch = curriculum.uniform_prob > 0.0
    counts: dict = {}
    out = {}
    for epoch, stage in stages.items():
        key = (stage, epoch) if per_epoch else stage
        if key not in counts:
            counts[key] = len(CurriculumDataset(records, tokenizer, image_processor, curriculum, stage, seed=seed,
                                                epoch=epoch, tokens=tokens, warn_dropped=False))  # fmt: skip
        out[epoch] = counts[key]
    return out


def micro_batches_per_epoch(num_samples: int, config: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank in an epoch of ``num_samples`` samples (the sampler pads the last shard)."""
    return math.ceil(math.ceil(num_samples / world_size) / config.batch_size_training)


def steps_per_epoch(num_samples: int, config: TrainConfig, world_size: int) -> int:
    """Optimizer steps per epoch: micro-batches per rank, rounded down to whole accumulation cycles."""
    return max(1, micro_batches_per_epoch(num_samples, config, world_size) // config.gradient_accumulation_steps)


def check_accumulation(micro_batches: int, gas: int, where: str) -> None:
    """An epoch must hold a whole accumulation cycle: with fewer micro-batches than gradient_accumulation_steps no
    optimizer step ends in it, and its gradients would run into the next epoch (another stage) unsaved."""
    if micro_batches < gas:
        raise ConfigError(
            f"{where} has {micro_batches} micro-batches per rank, fewer than gradient_accumulation_steps={gas}: no "
            "optimizer step would end in it. Lower gradient_accumulation_steps or batch_size_training, or add data"
        )


def batch_to_device(batch: dict, device: torch.device, *, non_blocking: bool = False) -> dict:
    """A collated batch's tensors on `device` (other entries as they are), each remembering its host tensor, so that
    the pass schedule and the loss read the ids, mask and labels there without waiting for the device
    (`engine.utils.device.host_values`)."""
    return {k: (to_device_keeping_host(v, device, non_blocking=non_blocking) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def forward_batch(engine, batch: dict, min_passes: int):
    """The model's training forward on a collated batch (loss on the labelled positions, no logits kept)."""
    return engine(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        labels=batch["labels"],
        position_ids=batch["position_ids"],
        return_logits=False,
        min_passes=min_passes,
    )
