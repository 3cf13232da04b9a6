"""Process-group set-up for `deepspeed`, `torchrun` and plain `python` launches, on GPU and CPU.

- Without a launcher there is no RANK/WORLD_SIZE/...: a single process group of size 1 is made, so that
  `deepspeed.initialize` works the same (else DeepSpeed tries MPI discovery).
- On CPU: DeepSpeed's CPU accelerator with the gloo backend. DeepSpeed would JIT-compile a shared-memory
  all-reduce op on the first `init_distributed` (~70 s on a 2-core machine); it only speeds up CPU
  all-reduce, which is never our bottleneck, so it is skipped unless asked for.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cuda_allocator: str = "torch's defaults"  # the caching allocator's settings (`choose_cuda_allocator`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(preference: str = "auto") -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        from engine.training.config import ConfigError  # a setting the user can fix: printed without a traceback

        raise ConfigError("device: cuda was asked for but torch sees no CUDA device (device=auto or cpu runs here)")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch reads the first one set
EXPANDABLE_SEGMENTS = "expandable_segments:True"
_ALLOCATOR_SET_HERE: list[str] = []  # what `choose_cuda_allocator` put into the environment, if anything


def choose_cuda_allocator(expandable_segments: bool = True) -> str:
    """Give torch's CUDA caching allocator expandable segments (`EXPANDABLE_SEGMENTS`) unless the environment sets
    the allocator already (`ALLOCATOR_ENV`, which wins) or CUDA has started (the settings are read once, at the
    first CUDA call). Returns the settings in force, for the log.

    Why: at the 8B geometry under ZeRO-3 the step runs close to the device's memory, where fixed-size segments
    fragment. The allocator then frees its cache and retries (a device sync each time). On two H200s with
    expandable segments: no retries and 740-775 ms per step, against 4 retries and 844-887 ms (benchmarks/RESULTS.md).
    """
    for name in ALLOCATOR_ENV:
        if os.environ.get(name):
            if _ALLOCATOR_SET_HERE and os.environ[name] == EXPANDABLE_SEGMENTS:
                return EXPANDABLE_SEGMENTS  # this process's earlier choice
            return f"{name}={os.environ[name]} (from the environment)"
    if not expandable_segments:
        return "torch's defaults"
    if torch.cuda.is_initialized():
        return "torch's defaults (CUDA had started before the allocator could be set)"
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    _ALLOCATOR_SET_HERE.append(EXPANDABLE_SEGMENTS)
    return EXPANDABLE_SEGMENTS


def init_distributed(device: str = "auto", local_rank: int | None = None, cpu_shm_comm: bool = False,
                     expandable_segments: bool = True) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (idempotent). On CUDA the caching allocator is set first
    (`choose_cuda_allocator`)."""
    kind = choose_device(device)
    allocator = choose_cuda_allocator(expandable_segments) if kind == "cuda" else "torch's defaults"
    if kind == "cpu":
        # Must be decided before deepspeed picks its accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK=str(local_rank or 0),
            MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    import deepspeed

    if kind == "cpu" and not cpu_shm_comm:
        comm_torch = importlib.import_module("deepspeed.comm.torch")
        comm_torch.build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if kind == "cpu" else "nccl")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    if kind == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, cuda_allocator=allocator)


def shutdown_distributed(wait_for_peers: bool = False) -> None:
    """Destroy the process group before the process exits: a gloo group left to static destruction can abort a
    rank at exit ("terminate called without an active exception") after the run itself succeeded. With
    ``wait_for_peers`` (a run that ended well on every rank) a barrier comes first, so that no rank tears its
    connections down while a peer still talks on them; after an error a peer may never arrive, so none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait_for_peers and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(value: int, device: torch.device) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    return values if world == 1 else [v / world for v in all_reduce_sum(values, device)]


def all_gather_objects(obj):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class Lockstep:
    """ZeRO-3 across ranks gathers parameters inside module calls, so every rank must run the same number of
    forward passes per step (the largest latent count of any rank) and keep generating until every rank is done.
    Off (and free) for one rank or ZeRO 0-2."""

    enabled: bool
    device: torch.device

    @classmethod
    def for_run(cls, zero_stage: int, env: DistEnv) -> "Lockstep":
        return cls(enabled=zero_stage == 3 and env.world_size > 1, device=env.device)

    def min_passes(self, input_ids: torch.Tensor, model) -> int:
        """Passes this step must run on every rank (0: no constraint)."""
        if not self.enabled or model.language_model_in_one_call:
            return 0  # in one call, every rank gathers the language model once per forward whatever its passes
        local = 1 + int((input_ids == model.latent_id).any(0).sum())
        return all_reduce_max(local, self.device)

    def step_sync(self) -> Callable[[bool], bool] | None:
        """For generation: `sync(local_done)` is True once every rank is done (None when not needed)."""
        if not self.enabled:
            return None
        device = self.device

        def sync(local_done: bool) -> bool:
            flag = torch.tensor([0 if local_done else 1], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return int(flag.item()) == 0

        return sync


def run_on_main(fn: Callable[[], object], env: DistEnv):
    """Run `fn` on rank 0 only and hand its result, or the exception it raised, to every rank (which then raise
    it too): file-system work done once, and no rank left waiting in a collective when it fails."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # handed to the other ranks, then raised here as well
            error = e
    if torch.distributed.is_available() and torch.distributed.is_initialized() and env.world_size > 1:
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result
