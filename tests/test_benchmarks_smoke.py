"""The benchmark harnesses run end to end (tiny model, CPU, --smoke) and say what they must about correctness;
the pytest-benchmark suites run once, untimed, as CI runs them."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.common
from benchmarks import bench_generate, bench_latent_forward
from benchmarks.common import is_oom
from engine.data.random_batch import perturb_after, replace_latents, synthetic_batch

ROOT = Path(__file__).resolve().parent.parent


def test_synthetic_batch_layout(tiny_model, tiny_tok):
    """Left-padded rows, the first latent at one column, labels on the answer and eos only."""
    b = synthetic_batch(tiny_model, tiny_tok, batch_size=3, n_latents=4, question_len=12, answer_len=5,
                        image_tokens=32, seed=3)
    model = tiny_model
    latent_cols = [(row == model.latent_id).nonzero().flatten().tolist() for row in b.input_ids]
    assert all(cols == list(range(b.first_latent_col, b.first_latent_col + 4)) for cols in latent_cols)
    assert (b.input_ids[:, b.end_col] == model.end_latent_id).all()
    assert (b.attention_mask[:, -1] == 1).all() and (b.attention_mask.sum(1) < b.seq_len).any(), "ragged, left-padded"
    assert ((b.input_ids == model.image_token_id).sum(1) == 32).all() and b.pixel_values.shape[0] == 3 * 2
    labelled = b.labels != -100
    assert (labelled.sum(1) == 6).all() and not labelled[:, : b.end_col + 1].any()
    assert (b.labels[labelled] == b.input_ids[labelled]).all()
    plain = replace_latents(b, model, tiny_tok)
    assert not (plain.input_ids == model.latent_id).any() and (plain.input_ids != b.input_ids).sum() == 12
    moved = perturb_after(b, model, tiny_tok, b.end_col)
    changed = moved.input_ids != b.input_ids
    assert changed[:, b.end_col + 1 :].all() and not changed[:, : b.end_col + 1].any()


def test_check_flags_a_leaking_engine(tiny_model, tiny_tok, monkeypatch):
    """The correctness check fails a scheme whose thoughts see the future (here: the flawed baseline posing as
    the engine), so a broken engine cannot pass silently."""
    b = synthetic_batch(tiny_model, tiny_tok, batch_size=2, n_latents=2, question_len=6, answer_len=6,
                        image_tokens=16, seed=1)
    plain = replace_latents(b, tiny_model, tiny_tok)
    honest = bench_latent_forward.check_config(["engine", "naive"], tiny_model, tiny_tok, b, plain, 1e-4)
    assert honest["engine"]["check_ok"] and honest["engine"]["leak"] == 0.0
    real = bench_latent_forward.method_outputs
    monkeypatch.setattr(bench_latent_forward, "method_outputs",
                        lambda m, *a: real("fullpass" if m == "engine" else m, *a))
    broken = bench_latent_forward.check_config(["engine", "naive"], tiny_model, tiny_tok, b, plain, 1e-4)
    assert broken["engine"]["check_ok"] is False and broken["engine"]["leak"] > 0


def test_out_of_memory_is_recorded_not_raised(monkeypatch):
    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(benchmarks.common, "time_fn", boom)
    args = bench_generate.parse_args(["--smoke"])
    row = bench_generate.timed(lambda: None, args)
    assert row["status"] == "oom" and "out of memory" in row["error"]

    def bug(*a, **k):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(benchmarks.common, "time_fn", bug)
    row = bench_generate.timed(lambda: None, args)
    assert row["status"] == "error" and "out of bounds" in row["error"]
    assert is_oom(RuntimeError("CUDA error: out of memory")) and not is_oom(RuntimeError("shape mismatch"))


def test_latent_forward_smoke(tmp_path, monkeypatch):
    rc = bench_latent_forward.main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "latent_forward.json").read_text())
    assert rc == 0
    for name in ("latent_forward.md", "latent_forward_ms.png", "latent_forward_x_floor.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert payload["environment"]["torch"] == torch.__version__ and payload["command"]
    rows = {(r["n_latents"], r["method"]): r for r in payload["rows"]}
    assert {n for n, _ in rows} == {0, 2} and {m for _, m in rows} == set(bench_latent_forward.METHODS)
    for r in payload["rows"]:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["tokens_per_s"] > 0, r
        assert r["x_floor"] > 0
    for n in (0, 2):
        engine = rows[(n, "engine")]
        assert engine["max_abs_logit_diff"] < 1e-4 and engine["loss_diff"] < 1e-4
        assert engine["leak"] == 0.0 and engine["check_ok"] is True
        assert rows[(n, "naive")]["leak"] == 0.0 and rows[(n, "naive")]["check_ok"] is True
        assert rows[(n, "plain")]["max_abs_logit_diff"] < 1e-4 and rows[(n, "plain")]["diff_reference"] == "hf"
    flawed = rows[(2, "fullpass")]
    assert flawed["leak"] > 1e-4, "the full-pass baseline's thoughts must be seen to depend on later tokens"
    assert flawed["max_abs_logit_diff"] > 1e-4
    assert rows[(2, "engine")]["speedup_vs_naive"] > 0 and rows[(2, "engine")]["speedup_vs_fullpass"] > 0
    table = (tmp_path / "latent_forward.md").read_text()
    assert "| 2 | 1x2 |" in table and "fullpass" in table

    # one point without a floor (its plain pass out of memory) left a method's whole line out of the plot
    from benchmarks import plot_results

    for r in payload["rows"]:
        if r["n_latents"] == 2:
            r["x_floor"] = None
            if r["method"] == "plain":
                r.update(median_ms=None, status="oom")
    drawn = {}
    original = plot_results._grid

    def recording_grid(plt, n, **kwargs):
        fig, axes = original(plt, n, **kwargs)
        drawn.setdefault("axes", []).append(axes)
        return fig, axes

    monkeypatch.setattr(plot_results, "_grid", recording_grid)
    plot_results.plot_latent_forward(payload, tmp_path)
    floor_axes = drawn["axes"][1][0]
    assert {line.get_label() for line in floor_axes.get_lines()} >= {"engine", "naive"}  # the n=0 points stay
    assert any("plain at 2: oom" in t.get_text() for t in drawn["axes"][0][0].texts)  # the failure is named

def test_generate_smoke(tmp_path, tiny_model):
    rc = bench_generate.main(["--smoke", "--stages", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "generate.json").read_text())
    assert rc == 0
    assert (tmp_path / "generate.md").stat().st_size > 0 and (tmp_path / "generate.png").stat().st_size > 0
    rows = payload["rows"]
    assert all(r["status"] == "ok" for r in rows), rows
    latent = [r for r in rows if r["method"] == "latent"]
    caches = {r["kv_cache"] for r in latent}
    assert caches == {"dynamic", "paged"}  # the smoke preset runs both: neither may be skipped
    for r in latent:
        assert r["matches_reference"] is True, r
        assert r["n_latents"] == 2 and r["new_tokens"] == 2  # smoke: 1 CoT step, stage 1 leaves the answer
        assert r["answers_per_s"] > 0 and r["speedup_vs_naive"] > 0 and r["floor_ms_per_step"] > 0
    (naive,) = [r for r in rows if r["method"] == "naive"]
    assert naive["batch_size"] == 1 and naive["new_tokens"] == 2 and naive["ms_per_token"] > 0
    (cot,) = [r for r in rows if r["method"] == "cot"]
    assert cot["new_tokens"] == 3 + 2 and cot["decode_ms_per_step"] >= 0


def _suites() -> list[Path]:
    harnesses = {"bench_latent_forward.py", "bench_generate.py"}
    return [p for p in sorted((ROOT / "benchmarks").glob("bench_*.py"))
            if p.name not in harnesses and "pytest.mark.benchmark" in p.read_text()]


def test_benchmark_suites_run_untimed():
    """`pytest benchmarks -m benchmark --benchmark-disable` (the Makefile's bench-smoke) passes."""
    if not _suites():
        pytest.skip("no pytest-benchmark suite in benchmarks/ yet")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-m", "benchmark", "--benchmark-disable", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_targets_are_evaluated_from_rows():
    """The H100 target lines come out of the rows: 6 latents at batch 32, engine vs plain/naive/fullpass."""
    rows = []
    for n, (engine, fullpass) in {0: (10.0, 10.0), 2: (11.0, 13.0), 6: (13.0, 12.0)}.items():
        for method, ms in (("engine", engine), ("fullpass", fullpass), ("naive", 45.0), ("plain", 10.0)):
            rows.append(dict(method=method, n_latents=n, batch_size=32, text_len=64, median_ms=ms, leak=0.0,
                             max_abs_logit_diff=0.0))
    bench_latent_forward.add_ratios([r for r in rows if r["n_latents"] == 6])
    summary = bench_latent_forward.summarize(rows)
    (line,) = summary
    assert line["n_latents"] == 6 and line["x_floor"] == pytest.approx(1.3)
    assert line["faster_than_fullpass_everywhere"] is False  # 13 ms > 12 ms at 6 latents
    met = [t["met"] for t in bench_latent_forward.check_targets(rows, summary)]
    assert met == [True, True, False]


def test_block_ops_harness_compares_the_latent_pass_variants(tmp_path):
    """bench_block_ops on the tiny model (fp32, CPU: the block eager, the fused ops interpreted): every variant
    runs, and the fused block and the transformers passes give the reference block's loss and gradients."""
    from benchmarks import bench_block_ops

    code = bench_block_ops.main(["--model", "tiny", "--batch-size", "2", "--latents", "2", "--text-len", "10",
                                 "--image-tokens", "16", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "block_ops.json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == set(bench_block_ops.VARIANTS)
    for variant in ("fused", "transformers"):
        assert abs(rows[variant]["delta_loss"]) < 1e-5
        assert 0 <= rows[variant]["grad_rel_diff_max"] < 1e-4, variant
    assert rows["reference"]["grad_rel_diff_max"] == 0
    assert "Δ loss vs reference" in (tmp_path / "block_ops.md").read_text()


def test_attention_backends_harness_runs_and_agrees(tmp_path):
    """bench_attention_backends on CPU at a small scale: the math and default backends agree on every shape; a
    backend that cannot run here is a row saying why, not a crash."""
    from benchmarks import bench_attention_backends

    assert bench_attention_backends.main(["--device", "cpu", "--scale", "0.03", "--repeats", "1", "--backends",
                                          "math,default,flash", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention_backends.json").read_text())["rows"]
    assert len(rows) == 3 * len(bench_attention_backends.SHAPES)
    for row in rows:
        if row["backend"] == "flash":
            assert "error" in row or row["max_diff_vs_first"] < 1e-5
        else:
            assert row["fwd_bwd_ms"] > 0 and row["max_diff_vs_first"] < 1e-5, row


def test_decode_linear_smoke(tmp_path, monkeypatch):
    """The split-K report on CPU: every product and batch has its cuBLAS-path row and checked kernel rows, the
    products an RMSNorm consumes their norm rows; a setting whose result is wrong is reported as an error."""
    import kernels.decode_linear as decode_linear
    from benchmarks import bench_decode_linear

    assert bench_decode_linear.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_decode_linear.json").read_text())
    rows = report["rows"]
    assert not [r for r in rows if "error" in r]
    for product in ("qkv", "o", "gate_up", "down"):
        for batch in (1, 3):
            these = [r for r in rows if r["product"] == product and r["batch"] == batch]
            assert {r["impl"] for r in these} == {"cublas", "split-K partials"}
            assert all(("us_with_norm" in r) == (product in ("o", "down")) for r in these)
            assert sum("best" in r["label"] for r in these) == 1
    assert all(r["max_rel_err"] is not None for r in rows if r["impl"].startswith("split-K"))
    assert all(r["norm_max_rel_err"] is not None for r in rows if r["impl"].startswith("split-K") and "us_with_norm" in r)

    real = decode_linear.decode_linear_partials
    monkeypatch.setattr(decode_linear, "decode_linear_partials", lambda x, w, c, *a, **k: real(x, w, c, *a, **k) * 1.5)
    assert bench_decode_linear.main(["--smoke", "--products", "o", "--out", str(tmp_path / "wrong")]) == 0
    wrong = json.loads((tmp_path / "wrong" / "bench_decode_linear.json").read_text())["rows"]
    assert [r for r in wrong if "error" in r and "relative error" in r["error"]], "a wrong product must be reported"


@pytest.mark.parametrize(
    "module, argv, needle",
    [
        ("bench_generate", ["--out", "{file}"], "is a file, not a folder"),
        ("bench_generate", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
        ("bench_generate", ["--batch-sizes", "4,0"], "every value must be >= 1"),
        ("bench_generate", ["--stages", "-1"], "every value must be >= 0"),
        ("bench_generate", ["--answer-tokens", "0"], "--answer-tokens: must be >= 1"),
        ("bench_latent_forward", ["--c-thought", "0"], "every value must be >= 1"),
        ("bench_paged_kv", ["--smoke", "--sections", "numerics,stepz"], "--sections: unknown ['stepz']"),
        ("bench_latent_inject", ["--smoke", "--sections", "bandwith"], "--sections: unknown ['bandwith']"),
    ],
)
def test_harness_arguments_out_of_range_are_refused_when_read(tmp_path, capsys, module, argv, needle):
    """Before any measurement: these ran a whole sweep and then failed, wrote rows that meant nothing (negative
    latents), or ran nothing and exited 0."""
    import importlib

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = [a.format(file=a_file) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_harness_names_a_bad_model_or_shape_in_one_line(tmp_path, capsys):
    """A model path that does not exist, or image tokens the model cannot tile, ended in a traceback."""
    from benchmarks.common import run_harness

    def harness(extra):
        return lambda: bench_latent_forward.main(["--smoke", "--out", str(tmp_path), *extra])

    assert run_harness(harness(["--model", str(tmp_path / "nope")])) == 2
    assert re.search(r"^error: model path .*nope does not exist", capsys.readouterr().err)
    assert run_harness(harness(["--image-tokens", "20"])) == 2
    assert "error: image tokens must be a multiple of the model's" in capsys.readouterr().err


def test_plot_results_names_inputs_it_cannot_plot_and_writes_nothing(tmp_path, capsys):
    from benchmarks import plot_results

    listed = tmp_path / "history.json"
    listed.write_text("[1, 2]")
    for path, needle in ((tmp_path / "nope.json", "cannot read"), (listed, "is not a harness's results file")):
        with pytest.raises(SystemExit) as exit_info:
            plot_results.main([str(path), "--out", str(tmp_path / "plots")])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("module", ["bench_patch_embedding", "bench_decode_fusions", "bench_one_query_attention"])
def test_a_pytest_suite_run_as_a_command_says_how_to_run_it(module):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2 and f"python -m pytest benchmarks/{module}.py -m benchmark" in proc.stderr
