"""Host cost of ZeRO-3's per-parameter work, DeepSpeed's own against the engine's (engine/training/zero3_gathers.py,
engine/training/zero3_linear.py and the step of engine/training/zero_step.py), on CPU ranks.

Under ZeRO-3 the forward gathers a leaf module's parameters (one collective, then a copy-out per parameter; DeepSpeed
lists them by a walk over the leaf's modules at each hook), the backward reduces its gradients (a bucket copy, a
reduce-scatter share and a partition copy per parameter) and the step reads the gradient norm on the host, then
re-gathers the persistent parameters (one collective each). Both paths step with torch's fused AdamW. On a GPU that
work is host time; here, with many small parameters and tiny tensors, each phase's time is almost all that host
work, so the per-parameter cost of each path can be read off without a GPU. A figure here is a CPU figure: what it
saves on a GPU is measured with benchmarks/bench_train_step.py (`--zero-settings zero3_flat_leaf_reduction=false`,
`grad_checks=deepspeed`).

    torchrun --nproc_per_node 2 -m benchmarks.zero3_host_cost --blocks 100 --steps 10 --out bench_results/zero3_host
    torchrun --nproc_per_node 2 -m benchmarks.zero3_host_cost --blocks 183 --steps 12 --paths engine_walks,engine \
        --rounds 3                                     # one replacement alone: the parameter lists against the walks

Each rank builds the same model: a leaf module of `--blocks` blocks (a 16x16 linear layer and a LayerNorm: four
tensors each) between two small linear layers, with `stage3_param_persistence_threshold` between the blocks' sizes
so that their biases and norms are persistent. Writes zero3_host_cost.json/.md (rank 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import output_dir, positive_int

PATHS = ("deepspeed", "engine", "engine_walks")  # engine_walks: the engine's path with DeepSpeed's parameter walks


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return x + torch.tanh(self.norm(self.fc(x)))


class Stack(torch.nn.Module):  # the ZeRO-3 leaf: gathered once per call, reduced in its backward hook
    def __init__(self, blocks: int, width: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=100, help="blocks in the leaf module (4 tensors each)")
    p.add_argument("--width", type=int, default=16, help="features per block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--paths", default="deepspeed,engine",
                   help=f"comma-separated, timed in this order: {', '.join(PATHS)}")
    p.add_argument("--rounds", type=positive_int, default=1, help="times through --paths, alternating (one row per path and round)")
    p.add_argument("--out", type=output_dir, default="bench_results/zero3_host")
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown or not args.paths:
        p.error(f"--paths: {', '.join(unknown) or 'none given'}; choose from {', '.join(PATHS)}")
    return args


def build(path: str, args):
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from engine.training import zero3_gathers, zero3_linear
    from engine.training.zero_step import use_device_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(args.width, args.width), Stack(args.blocks, args.width),
                                torch.nn.Linear(args.width, 4))
    set_z3_leaf_modules(model, [Stack])
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": args.width * args.width - 1}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                                      config=config)
    if path in ("engine", "engine_walks"):
        for why in (zero3_gathers.use_coalesced_persistent_gather(engine.optimizer), zero3_gathers.use_split_copy_out(),
                    zero3_gathers.use_flat_leaf_reduction(engine.optimizer), zero3_gathers.use_batched_release(engine.optimizer),
                    use_device_step(engine.optimizer, engine), zero3_linear.use_memory_efficient_linear(),
                    zero3_gathers.use_listed_parameters()):
            assert why is None, why
        if path == "engine_walks":
            zero3_gathers.restore_deepspeed_parameter_walks()
    else:
        zero3_gathers.restore_deepspeed_copy_out()
        zero3_gathers.restore_deepspeed_parameter_walks()
        zero3_linear.restore_deepspeed_linear()
    return engine


def time_path(path: str, args, rank: int) -> dict:
    import deepspeed.comm as dist

    from engine.training.optim import destroy_engine

    engine = build(path, args)
    torch.manual_seed(1 + rank)
    phases = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.steps):
        x, y = torch.randn(2, args.width), torch.randn(2, 4)
        dist.barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(engine(x), y)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if i >= args.warmup:
            for name, ms in zip(phases, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)):
                phases[name].append(ms)
    destroy_engine(engine)
    return {name: statistics.median(values) for name, values in phases.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU ranks: deepspeed picks its accelerator when imported
    import deepspeed
    import deepspeed.comm as dist

    from benchmarks.common import markdown_table, write_results, output_dir
    from engine.training.distributed import shutdown_distributed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = 4 + 4 * args.blocks
    rows = []
    for round_, path in ((r, path) for r in range(args.rounds) for path in args.paths):
        medians = time_path(path, args, rank)
        slowest = [None] * world
        torch.distributed.all_gather_object(slowest, medians)
        row = {"path": path, "round": round_ + 1, "ranks": world, "tensors": tensors}
        for name in medians:
            row[f"{name}_ms"] = max(r[name] for r in slowest)
            row[f"{name}_us_per_tensor"] = row[f"{name}_ms"] * 1e3 / tensors
        rows.append(row)
    if rank == 0:
        columns = [("path", "path"), ("round", "round"), ("ranks", "ranks"), ("tensors", "tensors"), ("forward_ms", "forward ms"),
                   ("backward_ms", "backward ms"), ("step_ms", "step ms"), ("forward_us_per_tensor", "fwd µs/tensor"),
                   ("backward_us_per_tensor", "bwd µs/tensor"), ("step_us_per_tensor", "step µs/tensor")]
        payload = {"benchmark": "zero3_host_cost", "settings": vars(args), "torch": torch.__version__,
                   "deepspeed": deepspeed.__version__, "rows": rows}
        table = markdown_table(rows, columns)
        write_results(args.out, "zero3_host_cost", payload, table,
                      header="# ZeRO-3 host cost per phase, CPU ranks (gloo), median of the slowest rank")
        print(table, flush=True)
    shutdown_distributed(wait_for_peers=True)
    return 0


if __name__ == "__main__":
    from benchmarks.common import run_harness
    raise SystemExit(run_harness(main))
