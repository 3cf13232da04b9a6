"""Train (or evaluate) Multimodal CoCoNuT through the staged latent curriculum.

    python recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml
    torchrun --nproc_per_node 2 recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml
    deepspeed --num_gpus 2 recipes/train_coconut.py --config recipes/configs/aokvqa_coconut.yaml --set lr=5e-5

Every key of `engine.training.config.TrainConfig` can be set in the YAML file or with `--set key=value`.
The run (data, model, DeepSpeed engine, the epoch loop, validation, checkpoints) is
`engine.training.trainer.Trainer`.

A mistake in the config, the data, an image or a checkpoint ends the run with one message naming what and where,
printed once (by rank 0; by another rank only when it fails alone), exit status 2; `--debug` (or COCONUT_DEBUG=1 in the environment) shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from engine.training.config import load_config  # noqa: E402
from engine.training.distributed import shutdown_distributed  # noqa: E402
from engine.training.errors import EXPECTED_ERRORS, Terminated, traceback_requested  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_TERMINATED = 143  # 128 + SIGTERM
# Rank 0 prints the errors every rank meets (a config, the data, a checkpoint: rank 0 checks and shares them), and
# the launcher then stops the other ranks. A rank that fails alone prints after this grace period, since rank 0
# may be waiting for it in a collective and never get to print.
OTHER_RANK_GRACE_S = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train or evaluate Multimodal CoCoNuT (staged latent curriculum).")
    parser.add_argument("--config", help="YAML config (keys of engine.training.config.TrainConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; dotted keys reach into dicts: synthetic.hops=4)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of config, data and checkpoint errors (also: COCONUT_DEBUG=1)")
    # the deepspeed launcher passes --local_rank=N to every process
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return args


def debug_requested(args: argparse.Namespace) -> bool:
    return args.debug or traceback_requested()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises `Terminated` while the run lasts (the handler before is put back after)."""
    if not _in_main_thread():  # only the main thread may set a handler
        yield
        return

    def stop(signum, frame):
        raise Terminated(f"signal {signal.Signals(signum).name}")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        with sigterm_as_interrupt():
            return Trainer(config, local_rank=args.local_rank).run()
    except EXPECTED_ERRORS as e:
        if debug_requested(args):
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}\n(--debug or COCONUT_DEBUG=1 shows the traceback)", file=sys.stderr)
        else:
            time.sleep(OTHER_RANK_GRACE_S)
            print(f"error (rank {rank}): {e}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt as e:  # the trainer has said where it stopped and which checkpoint to resume from
        if debug_requested(args):
            raise
        raise SystemExit(EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    ended_well = False
    try:
        main()
        ended_well = True
    finally:  # the process ends here: its process group goes first (a script's main, not a library call)
        shutdown_distributed(wait_for_peers=ended_well)
