"""Thought analysis: the attention forward equals the iterative one, norm statistics, cell geometry, the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from engine.data.synthetic import question_cells
from engine.eval.thoughts import (
    answer_attention,
    forward_with_attentions,
    layer_choice,
    peak_on_step,
    thought_norm_stats,
    token_cell,
)
from tests.helpers import align_batch, random_pixels, sample_ids


def _batch(model, tok):
    rows = [
        sample_ids(tok, model, question="Start at the top-left cell. Move right, down.", n_latents=3),
        sample_ids(tok, model, question="Move left.", n_latents=1),
    ]
    ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
    return ids, mask, random_pixels(2, model.config.vision_config.image_size[0], 5)


def test_attention_forward_is_the_iterative_forward(tiny_model, tiny_tok):
    ids, mask, pv = _batch(tiny_model, tiny_tok)
    result = forward_with_attentions(tiny_model, ids, mask, pv)
    assert result.max_hidden_difference < 1e-5
    assert tiny_model.language_model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        out = tiny_model(ids, mask, pv, return_inputs_embeds=True)
    real = mask.bool()
    torch.testing.assert_close(result.hidden_states[real], out.hidden_states[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(result.inputs_embeds[real], out.inputs_embeds[real], atol=1e-6, rtol=0)
    layers = tiny_model.language_model.config.num_hidden_layers
    heads = tiny_model.language_model.config.num_attention_heads
    assert len(result.attentions) == layers
    assert result.attentions[0].shape == (2, heads, ids.shape[1], ids.shape[1])
    # Causal, normalised, nothing on padding.
    weights = result.attentions[-1]
    sums = weights.sum(-1)[:, :, real[0]]
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]), atol=1e-5, rtol=0)
    assert float(torch.triu(weights[0, 0], diagonal=1).abs().max()) == 0.0
    assert float(weights[1][:, real[1]][..., ~real[1]].abs().max()) == 0.0  # real queries never read padding


def test_the_check_catches_inputs_without_thoughts(tiny_model, tiny_tok):
    """The hidden-state comparison fails when the plain forward does not get the thoughts."""
    ids, mask, pv = _batch(tiny_model, tiny_tok)
    with torch.no_grad():
        batch = tiny_model.prepare(ids, mask, pv)
        hidden, _, _ = tiny_model.run_passes(batch, need_cache=False)
        placeholder = tiny_model.language_model(
            inputs_embeds=tiny_model.base_embeddings(batch), attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state
    assert float((placeholder - hidden)[mask.bool()].abs().max()) > 1e-3


def test_thought_norm_stats_by_hand():
    torch.manual_seed(0)
    latent = 9
    ids = torch.tensor([[1, 2, latent, latent, latent, 3], [0, 1, 4, latent, 5, 6]])
    hidden = torch.randn(2, 6, 4)
    emb = torch.randn(20, 4)
    stats = thought_norm_stats(hidden, ids, latent, emb)
    thoughts = torch.stack([hidden[0, 1], hidden[0, 2], hidden[0, 3], hidden[1, 2]])
    norms = thoughts.norm(dim=-1)
    assert stats["thought_norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-6)
    assert stats["thought_norm_std"] == pytest.approx(float(norms.std()), rel=1e-6)
    assert stats["thought_norm_max"] == pytest.approx(float(norms.max()), rel=1e-6)
    assert stats["thought_norm_k1"] == pytest.approx(float((norms[0] + norms[3]) / 2), rel=1e-6)
    assert stats["thought_norm_k2"] == pytest.approx(float(norms[1]), rel=1e-6)
    assert stats["thought_norm_k3"] == pytest.approx(float(norms[2]), rel=1e-6)
    assert "thought_norm_k4" not in stats
    assert stats["embedding_norm_mean"] == pytest.approx(float(emb.norm(dim=-1).mean()), rel=1e-6)
    assert stats["thought_to_embedding_norm"] == pytest.approx(stats["thought_norm_mean"] / stats["embedding_norm_mean"])
    assert thought_norm_stats(hidden, torch.ones_like(ids), latent) == {}


def test_cells_tokens_and_peaks():
    assert question_cells("Start at the top-left cell. Move right, down, right. What colour is the cell?", 4) == [(0, 1), (1, 1), (1, 2)]
    assert question_cells("Start at the bottom-right cell. Move up. What colour is the cell?", 3) == [(1, 2)]
    with pytest.raises(ValueError, match="not a question"):
        question_cells("What is this?", 4)
    # 4 x 4 tokens over a 4 x 4 board: one token per cell, row-major; over a 2 x 2 board: 2 x 2 tokens per cell.
    assert [token_cell(t, 4, 4) for t in (0, 3, 4, 15)] == [(0, 0), (0, 3), (1, 0), (3, 3)]
    assert [token_cell(t, 4, 2) for t in (0, 5, 2, 10, 15)] == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1)]
    maps = [[0.0] * 16 for _ in range(2)]
    maps[0][1] = 1.0  # thought 1 peaks on (0, 1)
    maps[1][9] = 1.0  # thought 2 peaks on (2, 1)
    assert peak_on_step(maps, [(0, 1), (1, 1)], 4) == [[1, 0], [0, 0]]
    assert layer_choice(24) == [0, 12, 23] and layer_choice(2) == [0, 1] and layer_choice(1) == [0]


def test_cli_writes_figures_and_summary(tmp_path, tiny, capsys):
    from engine.data.synthetic import generate_synthetic
    from engine.eval.thoughts import main
    from engine.model.loading import export_model

    model, tok, proc = tiny
    data = generate_synthetic(tmp_path / "data", n_train=0, n_val=3, hops=2, seed=4)
    run = tmp_path / "run"
    export_model(model, tok, proc, run / "best")
    (run / "config.json").write_text(json.dumps({"c_thought": 1, "max_latent_stage": 2, "pause_as_thought": False}))
    summary = main(["--model", str(run / "best"), "--data", str(data["val"]), "--n", "2", "--out", str(tmp_path / "out"),
                    "--batch-size", "2", "--max-new-tokens", "4"])
    out = tmp_path / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["stage"] == 2 and saved["grid"] == 4 and saved["layers"] == [0, 1]
    assert len(saved["samples"]) == 2
    for entry in saved["samples"]:
        assert (out / entry["figure"]).stat().st_size > 5000
        assert len(entry["norms"]) == 2 and len(entry["top_tokens"][0]) == 5
        assert len(entry["walk_cells"]) == 2 and len(entry["peak_on_step"]["0"]) == 2
    hits = saved["aggregate"]["peak_on_step_thought_position"]["1"]
    assert len(hits["peak_on_step"]) == 2 and len(hits["peak_on_step"][0]) == 2 and hits["samples"] == 2
    assert saved["aggregate"]["chance"] == pytest.approx(1 / 16)
    assert summary["aggregate"]["num_samples"] == 2
    # a board size other than the data's scored every thought a miss on cells off the board
    with pytest.raises(SystemExit):
        main(["--model", str(run / "best"), "--data", str(data["val"]), "--n", "2", "--out", str(tmp_path / "out"),
              "--batch-size", "2", "--max-new-tokens", "4", "--grid", "3"])
    assert re.search(r"--grid 3: .* generated on a 4x4 board", capsys.readouterr().err)


def test_answer_position_attention(tiny_model, tiny_tok):
    """The map of the position that predicts the answer: the last generated '#' token, read from one forward over
    prompt + generation; a row with no '#' gets none; right-padding the shorter generation changes nothing."""
    from tests.helpers import pad_batch

    model, tok = tiny_model, tiny_tok
    rows = [sample_ids(tok, model, n_latents=2, tail="")[:-1], sample_ids(tok, model, question="Move up.", n_latents=2, tail="")[:-1]]
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[True, True])
    pv = random_pixels(2, model.config.vision_config.image_size[0], 9)
    answer = tok("right: row 0, column 1, red\n### red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    plain = tok("red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    generated = torch.full((2, len(answer)), tok.pad_token_id)
    generated[0] = torch.tensor(answer)
    generated[1, : len(plain)] = torch.tensor(plain)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}
    maps = answer_attention(model, tok, batch, generated, [0, 1])
    assert maps[1] is None and sorted(maps[0]) == [0, 1] and len(maps[0][0]) == model.tokens_per_tile
    mark = max(i for i, t in enumerate(answer) if "#" in tok.decode([t]))
    alone = torch.cat([ids[:1], generated[:1, : mark + 1]], 1)
    result = forward_with_attentions(model, alone, torch.cat([mask[:1], torch.ones(1, mark + 1, dtype=mask.dtype)], 1), pv[:1])
    cols = (ids[0] == model.image_token_id).nonzero().flatten()
    want = result.attentions[1][0].mean(0)[ids.shape[1] + mark, cols]
    torch.testing.assert_close(torch.tensor(maps[0][1]), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--grid", "0"], "--grid must be >= 1"),
        (["--stage", "-1"], "--stage must be >= 0"),
        (["--n", "0"], "--n must be >= 1"),
    ],
)
def test_cli_refuses_bad_arguments_by_name(tmp_path, capsys, extra, needle):
    from engine.eval.thoughts import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), *extra])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_cli_names_a_bad_model_folder_or_data_file_without_a_traceback(tmp_path, capsys, tiny):
    from engine.eval.thoughts import main
    from engine.model.loading import export_model

    model, tok, proc = tiny
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("{not json\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(not_a_model), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "empty" in err and "Traceback" not in err
    export_model(model, tok, proc, tmp_path / "best")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "best"), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "d.jsonl:1" in err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "best"), "--data", str(data), "--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def _sample(maps, record=None):
    from engine.eval.thoughts import SampleThoughts

    return SampleThoughts(record=record or {"id": 0, "image": "x.png"}, thought_positions=list(range(len(maps))),
                          norms=[1.0] * len(maps), top_tokens=[[]] * len(maps), attention={0: maps},
                          attention_producer={0: maps}, image_mass={0: [1.0] * len(maps)}, tile=0)


def test_aggregate_maps_each_thought_to_its_step_and_skips_samples_without_an_image():
    """With c_thought 2, thoughts 1-2 stand for step 1 and 3-4 for step 2 (the own-step rate read the diagonal, as
    if thought k were step k); a record without an image has no visual token to peak on, which is not a miss."""
    from engine.eval.thoughts import aggregate

    cells = [(0, 1), (1, 1)]
    maps = [[0.0] * 16 for _ in range(4)]
    for k, token in enumerate((1, 1, 5, 5)):  # thoughts 1-2 peak on cell (0, 1), thoughts 3-4 on (1, 1)
        maps[k][token] = 1.0
    with_image = _sample(maps)
    no_image = _sample([[] for _ in range(4)], {"id": 1, "image": None})
    result = aggregate([with_image, no_image], [cells, cells], grid=4, c_thought=2)
    hits = result["peak_on_step_thought_position"]["0"]
    assert hits["samples"] == 1
    assert hits["peak_on_own_step"] == [1.0, 1.0, 1.0, 1.0]
    assert hits["peak_on_step"] == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]


def test_the_stage_of_an_export_comes_from_its_runs_history(tmp_path):
    from engine.model.loading import export_stage

    run = tmp_path / "run"
    run.mkdir()
    history = [{"epoch": 1, "stage": 0, "val_accuracy": 90.0}, {"epoch": 2, "stage": 1, "val_accuracy": 95.0},
               {"epoch": 3, "stage": 2, "val_accuracy": 95.0}, {"epoch": 4, "stage": 3, "val_accuracy": 60.0}]
    (run / "history.json").write_text(json.dumps(history))
    assert export_stage(run / "best") == 1  # the first of the best: what the trainer exported
    assert export_stage(run / "final") == 3 and export_stage(run / "epoch_003") == 2
    assert export_stage(run / "epoch_009") is None and export_stage(tmp_path / "elsewhere" / "best") is None


def test_each_export_records_its_own_stage(tmp_path):
    """A run stopped before its end has no history.json: the exports' own record tells their stage (the analysis
    took max_latent_stage for them)."""
    from engine.model.loading import export_stage
    from engine.training.config import config_from_dict
    from engine.training.trainer import Trainer

    config = config_from_dict(dict(
        name="r", save_path=str(tmp_path), model_id="tiny", device="cpu", zero_stage=0,
        model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
        synthetic={"n_train": 8, "n_val": 2, "hops": 2, "seed": 3}, max_latent_stage=2, epochs_per_stage=1,
        num_epochs=3, batch_size_training=4, eval_batch_size=2, max_new_tokens=4, save_only_improve=False,
    ))
    run = Path(Trainer(config).run()["run_dir"])
    history = json.loads((run / "history.json").read_text())
    (run / "history.json").unlink()
    assert [export_stage(run / f"epoch_{h['epoch']:03d}") for h in history] == [h["stage"] for h in history] == [0, 1, 2]
    assert export_stage(run / "final") == 2
    best = json.loads((run / "best" / "coconut_training_state.json").read_text())
    assert export_stage(run / "best") == history[best["epoch"] - 1]["stage"]
    # and the settings its prompts need, for an export copied away from its run's config.json
    from engine.eval.thoughts import _run_settings

    assert best["c_thought"] == 1 and best["max_latent_stage"] == 2 and best["pause_as_thought"] is False
    copied = tmp_path / "copied" / "final"
    shutil.copytree(run / "final", copied)
    assert {k: _run_settings(copied)[k] for k in ("c_thought", "max_latent_stage")} == {"c_thought": 1, "max_latent_stage": 2}


def test_cli_refuses_a_run_without_thoughts_and_clears_earlier_figures(tmp_path, tiny, capsys):
    from engine.data.synthetic import generate_synthetic
    from engine.eval.thoughts import main
    from engine.model.loading import export_model

    model, tok, proc = tiny
    data = generate_synthetic(tmp_path / "data", n_train=0, n_val=2, hops=2, seed=4)
    run = tmp_path / "run"
    export_model(model, tok, proc, run / "final")
    (run / "config.json").write_text(json.dumps({"c_thought": 1, "max_latent_stage": 2, "no_thoughts": True}))
    args = ["--model", str(run / "final"), "--data", str(data["val"]), "--n", "1", "--out", str(tmp_path / "out"),
            "--max-new-tokens", "2"]
    with pytest.raises(SystemExit) as exit_info:  # one "error:" line and status 2, as every input error here
        main(args)
    assert exit_info.value.code == 2 and re.search(r"(?m)^error: .*trained without thoughts \(no_thoughts=true\)",
                                                   capsys.readouterr().err)
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "stage": 0, "val_accuracy": 50.0}]))
    (run / "config.json").write_text(json.dumps({"c_thought": 1, "max_latent_stage": 2}))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and re.search(r"exported at stage 0 .* give --stage", capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:  # nor at an explicit stage 0
        main([*args, "--stage", "0"])
    assert exit_info.value.code == 2 and "--stage 0 is the chain of thought" in capsys.readouterr().err
    (run / "history.json").unlink()
    (run / "config.json").write_text(json.dumps({"c_thought": 1, "max_latent_stage": 2}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "0007_old.png").write_bytes(b"an earlier analysis")
    (tmp_path / "out" / "notes.png").write_bytes(b"not ours")
    main(args)
    assert not (tmp_path / "out" / "0007_old.png").exists() and (tmp_path / "out" / "notes.png").exists()
