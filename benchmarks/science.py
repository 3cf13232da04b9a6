"""The paper's Table 1 on the built-in task: CoCoNuT against CoT, no-CoT and its three ablations, several seeds.

    python -m benchmarks.science run --out OUT [--seeds 0,1,2] [--methods coconut,cot,...] [--max-parallel 6]
        [--config recipes/configs/synthetic_gpu.yaml] [--work DIR] [--time-limit-s 540] [--smoke] [--set KEY=VALUE]
    python -m benchmarks.science aggregate --out OUT PART.json [PART.json ...]

`run` trains every (method, seed) pair with `recipes/train_coconut.py`, several processes at once on the
same device(s) (`--max-parallel`), all on one copy of the synthetic data (generated once from the config's
data seed; the seeds vary the model's initialisation and the data order). Bulky outputs (data, checkpoints,
exports, logs) go to `--work`; `--out` receives only `science_part_s<seeds>_<methods>.json` (one compact summary per
run, rewritten after every run that ends, so a run cut short keeps what finished) and the aggregate of every
part found in `--out`. A run still going at `--time-limit-s` is stopped and recorded as such.

`aggregate` merges parts (from separate commands, e.g. `--seeds 0` and `--seeds 1,2`) into `science.json`,
`science.md` (the table: final-stage accuracy mean ± std over seeds and tokens per answer, its continuous thoughts
counted as the paper counts them, plus the issue's targets) and `science.png` (accuracy per method with every seed, and validation accuracy per epoch).

Methods (their config switches):
    coconut        the curriculum with continuous thoughts (the recipe as it is)
    cot            multimodal chain of thought, the same number of epochs (cot=true)
    nocot          question -> answer (no_cot=true)
    pause          pause as thought: same curriculum, the thought positions take one learned embedding
    nocurriculum   w/o curriculum: stage 0, then the final stage directly (no_curriculum=true)
    nothoughts     w/o thought: the curriculum removes steps, no thoughts in their place (no_thoughts=true)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import output_dir  # noqa: E402
from engine.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402

METHODS: dict[str, tuple[str, list[str]]] = {
    # name: (row label in the paper's Table 1, config overrides)
    "cot": ("CoT", ["cot=true"]),
    "nocot": ("No-CoT", ["no_cot=true"]),
    "coconut": ("Coconut", []),
    "nocurriculum": ("- w/o curriculum", ["no_curriculum=true"]),
    "nothoughts": ("- w/o thought", ["no_thoughts=true"]),
    "pause": ("- pause as thought", ["pause_as_thought=true"]),
}
SMOKE_SETTINGS = [
    "model_overrides={text_hidden_size: 32, text_layers: 1, text_intermediate_size: 64}",
    "synthetic={n_train: 24, n_val: 6, hops: 2, seed: 0}",
    "max_latent_stage=2", "epochs_per_stage=1", "num_epochs=4", "batch_size_training=8", "eval_batch_size=8",
    "max_new_tokens=24", "device=cpu", "zero_stage=0", "bf16=false", "num_workers=0", "log_every_steps=1",
]
PART_PREFIX = "science_part_"


# ---------------------------------------------------------------------- running
def _parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def _overrides(args) -> list[str]:
    return (SMOKE_SETTINGS if args.smoke else []) + list(args.set)


def _load_config(args):
    from engine.training.config import load_config

    return load_config(args.config, _overrides(args))


def prepare_data(config, work: Path) -> tuple[Path, Path]:
    """The synthetic data every run trains on, generated once. Data made with other settings is refused, not
    reused: the runs already in the work folder trained on it."""
    from engine.data.synthetic import SyntheticSettings, generate_synthetic, read_settings

    data = work / "data"
    wanted = SyntheticSettings.from_dict(dict(config.synthetic or {}))
    if (data / "train.jsonl").is_file():
        recorded = read_settings(data)
        if recorded != wanted:
            raise SystemExit(f"error: {data} holds the synthetic task made with {recorded} and this command asks for "
                             f"{wanted}: use another --work (or --out), or delete {work}")
        return data / "train.jsonl", data / "val.jsonl"
    generate_synthetic(data, **dataclasses.asdict(wanted))
    return data / "train.jsonl", data / "val.jsonl"


def check_earlier_run(run_dir: Path, config_path: str, items: list[str]) -> None:
    """SystemExit when the work folder holds this run trained with other settings than this command's: reusing its
    results, or resuming it, would credit or mix another setup."""
    from engine.training.config import guarded_config_changes, load_config

    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # nothing trained there yet (or nothing readable: the trainer itself refuses an unreadable one)
    changes = guarded_config_changes(saved, load_config(config_path, items).to_dict(), every_key=True)
    changes.pop("num_workers", None)  # how many loader processes the run had, not what it trained
    if changes:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))
        raise SystemExit(f"error: {run_dir} was trained with other settings than this command's ({shown}): use "
                         "another --work (or --out), or delete that run")


def finished_run(run_dir: Path, num_epochs: int) -> bool:
    """Whether an earlier launch already trained this run to its end (its history reaches num_epochs and its final
    export is there)."""
    try:
        history = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(history) and history[-1].get("epoch") == num_epochs and (run_dir / "final").is_dir()


def run_summary(method: str, seed: int, run_dir: Path, returncode: int | None, seconds: float, log_path: Path,
                status: str, *, since: float | None = None) -> dict:
    """What a finished (or stopped) run contributes: its per-epoch validation and the final epoch's numbers.
    ``since``: the launch's start (a wall-clock time); files not written since then are an earlier launch's and are
    not this one's results."""
    def current(path: Path) -> bool:
        return path.is_file() and (since is None or path.stat().st_mtime >= since)

    history_path = run_dir / "history.json"
    history = json.loads(history_path.read_text()) if current(history_path) else []
    if not history:  # a run stopped early: its epochs so far are in the metrics log
        metrics = run_dir / "metrics.jsonl"
        if current(metrics):
            history = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "epoch"' in line]
    keep = ("epoch", "stage", "val_accuracy", "tokens_per_answer", "thoughts_per_answer", "train_loss", "val_loss",
            "train_samples_per_second", "train_seconds")
    epochs = [{k: h.get(k) for k in keep} for h in history]
    out = {"method": method, "seed": seed, "status": status, "returncode": returncode, "wall_seconds": round(seconds, 1),
           "epochs": epochs}
    if epochs:
        last = epochs[-1]
        out.update(final_accuracy=last["val_accuracy"], final_tokens_per_answer=last["tokens_per_answer"],
                   final_thoughts_per_answer=last.get("thoughts_per_answer"), final_stage=last["stage"],
                   num_epochs=last["epoch"])
    if status != "ok" and log_path.is_file():
        out["log_tail"] = log_path.read_text(errors="replace").splitlines()[-25:]
    return out


