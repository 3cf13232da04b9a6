"""PNG plots of the harness results; the harnesses call these, and they re-plot a saved JSON:

    python -m benchmarks.plot_results bench_results/latent_forward/latent_forward.json
    python -m benchmarks.plot_results bench_results/generate/generate.json --out /tmp/plots
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
    for r in payload["rows"]:
        if r.get("median_ms") is not None:
            groups[(r["batch_size"], r["text_len"])][r["method"]].append(r)
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
                elif method != "plain" and all(r.get("x_floor") for r in rows):
                    ax.plot(x, [r["x_floor"] for r in rows], label=method, **METHOD_STYLE.get(method, {}))
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
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(_title(payload), fontsize=10)
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
    fig.suptitle(_title(payload), fontsize=10)
    fig.tight_layout()
    path = out_dir / "generate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_results", description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="a latent_forward.json or generate.json written by a harness")
    p.add_argument("--out", default=None, help="output directory (default: next to the JSON)")
    args = p.parse_args(argv)
    payload = json.loads(Path(args.json).read_text())
    out = Path(args.out or Path(args.json).parent)
    out.mkdir(parents=True, exist_ok=True)
    plot = {"latent_forward": plot_latent_forward, "generate": plot_generate}.get(payload.get("benchmark"))
    if plot is None:
        raise SystemExit(f"{args.json}: 'benchmark' must be latent_forward or generate, got {payload.get('benchmark')!r}")
    for path in plot(payload, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
