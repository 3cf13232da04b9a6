"""What a resumed or relaunched run keeps and what it refuses: the launch's learning rate and schedule, optimizer
steps under gradient accumulation, the ZeRO stage and the ranks of its checkpoints, the curriculum switches, one
launch per run directory, SIGTERM, and a validation loss that counts every sample once on any number of ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.training.checkpoint import CheckpointError
from engine.training.config import ConfigError
from engine.training.trainer import Trainer
from tests.test_trainer import crash_in_epoch, make_config


def train_rows(run_dir, attempt=None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train" and (attempt is None or r["attempt"] == attempt)]


def test_a_resume_follows_the_launchs_learning_rate_and_schedule(tmp_path):
    """The checkpoint brought back the saved lr and schedule length: a linear decay ended with the first launch's
    epochs and the added epochs trained at lr 0, and a new lr was dropped without a word."""
    linear = dict(lr_schedule="linear", warmup_steps=0, num_epochs=1)
    Trainer(make_config(tmp_path, **linear)).run()
    resumed = Trainer(make_config(tmp_path, **{**linear, "num_epochs": 3, "lr": 2e-3, "resume": True}))
    resumed.run()
    fresh = Trainer(make_config(tmp_path, **{**linear, "num_epochs": 3, "lr": 2e-3, "name": "fresh"}))
    fresh.run()
    got = [r["lr"] for r in train_rows(resumed.run_dir, attempt=2)]
    want = [r["lr"] for r in train_rows(fresh.run_dir) if r["step"] > train_rows(resumed.run_dir, attempt=1)[-1]["step"]]
    assert got and got == pytest.approx(want, rel=1e-12) and got[0] > got[-1] and got[0] > 0


def test_a_step_is_counted_once_per_accumulation_cycle(tmp_path):
    """DeepSpeed's boundary check, read after step(), is about the next micro-batch: every micro-batch counted."""
    trainer = Trainer(make_config(tmp_path, num_epochs=1, batch_size_training=2, gradient_accumulation_steps=3))
    trainer.run()  # 12 samples in micro-batches of 2: 6 micro-batches, 2 optimizer steps
    assert [r["step"] for r in train_rows(trainer.run_dir)] == [1, 2]
    assert trainer.global_step == 2


def test_more_accumulation_than_an_epoch_has_micro_batches_is_refused(tmp_path):
    trainer = Trainer(make_config(tmp_path, batch_size_training=4, gradient_accumulation_steps=4))
    with pytest.raises(ConfigError, match=r"has 3 micro-batches per rank, fewer than gradient_accumulation_steps=4"):
        trainer.run()


def test_a_resume_under_another_zero_stage_is_refused_before_anything_loads(tmp_path):
    first = Trainer(make_config(tmp_path, num_epochs=1))
    first.run()
    stage = first.config.zero_stage
    other = 0 if stage else 2
    with pytest.raises(ConfigError, match=rf"written under zero_stage={stage} .* --set zero_stage={stage}"):
        Trainer(make_config(tmp_path, num_epochs=2, resume=True, zero_stage=other))


@pytest.mark.parametrize("switch", ["no_curriculum", "pause_as_thought", "no_thoughts"])
def test_a_resume_may_not_flip_a_curriculum_switch(tmp_path, switch):
    Trainer(make_config(tmp_path, num_epochs=1)).run()
    with pytest.raises(ConfigError, match=rf"{switch}: False \(saved\) -> True"):
        Trainer(make_config(tmp_path, num_epochs=2, resume=True, **{switch: True}))