def run(args) -> Path:
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / f"{out.name}_work"
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    seeds, methods = _parse_list(args.seeds, int), _parse_list(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    from engine.training.config import ConfigError

    try:
        config = _load_config(args)  # fails here, once, on a bad config or override
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    start = time.perf_counter()
    train, val = prepare_data(config, work)
    data_seconds = time.perf_counter() - start
    workers = args.num_workers if args.num_workers is not None else max(0, (os.cpu_count() or 2) // args.max_parallel - 1)
    queue = [(m, s) for s in seeds for m in methods]
    # one file per (seeds, methods): a later command with other methods for the same seeds adds a part, not replaces
    part = out / f"{PART_PREFIX}s{'-'.join(map(str, seeds))}_{'-'.join(methods)}.json"
    payload = {
        "config": args.config, "overrides": _overrides(args), "seeds": seeds, "methods": methods,
        "max_parallel": args.max_parallel, "num_workers": workers, "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "environment": _environment(),
        "data_seconds": round(data_seconds, 1), "n_train": (config.synthetic or {}).get("n_train"),
        "resolved_config": _resolved(config), "code": _code_version(), "runs": [],
    }
    running: dict = {}
    port = args.base_port
    deadline = start + args.time_limit_s if args.time_limit_s else None
    def run_items(method: str, seed: int) -> list[str]:
        return _overrides(args) + METHODS[method][1] + [
            f"seed={seed}", f"name={method}-s{seed}", f"save_path={work / 'runs'}", f"train_path={train}",
            f"val_path={val}", "save_only_improve=true", "keep_checkpoints=1", f"num_workers={workers}",
        ]

    # runs an earlier command finished count first: reusing them costs no time, so the time limit never drops them
    for method, seed in list(queue):
        name = f"{method}-s{seed}"
        run_dir = work / "runs" / name
        check_earlier_run(run_dir, args.config, run_items(method, seed))
        if finished_run(run_dir, config.num_epochs):  # an earlier command trained it: its results stand
            queue.remove((method, seed))
            summary = run_summary(method, seed, run_dir, 0, 0.0, work / "logs" / f"{name}.log", "ok")
            summary["reused"] = True
            payload["runs"].append(summary)
            atomic_write_json(part, payload)
            print(f"[science] {name}: finished by an earlier command, reused (final accuracy "
                  f"{summary.get('final_accuracy')})", flush=True)
    while queue or running:
        while queue and len(running) < args.max_parallel and (deadline is None or time.perf_counter() < deadline):
            method, seed = queue.pop(0)
            name = f"{method}-s{seed}"
            run_dir = work / "runs" / name
            log_path = work / "logs" / f"{name}.log"
            items = run_items(method, seed)
            # a run an earlier command left unfinished goes on from its last checkpoint
            resume = ["resume=true"] if (run_dir / "checkpoints" / "latest").is_file() else []
            command = [sys.executable, str(ROOT / "recipes" / "train_coconut.py"), "--config", args.config]
            for item in items + resume:
                command += ["--set", item]
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(port),
                       PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            port += 1
            with log_path.open("w") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[process] = (method, seed, time.perf_counter(), log_path, time.time())
            print(f"[science] started {name} ({len(running)} running, {len(queue)} queued)", flush=True)
        if not queue and not running:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            for process in running:
                process.terminate()
            for process in list(running):
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            finished = {p: "stopped at the time limit" for p in running}
            for method, seed in queue:
                payload["runs"].append({"method": method, "seed": seed, "status": "not started (time limit)", "epochs": []})
            queue = []
        else:
            time.sleep(1.0)
            finished = {p: None for p in running if p.poll() is not None}
        for process, reason in finished.items():
            method, seed, began, log_path, launched = running.pop(process)
            status = reason or ("ok" if process.returncode == 0 else f"failed (exit {process.returncode})")
            summary = run_summary(method, seed, work / "runs" / f"{method}-s{seed}", process.returncode,
                                  time.perf_counter() - began, log_path, status, since=launched - 1.0)
            payload["runs"].append(summary)
            print(f"[science] {method}-s{seed}: {status}, final accuracy {summary.get('final_accuracy')}, "
                  f"{summary['wall_seconds']} s", flush=True)
            payload["wall_seconds"] = round(time.perf_counter() - start, 1)
            atomic_write_json(part, payload)
    payload["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(part, payload)
    parts = sorted(out.glob(f"{PART_PREFIX}*.json"))
    aggregate(parts, out)
    return part


def _resolved(config) -> dict:
    """The config every run of a part shares, as the trainer reads it (the YAML file's contents, not its path),
    without what each run sets itself."""
    settings = config.to_dict()
    for key in ("seed", "name", "save_path", "train_path", "val_path", "num_workers", "resume", "overwrite"):
        settings.pop(key, None)
    return json.loads(json.dumps(settings, default=str))


def _code_version() -> str | None:
    """The commit the part was made with (with "+changes" for a working tree that differs), None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def _environment() -> dict:
    import platform

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        else:
            env["device"] = "cpu"
    except Exception as e:  # the summary must not fail over a stamp
        env["device"] = f"unknown ({e})"
    return env


# ---------------------------------------------------------------------- aggregating
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std; the std is None for one value (no spread to speak of, not a spread of 0)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


SETUP_KEYS = ("config", "overrides", "n_train")  # what every part of one table must share


def check_parts(parts: list[dict], names: list[str]) -> None:
    """SystemExit unless the parts are parts of one experiment: each a `run`'s part file, the same config,
    overrides and data size, and no (method, seed) finished in two of them (which one would count?)."""
    for part, name in zip(parts, names):
        runs = part.get("runs") if isinstance(part, dict) else None
        if not isinstance(runs, list) or not all(isinstance(r, dict) and "method" in r and "seed" in r for r in runs):
            raise SystemExit(f"error: {name} is not a part file of `science run` (no list of runs with method and seed)")
    first = parts[0]
    for part, name in zip(parts[1:], names[1:]):
        differ = [k for k in SETUP_KEYS if part.get(k) != first.get(k)]
        if differ:
            shown = "; ".join(f"{k}: {first.get(k)!r} in {names[0]}, {part.get(k)!r} in {name}" for k in differ)
            raise SystemExit(f"error: the parts were made with other settings ({shown}): aggregate parts of one setup")
        mine, theirs = first.get("resolved_config"), part.get("resolved_config")
        if mine is not None and theirs is not None and mine != theirs:  # the same config file, edited in between
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            shown = "; ".join(f"{k}: {mine.get(k)!r} in {names[0]}, {theirs.get(k)!r} in {name}" for k in keys[:5])
            raise SystemExit(f"error: the parts' configs differ ({shown}; a key missing from one part is a setting its "
                             "code did not have): aggregate parts of one setup")
    seen: dict[tuple, str] = {}
    for part, name in zip(parts, names):
        for r in part["runs"]:
            if r.get("status") != "ok" or r.get("reused"):  # a run reused from an earlier part is that part's run
                continue
            key = (r["method"], r["seed"])
            if key in seen and seen[key] != name:
                raise SystemExit(f"error: {r['method']} seed {r['seed']} finished in both {seen[key]} and {name}: "
                                 "keep one of them")
            seen[key] = name


THOUGHT_METHODS = ("coconut", "pause", "nocurriculum")  # prompts with thought positions (pause: one embedding)
STAGELESS_METHODS = ("cot", "nocot")  # every epoch at stage 0: no curriculum stage to reach


def final_stage_of(parts: list[dict], rows: dict) -> int | None:
    """The stage the curriculum ends at: the highest a thought method's run reached, and at least the parts'
    `max_latent_stage` (so that runs all stopped short are still seen as short)."""
    reached = [st for m, row in rows.items() if m not in STAGELESS_METHODS for st in row.get("final_stages", [])]
    configured = [p["resolved_config"].get("max_latent_stage") for p in parts
                  if isinstance(p.get("resolved_config"), dict) and isinstance(p["resolved_config"].get("max_latent_stage"), int)]
    return max(reached + configured, default=None)


def combine(parts: list[dict]) -> dict:
    """One row per method: final-stage accuracy and tokens per answer over the seeds that finished."""
    runs: dict[tuple[str, int], dict] = {}
    for part in parts:
        for r in part["runs"]:
            key = (r["method"], r["seed"])
            if key not in runs or (r.get("status") == "ok" and runs[key].get("status") != "ok"):
                runs[key] = r  # a seed stopped in one part and finished in another: the finished one counts
    rows = {}
    for method in METHODS:
        done = [r for (m, _), r in sorted(runs.items()) if m == method and r.get("status") == "ok" and r.get("final_accuracy") is not None]
        other = [r for (m, _), r in sorted(runs.items()) if m == method and r not in done]
        if not done and not other:
            continue
        acc_mean, acc_std = _mean_std([r["final_accuracy"] for r in done])
        tok_mean, _ = _mean_std([r["final_tokens_per_answer"] for r in done])
        thoughts = [r.get("final_thoughts_per_answer") for r in done]
        thought_mean = _mean_std(thoughts)[0] if done and None not in thoughts else None
        curves = {}
        for r in done:
            for e in r["epochs"]:
                if e.get("val_accuracy") is not None:
                    curves.setdefault(e["epoch"], []).append(e["val_accuracy"])
        epochs = sorted({r["num_epochs"] for r in done})
        rows[method] = {
            "label": METHODS[method][0], "seeds": [r["seed"] for r in done], "accuracies": [r["final_accuracy"] for r in done],
            "accuracy_mean": acc_mean, "accuracy_std": acc_std, "tokens_per_answer": tok_mean,
            "thoughts_per_answer": thought_mean,
            # the paper's "# tokens": the continuous thoughts and the generated tokens of an answer
            # (unknown for a thought method whose runs did not record their thoughts: parts of earlier code)
            "tokens_with_thoughts": (None if tok_mean is None or (thought_mean is None and method in THOUGHT_METHODS)
                                     else tok_mean + (thought_mean or 0.0)),
            "final_stages": sorted({r.get("final_stage") for r in done if r.get("final_stage") is not None}),
            "num_epochs": (epochs[0] if len(epochs) == 1 else "-".join(map(str, (epochs[0], epochs[-1])))) if done else None,
            # the mean of an epoch every seed validated (a mean of fewer seeds would jump where one is missing)
            "curve": {str(e): statistics.fmean(v) for e, v in sorted(curves.items()) if len(v) == len(done)},
            "wall_seconds": [r.get("wall_seconds") for r in done],
            "incomplete": [{"seed": r["seed"], "status": r.get("status")} for r in other],
        }
    final = final_stage_of(parts, rows)
    return {"methods": rows, "targets": targets(rows, final), "runs": [runs[k] for k in sorted(runs)], "final_stage": final}


def targets(rows: dict, final_stage: int | None = None) -> list[dict]:
    """The issue's checks: CoCoNuT >= 0.95 x CoT with >= 10x fewer tokens; above pause and w/o curriculum by
    more than their seed spread. Not evaluable (None) when Coconut's runs stopped before `final_stage`."""
    out = []
    coconut, cot = rows.get("coconut"), rows.get("cot")
    short = bool(coconut and final_stage is not None and coconut.get("final_stages")
                 and min(coconut["final_stages"]) < final_stage)
    if coconut and cot and coconut["accuracy_mean"] is not None and cot["accuracy_mean"] is not None:
        ratio = coconut["accuracy_mean"] / cot["accuracy_mean"] if cot["accuracy_mean"] else None
        mine, theirs = coconut["tokens_with_thoughts"], cot["tokens_per_answer"]
        fewer = theirs / mine if mine and theirs is not None else None
        # a ratio that cannot be computed (CoT at 0%) is not evaluable, not failed
        out.append({"target": "Coconut accuracy >= 0.95 x CoT", "value": ratio,
                    "met": None if ratio is None or short else ratio >= 0.95})
        out.append({"target": "Coconut uses >= 10x fewer tokens than CoT (its thoughts counted)", "value": fewer,
                    "met": None if fewer is None or short else fewer >= 10})
    for other in ("pause", "nocurriculum"):
        row = rows.get(other)
        if coconut and row and coconut["accuracy_mean"] is not None and row["accuracy_mean"] is not None:
            gap = coconut["accuracy_mean"] - row["accuracy_mean"]
            stds = (coconut["accuracy_std"], row["accuracy_std"])
            spread = None if None in stds else max(stds)  # one seed has no spread: the check cannot be made
            out.append({"target": f"Coconut above {row['label'].lstrip('- ')} by more than the seed spread",
                        "value": gap, "spread": spread, "met": None if spread is None or short else gap > spread})
    return out


def _fmt(value, spec=".1f") -> str:
    return "—" if value is None else format(value, spec)


def table_markdown(combined: dict, parts: list[dict]) -> str:
    rows = combined["methods"]
    lines = ["| method | accuracy (%) | # tokens | thoughts + generated | final stage | seeds | epochs |",
             "|---|---|---|---|---|---|---|"]
    # the stage the latent methods' curricula end at: a run that stopped before it is marked
    last_stage = combined.get("final_stage")
    for method, row in rows.items():
        acc = _fmt(row["accuracy_mean"])
        if row["accuracy_std"] is not None:
            acc += f" ± {_fmt(row['accuracy_std'])}"
        elif row["accuracy_mean"] is not None:
            acc += " (one seed)"
        note = f" ({len(row['incomplete'])} incomplete)" if row["incomplete"] else ""
        stages = row.get("final_stages") or []
        stage = ",".join(map(str, stages)) or "—"
        if method not in STAGELESS_METHODS and last_stage is not None and stages and min(stages) < last_stage:
            stage += f" (not {last_stage}: an earlier stage's accuracy)"
        split = ("—" if row.get("thoughts_per_answer") is None
                 else f"{_fmt(row['thoughts_per_answer'])} + {_fmt(row['tokens_per_answer'])}")
        lines.append(f"| {row['label']} | {acc} | {_fmt(row['tokens_with_thoughts'])} | "
                     f"{split} | {stage} | {','.join(map(str, row['seeds'])) or '—'}{note} | {row['num_epochs'] or '—'} |")
    lines.append("")
    for t in combined["targets"]:
        value = _fmt(t["value"], ".3g")
        spread = f" (seed spread {_fmt(t['spread'], '.2f')})" if "spread" in t else ""
        verdict = ("not evaluable" + (" with one seed" if t.get("spread", 0) is None else "") if t["met"] is None
                   else "met" if t["met"] else "not met")
        lines.append(f"- {t['target']}: {value}{spread}: **{verdict}**")
    stamps = sorted({f"{p.get('date')} · {p.get('environment', {}).get('device')}" for p in parts})
    lines.append("")
    codes = sorted({str(p.get("code")) for p in parts if p.get("code")})
    lines.append("Accuracy: validation answer accuracy at the last epoch (mean ± sample std over seeds); # tokens: "
                 "per answer at the last epoch, the continuous thoughts of its prompt and the tokens it generated, as "
                 "the paper counts them; final stage: the curriculum stage of that epoch. Parts: " + "; ".join(stamps)
                 + (f". Code: {', '.join(codes)}" if codes else ""))
    reused = [r for r in combined.get("runs", []) if r.get("reused") and r.get("status") == "ok"]
    if reused:
        lines.append("")
        lines.append(f"{len(reused)} run(s) were reused from an earlier command ("
                     + ", ".join(f"{r['method']} seed {r['seed']}" for r in reused[:6])
                     + "): they were trained by that command's code, which their part does not record.")
    if len(codes) > 1:
        lines.append("")
        lines.append(f"**The parts were made with different code ({', '.join(codes)}).**")
    return "\n".join(lines) + "\n"


def plot(combined: dict, path: Path) -> Path | None:
    import io

    rows = combined["methods"]
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:  # the GPU image may lack it: aggregate the parts again on a machine that has it
        print("[science] matplotlib is not installed: no science.png (run aggregate elsewhere for the plot)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(rows)
    for i, method in enumerate(names):
        row = rows[method]
        if row["accuracy_mean"] is None:
            continue
        ax_bar.bar(i, row["accuracy_mean"], yerr=row["accuracy_std"], capsize=4, color=plt.cm.tab10(i), alpha=0.7)
        ax_bar.scatter([i] * len(row["accuracies"]), row["accuracies"], color="black", s=12, zorder=3)
        # above the bar when it is too short to hold the label
        inside = row["accuracy_mean"] > 25
        ax_bar.text(i, 2 if inside else row["accuracy_mean"] + 2, f"{_fmt(row['tokens_with_thoughts'])} tok", ha="center",
                    va="bottom", fontsize=7, rotation=90, color="white" if inside else "black")
        curve = row["curve"]
        ax_curve.plot([int(e) for e in curve], list(curve.values()), "o-", color=plt.cm.tab10(i), label=row["label"], ms=3)
    ax_bar.set_xticks(range(len(names)), [rows[m]["label"] for m in names], rotation=20, fontsize=8)
    ax_bar.set_ylabel("final validation accuracy (%)")
    ax_bar.set_ylim(0, 105)
    ax_curve.set_xlabel("epoch")
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    ax_curve.set_ylabel("validation accuracy (%), mean over seeds")
    ax_curve.set_ylim(0, 105)
    ax_curve.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def aggregate(part_paths: list[Path], out: Path) -> dict:
    parts = []
    for path in part_paths:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read the part {path}: {e}") from e
    check_parts(parts, [str(p) for p in part_paths])
    combined = combine(parts)
    combined["parts"] = [{k: p.get(k) for k in ("command", "date", "environment", "seeds", "methods", "max_parallel",
                                                 "num_workers", "wall_seconds", "overrides", "config")} for p in parts]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "science.json", combined)
    atomic_write_text(out / "science.md", table_markdown(combined, parts))
    plot(combined, out / "science.png")
    print((out / "science.md").read_text())
    return combined


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every (method, seed) and aggregate",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--out", type=output_dir, required=True,
                   help="folder for this command's part file and the aggregate (science.json, .md, .png)")
    r.add_argument("--work", default=None, help="data, runs and logs (None: <out>_work next to --out)")
    r.add_argument("--config", default="recipes/configs/synthetic_gpu.yaml",
                   help="the training config every run starts from (the GPU recipe; --smoke for a CPU setting)")
    r.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    r.add_argument("--methods", default=",".join(METHODS), help="comma list of methods (Table 1's rows)")
    r.add_argument("--max-parallel", type=int, default=6, help="training runs at once")
    r.add_argument("--num-workers", type=int, default=None, help="data loader workers per run (None: cores / max-parallel - 1)")
    r.add_argument("--time-limit-s", type=float, default=540.0, help="stop runs still going after this (0: never)")
    r.add_argument("--base-port", type=int, default=29600, help="MASTER_PORT of the first run (one port per run)")
    r.add_argument("--smoke", action="store_true", help="a tiny CPU setting that exercises the whole script")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    a = sub.add_parser("aggregate", help="merge part files into science.json/.md/.png")
    a.add_argument("--out", type=output_dir, required=True, help="folder for science.json, .md and .png")
    a.add_argument("parts", nargs="+", help="science_part_*.json files written by `run`")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.max_parallel < 1:
            parser.error(f"--max-parallel must be >= 1, got {args.max_parallel}")
        try:
            seeds = _parse_list(args.seeds, int)
        except ValueError:
            parser.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
        for flag, values in (("--seeds", seeds), ("--methods", _parse_list(args.methods))):
            if not values:
                parser.error(f"{flag} names nothing")
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:  # two runs of one (method, seed) would share a run directory
                parser.error(f"{flag} lists {', '.join(map(str, twice))} more than once")
        part = run(args)
        runs = json.loads(part.read_text())["runs"]
        failed = [f"{r['method']}-s{r['seed']}: {r['status']}" for r in runs if r.get("status") != "ok"]
        if failed:  # recorded in the part file; the exit status says so too
            print(f"[science] {len(failed)} of {len(runs)} runs did not finish: {'; '.join(failed)}", flush=True)
            return 1
        return 0
    aggregate([Path(p) for p in args.parts], Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
