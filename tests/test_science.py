"""The science report's aggregator: parts from separate commands merge into one Table-1 row per method."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.science import METHODS, aggregate, finished_run, main, prepare_data, run_summary


def _run(method, seed, accuracy, tokens, status="ok", epochs=3, thoughts=None, final_stage=2):
    history = [{"epoch": e + 1, "stage": min(e, 2), "val_accuracy": accuracy - 10 * (epochs - 1 - e), "tokens_per_answer": tokens}
               for e in range(epochs)]
    out = {"method": method, "seed": seed, "status": status, "returncode": 0 if status == "ok" else 1, "wall_seconds": 5.0,
           "epochs": history}
    if status == "ok":
        out.update(final_accuracy=accuracy, final_tokens_per_answer=tokens, final_stage=final_stage, num_epochs=epochs,
                   final_thoughts_per_answer=thoughts if thoughts is not None else THOUGHTS.get(method))
    return out


THOUGHTS = {"coconut": 1.0, "cot": 0.0, "nocot": 0.0, "pause": 1.0, "nocurriculum": 1.0, "nothoughts": 0.0}


ACCURACY = {"coconut": [95.0, 97.0, 99.0], "cot": [100.0, 99.0, 100.0], "nocot": [40.0, 41.0, 39.0],
            "pause": [90.0, 80.0, 85.0], "nocurriculum": [60.0, 50.0, 70.0], "nothoughts": [70.0, 72.0, 71.0]}
TOKENS = {"coconut": 3.0, "cot": 40.5, "nocot": 3.0, "pause": 3.0, "nocurriculum": 3.0, "nothoughts": 3.0}


def _part(path, seeds, runs):
    payload = {"seeds": seeds, "methods": list(METHODS), "date": "2026-12-01 10:00 UTC", "environment": {"device": "test"},
               "command": "test", "runs": runs}
    path.write_text(json.dumps(payload))
    return path


def test_parts_merge_into_the_table(tmp_path):
    first = _part(tmp_path / "science_part_s0.json", [0], [_run(m, 0, ACCURACY[m][0], TOKENS[m]) for m in METHODS])
    # The second command: seeds 1 and 2; one pause run failed there and was run again later (counted once).
    runs = [_run(m, s, ACCURACY[m][s], TOKENS[m]) for s in (1, 2) for m in METHODS if (m, s) != ("pause", 2)]
    runs.append(_run("pause", 2, 0.0, 0.0, status="failed (exit 1)"))
    second = _part(tmp_path / "science_part_s1-2.json", [1, 2], runs)
    retry = _part(tmp_path / "science_part_s2.json", [2], [_run("pause", 2, ACCURACY["pause"][2], 3.0)])
    out = tmp_path / "report"
    combined = aggregate([first, second, retry], out)
    rows = combined["methods"]
    for method in METHODS:
        assert rows[method]["seeds"] == [0, 1, 2]
        assert rows[method]["accuracy_mean"] == pytest.approx(statistics.fmean(ACCURACY[method]))
        assert rows[method]["accuracy_std"] == pytest.approx(statistics.stdev(ACCURACY[method]))
        assert rows[method]["tokens_per_answer"] == pytest.approx(TOKENS[method])
        assert rows[method]["curve"]["3"] == pytest.approx(statistics.fmean(ACCURACY[method]))
    checks = {t["target"]: t for t in combined["targets"]}
    assert checks["Coconut accuracy >= 0.95 x CoT"]["met"]
    # the paper's count: Coconut's thoughts with its generated tokens (1 + 3 against CoT's 40.5)
    assert checks["Coconut uses >= 10x fewer tokens than CoT (its thoughts counted)"]["value"] == pytest.approx(40.5 / 4)
    assert checks["Coconut above pause as thought by more than the seed spread"]["met"]  # 97 - 85 > 5
    assert checks["Coconut above w/o curriculum by more than the seed spread"]["met"]  # 97 - 60 > 10
    table = (out / "science.md").read_text()
    assert "| Coconut | 97.0 ± 2.0 | 4.0 | 1.0 + 3.0 | 2 | 0,1,2 | 3 |" in table
    assert "| CoT | 99.7 ± 0.6 | 40.5 |" in table and "| - pause as thought | 85.0 ± 5.0 |" in table
    assert (out / "science.png").stat().st_size > 10_000
    assert json.loads((out / "science.json").read_text())["methods"]["nocot"]["accuracies"] == ACCURACY["nocot"]


def test_missing_and_failed_runs_are_reported_not_averaged(tmp_path):
    runs = [_run("coconut", 0, 90.0, 3.0), _run("coconut", 1, 0.0, 0.0, status="stopped at the time limit"),
            _run("cot", 0, 100.0, 40.0)]
    combined = aggregate([_part(tmp_path / "p.json", [0, 1], runs)], tmp_path / "out")
    row = combined["methods"]["coconut"]
    assert row["accuracies"] == [90.0] and row["accuracy_std"] is None  # one seed: no spread, not a spread of 0
    assert row["incomplete"] == [{"seed": 1, "status": "stopped at the time limit"}]
    assert "(1 incomplete)" in (tmp_path / "out" / "science.md").read_text()
    assert "pause" not in combined["methods"]
    gap = {t["target"]: t for t in combined["targets"]}["Coconut accuracy >= 0.95 x CoT"]
    assert gap["value"] == pytest.approx(0.9) and not gap["met"]


def test_run_summary_reads_history_or_the_metrics_log(tmp_path):
    run = tmp_path / "coconut-s0"
    run.mkdir()
    log = tmp_path / "x.log"
    log.write_text("line\n" * 40 + "Traceback: boom\n")
    metrics = [{"kind": "train", "step": 1, "loss": 1.0}, {"kind": "epoch", "step": 4, "epoch": 1, "stage": 0, "val_accuracy": 30.0,
                                                           "tokens_per_answer": 40.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    stopped = run_summary("coconut", 0, run, -15, 12.3, log, "stopped at the time limit")
    assert stopped["epochs"][0]["val_accuracy"] == 30.0 and stopped["final_accuracy"] == 30.0
    assert stopped["log_tail"][-1] == "Traceback: boom" and len(stopped["log_tail"]) == 25
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "stage": 0, "val_accuracy": 31.0, "tokens_per_answer": 40.0},
                                                  {"epoch": 2, "stage": 1, "val_accuracy": 60.0, "tokens_per_answer": 28.0}]))
    done = run_summary("coconut", 0, run, 0, 20.0, log, "ok")
    assert done["final_accuracy"] == 60.0 and done["final_stage"] == 1 and done["num_epochs"] == 2 and "log_tail" not in done


def test_cli_aggregate_and_bad_part(tmp_path, capsys):
    part = _part(tmp_path / "p.json", [0], [_run("coconut", 0, 90.0, 3.0)])
    main(["aggregate", "--out", str(tmp_path / "out"), str(part)])
    assert "| Coconut | 90.0 (one seed) |" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json"):
        main(["aggregate", "--out", str(tmp_path / "out"), str(bad)])


def test_run_exits_non_zero_when_a_run_fails(tmp_path, capsys, monkeypatch):
    """A failed or stopped training run is recorded in the part file and makes the command exit 1 (it exited 0)."""
    import benchmarks.science as science

    def fake_run(args):
        part = tmp_path / "science_part_s0.json"
        runs = [_run("coconut", 0, 90.0, 3.0), _run("pause", 0, 50.0, 3.0, status="failed (exit 2)")]
        return _part(part, [0], runs)

    monkeypatch.setattr(science, "run", fake_run)
    assert main(["run", "--out", str(tmp_path / "o"), "--seeds", "0"]) == 1
    assert "1 of 2 runs did not finish: pause-s0: failed (exit 2)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--out", str(tmp_path / "o"), "--seeds", "a"])
    assert "--seeds must be a comma list of integers" in capsys.readouterr().err


def test_one_seed_leaves_the_spread_targets_unevaluated(tmp_path):
    runs = [_run("coconut", 0, 60.0, 3.0), _run("pause", 0, 59.5, 3.0), _run("nocurriculum", 0, 59.9, 3.0)]
    combined = aggregate([_part(tmp_path / "p.json", [0], runs)], tmp_path / "out")
    spread = [t for t in combined["targets"] if "seed spread" in t["target"]]
    assert len(spread) == 2 and all(t["met"] is None for t in spread)
    table = (tmp_path / "out" / "science.md").read_text()
    assert "| Coconut | 60.0 (one seed) |" in table and table.count("**not evaluable with one seed**") == 2


def test_parts_of_other_setups_or_a_seed_finished_twice_are_refused(tmp_path):
    a = _part(tmp_path / "a.json", [0], [_run("coconut", 0, 60.0, 3.0)])
    other = json.loads(a.read_text())
    other.update(overrides=["num_epochs=6"], runs=[_run("coconut", 1, 70.0, 3.0, epochs=6)])
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"other settings \(overrides: None in .*a.json, \['num_epochs=6'\] in .*b.json"):
        aggregate([a, b], tmp_path / "out")
    twice = _part(tmp_path / "c.json", [0], [_run("coconut", 0, 84.0, 3.0)])
    with pytest.raises(SystemExit, match=r"coconut seed 0 finished in both .*a.json and .*c.json"):
        aggregate([a, twice], tmp_path / "out")
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"epoch": 1}]))
    with pytest.raises(SystemExit, match="is not a part file of `science run`"):
        aggregate([history], tmp_path / "out")


def test_the_curve_averages_only_epochs_every_seed_has(tmp_path):
    runs = [_run("coconut", 0, 90.0, 3.0, epochs=3), _run("coconut", 1, 80.0, 3.0, epochs=5)]
    row = aggregate([_part(tmp_path / "p.json", [0, 1], runs)], tmp_path / "out")["methods"]["coconut"]
    assert sorted(row["curve"]) == ["1", "2", "3"] and row["num_epochs"] == "3-5"


@pytest.mark.parametrize("flag, value, needle", [("--seeds", "0,0", "--seeds lists 0 more than once"),
                                                 ("--seeds", ",", "--seeds names nothing"),
                                                 ("--methods", "cot,cot", "--methods lists cot more than once")])
def test_seeds_and_methods_twice_or_none_are_refused(tmp_path, capsys, flag, value, needle):
    with pytest.raises(SystemExit):
        main(["run", "--out", str(tmp_path / "o"), flag, value])
    assert needle in capsys.readouterr().err


def test_a_rerun_reuses_finished_runs_and_never_an_earlier_launchs_results(tmp_path):
    """Run again into the same --out, a finished run failed against its own directory, and the failure was
    recorded with the earlier launch's history."""
    run = tmp_path / "coconut-s0"
    run.mkdir()
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "stage": 0, "val_accuracy": 50.0, "tokens_per_answer": 9.0},
                                                  {"epoch": 2, "stage": 1, "val_accuracy": 70.0, "tokens_per_answer": 5.0}]))
    assert not finished_run(run, 2)  # no final export yet
    (run / "final").mkdir()
    assert finished_run(run, 2) and not finished_run(run, 3)
    log = tmp_path / "x.log"
    log.write_text("error: run directory already holds a run\n")
    import time

    failed = run_summary("coconut", 0, run, 2, 1.0, log, "failed (exit 2)", since=time.time() + 10)
    assert failed["epochs"] == [] and "final_accuracy" not in failed


