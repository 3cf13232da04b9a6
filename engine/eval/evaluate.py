"""Batched generation over a validation set, scored with answer accuracy and the A-OKVQA metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from engine.eval.metrics import (
    answer_matches,
    direct_answer_score,
    extract_answer,
    multiple_choice_score,
    nearest_choice,
    normalize_answer,
)
from engine.model.generation import GenerationOptions, generate


def answer_length(tokens: torch.Tensor, eos_token_id: int | None) -> int:
    """Generated tokens up to and including the first eos (all of them when there is none)."""
    if eos_token_id is None:
        return int(tokens.numel())
    hits = (tokens == eos_token_id).nonzero()
    return int(hits[0]) + 1 if len(hits) else int(tokens.numel())


def score_record(record: dict, generation: str, answer_match: str = "normalized") -> dict:
    """Per-record scores: the answer match (`metrics.answer_matches` in ``answer_match``'s mode), A-OKVQA MC and DA
    (when the record has what they need).
    ``prediction`` is the normalised answer (`normalize_answer`), mapped to the record's choices;
    ``direct_answer`` is the answer as the model wrote it (stripped), which `official_predictions` writes and the
    DA score compares with the direct answers as they are: the official evaluator's exact match, so the in-run DA
    accuracy is what `python -m engine.eval.aokvqa` gives on the written predictions."""
    written = extract_answer(generation)
    prediction = normalize_answer(written)
    out = {"id": record["id"], "prediction": prediction, "direct_answer": written, "generation": generation}
    answer = record.get("answer")
    if answer is not None:
        out["answer"] = answer
        out["correct"] = float(answer_matches(generation, answer, answer_match))
    choices = record.get("choices")
    if choices:
        choice = nearest_choice(prediction, choices)
        out["multiple_choice"] = choice
        if record.get("correct_choice_idx") is not None:
            out["mc_score"] = multiple_choice_score(choice, choices, record["correct_choice_idx"])
    if record.get("direct_answers") and record.get("difficult_direct_answer") is False:
        # the written answer against the direct answers as they are: how the official script scores predictions.json
        out["da_score"] = direct_answer_score(written, record["direct_answers"])
    return out


def summarize(scored: list[dict], seconds: float) -> dict:
    def mean(key):
        values = [s[key] for s in scored if key in s]
        return 100.0 * sum(values) / len(values) if values else None

    lengths = [s["num_tokens"] for s in scored]
    thoughts = [s["num_thoughts"] for s in scored if "num_thoughts" in s]
    return {
        "val_accuracy": mean("correct"),
        "mc_accuracy": mean("mc_score"),
        "da_accuracy": mean("da_score"),
        "tokens_per_answer": sum(lengths) / len(lengths) if lengths else None,
        # the continuous thoughts of each prompt: the paper's "# tokens" counts them with the generated tokens
        "thoughts_per_answer": sum(thoughts) / len(thoughts) if thoughts else None,
        "answers_per_second": len(scored) / seconds if seconds > 0 else None,
        "num_answers": len(scored),
    }


@torch.no_grad()
def generate_answers(
    model,
    batches: Iterable[dict],
    tokenizer,
    *,
    device: torch.device,
    max_new_tokens: int,
    total: int | None = None,
    min_passes_fn: Callable[[dict], int] | None = None,
    step_sync: Callable[[bool], bool] | None = None,
    progress: bool = True,
    kv_cache: str = "dynamic",
    answer_match: str = "normalized",
) -> tuple[list[dict], float]:
    """Generate for every batch (from GenerationCollator) and score each record (`score_record`, ``answer_match``).
    Returns (scored, seconds). ``kv_cache``: "dynamic" or "paged" (one `PagedRunner` serves every batch and is
    released at the end)."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, step_sync=step_sync, kv_cache=kv_cache)
    with contextlib.ExitStack() as stack:
        runner = None
        if kv_cache == "paged":
            from engine.model.paged.runner import PagedRunner  # Triton kernels: imported only when used

            runner = stack.enter_context(PagedRunner(model))
        return _generate_batches(model, batches, tokenizer, device, options, runner, min_passes_fn, total, progress,
                                 answer_match)


def _generate_batches(model, batches, tokenizer, device, options, runner, min_passes_fn, total, progress,
                      answer_match):
    scored: list[dict] = []
    elapsed = 0.0
    for batch in tqdm(batches, total=total, desc="generate", disable=not progress, leave=False):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        pixels = batch["pixel_values"].to(device) if batch.get("pixel_values") is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        batch_options = dataclasses.replace(options, min_passes=min_passes_fn(batch) if min_passes_fn else 0)
        tokens = generate(model, ids, mask, pixels, batch_options, runner=runner)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        tokens = tokens.cpu()
        for row, record in enumerate(batch["records"]):
            n = answer_length(tokens[row], model.eos_token_id)
            text = tokenizer.decode(tokens[row, :n].tolist(), skip_special_tokens=True)
            result = score_record(record, text, answer_match)
            result["num_tokens"] = n
            if "num_latents" in batch:
                result["num_thoughts"] = int(batch["num_latents"][row])
            scored.append(result)
    return scored, elapsed


def official_predictions(scored: list[dict]) -> dict:
    """A-OKVQA's format: {question_id: {"multiple_choice": ..., "direct_answer": ...}}."""
    return {
        str(s["id"]): {"multiple_choice": s.get("multiple_choice", s["prediction"]),
                       "direct_answer": s.get("direct_answer", s["prediction"])}
        for s in scored
    }


if __name__ == "__main__":  # a library module: say where evaluation is run from instead of exiting silently
    import sys

    print("error: engine.eval.evaluate is the library the trainer evaluates with, not a command. Evaluate a model "
          "with\n  python recipes/train_coconut.py --config recipes/configs/aokvqa_eval.yaml --set "
          "load_model_path=<model>\nand score official-format predictions with\n  python -m engine.eval.aokvqa "
          "--annotations <aokvqa_v1p0_val.json> --predictions <predictions.json>", file=sys.stderr)  # fmt: skip
    raise SystemExit(2)
