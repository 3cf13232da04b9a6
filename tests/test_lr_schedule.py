"""The LR factor: warmup and decay, the warmup restart after an optimizer reset, and its state surviving a resume."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from engine.training.config import ConfigError, config_from_dict
from engine.training.lr_schedule import LRFactor, restart_warmup


def test_warmup_then_decay():
    f = LRFactor("cosine", warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
    assert LRFactor("linear", 0, 10)(5) == pytest.approx(0.5)
    assert [LRFactor("constant", 2, 10)(s) for s in (0, 1, 7)] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        LRFactor("step", 0, 10)


def test_restart_warms_up_again_under_the_decay():
    f = LRFactor("linear", warmup_steps=2, total_steps=20)
    f.restart(10)
    assert f(9) == pytest.approx(f.decay(9))  # before the restart: untouched
    assert f(10) == pytest.approx(0.5 * f.decay(10)) and f(11) == pytest.approx(f.decay(11))


def _scheduler(factor):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param]}, {"params": [], "weight_decay": 0.0}], lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def test_restart_applies_now_and_survives_a_state_dict_round_trip():
    scheduler = _scheduler(LRFactor("constant", 4, 100))
    for _ in range(10):
        scheduler.optimizer.step()
        scheduler.step()
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert restart_warmup(scheduler) == 10
    assert [g["lr"] for g in scheduler.optimizer.param_groups] == pytest.approx([0.025, 0.025])  # the next step's rate
    state = scheduler.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "lr_lambdas"})
    fresh = _scheduler(LRFactor("constant", 4, 100))
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].restart_step == 10 and fresh.lr_lambdas[0](11) == pytest.approx(0.5)


def test_trainer_restarts_the_warmup_at_a_stage_switch(tmp_path):
    with_reset, without = _lrs_of_a_run(tmp_path, True), _lrs_of_a_run(tmp_path, False)
    # 3 steps per epoch; each row logs the rate its step applied. The warmup's first step runs at a third of the
    # peak, at step 1 and again at step 4 (the first of stage 1) with the restart.
    assert with_reset[1] == pytest.approx(1e-3 / 3) and with_reset[3] == pytest.approx(1e-3)
    assert with_reset[4] == pytest.approx(1e-3 / 3) and with_reset[5] == pytest.approx(2e-3 / 3)
    assert without[1] == pytest.approx(1e-3 / 3) and without[4] == pytest.approx(1e-3)


def _lrs_of_a_run(tmp_path, reset, epochs_per_stage=1, log=None):
    """The learning rate each logged step applied, in a 2-epoch run of 3 steps per epoch."""
    from engine.training.trainer import Trainer

    config = config_from_dict(dict(
        name=f"reset{reset}{epochs_per_stage}", save_path=str(tmp_path / "runs"), model_id="tiny",
        model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
        synthetic={"n_train": 12, "n_val": 2, "hops": 2, "seed": 3}, max_latent_stage=2,
        epochs_per_stage=epochs_per_stage, num_epochs=2, batch_size_training=4, eval_batch_size=2, max_new_tokens=4,
        lr=1e-3, warmup_steps=3, reset_optimizer=reset, device="cpu", zero_stage=0, log_every_steps=1,
    ))
    run = Trainer(config).run()["run_dir"]
    records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    return {r["step"]: r["lr"] for r in records if r["kind"] == "train"}


def test_reset_optimizer_every_epoch_resets_inside_a_stage_too(tmp_path, caplog):
    """The original's code builds a new optimizer in every epoch: `every_epoch` does so, `true` only where the
    stage changes (both epochs here are stage 0)."""
    with caplog.at_level(logging.INFO, logger="engine.training.trainer"):
        every = _lrs_of_a_run(tmp_path, "every_epoch", epochs_per_stage=2)
    at_stages = _lrs_of_a_run(tmp_path, True, epochs_per_stage=2)
    assert every[4] == pytest.approx(1e-3 / 3) and every[6] == pytest.approx(1e-3)
    assert at_stages[4] == pytest.approx(1e-3)
    assert any("epoch 2 begins: optimizer state reset" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="reset_optimizer must be true .* or every_epoch, got 'stage'"):
        config_from_dict({"reset_optimizer": "stage"})


def _dropping_run(tmp_path, **overrides):
    """16 records, half of them too long for max_length at the stages that keep their long steps (0 and 1)."""
    def record(i, long):
        step = "a long reasoning step with many words in it" if long else "s"
        return {"id": f"r{i}", "image": None, "question": f"q{i}?", "steps": [f"{step} {j}" for j in range(3)], "answer": "a"}

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(record(i, i % 2)) + "\n" for i in range(16)))
    (tmp_path / "val.jsonl").write_text(json.dumps(record(99, False)) + "\n")
    values = dict(
        name="t", save_path=str(tmp_path / "runs"), model_id="tiny", device="cpu", zero_stage=0,
        model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
        train_path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"), max_latent_stage=3,
        epochs_per_stage=1, num_epochs=4, max_length=40, lr_schedule="linear", lr=1e-3, batch_size_training=2,
        log_every_steps=1,
    )
    return config_from_dict({**values, **overrides})


def test_a_decay_spans_the_steps_the_epochs_run_when_samples_are_dropped(tmp_path):
    """Samples over max_length are dropped, more at the early stages (their sequences keep more steps): the schedule
    was sized from the record count, so a linear decay stopped a quarter of its range short of its end."""
    from engine.training.trainer import Trainer

    trainer = Trainer(_dropping_run(tmp_path))
    run = trainer.run()["run_dir"]
    steps = [r["step"] for r in map(json.loads, open(f"{run}/metrics.jsonl")) if r["kind"] == "train"]
    assert steps[-1] < 4 * 16 // 2  # some epochs dropped samples
    assert trainer.engine.lr_scheduler.lr_lambdas[0].total_steps == steps[-1]


def test_a_resume_checks_only_the_epochs_it_has_left(tmp_path):
    """The epochs' accumulation check at set-up covered the epochs a resumed run had trained already: more
    accumulation than an early (dropping) stage's micro-batches refused a resume that trains only later stages."""
    from engine.training.config import ConfigError
    from engine.training.trainer import Trainer

    Trainer(_dropping_run(tmp_path, num_epochs=2)).run()  # stages 0 and 1 keep 8 of the 16 samples: 4 micro-batches
    resumed = Trainer(_dropping_run(tmp_path, resume=True, gradient_accumulation_steps=6))
    assert [h["epoch"] for h in resumed.run()["history"]] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"epoch 1 \(stage 0, 8 samples kept of 16\) has 4 micro-batches"):
        Trainer(_dropping_run(tmp_path, name="fresh", gradient_accumulation_steps=6)).run()  # a fresh run trains it