def test_data_made_with_other_settings_is_refused_not_reused(tmp_path):
    from engine.training.config import config_from_dict

    small = config_from_dict({"synthetic": {"n_train": 8, "n_val": 2, "hops": 2, "seed": 0}})
    train, _ = prepare_data(small, tmp_path)
    assert train.is_file() and prepare_data(small, tmp_path)[0] == train  # the same settings: kept
    with pytest.raises(SystemExit, match=r"holds the synthetic task made with .*n_train=8.* asks for .*n_train=12"):
        prepare_data(config_from_dict({"synthetic": {"n_train": 12, "n_val": 2, "hops": 2, "seed": 0}}), tmp_path)


def test_a_bad_override_is_one_line_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: c_thought must be >= 1, got 0$"):
        main(["run", "--out", str(tmp_path / "o"), "--smoke", "--seeds", "0", "--set", "c_thought=0"])


def test_a_run_trained_with_other_settings_is_neither_reused_nor_resumed(tmp_path):
    from benchmarks.science import check_earlier_run
    from engine.training.config import load_config

    run = tmp_path / "coconut-s0"
    run.mkdir()
    items = ["lr=0.001", "max_latent_stage=2", "num_workers=1"]
    (run / "config.json").write_text(json.dumps(load_config("recipes/configs/synthetic_demo.yaml", items).to_dict()))
    check_earlier_run(run, "recipes/configs/synthetic_demo.yaml", ["lr=0.001", "max_latent_stage=2", "num_workers=3"])
    with pytest.raises(SystemExit, match=r"trained with other settings than this command's \(lr: 0.001 -> 0.002"):
        check_earlier_run(run, "recipes/configs/synthetic_demo.yaml", ["lr=0.002", "max_latent_stage=2"])
    check_earlier_run(tmp_path / "never-trained", "recipes/configs/synthetic_demo.yaml", items)