def test_a_checkpoint_of_other_ranks_is_refused_before_it_loads_with_the_way_on(tmp_path, monkeypatch):
    """Under ZeRO-1/2/3 DeepSpeed's own refusal came first, wrapped as 'cannot load'; under ZeRO-0 the checkpoint
    loaded and the run went on with another global batch and data order."""
    first = Trainer(make_config(tmp_path, num_epochs=1))
    first.run()
    manifest_path = first.run_dir / "checkpoints" / "epoch_001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["world_size"] == 1
    manifest_path.write_text(json.dumps({**manifest, "world_size": 2}))  # as two ranks would have written it
    import engine.training.run_dir as run_dir

    loads = []
    monkeypatch.setattr(run_dir, "load_checkpoint", lambda *args: loads.append(args))
    with pytest.raises(CheckpointError, match=r"written by 2 ranks and this launch has 1: resume with 2, or start a "
                                              r"new run from its export \(--set load_model_path=.*epoch_001 --set resume=1"):
        Trainer(make_config(tmp_path, num_epochs=2, resume=True)).run()
    assert not loads  # refused before DeepSpeed read anything
    launches = json.loads((first.run_dir / "run.json").read_text())["launches"]
    assert len(launches) == 1  # and before the refused launch was recorded


def test_a_checkpoint_of_another_precision_is_refused_before_it_loads(tmp_path):
    """A bf16 engine's ZeRO states are other files: the load failed with "file not found", read as damage."""
    first = Trainer(make_config(tmp_path, num_epochs=1))
    first.run()
    checkpoint = first.run_dir / "checkpoints" / "epoch_001"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"
    (checkpoint / "manifest.json").write_text(json.dumps({**manifest, "precision": "bf16"}))
    with pytest.raises(CheckpointError, match=r"written in bf16 and this launch trains in fp32"):
        Trainer(make_config(tmp_path, num_epochs=2, resume=True))
    del manifest["precision"]  # a manifest from before the precision was recorded: read from the files' names
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    for state in checkpoint.glob("zero_pp_rank_*"):
        state.rename(state.with_name("bf16_" + state.name))
    with pytest.raises(CheckpointError, match=r"written in bf16"):
        Trainer(make_config(tmp_path, num_epochs=2, resume=True))


def test_a_setting_deepspeed_refuses_leaves_an_earlier_run_in_place(tmp_path):
    """It was found by deepspeed.initialize, after overwrite=true had removed the earlier run's checkpoints."""
    first = Trainer(make_config(tmp_path, num_epochs=1))
    first.run()
    bad = {"zero_optimization": {"overlap_comm": "maybe"}}
    with pytest.raises(ConfigError, match=r"DeepSpeed refuses the run's config .*overlap_comm"):
        Trainer(make_config(tmp_path, num_epochs=1, overwrite=True, deepspeed=bad)).run()
    assert (first.run_dir / "checkpoints" / "epoch_001").is_dir() and (first.run_dir / "final").is_dir()


def test_deepspeeds_wall_clock_breakdown_trains(tmp_path):
    """DeepSpeed starts its backward timers (and ZeRO's accumulation boundary) from hooks on the forward's output
    tensors, found in a dict, list or tuple only: a plain dataclass output skipped them and the first step failed
    on 'timer is not started'."""
    trainer = Trainer(make_config(tmp_path, num_epochs=1, deepspeed={"wall_clock_breakdown": True}))
    trainer.run()
    assert trainer.global_step > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows(trainer.run_dir))


def test_a_resumed_run_that_began_at_an_epoch_keeps_its_schedule(tmp_path):
    """A run started with resume=N (the original's skip of the first stages) spans num_epochs - N epochs; resumed
    with resume=true it was given a schedule over all num_epochs."""
    settings = dict(lr_schedule="linear", warmup_steps=0, num_epochs=3, resume=1)
    whole = Trainer(make_config(tmp_path / "a", **settings))
    whole.run()
    crash_in_epoch(Trainer(make_config(tmp_path / "b", **settings)), 2)
    resumed = Trainer(make_config(tmp_path / "b", **{**settings, "resume": True}))
    resumed.run()
    assert [r["lr"] for r in train_rows(resumed.run_dir)] == [r["lr"] for r in train_rows(whole.run_dir)]
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_one_launch_at_a_time_in_a_run_directory(tmp_path):
    """Two launches in one directory deleted each other's temporaries and mixed their checkpoints and metrics."""
    config = make_config(tmp_path)
    run_dir = tmp_path / "runs" / config.name
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from engine.training.run_dir import lock_run_directory; lock_run_directory(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"is in use by another launch \(pid {holder.pid} on .*\): wait for it"):
            Trainer(config)
    finally:
        holder.kill()
        holder.wait()
    Trainer(config)  # the lock went with its process
    Trainer(config).run()  # this process may build its trainer again, and gives the lock back when the run ends
    taker = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from engine.training.run_dir import lock_run_directory; lock_run_directory(Path(sys.argv[1]))", str(run_dir)],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert taker.returncode == 0, taker.stderr


