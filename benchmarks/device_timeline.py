"""The device side of a torch.profiler trace: which kernels the time went to, and when the device sat idle.

`bench_train_step --profile-phase P` reports operators by self time; that hides two things this module shows from
the profiler's Chrome trace (kernels inside CUDA graphs are traced one by one there):

- kernels by name with their count, total and mean time, and apart the kernels a CUDA graph launched (the latent
  block's: thousands of small kernels under one `cudaGraphLaunch`);
- the device's idle gaps between kernels, each charged to the host operator that launched the kernel after it
  (and the `coconut/...` range it ran in): a long gap there is host time the device waited for (a
  synchronisation, Python between launches).

`device_timeline(events)` works on the trace's event list (`trace_events(prof)` exports and loads it), so tests
can hand it a synthetic trace.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_US = 5.0  # shorter gaps are the launch pipeline's normal spacing


def trace_events(prof) -> list[dict]:
    """The events of a finished `torch.profiler.profile` (its Chrome trace, exported to a temporary file)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]
    finally:
        os.unlink(path)


def _by_name(kernels: list[dict], top: int) -> list[dict]:
    table: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        row = table[k["name"][:90]]
        row[0] += 1
        row[1] += k["dur"]
    rows = [dict(name=name, calls=n, ms=us / 1e3, mean_us=us / n) for name, (n, us) in table.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def device_timeline(events: list[dict], top: int = 25) -> dict:
    """Kernels (and device copies/sets) of ``events``: their summed time and the span from the first start to the
    last end, the top ``top`` by total time (all, and those launched by CUDA graphs), and the idle gaps over
    `GAP_US` (no kernel running) charged to (range, operator) of the next kernel's launch."""
    kernels = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    if not kernels:
        return dict(kernels=0, kernel_ms=0.0, span_ms=0.0, idle_ms=0.0, by_name=[], graph_by_name=[], graph_kernels=0,
                    gaps=[])
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: e["ts"])
    starts = [o["ts"] for o in ops]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and "dur" in e
              and str(e.get("name", "")).startswith("coconut/")]

    def launched_by(ts: float) -> tuple[str | None, str | None]:
        """The `coconut/` range and the innermost operator running on the host at ``ts``."""
        where = next((r["name"] for r in ranges if r["ts"] <= ts <= r["ts"] + r["dur"]), None)
        inner = None
        for o in reversed(ops[max(0, bisect.bisect_right(starts, ts) - 5000) : bisect.bisect_right(starts, ts)]):
            if o["ts"] + o["dur"] >= ts:  # the latest-starting operator still running: the innermost
                inner = o["name"]
                break
        return where, inner

    graph_launches = {c for c, r in runtime.items() if "GraphLaunch" in r.get("name", "")}
    in_graphs = [k for k in kernels if k.get("args", {}).get("correlation") in graph_launches]
    gaps: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for k in kernels[1:]:
        gap = k["ts"] - end
        if gap > GAP_US:
            launch = runtime.get(k.get("args", {}).get("correlation"))
            key = launched_by(launch["ts"]) if launch is not None else (None, None)
            gaps[key][0] += 1
            gaps[key][1] += gap
        end = max(end, k["ts"] + k["dur"])
    gap_rows = [dict(range=r or "-", operator=o or "(not found)", gaps=n, ms=us / 1e3)
                for (r, o), (n, us) in gaps.items()]
    return dict(
        kernels=len(kernels),
        kernel_ms=sum(k["dur"] for k in kernels) / 1e3,
        span_ms=(end - kernels[0]["ts"]) / 1e3,
        idle_ms=sum(r["ms"] for r in gap_rows),
        by_name=_by_name(kernels, top),
        graph_by_name=_by_name(in_graphs, top),
        graph_kernels=len(in_graphs),
        gaps=sorted(gap_rows, key=lambda r: -r["ms"])[:top],
    )


if __name__ == "__main__":  # a library module: say where it is used instead of exiting silently
    import sys

    print("error: benchmarks.device_timeline is a library, not a command; its tables come with\n"
          "  python -m benchmarks.bench_train_step ... --profile-phase backward", file=sys.stderr)
    sys.exit(2)