def test_a_run_reused_in_a_later_part_counts_once(tmp_path):
    """Seeds 0-2 cut short, then seed 2 again into the same --out: its finished runs are reused into the new part."""
    first = _part(tmp_path / "science_part_s0-1-2.json", [0, 1, 2], [_run("coconut", s, 90.0 + s, 3.0) for s in (0, 1, 2)]
                  + [_run("cot", 2, 0.0, 0.0, status="stopped at the time limit")])
    again = _part(tmp_path / "science_part_s2.json", [2], [{**_run("coconut", 2, 92.0, 3.0), "reused": True},
                                                          _run("cot", 2, 99.0, 40.0)])
    combined = aggregate([first, again], tmp_path / "out")
    assert combined["methods"]["coconut"]["seeds"] == [0, 1, 2] and combined["methods"]["cot"]["seeds"] == [2]


def test_finished_runs_are_reused_even_past_the_time_limit(tmp_path, capsys):
    """Reusing costs no time: a run an earlier command finished counts even when the limit leaves no time to start
    any run (it was reported 'not started' once the limit had passed before its turn in the queue)."""
    from engine.training.config import load_config

    out, work = tmp_path / "o", tmp_path / "w"
    num_epochs = load_config("recipes/configs/synthetic_demo.yaml", []).num_epochs
    done = work / "runs" / "cot-s0"
    (done / "final").mkdir(parents=True)
    (done / "history.json").write_text(json.dumps(
        [{"epoch": e + 1, "stage": 0, "val_accuracy": 80.0 + e, "tokens_per_answer": 9.0} for e in range(num_epochs)]))
    main(["run", "--out", str(out), "--work", str(work), "--config", "recipes/configs/synthetic_demo.yaml",
          "--seeds", "0", "--methods", "coconut,cot", "--time-limit-s", "1e-9", "--set", "synthetic.n_train=8",
          "--set", "synthetic.n_val=2"])
    runs = {r["method"]: r for r in json.loads((out / "science_part_s0_coconut-cot.json").read_text())["runs"]}
    assert runs["cot"]["status"] == "ok" and runs["cot"]["reused"] and runs["cot"]["final_accuracy"] == 80.0 + num_epochs - 1
    assert runs["coconut"]["status"] == "not started (time limit)"
    # another command for the same seed with other methods adds its part (it replaced the first one's file)
    main(["run", "--out", str(out), "--work", str(work), "--config", "recipes/configs/synthetic_demo.yaml",
          "--seeds", "0", "--methods", "nocot", "--time-limit-s", "1e-9", "--set", "synthetic.n_train=8",
          "--set", "synthetic.n_val=2"])
    assert (out / "science_part_s0_coconut-cot.json").is_file() and (out / "science_part_s0_nocot.json").is_file()
    assert "| CoT |" in (out / "science.md").read_text()
    assert "1 run(s) were reused from an earlier command (cot seed 0)" in (out / "science.md").read_text()


