"""The DeepSpeed training-step harness (`benchmarks/bench_train_step.py`) end to end on CPU: one process with
ZeRO-2 (in-process), an out-of-memory recorded in its row, and two torchrun processes with ZeRO-3 (gloo)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.common
from benchmarks import bench_train_step
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent

# the --smoke preset: text 12 (question 6, answer 6 + eos), 16 image tokens, c_thought 2, batch 2 per rank
QUESTION, ANSWER, IMAGE_TOKENS, C_THOUGHT, BATCH = 6, 6, 16, 2, 2


def _finite_numbers(value) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def check_rows(payload: dict, world_size: int, zero_stage: int, stages: list[int]) -> None:
    rows = payload["rows"]
    assert payload["world_size"] == world_size
    assert [(r["zero_stage"], r["n_latents"]) for r in rows] == [(zero_stage, s * C_THOUGHT) for s in stages]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["skipped_steps"] == 0, r  # every timed step updated the weights
        assert _finite_numbers(r), r
        assert r["world_size"] == world_size and r["global_batch"] == world_size * BATCH
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["loss_finite"] and r["loss"] > 0
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        # every step's loss and global gradient norm (rank 0's), the last loss the row's
        assert len(r["step_losses"]) == len(r["step_grad_norms"]) >= r["steps"]
        norms = [n for n in r["step_grad_norms"] if n is not None]  # None where DeepSpeed keeps no norm (ZeRO-0)
        assert r["step_losses"][-1] == r["loss"] and len(norms) == (0 if zero_stage == 0 else len(r["step_losses"]))
        assert all(n > 0 for n in norms)
        # global throughput: samples/s = global batch / step time; tokens/s = samples/s x mean tokens per sample
        assert r["samples_per_s"] == pytest.approx(r["global_batch"] / (r["median_ms"] / 1e3), rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * r["mean_tokens_per_sample"], rel=1e-6)
        assert r["mean_tokens_per_sample"] == pytest.approx(r["tokens_per_step"] / r["global_batch"], rel=1e-9)
        # a row's real tokens: <img> ctx*16 </img>, a question of 6 tokens (rows after a rank's first up to a
        # quarter shorter), <start> latents <end>, the answer and eos; never more than the padded width
        n = r["n_latents"]
        longest = IMAGE_TOKENS + 2 + QUESTION + n + 2 + ANSWER + 1
        shortest = longest - QUESTION // 4
        assert shortest <= r["mean_tokens_per_sample"] <= r["seq_len"] <= longest
        assert r["passes"] == n + 1  # prefix pass, one per latent, final pass (one pass without latents)
        terms = r["flops_terms"]
        assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"), rel=1e-12)
        assert all(terms[k] > 0 for k in ("lm", "lm_attention", "lm_head", "vision", "vision_attention", "projector"))
        assert r["achieved_tflops_per_gpu"] == pytest.approx(
            r["model_tflop_per_step"] / (r["median_ms"] / 1e3) / world_size, rel=1e-9)
        assert r["mfu"] is None and r["mfu_matmul"] is None and r["peak_gib"] is None  # n/a on CPU
    # more latents, more language-model tokens and FLOPs, the same image work
    by_n = sorted(rows, key=lambda r: r["n_latents"])
    if len(by_n) > 1:
        assert by_n[-1]["flops_terms"]["lm"] > by_n[0]["flops_terms"]["lm"]
        assert by_n[-1]["flops_terms"]["vision"] == by_n[0]["flops_terms"]["vision"]


def test_single_process_zero2_smoke(tmp_path, capsys):
    rc = bench_train_step.main(["--smoke", "--out", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "train_step.json").read_text())
    check_rows(payload, world_size=1, zero_stage=2, stages=[0, 1])
    assert payload["launcher"] == "python" and payload["command"].startswith("python -m benchmarks.bench_train_step")
    sizes = payload["model_sizes"]
    assert 0 < sizes["lm_params"] < sizes["total_params"] and sizes["vision_seq"] > 1
    md = (tmp_path / "train_step.md").read_text()
    assert "6 · N_lm · tokens" in md and "| ZeRO |" in md
    assert "samples/s" in capsys.readouterr().out


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = benchmarks.common.time_fn
    calls = []

    def oom_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(benchmarks.common, "time_fn", oom_first)
    rc = bench_train_step.main(["--smoke", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert rc == 0  # an OOM is a result, not a failure
    assert rows[0]["status"] == "oom" and "out of memory" in rows[0]["error"] and "median_ms" not in rows[0]
    assert rows[1]["status"] == "ok" and rows[1]["samples_per_s"] > 0  # the engine was rebuilt after the OOM


@pytest.mark.distributed
def test_two_process_zero3_through_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", free_port(), "-m", "benchmarks.bench_train_step",
           "--smoke", "--zero-stages", "3", "--stages", "0,2", "--zero-settings", "default",
           "--zero-settings", "zero3_listed_parameters=false", "--alternate", "listed_parameters,split_copy_out,flat_gradients",
           "--alternate-rounds", "2", "--alternate-steps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    payload = json.loads((out / "train_step.json").read_text())
    walks = {"default": "listed", "zero3_listed_parameters=false": "deepspeed"}
    for setting, walk in walks.items():  # the trainer's parameter lists, and DeepSpeed's walks when asked
        rows = [r for r in payload["rows"] if r["zero_settings"] == setting]
        assert [r["parameter_walks"] for r in rows] == [walk, walk]
        check_rows(dict(payload, rows=rows), world_size=2, zero_stage=3, stages=[0, 2])
        assert all(abs(r["loss_diff"]) < 1e-5 for r in rows)  # the same steps with either walk
    # --alternate: each setting timed in both rounds of the same engine, with the replacements it names switched
    # off and the others as the row was built; the row's own state again at the end
    for r in payload["rows"]:
        listed = r["zero_settings"] == "default"
        alternate = r["alternate"]["settings"]
        assert list(alternate) == ["as built", "listed_parameters off", "split_copy_out off", "flat_gradients off"]
        built = alternate["as built"]["active"]
        assert built["listed_parameters"] is listed and built["split_copy_out"] is built["flat_gradients"] is True
        assert r["alternate"]["active_after"] == built
        timed = ["as built", "split_copy_out off", "flat_gradients off"] + (["listed_parameters off"] if listed else [])
        for key in timed:
            assert len(alternate[key]["round_medians_ms"]) == 2 and alternate[key]["steps"] == 2
            assert 0 < alternate[key]["p10_ms"] <= alternate[key]["median_ms"] <= alternate[key]["p90_ms"]
            switched = {"listed_parameters": key != "listed_parameters off" and listed,
                        "split_copy_out": key != "split_copy_out off", "flat_gradients": key != "flat_gradients off"}
            assert {k: alternate[key]["active"][k] for k in switched} == switched, key
        if not listed:  # the row runs DeepSpeed's walks: nothing to switch off
            assert alternate["listed_parameters off"] == {"unavailable": "not installed in this row"}
        assert alternate["as built"]["vs_built"] == 1.0
    md = (out / "train_step.md").read_text()
    assert "alternated in one engine" in md and "split_copy_out off" in md
    assert payload["launcher"] == "torchrun" and payload["command"].startswith("torchrun --nproc_per_node 2 -m")
    assert sorted(p.name for p in out.iterdir()) == ["train_step.json", "train_step.md"]  # rank 0 alone writes


def test_ranks_merge_into_global_throughput_and_mfu():
    """Two ranks: the step time is the slower rank's per step, samples/tokens/FLOPs add up, and MFU divides
    the global FLOP rate by (world size x peak) or by the summed measured matmul rates."""
    import argparse

    cfg = bench_train_step.Config(zero_stage=3, batch_size=4, n_latents=6, stage_c=("3x2",))
    args = argparse.Namespace(text_len=64, image_tokens=256)
    flops = lambda total: dict(lm=total / 2, vision=total / 2, total=total)  # noqa: E731
    ok = {"status": "ok"}
    ranks = [
        dict(status=ok, samples_ms=[100.0, 120.0, 90.0], peak_gib=30.0, tokens=1200, samples=4, seq_len=310,
             flops=flops(4e13), loss=2.0, loss_finite=True, passes=7, latent_block="graphs, 1 shape(s)"),
        dict(status=ok, samples_ms=[110.0, 100.0, 95.0], peak_gib=31.0, tokens=1300, samples=4, seq_len=330,
             flops=flops(6e13), loss=2.1, loss_finite=True, passes=7, latent_block="graphs, 1 shape(s)"),
    ]
    row = bench_train_step.merge_ranks(cfg, ranks, args, world_size=2)
    assert row["latent_block"] == "graphs, 1 shape(s)"  # the ranks agree: said once
    assert "alloc_retries" not in row  # CPU ranks: the allocator's counts are not tracked
    ranks[0]["allocator"] = dict(num_alloc_retries=0, num_device_alloc=7, num_device_free=0)
    ranks[1]["allocator"] = dict(num_alloc_retries=3, num_device_alloc=5, num_device_free=9)
    counted = bench_train_step.merge_ranks(cfg, ranks, args, world_size=2)
    assert counted["alloc_retries"] == 3 and counted["driver_allocs"] == 7  # the worst rank's count of each
    assert row["median_ms"] == 110.0 and row["p10_ms"] == 95.0 and row["p90_ms"] == 120.0  # max per step: 110,120,95
    assert row["samples_per_s"] == pytest.approx(8 / 0.110) and row["tokens_per_s"] == pytest.approx(2500 / 0.110)
    assert row["peak_gib"] == 31.0 and row["peak_gib_per_rank"] == [30.0, 31.0] and row["seq_len"] == 330
    bench_train_step.add_mfu(row, 989.0, 1600.0, cuda=True)
    assert row["mfu"] == pytest.approx(1e14 / 0.110 / (2 * 989e12))
    assert row["mfu_matmul"] == pytest.approx(1e14 / 0.110 / 1600e12)
    bench_train_step.add_mfu(row, 989.0, 1600.0, cuda=False)
    assert row["mfu"] is None and row["mfu_matmul"] is None

    one_gpu = [dict(row, zero_stage=2, world_size=1, batch_size=4, samples_per_s=50.0, baseline_world_size=1)]
    bench_train_step.add_scaling(row, one_gpu)
    assert row["speedup_vs_baseline"] == pytest.approx(8 / 0.110 / 50.0)
    assert row["scaling_efficiency"] == pytest.approx(row["speedup_vs_baseline"] / 2) and row["baseline_zero_stage"] == 2

    # ZeRO-3 against the ZeRO-2 row of the same GPUs, batch, latents and variant (same settings label, else default)
    base = dict(world_size=2, batch_size=4, n_latents=6, optimizer="adamw_fused", liger="none", zero_settings="default")
    rows = [dict(base, zero_stage=2, samples_per_s=100.0), dict(base, zero_stage=2, samples_per_s=60.0, batch_size=8),
            dict(base, zero_stage=3, samples_per_s=80.0), dict(base, zero_stage=3, samples_per_s=45.0, batch_size=8),
            dict(base, zero_stage=3, samples_per_s=70.0, zero_settings="overlap_comm=false"),
            dict(base, zero_stage=3, samples_per_s=70.0, world_size=1), dict(base, zero_stage=3, status="oom")]
    bench_train_step.add_zero3_ratios(rows)
    assert [r.get("zero3_vs_zero2") for r in rows] == [None, None, 0.8, 0.75, 0.7, None, None]

    ranks[1]["status"] = {"status": "oom", "error": "CUDA out of memory"}
    ranks[1]["latent_block"] = "eager: the graphs did not fit (batch 4, prefix bucket 384: CUDA out of memory)"
    row = bench_train_step.merge_ranks(cfg, ranks, args, world_size=2)
    assert row["status"] == "oom" and row["failed_ranks"] == [1] and "median_ms" not in row
    assert row["latent_block"] == "graphs, 1 shape(s) | " + ranks[1]["latent_block"]  # each rank's, in rank order
    ranks[0]["latent_block"] = ranks[1]["latent_block"] = ""  # no block ran: the transformers passes
    assert bench_train_step.merge_ranks(cfg, ranks, args, world_size=2)["latent_block"] == "-"


def run_variants(tmp_path, optimizers: list[str], settings: list[str], liger: list[str]) -> list[dict]:
    argv = ["--smoke", "--stages", "1", "--warmup", "1", "--steps", "1", "--phases", "--phase-steps", "2",
            "--optimizers", ",".join(optimizers), "--liger", ",".join(liger), "--out", str(tmp_path)]
    for spec in settings:
        argv += ["--zero-settings", spec]
    assert bench_train_step.main(argv) == 0
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [(r["optimizer"], r["zero_settings"], r["liger"]) for r in rows] == [
        (o, s, lg) for o in optimizers for s in settings for lg in liger]
    for r in rows:
        assert r["status"] == "ok" and r["optimizer_resolved"] == r["optimizer"], r
        assert r["zero_optimization"]["stage"] == 2 and r["grad_hooks"] == r["trainable_tensors"] > 0
        phases = [r[f"phase_{p}_ms"] for p in bench_train_step.PHASES]
        assert all(ms >= 0 for ms in phases) and r["phase_step_ms"] == pytest.approx(sum(phases))
        assert r["optimizer_share"] == pytest.approx(r["phase_optimizer_ms"] / r["phase_step_ms"])
        assert all(r[f"phase_{p}_host_ms"] <= r[f"phase_{p}_ms"] + 1e-6 for p in bench_train_step.PHASES)
        assert "host_syncs" not in r  # counted on CUDA only
        assert r["reference_variant"] == f"{optimizers[0]}/{settings[0]}/{liger[0]}"
    md = (tmp_path / "train_step.md").read_text()
    assert "| opt ms |" in md and "| Δ probe loss |" in md
    return rows


def test_variants_phases_and_numerics(tmp_path):
    """Optimizer and ZeRO-settings variants, each a fresh engine from the same weights; --phases adds synchronised
    per-phase times; the loss columns compare the variants (tests/test_liger.py runs the Liger variants)."""
    settings = ["default", "overlap_comm=false,reduce_bucket_size=5e7"]
    rows = run_variants(tmp_path, ["adamw", "adamw_fused"], settings, ["none"])
    for r in rows:
        if r["zero_settings"] != "default":
            assert r["zero_optimization"]["overlap_comm"] is False
            assert r["zero_optimization"]["reduce_bucket_size"] == 50_000_000
        # same weights and batch: neither the optimizer nor the ZeRO settings change the forward; after the same
        # steps the losses agree to fp32 rounding
        assert r["probe_loss_diff"] == 0.0 and abs(r["loss_diff"]) < 1e-5
        first = next(f for f in rows if f["n_latents"] == r["n_latents"] and f["batch_size"] == r["batch_size"])
        assert r["step_losses"] == pytest.approx(first["step_losses"], abs=1e-5)  # step by step
        assert r["step_grad_norms"] == pytest.approx(first["step_grad_norms"], rel=1e-5)
    assert "ZeRO settings" in (tmp_path / "train_step.md").read_text()


def test_variant_flags_are_checked():
    with pytest.raises(SystemExit, match="--optimizers: unknown"):
        bench_train_step.parse_args(["--smoke", "--optimizers", "sgd"])
    with pytest.raises(SystemExit, match="--zero-settings expects"):
        bench_train_step.parse_args(["--smoke", "--zero-settings", "overlap_comm"])
    with pytest.raises(SystemExit, match="--liger: unknown"):
        bench_train_step.parse_args(["--smoke", "--liger", "rms_norm+flash"])
    with pytest.raises(SystemExit, match="--alternate: unknown"):
        bench_train_step.parse_args(["--smoke", "--alternate", "listed_parameters,walks"])
    with pytest.raises(SystemExit, match="--alternate-rounds"):
        bench_train_step.parse_args(["--smoke", "--alternate", "all", "--alternate-rounds", "0"])
    assert bench_train_step.parse_args(["--smoke", "--alternate", "all"]).alternate == list(bench_train_step.REPLACEMENTS)
    assert bench_train_step.parse_zero_settings("reduce_bucket_size=2e8,overlap_comm=true") == {
        "reduce_bucket_size": 200_000_000, "overlap_comm": True}
    assert bench_train_step.parse_liger("all") == ("fused_linear_cross_entropy", "rms_norm", "swiglu", "rope")


def test_scaling_plot_from_runs_on_several_gpu_counts(tmp_path):
    """benchmarks/plot_results.py: samples/s against GPU count from train_step.json files (1, 2 and 4 GPUs)."""
    pytest.importorskip("matplotlib")
    from benchmarks import plot_results

    def payload(world, rows):
        return {"benchmark": "train_step", "world_size": world, "settings": {"model": "internvl3-8b-geometry",
                "dtype": "bfloat16"}, "environment": {"device": "test", "date": "today"}, "rows": rows}

    def row(world, zero, rate, latents=6):
        return dict(world_size=world, zero_stage=zero, n_latents=latents, batch_size=8, samples_per_s=rate,
                    optimizer="auto", zero_settings="default", liger="none", text_len=64, image_tokens=256)

    paths = []
    for world, rows in ((1, [row(1, 2, 10.0)]), (2, [row(2, 2, 19.0), row(2, 3, 15.0), row(2, 3, 16.0)]),
                        (4, [row(4, 2, 36.0), row(4, 3, 30.0), dict(row(4, 3, None), status="oom")])):
        path = tmp_path / f"ts_{world}gpu.json"
        path.write_text(json.dumps(payload(world, rows)))
        paths.append(str(path))
    series = plot_results.scaling_series([json.loads(Path(p).read_text()) for p in paths])
    setup = ("bfloat16", "test", 64, 256)
    zero2 = series[("internvl3-8b-geometry", 2, 6, 8, "auto", "default", "none", setup)]
    zero3 = series[("internvl3-8b-geometry", 3, 6, 8, "auto", "default", "none", setup)]
    assert [(w, r) for w, r, _ in zero2] == [(1, 10.0), (2, 19.0), (4, 36.0)]
    assert [(w, r) for w, r, _ in zero3] == [(2, 16.0), (4, 30.0)]  # the faster of two, the OOM row left out
    assert plot_results.main([*paths, "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "train_step_scaling.png").stat().st_size > 0
    # a run of another sequence length (or dtype, or device) is a series of its own, not a point dropped as slower
    other = payload(1, [dict(row(1, 2, 4.0), text_len=4096)])
    series = plot_results.scaling_series([json.loads(Path(p).read_text()) for p in paths] + [other])
    assert [(w, r) for w, r, _ in series[("internvl3-8b-geometry", 2, 6, 8, "auto", "default", "none", setup)]][0] == (1, 10.0)
    assert series[("internvl3-8b-geometry", 2, 6, 8, "auto", "default", "none", ("bfloat16", "test", 4096, 256))]


def test_profiled_phase_holds_only_that_phase(tmp_path):
    """--profile-phase optimizer: one extra step whose optimizer phase runs under torch.profiler; the AdamW step is
    in its operators and the forward's (the embedding lookup) and backward's (its autograd nodes) are not."""
    rc = bench_train_step.main(["--smoke", "--stages", "1", "--warmup", "0", "--steps", "1",
                                "--profile-phase", "optimizer", "--out", str(tmp_path)])
    assert rc == 0
    prof = json.loads((tmp_path / "train_step.json").read_text())["rows"][0]["profile_rank0"]
    assert prof["phase"] == "optimizer" and prof["wall_ms"] > 0 and prof["host_ms"] > 0
    names = [r["name"] for r in prof["by_host"]]
    assert any("AdamW.step" in n or "Optimizer.step" in n for n in names), names
    assert not any(n in ("aten::embedding", "aten::embedding_backward") or "Backward" in n for n in names), names
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--smoke", "--profile-phase", "everything"])


def test_python_profile_of_a_phase_holds_only_that_phase(tmp_path):
    """--profile-tool python: the optimizer phase's Python functions under cProfile; DeepSpeed's step is in them,
    the model's forward and the backward's hooks are not, and the logged table names them."""
    rc = bench_train_step.main(["--smoke", "--stages", "1", "--warmup", "0", "--steps", "1", "--profile-phase",
                                "optimizer", "--profile-tool", "python", "--out", str(tmp_path)])
    assert rc == 0
    prof = json.loads((tmp_path / "train_step.json").read_text())["rows"][0]["profile_rank0"]
    assert prof["tool"] == "python" and prof["phase"] == "optimizer" and prof["wall_ms"] > 0
    names = [r["function"] for r in prof["by_cumulative"]]
    assert any(n.startswith("deepspeed/runtime/") and "(step)" in n for n in names), names
    everything = [r["function"] for r in prof["by_self"] + prof["by_cumulative"]]
    assert not any("engine/model/coconut.py" in n or "backward" in n.lower() for n in everything), everything
    assert all(r["cumulative_ms"] >= r["self_ms"] >= 0 and r["calls"] > 0 for r in prof["by_self"])
    table = bench_train_step.profile_table(prof)  # as logged
    assert "optimizer phase under cProfile" in table and names[0] in table


@pytest.mark.parametrize("tool", ["torch", "python"])
def test_a_step_that_fails_under_the_profiler_stops_it(tool):
    """`Bench.profile_phase` stops the profiler when the profiled step raises half-way (the sweep goes on with the
    next configuration unprofiled), and an unfinished phase has no summary."""
    import sys
    from types import SimpleNamespace

    def failing_step(clock):
        for phase in ("data", "forward", "backward"):
            clock.mark(phase)
        torch.ones(3).sum()
        raise RuntimeError("the optimizer failed")

    bench = SimpleNamespace(device=torch.device("cpu"), args=SimpleNamespace(profile_tool=tool))
    with pytest.raises(RuntimeError, match="the optimizer failed"):
        bench_train_step.Bench.profile_phase(bench, failing_step, "optimizer")
    assert not torch.autograd.profiler._is_profiler_enabled
    assert sys.getprofile() is None  # cProfile disabled again
    unfinished = bench_train_step.PhaseProfiler(torch.device("cpu"), "data", tool)  # starts at once
    unfinished.stop()
    with pytest.raises(RuntimeError, match="not profiled to its end"):
        unfinished.summary()


def test_sync_counter_counts_explicit_waits_too(monkeypatch):
    """CUDA's sync debug mode warns of operators that wait (`.item()`), not of explicit waits; the counter counts
    those (`torch.cuda.synchronize`, a stream's or an event's) while it is counting, per phase, and puts the
    functions back afterwards."""
    import warnings

    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)  # no device here
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: None)
    plain = torch.cuda.synchronize
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter = bench_train_step.SyncCounter(caught)
        with counter.counting():
            assert torch.cuda.synchronize is not plain
            torch.cuda.synchronize()
            warnings.warn("called a synchronizing CUDA operation")  # what the debug mode warns
            counter.mark("forward")
            torch.cuda.synchronize()
            torch.cuda.Event.synchronize(object())
            counter.mark("optimizer")
            counter.mark("data")
    assert counter.counts == {"forward": 2, "optimizer": 2, "data": 0}
    assert torch.cuda.synchronize is plain
