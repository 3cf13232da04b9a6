"""Fixtures and collection for the pytest-benchmark suites in this folder (`bench_*.py`, marked `benchmark`).

    pytest benchmarks -m benchmark                            # timed, on the GPU when there is one
    pytest benchmarks -m benchmark --benchmark-disable -q     # each benchmark body once, untimed (CI)

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1, set here before any kernel module is
imported) and torch uses one thread (OMP_NUM_THREADS=1). Tests marked `gpu` are skipped without CUDA.
"""

from __future__ import annotations

import fnmatch
import os

import torch

if not torch.cuda.is_available():
    # Both must be in place before a test module imports a kernel or runs an op (TRITON_INTERPRET is read
    # when @triton.jit decorates; child processes inherit the variables).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from benchmarks.common import copy_bandwidth_gbs  # noqa: E402

# The harnesses (command-line programs, no tests in them) are not collected.
HARNESSES = {"bench_latent_forward.py", "bench_generate.py", "bench_train_step.py", "bench_block_ops.py",
             "bench_attention_backends.py"}


def pytest_collect_file(file_path, parent):
    """Collect `bench_*.py` suites, which pytest's default `test_*.py` pattern would not see."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or file_path.name in HARNESSES:
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None  # already collected through python_files
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it already
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the suites measure on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Measured copy bandwidth of `device` in GB/s (bytes read + written): the floor of memory-bound kernels."""
    return copy_bandwidth_gbs(str(device))
