"""Shared measurement helpers for the benchmark harnesses and suites.

Everything here measures on the device it is given: the copy bandwidth that floors every memory-bound
kernel, a timer that reports the median with spread, peak memory, and the environment stamp that goes
beside every number in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


def use_triton_interpreter_without_cuda() -> None:
    """Run Triton kernels in the interpreter when there is no GPU. Must run before any kernel module is
    imported (`@triton.jit` reads TRITON_INTERPRET when it decorates)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms [{self.p10_ms:.3f}, {self.p90_ms:.3f}] (n={self.repeats})"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, repeats: int = 10) -> Timing:
    """Median and 10th/90th percentiles of `fn()` wall time, after warm-up (compile/autotune excluded)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * (len(samples) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(samples), q(0.1), q(0.9), len(samples), samples)


@functools.lru_cache(maxsize=None)
def check_then_benchmark(benchmark, step: Callable[[str], tuple], fast: str, reference: str, impl: str,
                         tol: float, device: torch.device | str) -> None:
    """A pytest-benchmark case: ``step(fast)`` and ``step(reference)`` (each a tuple of outputs and gradients) must
    agree within ``tol`` (absolute tolerance scaled by the reference's largest value), then ``step(impl)`` is timed,
    synchronised on CUDA."""
    for a, b in zip(step(fast), step(reference), strict=True):
        scale = max(1.0, float(b.detach().abs().max()))
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)

    def run():
        out = step(impl)
        synchronize(device)
        return out

    benchmark(run)


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second).

    This is the floor every memory-bound kernel is compared against. On CPU a smaller buffer is used.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).fill_(1)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), dev, warmup=3, repeats=20)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocator_counts(device: torch.device | str) -> dict[str, int] | None:
    """The caching allocator's running counts that show memory pressure: retries (it freed its cache and asked the
    driver again: a device sync each) and the driver allocations and frees behind them. None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {key: int(stats.get(key, 0)) for key in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def peak_memory_gib(device: torch.device | str) -> float | None:
    """Peak allocated GPU memory since the last reset (None on CPU, where it is not tracked)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def environment_info(device: torch.device | str) -> dict:
    """Device, library versions and date: the stamp that goes beside every number."""
    import transformers

    info = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for package in ("triton", "deepspeed"):  # versions from metadata: importing deepspeed costs seconds
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device"] = torch.cuda.get_device_name(dev)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        # the caching allocator's settings change step times near a full device (expandable segments)
        from engine.training.distributed import ALLOCATOR_ENV

        info["cuda_allocator"] = next((os.environ[name] for name in ALLOCATOR_ENV if os.environ.get(name)), "default")
    else:
        info["device"] = f"CPU ({_cpu_name()}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads)"
    info["git"] = _git_revision()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    """Commit of the checkout (with '+dirty' when files differ from it); None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------- harness helpers
def run_harness(main: Callable[[], int | None]) -> int | None:
    """A harness's `main` as a command: a mistake in its inputs (a model path or checkpoint, a config, data, a shape
    the model cannot take) ends with one ``error:`` line and exit status 2, as the training recipe's does, instead
    of a traceback; COCONUT_DEBUG=1 keeps the traceback."""
    from engine.training.errors import EXPECTED_ERRORS, traceback_requested

    try:
        return main()
    except EXPECTED_ERRORS as e:
        if traceback_requested():
            raise
        print(f"error: {e}\n(COCONUT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def pytest_suite_main(file: str) -> None:
    """What a pytest-benchmark suite run as a command does: say how it runs (exit status 2), not exit silently."""
    name = f"benchmarks/{Path(file).name}"
    print(f"error: {name} is a pytest-benchmark suite, not a command; run it with\n"
          f"  python -m pytest {name} -m benchmark [-k gpu] [--benchmark-json out.json]", file=sys.stderr)
    raise SystemExit(2)


def resolve_device(name: str | None) -> torch.device:
    """'cuda' when available unless told otherwise; a clear error when CUDA is asked for but absent."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} asked for CUDA, but torch.cuda.is_available() is False")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless told otherwise."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def output_dir(text: str) -> str:
    """The type of a harness's ``--out``: a folder, made when results are written; an existing file is refused
    when the arguments are read, not after the measurements."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type: repeats, steps, token counts)."""
    return _at_least(1, text)


def _all_at_least(minimum: int, text: str) -> list[int]:
    values = int_list(text)
    if min(values) < minimum:
        raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    """'1,8,32', each >= 1 (argparse type: batch sizes, latents per stage)."""
    return _all_at_least(1, text)


def natural_int_list(text: str) -> list[int]:
    """'0,1,2', each >= 0 (argparse type: curriculum stages)."""
    return _all_at_least(0, text)


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def choice_list(*choices: str) -> Callable[[str], list[str]]:
    """The argparse type of a comma list drawn from ``choices`` (a report's sections): an unknown name or an empty
    list is refused when the arguments are read (it would run nothing and exit 0)."""

    def parse(text: str) -> list[str]:
        values = str_list(text)
        unknown = sorted(set(values) - set(choices))
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'none given'}; choose from {', '.join(choices)}")
        return values

    return parse


def limit_map(pairs: list[str] | None, valid: tuple[str, ...], flag: str) -> dict[str, int]:
    """['naive=8', 'hf=32'] -> {'naive': 8, 'hf': 32}; unknown names are an error naming the valid ones."""
    limits: dict[str, int] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or name not in valid or not value.isdigit():
            raise SystemExit(f"{flag} takes METHOD=N with METHOD one of {list(valid)}, got {pair!r}")
        limits[name] = int(value)
    return limits


def is_oom(exc: BaseException) -> bool:
    """CUDA (or CPU allocator) out-of-memory, which a sweep records instead of crashing on."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextlib.contextmanager
def strict_fp32():
    """fp32 matmuls and convolutions in full precision (no TF32) for correctness checks; restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def guarded_time_fn(fn, device, *, warmup: int, repeats: int, log) -> tuple[Timing | None, dict]:
    """`time_fn` that never ends a sweep: out-of-memory gives status 'oom', any other error status 'error'
    (its traceback logged; the harness exits non-zero at the end). Returns (timing or None, status fields)."""
    try:
        timing = time_fn(fn, device, warmup=warmup, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - recorded in the results instead of losing the whole run
        status = "oom" if is_oom(e) else "error"
        if status == "error":
            log.exception("timed function failed")
        message = (str(e).splitlines() or [type(e).__name__])[0][:300]
        del e
        free_memory(device)
        return None, {"status": status, "error": message}
    return timing, {"status": "ok"}


def free_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def module_bytes(module: torch.nn.Module, *, skip: tuple[torch.nn.Module, ...] = ()) -> int:
    """Bytes of a module's parameters (shared tensors counted once), leaving out the modules in `skip`."""
    skipped = {id(p) for m in skip for p in m.parameters()}
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in skipped or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def fmt(value, digits: int = 3) -> str:
    """Table cell: floats to `digits` significant figures, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits or abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """`columns` = [(key, header)]; a key missing from a row gives an empty cell."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) if k in r else "" for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_results(out_dir: str | os.PathLike, name: str, payload: dict, table: str, *, header: str = "") -> dict[str, Path]:
    """Write `<name>.json` (rows + environment + command) and `<name>.md` (the table) into `out_dir`.

    Called after every configuration, so a sweep cut short still leaves what it measured.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from engine.utils.io import atomic_write_text

    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=str))
    env = payload.get("environment", {})
    stamp = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    command = payload.get("command", "")
    atomic_write_text(paths["md"], f"{header}\n\n{stamp}\n\n`{command}`\n\n{table}\n" if header
                      else f"{stamp}\n\n`{command}`\n\n{table}\n")  # fmt: skip
    return paths


def command_line() -> str:
    """The command that produced a result, as it would be typed (module form when run with -m)."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = ["python", "-m", spec.name, *argv[1:]]
    else:
        argv = ["python", *argv]
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------- optional packages
def progress(items, **kwargs):
    """tqdm over `items` when tqdm is installed (GPU images may lack it), else the items themselves."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, **kwargs)


def save_plots(plot, payload: dict, out_dir: str | os.PathLike, log) -> list[Path]:
    """Run a plot function of benchmarks.plot_results; without matplotlib, say how to plot later instead."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no PNG plots. Plot later with "
                    "`python -m benchmarks.plot_results %s/<name>.json` where it is installed", out_dir)
        return []
    paths = plot(payload, out_dir)
    for path in paths:
        log.info("wrote %s", path)
    return paths