def test_a_method_short_of_the_final_stage_is_marked_and_an_uncomputable_target_is_not_failed(tmp_path):
    """Accuracy at the last epoch was read as the final stage's whatever stage that epoch trained at; a ratio over
    a CoT accuracy of 0 was reported "not met"."""
    runs = [_run("coconut", 0, 50.0, 3.0, final_stage=1), _run("nocurriculum", 0, 40.0, 3.0, final_stage=2),
            _run("cot", 0, 0.0, 40.0, final_stage=0)]
    combined = aggregate([_part(tmp_path / "p.json", [0], runs)], tmp_path / "out")
    table = (tmp_path / "out" / "science.md").read_text()
    assert "| 1 (not 2: an earlier stage's accuracy) |" in table and "| - w/o curriculum | 40.0 (one seed) |" in table
    gap = {t["target"]: t for t in combined["targets"]}["Coconut accuracy >= 0.95 x CoT"]
    assert gap["met"] is None and "Coconut accuracy >= 0.95 x CoT: —: **not evaluable**" in table


def test_parts_of_the_same_config_file_edited_in_between_are_refused(tmp_path):
    first = json.loads(_part(tmp_path / "a.json", [0], [_run("coconut", 0, 90.0, 3.0)]).read_text())
    second = json.loads(_part(tmp_path / "b.json", [1], [_run("coconut", 1, 91.0, 3.0)]).read_text())
    for payload, lr, name in ((first, 1e-3, "a.json"), (second, 5e-2, "b.json")):
        payload.update(config="cfg.yaml", overrides=[], resolved_config={"lr": lr, "uniform_prob": 0.3})
        (tmp_path / name).write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match=r"the parts' configs differ \(lr: 0.001 in \S*a.json, 0.05 in \S*b.json;"):
        aggregate([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out")


def test_runs_without_thought_counts_or_all_short_are_not_judged(tmp_path):
    """Parts of earlier code recorded no thoughts: the "thoughts counted" target passed on generated tokens alone.
    Runs that all stopped before max_latent_stage were not seen as short."""
    old = [_run("coconut", s, 97.0 + s, 3.0) for s in (0, 1)] + [_run("cot", s, 99.0, 40.5) for s in (0, 1)]
    for r in old:
        r.pop("final_thoughts_per_answer")
    combined = aggregate([_part(tmp_path / "old.json", [0, 1], old)], tmp_path / "a")
    fewer = {t["target"]: t for t in combined["targets"]}["Coconut uses >= 10x fewer tokens than CoT (its thoughts counted)"]
    assert fewer["value"] is None and fewer["met"] is None
    short = json.loads(_part(tmp_path / "short.json", [0, 1], [_run("coconut", s, 97.0, 3.0, final_stage=1) for s in (0, 1)]
                             + [_run("cot", s, 99.0, 40.5, final_stage=0) for s in (0, 1)]).read_text())
    short["resolved_config"] = {"max_latent_stage": 3}
    (tmp_path / "short.json").write_text(json.dumps(short))
    combined = aggregate([tmp_path / "short.json"], tmp_path / "b")
    assert "(not 3: an earlier stage's accuracy)" in (tmp_path / "b" / "science.md").read_text()
    assert all(t["met"] is None for t in combined["targets"])
