"""Shared measurement helpers for the benchmark harnesses and suites.

Everything here measures on the device it is given: the copy bandwidth that floors every memory-bound
kernel, a timer that reports the median with spread, peak memory, and the environment stamp that goes
beside every number in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


def int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


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
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(paths["json"])
    env = payload.get("environment", {})
    stamp = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    command = payload.get("command", "")
    paths["md"].write_text(f"{header}\n\n{stamp}\n\n`{command}`\n\n{table}\n" if header else f"{stamp}\n\n`{command}`\n\n{table}\n")
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


# ---------------------------------------------------------------------- synthetic batches
@dataclass
class SyntheticBatch:
    """A collated batch built in code: left-padded so the first latent sits at one column in every row."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 except on the answer tokens and eos
    pixel_values: torch.Tensor | None  # (B * tiles, 3, S, S)
    tiles_per_row: int
    n_latents: int
    first_latent_col: int | None  # None without latents
    end_col: int  # last column before the tokens that follow the thoughts (the end-latent marker)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) positions, image tokens and latents included."""
        return int(self.attention_mask.sum())

    def rows(self, n: int) -> "SyntheticBatch":
        """The first n rows (their tiles with them)."""
        pv = None if self.pixel_values is None else self.pixel_values[: n * self.tiles_per_row]
        return dataclasses.replace(
            self, input_ids=self.input_ids[:n], attention_mask=self.attention_mask[:n], labels=self.labels[:n], pixel_values=pv
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SyntheticBatch":
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device=device, dtype=dtype or pv.dtype)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            pixel_values=pv,
        )

    def with_ids(self, input_ids: torch.Tensor) -> "SyntheticBatch":
        return dataclasses.replace(self, input_ids=input_ids)


def special_ids(model, tok) -> set[int]:
    from engine.vocab import IMAGE_END_TOKEN, IMAGE_START_TOKEN

    ids = set(tok.all_special_ids) | {model.latent_id, model.start_latent_id, model.end_latent_id, model.image_token_id}
    for t in (IMAGE_START_TOKEN, IMAGE_END_TOKEN):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return {i for i in ids if i is not None}


def ordinary_token_ids(model, tok) -> torch.Tensor:
    """Every id of the base vocabulary that is no special, image or latent token."""
    special = special_ids(model, tok)
    return torch.tensor([i for i in range(tok.vocab_size) if i not in special], dtype=torch.long)


def image_tiles_for(model, image_tokens: int) -> int:
    """Tiles per row for `image_tokens` <IMG_CONTEXT> tokens (a whole number of tiles, or an error)."""
    per_tile = model.tokens_per_tile
    if image_tokens < 0 or image_tokens % per_tile:
        raise SystemExit(
            f"--image-tokens must be a multiple of the model's {per_tile} tokens per tile, got {image_tokens}"
        )
    return image_tokens // per_tile


def synthetic_batch(
    model,
    tok,
    *,
    batch_size: int,
    n_latents: int,
    question_len: int,
    answer_len: int,
    image_tokens: int,
    seed: int = 0,
    ragged: bool = True,
    markers: bool = True,
) -> SyntheticBatch:
    """Rows `<img> ctx*image_tokens </img> question [<start> latent*n <end>] answer eos`, left-padded.

    Question lengths vary by up to a quarter between rows when `ragged` (so padding is exercised, as the
    collator pads real data); answers all have `answer_len` tokens. With `answer_len == 0` the rows end at
    the end-latent marker (a generation prompt), without eos. Labels cover the answer and eos.
    """
    from engine.vocab import tile_size_from_config
    from engine.vocab import IMAGE_END_TOKEN, IMAGE_START_TOKEN

    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_token_ids(model, tok)
    draw = lambda n: ordinary[torch.randint(len(ordinary), (n,), generator=g)].tolist()  # noqa: E731
    tiles = image_tiles_for(model, image_tokens)
    img_start = tok.convert_tokens_to_ids(IMAGE_START_TOKEN)
    img_end = tok.convert_tokens_to_ids(IMAGE_END_TOKEN)
    rows, label_rows = [], []
    for b in range(batch_size):
        shorten = int(torch.randint(0, question_len // 4 + 1, (1,), generator=g)) if (ragged and b) else 0
        prefix = [img_start, *[model.image_token_id] * image_tokens, img_end] if tiles else []
        prefix += draw(max(1, question_len - shorten))
        middle = [model.start_latent_id, *[model.latent_id] * n_latents, model.end_latent_id] if markers else []
        answer = draw(answer_len) + [tok.eos_token_id] if answer_len else []
        rows.append(prefix + middle + answer)
        label_rows.append([-100] * (len(prefix) + len(middle)) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    for b, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
        labels[b, width - len(r) :] = torch.tensor(lab)
    size = tile_size_from_config(model.config)
    pv = torch.randn(batch_size * tiles, 3, size, size, generator=g) if tiles else None
    latent_cols = (ids[0] == model.latent_id).nonzero().flatten()
    first = int(latent_cols[0]) if len(latent_cols) else None
    end_cols = (ids[0] == model.end_latent_id).nonzero().flatten()
    end_col = int(end_cols[0]) if len(end_cols) else width - 1 - (answer_len + 1 if answer_len else 0)
    return SyntheticBatch(ids, mask, labels, pv, tiles, n_latents, first, end_col)


def replace_latents(batch: SyntheticBatch, model, tok, seed: int = 1) -> SyntheticBatch:
    """The same batch with every <|latent|> replaced by an ordinary token: same length, one plain pass."""
    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_token_ids(model, tok).to(batch.input_ids.device)
    fill = ordinary[torch.randint(len(ordinary), batch.input_ids.shape, generator=g).to(ordinary.device)]
    return batch.with_ids(torch.where(batch.input_ids == model.latent_id, fill, batch.input_ids))


def perturb_after(batch: SyntheticBatch, model, tok, col: int, seed: int = 2) -> SyntheticBatch:
    """Replace every real token after column `col` by a different ordinary token (the causality probe)."""
    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_token_ids(model, tok).to(batch.input_ids.device)
    ids = batch.input_ids
    fill = ordinary[torch.randint(len(ordinary), ids.shape, generator=g).to(ordinary.device)]
    fill = torch.where(fill == ids, ordinary[(torch.searchsorted(ordinary, fill) + 1) % len(ordinary)], fill)
    after = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    after[:, col + 1 :] = True
    after &= batch.attention_mask.bool()
    return batch.with_ids(torch.where(after, fill, ids))


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