def test_sigterm_stops_a_run_as_ctrl_c_does():
    """What torchrun and job schedulers send: the run said nothing and closed nothing."""
    from engine.training.errors import Terminated
    from recipes.train_coconut import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_recipe_exits_143_on_sigterm(monkeypatch, tmp_path, capsys):
    import recipes.train_coconut as recipe
    from engine.training.errors import Terminated

    def terminated(self):
        raise Terminated("signal SIGTERM")

    monkeypatch.setattr(recipe.Trainer, "run", terminated)
    with pytest.raises(SystemExit) as stop:
        recipe.main(["--config", "recipes/configs/synthetic_demo.yaml", "--set", f"save_path={tmp_path}"])
    assert stop.value.code == recipe.EXIT_TERMINATED == 143


def test_validation_loss_counts_every_sample_once_on_any_number_of_ranks(tmp_path, monkeypatch):
    """The sampler pads the last shard with repeats; each rank's mean was averaged, a repeat counted twice."""
    import engine.training.validation as validation

    trainer = Trainer(make_config(tmp_path, synthetic={"n_train": 12, "n_val": 5, "hops": 2, "seed": 3},
                                  eval_batch_size=2))
    trainer.setup()
    validator = trainer.validator

    class Engine:  # the model's forward as DeepSpeed's engine gives it
        module = trainer.model

        def __call__(self, **kwargs):
            return trainer.model(**kwargs)

    alone = validator.loss(Engine(), 1)
    sums = []
    monkeypatch.setattr(validation, "all_reduce_sum", lambda values, device: sums.append(values) or values)
    for rank in range(2):
        monkeypatch.setattr(validator, "env", dataclasses.replace(validator.env, world_size=2, rank=rank))
        validator.loss(Engine(), 1)
    total, count = (sum(s[i] for s in sums) for i in range(2))
    assert total / count == pytest.approx(alone, rel=1e-6)


def test_a_zero3_run_resumes_exactly(tmp_path):
    """The model fingerprint saved with a ZeRO-3 checkpoint hashed the partitioned parameters' empty shapes, and
    after the load (parameters gathered) it never matched: every ZeRO-3 resume was refused."""
    whole = Trainer(make_config(tmp_path / "a", zero_stage=3, num_epochs=2))
    whole.run()
    Trainer(make_config(tmp_path / "b", zero_stage=3, num_epochs=1)).run()
    resumed = Trainer(make_config(tmp_path / "b", zero_stage=3, num_epochs=2, resume=True))
    resumed.run()
    from safetensors.torch import load_file

    want = load_file(str(whole.run_dir / "final" / "model.safetensors"))
    got = load_file(str(resumed.run_dir / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_a_file_system_without_locks_lets_the_run_go_on(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK on some network file systems: that must not stop every launch."""
    import errno
    import fcntl
    import logging

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    engine_log = logging.getLogger("coconut")
    engine_log.addHandler(caplog.handler)
    try:
        Trainer(make_config(tmp_path, num_epochs=1)).run()
    finally:
        engine_log.removeHandler(caplog.handler)
    assert "cannot lock run directory" in caplog.text and "No locks available" in caplog.text
