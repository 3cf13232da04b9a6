"""benchmarks/device_timeline.py on a synthetic Chrome trace: kernels summed by name (CUDA-graph kernels apart),
idle gaps charged to the range and innermost operator that launched the next kernel, nothing on a trace without
kernels."""

from __future__ import annotations

import pytest

from benchmarks.device_timeline import device_timeline


def op(name, ts, dur, cat="cpu_op"):
    return dict(cat=cat, name=name, ts=ts, dur=dur)


def launch(name, ts, correlation):
    return dict(cat="cuda_runtime", name=name, ts=ts, dur=2, args=dict(correlation=correlation))


def kernel(name, ts, dur, correlation):
    return dict(cat="kernel", name=name, ts=ts, dur=dur, args=dict(correlation=correlation))


def test_kernels_by_name_graph_kernels_and_gaps():
    events = [
        op("coconut/prefix_pass", 0, 100, cat="user_annotation"),
        op("aten::mm", 1, 5),
        launch("cudaLaunchKernel", 2, 1),
        kernel("gemm", 10, 20, 1),  # 10-30
        op("aten::cat", 40, 10),
        op("aten::copy_", 42, 3),  # inside cat: the innermost operator at the launch
        launch("cudaLaunchKernel", 43, 2),
        kernel("copy", 60, 5, 2),  # a 30 us gap after the gemm, charged to copy_ in the prefix pass
        launch("cudaGraphLaunch", 200, 3),
        kernel("small", 66, 4, 3),  # 1 us after the copy: no gap
        kernel("small", 71, 4, 3),
        kernel("gemm", 90, 10, 3),  # 15 us gap: launched by the graph, outside any range
    ]
    t = device_timeline(events)
    assert t["kernels"] == 5 and t["graph_kernels"] == 3
    assert t["kernel_ms"] == pytest.approx(43e-3) and t["span_ms"] == pytest.approx(90e-3)
    assert [(r["name"], r["calls"]) for r in t["by_name"]] == [("gemm", 2), ("small", 2), ("copy", 1)]
    assert t["by_name"][0]["mean_us"] == pytest.approx(15.0)
    assert [(r["name"], r["calls"]) for r in t["graph_by_name"]] == [("gemm", 1), ("small", 2)]  # 10 vs 8 us
    assert t["gaps"] == [
        dict(range="coconut/prefix_pass", operator="aten::copy_", gaps=1, ms=pytest.approx(0.030)),
        dict(range="-", operator="(not found)", gaps=1, ms=pytest.approx(0.015)),
    ]
    assert t["idle_ms"] == pytest.approx(0.045)


def test_overlapping_kernels_leave_no_gap_and_an_empty_trace_gives_zeros():
    events = [kernel("a", 0, 50, 1), kernel("b", 10, 5, 2), kernel("c", 52, 1, 3)]  # b inside a; c 2 us after a
    t = device_timeline(events)
    assert t["gaps"] == [] and t["idle_ms"] == 0 and t["span_ms"] == pytest.approx(53e-3)
    empty = device_timeline([op("aten::mm", 0, 5)])
    assert empty["kernels"] == 0 and empty["by_name"] == [] and empty["gaps"] == []


def test_trace_events_reads_a_finished_profile():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.device_timeline import trace_events

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4, 4) @ torch.ones(4, 4)
    events = trace_events(prof)
    assert any(e.get("cat") == "cpu_op" and "mm" in e.get("name", "") for e in events)
    assert device_timeline(events)["kernels"] == 0  # a CPU run: no device events
