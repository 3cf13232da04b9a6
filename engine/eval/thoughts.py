"""What the continuous thoughts look at and what they say: attention over the image, lm_head decoding, norms.

    python -m engine.eval.thoughts --model runs/synthetic-demo/final --data runs/synthetic-demo/data/val.jsonl \\
        --n 16 --out runs/synthetic-demo/thoughts

For every sample, one PNG: the image, then for each continuous thought a heatmap of the attention that the
thought's position pays to the visual tokens (averaged over heads) in an early, a middle and a late layer,
the tokens the thought decodes to through the lm_head, and the thought's norm against the norms of the
token embeddings; one more column shows the position that predicts the answer (after the generated `###`).
Plus `summary.json` with the same numbers for every sample and their aggregates.

How the attention weights are obtained: the model's causal iterative forward (`prepare` + `run_passes`)
computes the thoughts; one plain transformers forward of the language model over the inputs actually fed
(thoughts at the latent positions) with eager attention then returns every layer's attention. Attention is
causal, so that forward computes exactly what the iterative one did (its hidden states are checked against
the iterative ones), and its weights are the ones the thoughts were computed with.

Positions: thought k is fed at its latent position p_k (its input embedding) and was produced at p_k - 1 (the
last-layer hidden state there; the `<|start-latent|>` marker for the first thought). The heatmaps show the
thought's own position p_k; the summary reports both. On the built-in task (`engine.data.synthetic`), where
the walk's cells are known, the summary counts how often the attention peak of thought k lands on the cell
of each step j: `peak_on_step[k][j]`, whose diagonal is "thought k re-reads the image where step k looks", and
how often the answer position's peak lands on each step's cell (`answer_peak_on_step`).

`thought_norm_stats` gives the norm statistics of a training forward's thoughts (logged by the trainer).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from engine.utils.io import atomic_write_bytes, atomic_write_json
from engine.utils.logging import get_logger

log = get_logger("thoughts")

HIDDEN_MATCH_TOL = 1e-3  # fp32: the two forwards agree to ~1e-6; a mismatch means the inputs differ
_FIGURE = re.compile(r"^\d{4}_.*\.png$")  # a sample's figure: "<index>_<record id>.png"


class ThoughtAnalysisError(RuntimeError):
    pass


# ---------------------------------------------------------------------- norms (also for training metrics)
def _thought_vectors(hidden_states: torch.Tensor, input_ids: torch.Tensor, latent_id: int):
    """The thoughts of a forward: the last-layer hidden state before each latent position, with each one's
    index within its row's run of thoughts (0 for the first)."""
    latent = input_ids == latent_id
    latent[:, 0] = False  # a latent is never a row's first token (the schedule refuses it)
    rows, cols = latent.nonzero(as_tuple=True)
    vectors = hidden_states[rows, cols - 1]
    first = torch.zeros_like(latent)
    first[:, 1:] = latent[:, 1:] & ~latent[:, :-1]
    run_start = torch.cummax(torch.where(first, torch.arange(latent.shape[1], device=latent.device), 0), dim=1).values
    index = cols - run_start[rows, cols]
    return vectors, index


@torch.no_grad()
def thought_norm_stats(
    hidden_states: torch.Tensor,
    input_ids: torch.Tensor,
    latent_id: int,
    embedding_weight: torch.Tensor | None = None,
    *,
    max_index: int = 8,
) -> dict[str, float]:
    """Norm statistics of the continuous thoughts of a forward (empty dict when the batch has none).

    `hidden_states` (B, T, H): last-layer hidden states (post-norm, as `CoconutOutput.hidden_states`);
    `input_ids` (B, T). The thought fed at a latent position is the hidden state of the position before it.
    Returns `thought_norm_mean/std/min/max`, `thought_norm_k{i}` (mean norm of each row's i-th thought, i from
    1, up to `max_index`), and with `embedding_weight` (vocab, H) `embedding_norm_mean` and
    `thought_to_embedding_norm` (how far the thoughts sit from the scale of ordinary token inputs).
    """
    vectors, index = _thought_vectors(hidden_states.detach(), input_ids, latent_id)
    if vectors.shape[0] == 0:
        return {}
    norms = vectors.float().norm(dim=-1)
    stats = {
        "thought_norm_mean": float(norms.mean()),
        "thought_norm_std": float(norms.std()) if norms.numel() > 1 else 0.0,
        "thought_norm_min": float(norms.min()),
        "thought_norm_max": float(norms.max()),
    }
    for i in range(min(max_index, int(index.max()) + 1)):
        chosen = norms[index == i]
        if chosen.numel():
            stats[f"thought_norm_k{i + 1}"] = float(chosen.mean())
    if embedding_weight is not None:
        emb = float(embedding_weight.detach().float().norm(dim=-1).mean())
        stats["embedding_norm_mean"] = emb
        stats["thought_to_embedding_norm"] = stats["thought_norm_mean"] / emb if emb > 0 else math.nan
    return stats


