"""Train (or evaluate) Multimodal CoCoNuT through the staged latent curriculum.

    python recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml
    torchrun --nproc_per_node 2 recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml
    deepspeed --num_gpus 2 recipes/train_coconut.py --config recipes/configs/aokvqa_coconut.yaml --set lr=5e-5

Every key of `engine.training.config.TrainConfig` can be set in the YAML file or with `--set key=value`.
"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from engine.training.trainer import main  # noqa: E402

if __name__ == "__main__":
    main()
