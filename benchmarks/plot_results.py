"""PNG plots of the harness results; the harnesses call these, and they re-plot a saved JSON:

    python -m benchmarks.plot_results bench_results/latent_forward/latent_forward.json
    python -m benchmarks.plot_results bench_results/generate/generate.json --out /tmp/plots
    python -m benchmarks.plot_results OUT/ts_1gpu/train_step.json OUT/ts_2gpu/train_step.json \
        OUT/ts_4gpu/train_step.json --out /tmp/plots          # training-step scaling: samples/s against GPUs
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

METHOD_STYLE = {
    "engine": dict(color="tab:green", marker="o"),
    "engine_eager": dict(color="tab:olive", marker="o", linestyle=":"),
    "fullpass": dict(color="tab:red", marker="x"),
    "naive": dict(color="tab:orange", marker="s"),
    "plain": dict(color="black", marker=".", linestyle="--"),
    "hf": dict(color="tab:gray", marker="^", linestyle=":"),
    "cot": dict(color="tab:purple", marker="^"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, width: float = 5.0, height: float = 3.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _title(payload: dict) -> str:
    s = payload.get("settings", {})
    env = payload.get("environment", {})
    return f"{s.get('model')} · {s.get('dtype')} · {env.get('device')} · {env.get('date')}"


def plot_latent_forward(payload: dict, out_dir: str | Path) -> list[Path]:
    """ms/step vs latent count per method, and the ratio to the plain floor, one panel per (batch, text)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    failed: dict[tuple, list[str]] = defaultdict(list)  # configurations without a time, named on their panel
    for r in payload["rows"]:
        if r.get("median_ms") is not None:
            groups[(r["batch_size"], r["text_len"])][r["method"]].append(r)
        elif r.get("status") not in (None, "ok"):
            failed[(r["batch_size"], r["text_len"])].append(f"{r['method']} at {r.get('n_latents')}: {r['status']}")
    if not groups:
        return []
    keys = sorted(groups)
    paths = []
    mode = payload.get("settings", {}).get("mode", "train")
    for kind in ("ms", "x_floor"):
        fig, axes = _grid(plt, len(keys))
        for ax, key in zip(axes, keys):
            for method, rows in groups[key].items():
                rows = sorted(rows, key=lambda r: r["n_latents"])
                x = [r["n_latents"] for r in rows]
                if kind == "ms":
                    y = [r["median_ms"] for r in rows]
                    err = [[r["median_ms"] - r["p10_ms"] for r in rows], [r["p90_ms"] - r["median_ms"] for r in rows]]
                    ax.errorbar(x, y, yerr=err, label=method, capsize=2, **METHOD_STYLE.get(method, {}))
                elif method != "plain":  # the points that have a floor (a failed plain pass leaves some without)
                    kept = [r for r in rows if r.get("x_floor")]
                    if kept:
                        ax.plot([r["n_latents"] for r in kept], [r["x_floor"] for r in kept], label=method,
                                **METHOD_STYLE.get(method, {}))
            if kind == "ms":
                ax.set_yscale("log")
                ax.set_ylabel(f"ms per {'fwd+bwd' if mode == 'train' else 'forward'} step")
            else:
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.axhline(1.4, color="tab:green", linewidth=0.8, linestyle=":", label="1.4× target")
                ax.set_yscale("log")
                ax.set_ylabel("time / plain pass over the same tokens")
            ax.set_xlabel("latents (stage × c_thought)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"batch {key[0]}, text {key[1]} tokens", fontsize=10)
            if failed.get(key):
                ax.text(0.01, 0.01, "not measured: " + "; ".join(failed[key][:4]) + (" ..." if len(failed[key]) > 4 else ""),
                        transform=ax.transAxes, fontsize=6, va="bottom", wrap=True)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(_title(payload), fontsize=9, wrap=True)
        fig.tight_layout()
        path = out_dir / ("latent_forward_ms.png" if kind == "ms" else "latent_forward_x_floor.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_generate(payload: dict, out_dir: str | Path) -> list[Path]:
    """answers/s vs batch size per method (one line per latent count), and decode ms/step against the floor."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    ok = [r for r in payload["rows"] if r.get("answers_per_s") is not None]
    if not ok:
        return []
    series: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        name = r["method"] if r["method"] == "cot" else f"{r['method']} ({r['n_latents']} latents)"
        if r.get("kv_cache"):
            name += f" [{r['kv_cache']}]"
        series[name].append(r)
    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["batch_size"])
        method = rows[0]["method"]
        if method == "naive":  # batch 1 by construction: a level to compare against
            ax1.axhline(rows[0]["answers_per_s"], color="tab:orange", linestyle=":", linewidth=1,
                        label=f"{name}, batch 1")
            continue
        style = dict(METHOD_STYLE.get(method, {}))
        if method == "latent":
            style = dict(marker="o", linestyle="--" if rows[0].get("kv_cache") == "paged" else "-")
        ax1.plot([r["batch_size"] for r in rows], [r["answers_per_s"] for r in rows], label=name, **style)
        step = [r for r in rows if r.get("decode_ms_per_step") is not None]
        if step:
            ax2.plot([r["batch_size"] for r in step], [r["decode_ms_per_step"] for r in step], label=name, **style)
    floor = sorted({(r["batch_size"], r["floor_ms_per_step"]) for r in ok if r.get("floor_ms_per_step") and r["method"] == "latent"})
    if floor:
        ax2.plot([b for b, _ in floor], [f for _, f in floor], color="black", linestyle="--", marker="_", markersize=14,
                 label="memory floor (latent)")
    for ax, ylabel in ((ax1, "answers / s"), (ax2, "ms per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(payload), fontsize=9, wrap=True)
    fig.tight_layout()
    path = out_dir / "generate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def scaling_series(payloads: list[dict]) -> dict[tuple, list[tuple[int, float, dict]]]:
    """Training-step rows of several runs as series over the GPU count: key (model, ZeRO stage, latents, batch per
    rank, optimizer, ZeRO settings, Liger), points (world size, global samples/s, row), one per world size (the
    fastest when a run measured it twice)."""
    best: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for payload in payloads:
        model = payload.get("settings", {}).get("model")
        # runs of another dtype, device kind or sequence are another series, not a point of this one
        setup = (payload.get("settings", {}).get("dtype"), _device_kind(payload.get("environment", {}).get("device")))
        for r in payload["rows"]:
            if r.get("samples_per_s") is None:
                continue
            key = (model, r["zero_stage"], r["n_latents"], r["batch_size"], r.get("optimizer", "auto"),
                   r.get("zero_settings", "default"), r.get("liger", "none"),
                   (*setup, r.get("text_len"), r.get("image_tokens")))
            world = int(r["world_size"])
            if world not in best[key] or r["samples_per_s"] > best[key][world]["samples_per_s"]:
                best[key][world] = r
    return {k: sorted((w, r["samples_per_s"], r) for w, r in v.items()) for k, v in best.items()}


def _device_kind(device) -> str | None:
    """"2 x NVIDIA H200" -> "NVIDIA H200": the kind of device, whatever the count (the count is the x axis)."""
    text = str(device) if device is not None else None
    return text.split(" x ", 1)[1] if text and " x " in text and text.split(" x ", 1)[0].isdigit() else text


def plot_train_scaling(payloads: list[dict], out_dir: str | Path) -> list[Path]:
    """Global samples/s against GPU count, one panel per model, a line per (ZeRO stage, latents, batch per rank) and
    its linear-scaling reference (dotted, from the line's smallest GPU count)."""
    plt = _pyplot()

    series = scaling_series(payloads)
    if not series:
        return []
    models = sorted({k[0] for k in series}, key=str)
    fig, axes = _grid(plt, len(models), width=5.5, height=4.0)
    colors = {2: "tab:blue", 3: "tab:red", 1: "tab:green", 0: "tab:gray"}
    setups = {k[-1] for k in series}
    for ax, model in zip(axes, models):
        for key, points in sorted(((k, v) for k, v in series.items() if k[0] == model), key=lambda kv: (*kv[0][1:4], str(kv[0][4:]))):
            _, zero, latents, batch, optimizer, settings, liger, setup = key
            worlds, rates = [p[0] for p in points], [p[1] for p in points]
            variant = "".join(f", {v}" for v, d in ((optimizer, "auto"), (settings, "default"), (liger, "none")) if v != d)
            if len(setups) > 1:  # name what tells the series apart (a file of older code may lack a part)
                dtype, device, text, image = setup
                variant += "".join(f", {v}" for v in (dtype, device) if v is not None)
                if text is not None:
                    variant += f", text {text} + {image} image tokens"
            style = dict(color=colors.get(zero, "black"), marker="o" if latents else "s",
                         linestyle="-" if latents else "--")
            ax.plot(worlds, rates, label=f"ZeRO-{zero}, {latents} latents, batch {batch}/GPU{variant}", **style)
            if len(points) > 1:
                ax.plot(worlds, [rates[0] * w / worlds[0] for w in worlds], color=style["color"], linestyle=":",
                        linewidth=0.8)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("samples / s (global)")
        worlds = sorted({p[0] for k, v in series.items() if k[0] == model for p in v})
        ax.set_xticks(worlds)  # the GPU counts measured (one count alone got fractional ticks)
        if len(worlds) == 1:
            ax.set_xlim(worlds[0] - 1, worlds[0] + 1)
        ax.set_title(f"{model} (dotted: linear scaling)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    def listed(values) -> str:
        return ", ".join(sorted({str(v) for v in values}))

    fig.suptitle(f"training step · {listed(p.get('settings', {}).get('dtype') for p in payloads)} · "
                 f"{listed(_device_kind(p.get('environment', {}).get('device')) for p in payloads)} · "
                 f"{listed(p.get('environment', {}).get('date') for p in payloads)}", fontsize=9, wrap=True)
    fig.tight_layout()
    path = Path(out_dir) / "train_step_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_results", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="a latent_forward.json or generate.json written by a harness, or "
                   "train_step.json files of runs on different GPU counts (one scaling plot of all of them)")
    p.add_argument("--out", default=None, help="output directory (default: next to the first JSON)")
    args = p.parse_args(argv)
    payloads = []
    for path in args.json:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            p.error(f"cannot read {path} as a harness's JSON: {e}")
        if not isinstance(payload, dict) or "benchmark" not in payload:
            p.error(f"{path} is not a harness's results file (a JSON object with a 'benchmark' key)")
        payloads.append(payload)
    out = Path(args.out or Path(args.json[0]).parent)
    kinds = {pl.get("benchmark") for pl in payloads}
    if kinds == {"train_step"}:
        plot = lambda: plot_train_scaling(payloads, out)  # noqa: E731
    elif len(payloads) == 1 and kinds <= {"latent_forward", "generate"}:
        one = {"latent_forward": plot_latent_forward, "generate": plot_generate}[payloads[0]["benchmark"]]
        plot = lambda: one(payloads[0], out)  # noqa: E731
    else:
        p.error(f"{args.json}: expected one latent_forward.json or generate.json, or train_step.json files; got "
                f"benchmarks {sorted(map(str, kinds))}")
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to plot
    paths = plot()
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