# ---------------------------------------------------------------------- the forward with attention weights
@dataclass
class ThoughtForward:
    hidden_states: torch.Tensor  # (B, T, H) of the iterative forward
    inputs_embeds: torch.Tensor  # (B, T, H) the inputs fed: thoughts at latent positions
    attentions: tuple[torch.Tensor, ...]  # per layer (B, heads, T, T), from the plain forward over inputs_embeds
    max_hidden_difference: float  # between the plain and the iterative forward's last hidden states
    latent_mask: torch.Tensor = field(repr=False, default=None)  # (B, T) positions fed a thought


@torch.no_grad()
def forward_with_attentions(model, input_ids, attention_mask=None, pixel_values=None) -> ThoughtForward:
    """The iterative forward, then one plain language-model forward over the inputs it fed, with eager attention
    and `output_attentions` (the attention backend is switched for the call and restored). Raises
    ThoughtAnalysisError when the two forwards' hidden states differ by more than HIDDEN_MATCH_TOL."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = model.prepare(input_ids, attention_mask, pixel_values)
    hidden, inputs, _ = model.run_passes(batch, keep_inputs=True, need_cache=False)
    config = model.language_model.config
    previous = getattr(config, "_attn_implementation", "sdpa")
    if previous != "eager":
        model.set_attention_backend("eager")
    try:
        plain = model.language_model(
            inputs_embeds=inputs,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_attentions=True,
            use_cache=False,
        )
    finally:
        if previous != "eager":
            model.set_attention_backend(previous)
    real = batch.attention_mask.bool()
    difference = float((plain.last_hidden_state - hidden)[real].abs().max()) if bool(real.any()) else 0.0
    if not difference <= HIDDEN_MATCH_TOL:
        raise ThoughtAnalysisError(
            f"the plain forward over the fed inputs differs from the iterative forward by {difference:.3g} "
            f"(> {HIDDEN_MATCH_TOL}); its attention weights would not be the ones the thoughts were computed with"
        )
    if not plain.attentions or plain.attentions[0] is None:
        raise ThoughtAnalysisError("the language model returned no attention weights (eager attention is needed)")
    return ThoughtForward(hidden, inputs, tuple(plain.attentions), difference, batch.latent_mask)


# ---------------------------------------------------------------------- geometry of the visual tokens
def token_cell(token: int, tokens_per_side: int, grid: int) -> tuple[int, int]:
    """The board cell `(row, column)` under visual token `token` of a square tile (tokens in row-major order,
    as InternVL's pixel shuffle lays them out), for a `grid x grid` board drawn over the whole tile."""
    row, col = divmod(int(token), tokens_per_side)
    return int((row + 0.5) * grid / tokens_per_side), int((col + 0.5) * grid / tokens_per_side)


def layer_choice(num_layers: int) -> list[int]:
    """An early, a middle and a late layer (fewer when the model has fewer layers)."""
    return sorted({0, num_layers // 2, num_layers - 1})


@dataclass
class SampleThoughts:
    """The thoughts of one prompt."""

    record: dict
    thought_positions: list[int]  # latent columns p_k (in the padded batch)
    norms: list[float]  # norm of each thought fed
    top_tokens: list[list[tuple[str, float]]]  # per thought: (token, probability) through the lm_head
    # per selected layer, per thought: head-averaged attention over the visual tokens of the tile that covers the
    # whole image, (tokens_per_tile,), at the thought's position and at the position that produced it
    attention: dict[int, list[list[float]]]
    attention_producer: dict[int, list[list[float]]]
    image_mass: dict[int, list[float]]  # per layer, per thought: total attention on all visual tokens
    tile: int  # which tile the maps cover (0 for one tile, the thumbnail otherwise)
    prediction: str | None = None
    correct: bool | None = None
    # per layer: the same map for the position that predicts the answer (the last generated token holding '#')
    answer_attention: dict[int, list[float]] | None = None


def _whole_image_tile(num_tiles: int) -> int:
    """InternVL adds a thumbnail of the whole image as the last tile when it cuts more than one."""
    return 0 if num_tiles <= 1 else num_tiles - 1


@torch.no_grad()
def analyse_batch(model, tokenizer, batch: dict, *, top_k: int = 5, layers: Sequence[int] | None = None) -> list[SampleThoughts]:
    """Thoughts of a GenerationCollator batch: attention maps, lm_head decoding and norms per row."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = batch.get("pixel_values")
    result = forward_with_attentions(model, ids, mask, pixels)
    num_layers = len(result.attentions)
    layers = list(layers) if layers is not None else layer_choice(num_layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the language model has {num_layers} layers")
    weight = model.base.lm_head.weight
    per_tile = model.tokens_per_tile
    samples = []
    for row, record in enumerate(batch["records"]):
        positions = (ids[row] == model.latent_id).nonzero().flatten().tolist()
        image_cols = (ids[row] == model.image_token_id).nonzero().flatten()
        tiles = len(image_cols) // per_tile
        tile = _whole_image_tile(tiles)
        tile_cols = image_cols[tile * per_tile : (tile + 1) * per_tile]
        thoughts = result.inputs_embeds[row, positions].float()  # (K, H)
        probs = torch.softmax(thoughts.to(weight.dtype) @ weight.T, dim=-1).float() if positions else thoughts[:, :0]
        top = []
        for k in range(len(positions)):
            values, indices = probs[k].topk(min(top_k, probs.shape[-1]))
            top.append([(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices)])
        attention, producer, mass = {}, {}, {}
        for layer in layers:
            heads = result.attentions[layer][row].float().mean(0)  # (T, T) averaged over heads
            attention[layer] = [heads[p, tile_cols].tolist() if len(tile_cols) else [] for p in positions]
            producer[layer] = [heads[p - 1, tile_cols].tolist() if len(tile_cols) else [] for p in positions]
            mass[layer] = [float(heads[p, image_cols].sum()) for p in positions]
        samples.append(
            SampleThoughts(
                record=record,
                thought_positions=positions,
                norms=thoughts.norm(dim=-1).tolist(),
                top_tokens=top,
                attention=attention,
                attention_producer=producer,
                image_mass=mass,
                tile=tile,
            )
        )
    return samples


@torch.no_grad()
def answer_attention(model, tokenizer, batch: dict, generated: torch.Tensor, layers: Sequence[int]) -> list[dict | None]:
    """Per row, per layer: the head-averaged attention over the whole-image tile of the position that predicts the
    answer (`... ### answer`: the last generated token holding '#'), from the prompt plus the generated tokens up
    to it; None for a row whose generation holds no '#'."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    marks = []
    for row in range(rows):
        pieces = [tokenizer.decode([int(t)]) for t in generated[row].tolist()]
        hits = [i for i, piece in enumerate(pieces) if "#" in piece and int(generated[row, i]) != model.eos_token_id]
        marks.append(hits[-1] if hits else None)
    if all(m is None for m in marks):
        return [None] * rows
    extra = max(m for m in marks if m is not None) + 1
    tail = generated[:, :extra].to(ids.device)
    tail_mask = torch.zeros_like(tail, dtype=mask.dtype)
    for row, m in enumerate(marks):
        if m is not None:
            tail_mask[row, : m + 1] = 1
    result = forward_with_attentions(model, torch.cat([ids, tail], 1), torch.cat([mask, tail_mask], 1), batch.get("pixel_values"))
    per_tile = model.tokens_per_tile
    out = []
    for row, m in enumerate(marks):
        if m is None:
            out.append(None)
            continue
        image_cols = (ids[row] == model.image_token_id).nonzero().flatten()
        tile = _whole_image_tile(len(image_cols) // per_tile)
        cols = image_cols[tile * per_tile : (tile + 1) * per_tile]
        out.append({layer: result.attentions[layer][row].float().mean(0)[width + m, cols].tolist() for layer in layers})
    return out


# ---------------------------------------------------------------------- the built-in task: peaks on the walk
def peak_on_step(maps: list[list[float]], cells: list[tuple[int, int]], grid: int) -> list[list[int]]:
    """`hits[k][j]` = 1 when the attention peak of thought k lies on the cell of step j (0-based)."""
    hits = []
    for weights in maps:
        if not weights:
            hits.append([0] * len(cells))
            continue
        side = math.isqrt(len(weights))
        peak = token_cell(int(torch.tensor(weights).argmax()), side, grid)
        hits.append([int(peak == cell) for cell in cells])
    return hits


def walk_cells_of(record: dict, grid: int | None) -> list[tuple[int, int]] | None:
    """The walk's cells when the record is a question of the built-in task, else None."""
    if grid is None:
        return None
    from engine.data.synthetic import question_cells

    try:
        return question_cells(record["question"], grid)
    except ValueError:
        return None


# ---------------------------------------------------------------------- the figure
def plot_sample(sample: SampleThoughts, image_path: str | None, embedding_norms: torch.Tensor, *, grid: int | None,
                cells: list[tuple[int, int]] | None, path: Path, c_thought: int = 1) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    layers = sorted(sample.attention)
    k_count = len(sample.thought_positions)
    # (label, maps, the thought's index, the step it stands for: thought k replaces step k // c_thought)
    columns = [(f"thought {k + 1}", {layer: sample.attention[layer][k] for layer in layers}, k, k // c_thought)
               for k in range(k_count)]
    if sample.answer_attention:
        columns.append(("answer", sample.answer_attention, None, len(cells) - 1 if cells else None))
    cols = max(1, len(columns))
    fig = plt.figure(figsize=(2.6 * (cols + 1), 2.4 * (len(layers) + 1) + 0.6))
    spec = fig.add_gridspec(len(layers) + 1, cols + 1)
    image = None
    if image_path is not None:
        with Image.open(image_path) as img:
            image = np.asarray(img.convert("RGB"))
    record = sample.record
    ax = fig.add_subplot(spec[0, 0])
    if image is not None:
        ax.imshow(image)
        if cells:
            h, w = image.shape[:2]
            for j, (r, c) in enumerate(cells):
                ax.text((c + 0.5) * w / grid, (r + 0.5) * h / grid, str(j + 1), ha="center", va="center",
                        fontsize=11, color="black", bbox=dict(boxstyle="circle", fc="white", alpha=0.8))
    ax.set_axis_off()
    verdict = "" if sample.correct is None else (" (correct)" if sample.correct else " (wrong)")
    ax.set_title(f"answer {record.get('answer')!r}\npredicted {sample.prediction!r}{verdict}", fontsize=8)
    for li, layer in enumerate(layers):
        for ci, (label, maps, thought, step) in enumerate(columns):
            ax = fig.add_subplot(spec[li, ci + 1])
            weights = maps[layer]
            if weights:
                side = math.isqrt(len(weights))
                heat = np.asarray(weights, dtype=np.float32).reshape(side, side)
                extent = (0, image.shape[1], image.shape[0], 0) if image is not None else None
                if image is not None:
                    ax.imshow(image, alpha=0.55)
                ax.imshow(heat, cmap="magma", alpha=0.6, extent=extent, interpolation="nearest")
                peak = int(np.argmax(heat))
                pr, pc = divmod(peak, side)
                scale = (image.shape[0] / side) if image is not None else 1.0
                ax.plot((pc + 0.5) * scale, (pr + 0.5) * scale, "c+", markersize=12, mew=2)
                if cells and step is not None and step < len(cells) and image is not None:
                    r, c = cells[step]  # the cell of the step this position stands for
                    ch = image.shape[0] / grid
                    ax.add_patch(matplotlib.patches.Rectangle((c * ch, r * ch), ch, ch, fill=False, ec="lime", lw=2))
            ax.set_axis_off()
            mass = f"\nimage mass {sample.image_mass[layer][thought]:.2f}" if thought is not None else f"\nimage mass {sum(weights):.2f}"
            ax.set_title(f"{label}, layer {layer}{mass}", fontsize=7)
    # Bottom row: what each thought decodes to, and its norm against the token embeddings.
    ax = fig.add_subplot(spec[len(layers), 0])
    ax.hist(embedding_norms.numpy(), bins=40, color="lightgray", label="token embeddings")
    for k, norm in enumerate(sample.norms):
        ax.axvline(norm, color=plt.cm.tab10(k % 10), lw=1.5, label=f"thought {k + 1}")
    ax.set_xlabel("L2 norm", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    for k in range(k_count):
        ax = fig.add_subplot(spec[len(layers), k + 1])
        ax.set_axis_off()
        lines = [f"thought {k + 1}: norm {sample.norms[k]:.2f}"]
        lines += [f"{token!r}  {p:.2f}" for token, p in sample.top_tokens[k]]
        ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=7, family="monospace", transform=ax.transAxes)
    fig.suptitle(record.get("question", ""), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------- the command
def _run_settings(model_dir: Path) -> dict:
    """The training settings of `model_dir`: those its export records (`EXPORT_STATE_FILE`: the curriculum keys it
    was trained with) over the config of the run that wrote it (`<run>/best`, `<run>/final`), when present. With
    neither (an export copied away from its run, written before exports recorded them), the defaults and the
    command line's, with a warning."""
    from engine.model.loading import EXPORT_STATE_FILE, read_export_state

    settings: dict = {}
    path = model_dir.parent / "config.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; not read", path)
            found = None
        if isinstance(found, dict):
            settings.update(found)
    settings.update(read_export_state(model_dir) or {})
    if "c_thought" not in settings:
        log.warning("%s records no training settings (no %s with them, no run config.json beside it): c_thought, "
                    "max_latent_stage and the thought mode are the command line's or the defaults", model_dir,
                    EXPORT_STATE_FILE)
    return settings


def _grid_of(data_path: Path) -> int | None:
    from engine.data.synthetic import META_FILE

    meta = data_path.parent / META_FILE
    if meta.is_file():
        return int(json.loads(meta.read_text()).get("grid", 4))
    return None


def aggregate(samples: list[SampleThoughts], cells_per_sample: list, grid: int | None, c_thought: int = 1) -> dict:
    """Hit rates, norms and accuracy over the samples. The peak rates count the samples that show an image (one
    without has no visual token to peak on: not a miss); thought k stands for step k // c_thought."""
    out: dict = {"num_samples": len(samples)}
    norms = [n for s in samples for n in s.norms]
    if norms:
        t = torch.tensor(norms)
        out["thought_norm"] = {"mean": float(t.mean()), "std": float(t.std()) if len(norms) > 1 else 0.0,
                               "min": float(t.min()), "max": float(t.max())}
    judged = [s.correct for s in samples if s.correct is not None]
    if judged:
        out["accuracy"] = 100.0 * sum(judged) / len(judged)
    if grid is None:
        return out
    for name, attr in (("thought_position", "attention"), ("producing_position", "attention_producer")):
        per_layer = {}
        for layer in sorted(samples[0].attention) if samples else []:
            totals, counts = None, None
            for sample, cells in zip(samples, cells_per_sample):
                if not cells or not any(getattr(sample, attr)[layer]):
                    continue
                hits = torch.tensor(peak_on_step(getattr(sample, attr)[layer], cells, grid), dtype=torch.float64)
                if hits.numel() == 0:
                    continue
                k, j = hits.shape
                if totals is None:
                    totals, counts = torch.zeros(k, j, dtype=torch.float64), torch.zeros(k, 1, dtype=torch.float64)
                if hits.shape != totals.shape:
                    continue  # a sample with another number of thoughts or steps: kept out of the matrix
                totals += hits
                counts += 1
            if totals is not None:
                rates = (totals / counts.clamp(min=1)).tolist()
                per_layer[str(layer)] = {
                    "peak_on_step": rates,
                    "peak_on_own_step": [rates[k][k // c_thought] for k in range(len(rates))
                                         if k // c_thought < len(rates[0])],
                    "samples": int(counts[0, 0]),
                }
        out[f"peak_on_step_{name}"] = per_layer
    answer = {}
    for layer in sorted(samples[0].attention) if samples else []:
        hits = [peak_on_step([s.answer_attention[layer]], cells, grid)[0]
                for s, cells in zip(samples, cells_per_sample) if cells and s.answer_attention and s.answer_attention[layer]]
        steps = {len(h) for h in hits}
        if hits and len(steps) == 1:
            answer[str(layer)] = {"peak_on_step": torch.tensor(hits, dtype=torch.float64).mean(0).tolist(), "samples": len(hits)}
    out["answer_peak_on_step"] = answer
    out["chance"] = 1.0 / (grid * grid)
    return out


def run(args: argparse.Namespace) -> dict:
    from engine.data.collator import GenerationCollator
    from engine.data.dataset import CurriculumConfig, QuestionDataset
    from engine.data.records import DataError, load_records
    from engine.eval.evaluate import answer_length, score_record
    from engine.model.loading import CheckpointError, export_stage, load_model

    model_dir, data_path, out_dir = Path(args.model), Path(args.data), Path(args.out)
    if not model_dir.is_dir():
        raise CheckpointError(f"--model: not a directory: {model_dir}")
    if not data_path.is_file():
        raise DataError(f"--data: file not found: {data_path}")
    settings = _run_settings(model_dir)

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else settings.get(name, default)

    modes = [m for m in ("cot", "no_cot", "no_thoughts") if settings.get(m)]
    if modes:
        raise CheckpointError(f"--model: the run that wrote {model_dir} trained without thoughts ({modes[0]}=true): "
                              "there are no thoughts to analyse")
    c_thought, max_latent_stage = pick("c_thought", 1), pick("max_latent_stage", 3)
    pause = bool(pick("pause_as_thought", False))
    stage = args.stage
    if stage is None:
        stage = export_stage(model_dir)
        if stage is None:
            stage = max_latent_stage
        elif stage == 0:
            raise CheckpointError(f"--model: {model_dir} was exported at stage 0 (a chain of thought: its prompts hold "
                                  "no thoughts); analyse a later epoch's export, or give --stage")
        else:
            log.info("%s was exported at stage %d: its prompts are that stage's (--stage sets another)", model_dir, stage)
    curriculum = CurriculumConfig(
        c_thought=c_thought, max_latent_stage=max_latent_stage, pad_latent_to_max=bool(pick("pad_latent_to_max", False))
    )
    model, tokenizer, processor = load_model(model_dir, device=args.device, attn_implementation="eager",
                                             max_tiles=pick("max_tiles", None))
    model.thought_feedback = not pause
    model.eval()
    records = load_records(data_path, need_answer=False)[: args.n]
    if not records:
        raise DataError(f"--data: {data_path} holds no records")
    written = _grid_of(data_path)
    if args.grid is not None and written is not None and args.grid != written:
        raise DataError(f"--grid {args.grid}: {data_path}'s task was generated on a {written}x{written} board "
                        "(its synthetic.json); leave --grid out")
    grid = args.grid if args.grid is not None else written
    dataset = QuestionDataset(records, tokenizer, processor, curriculum, stage)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=GenerationCollator(tokenizer.pad_token_id))
    embedding_norms = model.base.get_input_embeddings().weight.detach().float().norm(dim=-1).cpu()
    samples: list[SampleThoughts] = []
    for batch in loader:
        batch = {k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        result = analyse_batch(model, tokenizer, batch, top_k=args.top_k)
        with torch.no_grad():
            tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                    max_new_tokens=args.max_new_tokens).cpu()
        answers = answer_attention(model, tokenizer, batch, tokens, sorted(result[0].attention)) if result else []
        for row, sample in enumerate(result):
            n = answer_length(tokens[row], model.eos_token_id)
            scored = score_record(sample.record, tokenizer.decode(tokens[row, :n].tolist(), skip_special_tokens=True),
                                  settings.get("answer_match", "normalized"))
            sample.prediction = scored["prediction"]
            sample.correct = bool(scored["correct"]) if "correct" in scored else None
            sample.answer_attention = answers[row]
        samples.extend(result)
    cells_per_sample = [walk_cells_of(s.record, grid) for s in samples]
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out_dir.glob("*.png") if _FIGURE.match(p.name)]
    for path in stale:  # an earlier analysis's figures would sit beside this one's summary
        path.unlink()
    if stale:
        log.info("removed %d figures of an earlier analysis from %s", len(stale), out_dir)
    entries = []
    for i, (sample, cells) in enumerate(zip(samples, cells_per_sample)):
        name = f"{i:04d}_{sample.record['id']}.png"
        plot_sample(sample, sample.record.get("image"), embedding_norms, grid=grid, cells=cells, path=out_dir / name,
                    c_thought=c_thought)
        entry = {
            "id": sample.record["id"], "figure": name, "question": sample.record["question"],
            "answer": sample.record.get("answer"), "prediction": sample.prediction, "correct": sample.correct,
            "norms": sample.norms, "top_tokens": sample.top_tokens, "tile": sample.tile,
            "image_mass": {str(k): v for k, v in sample.image_mass.items()},
        }
        if cells:
            entry["walk_cells"] = cells
            entry["peak_on_step"] = {str(layer): peak_on_step(sample.attention[layer], cells, grid) for layer in sample.attention}
            if sample.answer_attention:
                entry["answer_peak_on_step"] = {str(layer): peak_on_step([maps], cells, grid)[0]
                                                for layer, maps in sample.answer_attention.items()}
        entries.append(entry)
    summary = {
        "model": str(model_dir), "data": str(data_path), "stage": stage, "c_thought": c_thought,
        "pause_as_thought": pause, "grid": grid, "layers": sorted(samples[0].attention) if samples else [],
        "embedding_norm": {"mean": float(embedding_norms.mean()), "p05": float(embedding_norms.quantile(0.05)),
                           "p50": float(embedding_norms.median()), "p95": float(embedding_norms.quantile(0.95))},
        "aggregate": aggregate(samples, cells_per_sample, grid, c_thought),
        "samples": entries,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    log.info("wrote %d figures and %s", len(entries), out_dir / "summary.json")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Attention, lm_head decoding and norms of the continuous thoughts.")
    parser.add_argument("--model", required=True, help="a transformers-format export (<run>/best or <run>/final)")
    parser.add_argument("--data", required=True, help="records as the trainer reads them (JSON lines, or the original CoCoNuT's JSON array)")
    parser.add_argument("--out", required=True, help="folder for the figures and summary.json")
    parser.add_argument("--n", type=int, default=8, help="samples to analyse (the first N)")
    parser.add_argument("--stage", type=int, default=None,
                        help="curriculum stage of the prompts (default: the export's epoch's, else max_latent_stage)")
    parser.add_argument("--c-thought", dest="c_thought", type=int, default=None, help="default: the run's config.json, else 1")
    parser.add_argument("--max-latent-stage", dest="max_latent_stage", type=int, default=None,
                        help="default: the run's config.json, else 3")
    parser.add_argument("--pad-latent-to-max", dest="pad_latent_to_max", action="store_true", default=None)
    parser.add_argument("--pause-as-thought", dest="pause_as_thought", action="store_true", default=None,
                        help="the model was trained with pause_as_thought (default: the run's config.json)")
    parser.add_argument("--grid", type=int, default=None, help="board size of the built-in task (default: synthetic.json)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="default: the run's config.json, else the export's image processor")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("n", "top_k", "batch_size", "max_new_tokens", "max_tiles", "grid", "c_thought"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("stage", "max_latent_stage"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.stage == 0:
        parser.error("--stage 0 is the chain of thought: its prompts hold no thoughts to analyse")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out: {args.out} is a file, not a folder")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    from engine.data.images import ImageError
    from engine.data.records import DataError
    from engine.model.loading import CheckpointError

    try:
        return run(args)
    except (CheckpointError, DataError, ImageError) as e:  # a bad model folder, data file or image: named, no traceback
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
