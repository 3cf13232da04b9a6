"""Train (or evaluate) Multimodal CoCoNuT through the staged latent curriculum.

    python recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml
    torchrun --nproc_per_node 2 recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml
    deepspeed --num_gpus 2 recipes/train_coconut.py --config recipes/configs/aokvqa_coconut.yaml --set lr=5e-5

Every key of `engine.training.config.TrainConfig` can be set in the YAML file or with `--set key=value`.
The run (data, model, DeepSpeed engine, the epoch loop, validation, checkpoints) is `engine.training.Trainer`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from engine.training.config import load_config  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train or evaluate Multimodal CoCoNuT (staged latent curriculum).")
    parser.add_argument("--config", help="YAML config (keys of engine.training.config.TrainConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; dotted keys reach into dicts: synthetic.hops=4)")
    # the deepspeed launcher passes --local_rank=N to every process
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    return Trainer(config, local_rank=args.local_rank).run()


if __name__ == "__main__":
    main()
