"""The trainer end to end on the tiny model and the synthetic task (single process, CPU, ZeRO-2, fp32)."""

import json
from pathlib import Path

import pytest
import torch

from engine.model.paged.runner import PagedRunner
from engine.training.config import ConfigError, config_from_dict
from engine.training.optim import reset_optimizer_state
from engine.training.trainer import Trainer, TrainingError
from engine.training.validation import Validator

SMALL_MODEL = {"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64}


def make_config(tmp_path, **overrides):
    values = dict(
        name="t",
        save_path=str(tmp_path / "runs"),
        model_id="tiny",
        model_overrides=dict(SMALL_MODEL),
        synthetic={"n_train": 12, "n_val": 6, "hops": 2, "seed": 3},
        c_thought=1,
        max_latent_stage=2,
        epochs_per_stage=1,
        num_epochs=3,
        batch_size_training=4,
        gradient_accumulation_steps=1,
        lr=1e-3,
        eval_batch_size=4,
        max_new_tokens=12,
        device="cpu",
        log_every_steps=1,
        keep_checkpoints=3,
    )
    values.update(overrides)
    return config_from_dict(values)


def crash_in_epoch(trainer, crashing: int) -> None:
    """Run `trainer` until epoch ``crashing`` (0-based) raises at its start: a crash after the epochs before it."""
    original = trainer.train_epoch

    def train_epoch(epoch, stage):
        if epoch == crashing:
            raise RuntimeError("simulated crash")
        return original(epoch, stage)

    trainer.train_epoch = train_epoch
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run()


def trained_parameters(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    trainer = Trainer(make_config(tmp))
    result = trainer.run()
    return trainer, result


def test_run_covers_stages_and_writes_reports(finished_run):
    trainer, result = finished_run
    history = result["history"]
    assert [h["stage"] for h in history] == [0, 1, 2]
    for h in history:
        assert h["train_loss"] > 0 and h["val_loss"] is not None
        assert 0.0 <= h["val_accuracy"] <= 100.0 and h["tokens_per_answer"] > 0 and h["answers_per_second"] > 0
    run = Path(result["run_dir"])
    assert (run / "training_curves.png").stat().st_size > 1000
    assert "| stage |" in (run / "summary.md").read_text()
    kinds = {json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"train", "epoch"} <= kinds
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch_003"
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_exports_load_with_load_model(finished_run):
    from engine import load_model

    trainer, result = finished_run
    run = Path(result["run_dir"])
    model, tok, _ = load_model(run / "final")
    for name, p in trainer.model.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], p.detach()), name
    assert tok.convert_tokens_to_ids("<|latent|>") == trainer.model.latent_id
    assert (run / "best" / "config.json").is_file() and (run / "epoch_002" / "config.json").is_file()


def test_loss_decreases_over_the_cot_stage(tmp_path):
    cfg = make_config(tmp_path, cot=True, num_epochs=3, lr=3e-3, synthetic={"n_train": 16, "n_val": 4, "hops": 2, "seed": 1})
    history = Trainer(cfg).run()["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.8


def test_resume_reaches_the_same_parameters(tmp_path):
    reference = Trainer(make_config(tmp_path / "a", reset_optimizer=True))
    reference.run()
    expected = trained_parameters(reference)

    crash_in_epoch(Trainer(make_config(tmp_path / "b", reset_optimizer=True)), 2)
    ckpt = tmp_path / "b" / "runs" / "t" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "epoch_002"

    resumed = Trainer(make_config(tmp_path / "b", reset_optimizer=True, resume=True))
    result = resumed.run()
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    for name, value in trained_parameters(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_reset_optimizer_clears_adam_state(finished_run):
    trainer, _ = finished_run
    assert reset_optimizer_state(trainer.engine) > 0
    assert reset_optimizer_state(trainer.engine) == 0


def test_missing_data_file_is_named(tmp_path):
    cfg = make_config(tmp_path, train_path=str(tmp_path / "missing.jsonl"), val_path=None)
    with pytest.raises(ConfigError, match="missing.jsonl"):
        Trainer(cfg).run()


def test_more_latent_stages_than_steps_is_an_error(tmp_path):
    from engine.data.records import DataError

    cfg = make_config(tmp_path, max_latent_stage=5)  # the synthetic task has 2 steps per sample here
    with pytest.raises(DataError, match="max_latent_stage"):
        Trainer(cfg).run()


def test_checkpoint_of_another_model_is_refused(finished_run, tmp_path):
    _, result = finished_run
    export = Path(result["run_dir"]) / "final"
    cfg = make_config(tmp_path, load_model_path=str(export), model_overrides={"text_hidden_size": 48})
    with pytest.raises(ConfigError, match="text_config.hidden_size"):
        Trainer(cfg).run()


def test_crash_mid_epoch_keeps_last_checkpoint(tmp_path, caplog):
    trainer = Trainer(make_config(tmp_path, num_epochs=2))
    real_train_epoch = trainer.train_epoch

    def failing(epoch, stage):
        if epoch == 1:
            raise TrainingError("non-finite loss nan at epoch 2, step 3")
        return real_train_epoch(epoch, stage)

    trainer.train_epoch = failing
    with caplog.at_level("ERROR"):
        with pytest.raises(TrainingError):
            trainer.run()
    ckpt = tmp_path / "runs" / "t" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "epoch_001" and (ckpt / "epoch_001").is_dir()
    assert "epoch_001" in caplog.text and "resume=true" in caplog.text


def test_only_eval_writes_official_predictions(finished_run, tmp_path):
    from engine.eval import aokvqa

    _, result = finished_run
    run = Path(result["run_dir"])
    preds = tmp_path / "preds.json"
    cfg = make_config(
        tmp_path,
        only_eval=True,
        load_model_path=str(run / "best"),
        train_path=None,
        val_path=str(run / "data" / "val.jsonl"),
        predictions_path=str(preds),
    )
    summary = Trainer(cfg).run()
    assert summary["num_answers"] == 6
    data = json.loads(preds.read_text())
    assert len(data) == 6 and all(set(v) == {"multiple_choice", "direct_answer"} for v in data.values())
    # the official scorer accepts them, given annotations in the official format
    records = [json.loads(line) for line in (run / "data" / "val.jsonl").read_text().splitlines()]
    annotations = [
        {"question_id": r["id"], "choices": r["choices"], "correct_choice_idx": r["correct_choice_idx"],
         "direct_answers": r["direct_answers"], "difficult_direct_answer": r["difficult_direct_answer"]}
        for r in records
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(annotations))
    assert aokvqa.main(["--annotations", str(ann), "--predictions", str(preds)]) == 0
    # the in-run accuracies are the official scorer's on the written file
    official = aokvqa.score(aokvqa.load_annotations(ann), aokvqa.load_predictions(preds))
    assert summary["da_accuracy"] == pytest.approx(official["da_accuracy"])
    assert summary["mc_accuracy"] == pytest.approx(official["mc_accuracy"])


def test_only_eval_prompts_at_the_stage_the_export_was_trained_at(finished_run, tmp_path, caplog):
    """An export of an earlier epoch (`best` often is one) was evaluated at max_latent_stage, with more thoughts
    in its prompts than it was ever trained with."""
    _, result = finished_run
    run = Path(result["run_dir"])
    common = dict(only_eval=True, train_path=None, val_path=str(run / "data" / "val.jsonl"))
    stages = [h["stage"] for h in result["history"]]
    assert stages[1] != make_config(tmp_path).max_latent_stage
    summary = Trainer(make_config(tmp_path, load_model_path=str(run / "epoch_002"), **common)).run()
    assert summary["stage"] == stages[1]
    with caplog.at_level("WARNING"):
        summary = Trainer(make_config(tmp_path, load_model_path=str(run / "epoch_002"), eval_stage=2, **common)).run()
    assert summary["stage"] == 2 and "was trained at stage 1" in caplog.text
    summary = Trainer(make_config(tmp_path, load_model_path=str(run / "final"), **common)).run()
    assert summary["stage"] == stages[-1]
    # the original CoCoNuT's eval configs give the stage as resume: N (epoch N's stage); it was ignored
    caplog.clear()
    with caplog.at_level("WARNING"):
        summary = Trainer(make_config(tmp_path, load_model_path=str(run / "epoch_002"), resume=2, **common)).run()
    assert summary["stage"] == 2 and "resume=2 (epoch 2's stage) gives stage 2" in caplog.text
    # an export given as model_id, without load_model_path: its stage too
    summary = Trainer(make_config(tmp_path, model_id=str(run / "epoch_002"), model_overrides={}, **common)).run()
    assert summary["stage"] == stages[1]


def test_offloaded_optimizer_states_with_accumulation_keep_the_vision_gradients(tmp_path):
    """With the optimizer states on the host, DeepSpeed dropped the accumulated gradients of parameters the last
    micro-batch of a cycle left unused: behind an image-less micro-batch the vision tower was not updated at all."""
    from engine.data.records import read_jsonl, write_jsonl
    from engine.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", n_train=12, n_val=4, hops=2, seed=5, progress=False)
    for split in ("train", "val"):
        records = read_jsonl(data[split])
        write_jsonl(data[split], [{**r, "image": None} if i % 2 else r for i, r in enumerate(records)])
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False}
    common = dict(synthetic=None, train_path=str(data["train"]), val_path=str(data["val"]), num_epochs=1, optimizer="adamw",
                  batch_size_training=2, gradient_accumulation_steps=2, check_images=False)
    trainer = Trainer(make_config(tmp_path, name="offload", deepspeed=offload, **common))
    trainer.run()
    assert trainer.model.vision_every_batch and trainer.global_step == 3
    plain = Trainer(make_config(tmp_path, name="plain", **common))
    plain.run()
    assert not plain.model.vision_every_batch  # one rank, no offload: image-less batches skip the tower
    got, want = dict(trainer.model.named_parameters()), dict(plain.model.named_parameters())
    worst = {n: (got[n] - p).abs().max().item() for n, p in want.items()}
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]  # the same updates


def test_only_eval_checks_its_predictions_path_before_generating(finished_run, tmp_path):
    _, result = finished_run
    run = Path(result["run_dir"])
    common = dict(only_eval=True, load_model_path=str(run / "best"), train_path=None,
                  val_path=str(run / "data" / "val.jsonl"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"predictions_path: .* is a folder"):
        Trainer(make_config(tmp_path, predictions_path=str(tmp_path), **common))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"predictions_path .*a_file is a file, not a folder"):
        Trainer(make_config(tmp_path, predictions_path=str(tmp_path / "a_file" / "preds.json"), **common))


def test_a_model_id_that_is_no_model_is_named_when_a_checkpoint_is_checked_against_it(finished_run, tmp_path):
    _, result = finished_run
    best = Path(result["run_dir"]) / "best"
    with pytest.raises(ConfigError, match=r"model_id '.*no_such_folder' .* is neither a built-in spec"):
        Trainer(make_config(tmp_path, load_model_path=str(best), model_id=str(tmp_path / "no_such_folder"))).run()


def test_static_latent_block_trains_to_the_same_parameters(tmp_path):
    """The latent block (what CUDA graphs replay on GPU) inside the real trainer: same parameters as the
    transformers passes after the latent stages, and the aligned batches really took it."""
    reference = Trainer(make_config(tmp_path / "a", latent_passes="transformers"))
    reference.run()
    block = Trainer(make_config(tmp_path / "b", latent_passes="static"))
    block.run()
    assert block.model._latent_blocks[(False, False, False)].calls > 0  # eager, the modules (auto on CPU)
    expected = trained_parameters(reference)
    for name, value in trained_parameters(block).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_paged_eval_kv_cache_gives_the_dynamic_cache_predictions(finished_run, tmp_path, monkeypatch):
    """Validation generation through the paged runner (`eval_kv_cache=paged`, the GPU default) answers exactly as
    through transformers' DynamicCache, and the runner is not kept afterwards."""
    _, result = finished_run
    run = Path(result["run_dir"])
    predictions = {}
    for kv_cache in ("dynamic", "paged"):
        cfg = make_config(
            tmp_path / kv_cache,
            only_eval=True,
            load_model_path=str(run / "best"),
            train_path=None,
            val_path=str(run / "data" / "val.jsonl"),
            predictions_path=str(tmp_path / f"{kv_cache}.json"),
            eval_kv_cache=kv_cache,
        )
        trainer = Trainer(cfg)
        assert trainer.validator.eval_kv_cache() == kv_cache
        calls = {"generate_prepared": 0, "close": 0}
        for name in calls:
            original = getattr(PagedRunner, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                calls[_name] += 1
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(PagedRunner, name, counted)
        summary = trainer.run()
        monkeypatch.undo()
        predictions[kv_cache] = (json.loads((tmp_path / f"{kv_cache}.json").read_text()), summary["val_accuracy"], summary["tokens_per_answer"])
        used = calls["generate_prepared"] > 0
        assert used == (kv_cache == "paged"), "the paged cache must really be used (and only then)"
        assert calls["close"] == int(used), "the paged runner must be released after validation"
    assert predictions["paged"] == predictions["dynamic"]
    auto = Trainer(make_config(tmp_path / "auto"))
    assert auto.validator.eval_kv_cache() == "dynamic"  # auto on the CPU
    auto.validator.device = torch.device("cuda")  # what auto picks on a GPU (nothing runs here)
    assert auto.validator.eval_kv_cache() == "paged"
    auto.validator.paged_eval_failed = True
    assert auto.validator.eval_kv_cache() == "dynamic"


def test_auto_eval_kv_cache_falls_back_when_the_paged_cache_fails(finished_run, tmp_path, monkeypatch, caplog):
    """eval_kv_cache=auto (paged on GPU) must not end a run when the paged path raises: a warning, the dynamic
    cache's answers, and no second try. An explicit eval_kv_cache=paged raises."""
    _, result = finished_run
    run = Path(result["run_dir"])

    def broken(self, *args, **kwargs):
        raise RuntimeError("paged kernel failure")

    monkeypatch.setattr(PagedRunner, "generate_prepared", broken)
    common = dict(only_eval=True, load_model_path=str(run / "best"), train_path=None,
                  val_path=str(run / "data" / "val.jsonl"))
    trainer = Trainer(make_config(tmp_path / "auto", predictions_path=str(tmp_path / "auto.json"), **common))
    monkeypatch.setattr(Validator, "eval_kv_cache", lambda self: "dynamic" if self.paged_eval_failed else "paged")
    summary = trainer.run()
    assert trainer.validator.paged_eval_failed and summary["num_answers"] == 6
    assert any("paged KV cache failed" in r.getMessage() for r in caplog.records)
    explicit = Trainer(make_config(tmp_path / "paged", eval_kv_cache="paged", **common))
    with pytest.raises(RuntimeError, match="paged kernel failure"):
        explicit.run()


class _HostReads(torch.Tensor):
    """A loss tensor that counts how often its value (or a value computed from it) is read on the host."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})

    def _count(self):
        type(self).reads += 1

    def item(self):
        self._count()
        return super().item()

    def tolist(self):
        self._count()
        return super().tolist()

    def __float__(self):
        self._count()
        return super().__float__()

    def __bool__(self):
        self._count()
        return super().__bool__()


class _LossWrapper:
    """Wraps the DeepSpeed engine: the loss comes back as `_HostReads`, optionally NaN at one micro-step."""

    def __init__(self, engine, nan_at=None):
        self._engine, self._nan_at, self._calls = engine, nan_at, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):  # e.g. skipped_steps, which the device step's settling adds to
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)

    def __call__(self, **kwargs):
        import dataclasses

        out = self._engine(**kwargs)
        self._calls += 1
        loss = out.loss * float("nan") if self._calls == self._nan_at else out.loss
        return dataclasses.replace(out, loss=loss.as_subclass(_HostReads))


def test_train_steps_read_the_loss_on_the_host_only_at_log_steps(tmp_path, monkeypatch):
    """12 samples in micro-batches of 2: 6 optimizer steps. Logging every 3 steps reads the losses twice (steps 3
    and 6); the end of the epoch has nothing left to read. A NaN loss is still reported with its epoch and step."""
    import engine.training.trainer as trainer_module

    real_build = trainer_module.build_engine
    monkeypatch.setattr(trainer_module, "build_engine", lambda *a, **k: _LossWrapper(real_build(*a, **k)))
    cfg = make_config(tmp_path / "a", num_epochs=1, batch_size_training=2, log_every_steps=3, eval_every_epochs=1)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.prepare_training()
    _HostReads.reads = 0
    stats = trainer.train_epoch(0, 0)
    assert trainer.global_step == 6 and _HostReads.reads == 2, _HostReads.reads
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6] and stats["train_loss"] > 0

    monkeypatch.setattr(trainer_module, "build_engine", lambda *a, **k: _LossWrapper(real_build(*a, **k), nan_at=5))
    nan_run = Trainer(make_config(tmp_path / "b", num_epochs=1, batch_size_training=2, log_every_steps=3))
    with pytest.raises(TrainingError, match=r"non-finite loss nan at epoch 1, step 4"):
        nan_run.run()


def test_each_backward_is_queued_after_the_pacers_wait_for_its_forward(tmp_path, monkeypatch):
    """Every micro-step marks the end of its forward and waits for it before the backward (`HostPacer`, which under
    ZeRO-3 on CUDA keeps the backward's gather of the language model off the forward's memory); the pacer waits
    only there, and only under ZeRO-3 on CUDA."""
    import engine.training.trainer as trainer_module
    from engine.training.pacing import HostPacer

    assert HostPacer(torch.device("cuda"), 3).enabled
    assert not HostPacer(torch.device("cuda"), 2).enabled and not HostPacer(torch.device("cpu"), 3).enabled
    log = []

    class RecordingPacer(HostPacer):
        def after_forward(self):
            log.append("forward done")

        def before_backward(self):
            log.append("wait")

    class Recording(_LossWrapper):
        def __call__(self, **kwargs):
            log.append("forward")
            return self._engine(**kwargs)

        def backward(self, loss):
            log.append("backward")
            return self._engine.backward(loss)

    real_build = trainer_module.build_engine
    monkeypatch.setattr(trainer_module, "build_engine", lambda *a, **k: Recording(real_build(*a, **k)))
    monkeypatch.setattr(trainer_module, "HostPacer", RecordingPacer)
    trainer = Trainer(make_config(tmp_path, num_epochs=1, batch_size_training=4, log_every_steps=3))
    trainer.setup()
    trainer.prepare_training()
    trainer.train_epoch(0, 0)
    assert log and log == ["forward", "forward done", "wait", "backward"] * (len(log) // 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_pacer_waits_for_the_forwards_end_on_the_device():
    """Under ZeRO-3 on CUDA, `before_backward` returns once the device has run everything queued before
    `after_forward` (a long kernel here), and not before."""
    from engine.training.pacing import HostPacer

    pacer = HostPacer(torch.device("cuda"), 3)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device time, queued before the mark
    pacer.after_forward()
    assert not torch.cuda.current_stream().query()  # the host is ahead of the device
    pacer.before_backward()
    assert torch.cuda.current_stream().query()
    pacer.before_backward()  # nothing marked since: returns at once


# ---------------------------------------------------------------------- run directory, resume, reliability
@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """A finished 2-epoch run written under umask 022; tests that change it work on a copy (`copy_run`)."""
    import os

    tmp = tmp_path_factory.mktemp("two")
    old_umask = os.umask(0o022)
    try:
        trainer = Trainer(make_config(tmp, num_epochs=2, keep_checkpoints=2))
        trainer.run()
    finally:
        os.umask(old_umask)
    return tmp, trainer


def copy_run(two_epoch_run, tmp_path):
    import shutil

    source, _ = two_epoch_run
    shutil.copytree(source / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "t"


def test_outputs_have_ordinary_permissions(two_epoch_run):
    import os
    import stat

    run = two_epoch_run[0] / "runs" / "t"
    for folder, dirs, files in os.walk(run):
        for name in dirs:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode == 0o755, f"{os.path.join(folder, name)}: {oct(mode)}"
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode & 0o644 == 0o644 and not mode & 0o022, f"{os.path.join(folder, name)}: {oct(mode)}"


def test_fresh_run_over_an_earlier_run_refuses_or_starts_clean(two_epoch_run, tmp_path):
    """The older run has epoch_001/002 and exports; a fresh run there must not prune its own new checkpoints
    by name (`latest` used to name a deleted folder) nor mix with the old files: it refuses and says how to go
    on, or deletes the old run with overwrite=true."""
    run = copy_run(two_epoch_run, tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a run.*resume=true.*name=.*overwrite=true"):
        Trainer(make_config(tmp_path, num_epochs=1, keep_checkpoints=1))
    assert (run / "checkpoints" / "epoch_002").is_dir()  # untouched
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    result = Trainer(make_config(tmp_path, num_epochs=1, keep_checkpoints=1, overwrite=True)).run()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "epoch_001" and (run / "checkpoints" / latest).is_dir()
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*")) == ["epoch_001"]
    assert not (run / "epoch_002").exists() and [h["epoch"] for h in result["history"]] == [1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in rows} == {json.loads((run / "run.json").read_text())["run_id"]} != {old_id}


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(two_epoch_run, tmp_path, caplog):
    _, finished = two_epoch_run
    run = copy_run(two_epoch_run, tmp_path)
    states = run / "checkpoints" / "epoch_002" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated: torch.load fails with a 40-line traceback
    resumed = Trainer(make_config(tmp_path, num_epochs=2, keep_checkpoints=2, resume=True))
    with caplog.at_level("WARNING"):
        result = resumed.run()
    assert "mp_rank_00_model_states.pt" in caplog.text and "epoch_001" in caplog.text
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    expected = trained_parameters(finished)
    for name, value in trained_parameters(resumed).items():  # epoch 2 trained again from epoch 1: same weights
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert ckpt_verifies(run / "checkpoints" / "epoch_002")


def ckpt_verifies(path):
    from engine.training.checkpoint import verify_checkpoint

    return verify_checkpoint(path) is None


def test_resume_refuses_changed_curriculum_unless_allowed_and_keeps_config_history(two_epoch_run, tmp_path):
    run = copy_run(two_epoch_run, tmp_path)
    with pytest.raises(ConfigError, match=r"c_thought: 1 \(saved\) -> 2.*allow_config_changes=\[c_thought\]"):
        Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True, c_thought=2))
    assert json.loads((run / "config.json").read_text())["c_thought"] == 1  # not overwritten by the refused launch
    trainer = Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True, c_thought=2,
                                  allow_config_changes=["c_thought"]))
    trainer.run()
    launches = json.loads((run / "run.json").read_text())["launches"]
    assert [launch["attempt"] for launch in launches] == [1, 2] and launches[1]["resume"] is True
    assert launches[1]["config_changes"]["c_thought"] == [1, 2] and launches[1]["allowed_config_changes"] == ["c_thought"]
    assert launches[1]["config_changes"]["num_epochs"] == [2, 3]  # other changes are recorded too
    assert json.loads((run / "configs" / "001.json").read_text())["c_thought"] == 1
    assert json.loads((run / "configs" / "002.json").read_text())["c_thought"] == 2
    assert json.loads((run / "config.json").read_text())["c_thought"] == 2


@pytest.mark.parametrize("name", ["config.json", "run.json"])
def test_resume_refuses_an_unreadable_saved_config_or_run_record(two_epoch_run, tmp_path, name):
    """A damaged config.json would turn off the resume's config check, a damaged run.json would start a new run
    id (and leave the old id's checkpoints unpruned): both are errors naming the file; the run is left as it was."""
    run = copy_run(two_epoch_run, tmp_path)
    changed = {"c_thought": 2} if name == "config.json" else {}  # a change the damaged file must not let through
    for damaged in ("{bad", "[1, 2]"):
        (run / name).write_text(damaged)
        with pytest.raises(ConfigError, match=rf"{name}.*(cannot be read|not an object).*move it away"):
            Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True, **changed))
        assert (run / name).read_text() == damaged and not (run / "configs" / "002.json").exists()
    if name == "run.json":
        (run / name).write_text(json.dumps({"launches": []}))  # no run id
        with pytest.raises(ConfigError, match="run.json has no run_id"):
            Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True))


def test_resume_without_the_saved_config_warns_that_its_check_is_skipped(two_epoch_run, tmp_path, caplog):
    run = copy_run(two_epoch_run, tmp_path)
    (run / "config.json").unlink()
    with caplog.at_level("WARNING"):
        trainer = Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True))
        trainer.setup()
    assert "config.json is missing" in caplog.text and "skipped" in caplog.text
    assert json.loads((run / "config.json").read_text())["num_epochs"] == 3  # this launch's config, written again
    assert len(json.loads((run / "run.json").read_text())["launches"]) == 2  # the same run, a second launch


def test_overwrite_deletes_nothing_when_the_inputs_fail_to_load(two_epoch_run, tmp_path):
    """overwrite=true deletes an earlier run only once the new launch's data and model have loaded: a malformed
    data file or a missing model leaves the earlier run intact."""
    from engine.data.records import DataError

    run = copy_run(two_epoch_run, tmp_path)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1"):
        Trainer(make_config(tmp_path, overwrite=True, train_path=str(bad))).run()
    with pytest.raises(Exception, match="no_such_model"):
        Trainer(make_config(tmp_path, overwrite=True, model_id=str(tmp_path / "no_such_model"))).run()
    # a max_length that drops every sample of a stage: found before the directory changes, not at that epoch
    with pytest.raises(DataError, match=r"longer than max_length=10 at stage\(s\) \[0"):
        Trainer(make_config(tmp_path, overwrite=True, max_length=10)).run()
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_overwrite_removes_an_earlier_evaluations_outputs_too(two_epoch_run, tmp_path):
    """Predictions of an earlier only_eval in the directory were left beside the new run's outputs."""
    run = copy_run(two_epoch_run, tmp_path)
    (run / "predictions.json").write_text("{}")
    (run / "eval_summary.json").write_text("{}")
    Trainer(make_config(tmp_path, num_epochs=1, overwrite=True)).run()
    assert not (run / "predictions.json").exists() and not (run / "eval_summary.json").exists()


def test_metrics_have_one_row_per_step_after_a_crash_and_resume(two_epoch_run, tmp_path):
    run = copy_run(two_epoch_run, tmp_path)
    crashing = Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True))
    real_epoch = crashing.train_epoch

    def crash_after_training(epoch, stage):  # epoch 3's steps are logged, its checkpoint is never written
        real_epoch(epoch, stage)
        raise RuntimeError("killed")

    crashing.train_epoch = crash_after_training
    with pytest.raises(RuntimeError, match="killed"):
        crashing.run()
    Trainer(make_config(tmp_path, num_epochs=3, keep_checkpoints=2, resume=True)).run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert all(r["run_id"] == run_id for r in rows)
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), "a step logged twice"
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 10))  # 3 epochs x 3 steps, each once
    assert {r["attempt"] for r in rows if r["kind"] == "train" and r["step"] > 6} == {3}


def test_synthetic_data_follows_the_settings(tmp_path):
    first = Trainer(make_config(tmp_path))
    first.setup()
    assert {len(r["steps"]) for r in first.train_records} == {2}
    second = Trainer(make_config(tmp_path, synthetic={"n_train": 12, "n_val": 6, "hops": 3, "seed": 3}))
    second.setup()  # the data of the first run (hops 2) must not be reused
    assert {len(r["steps"]) for r in second.train_records} == {3}
    meta = json.loads((tmp_path / "runs" / "t" / "data" / "synthetic.json").read_text())
    assert meta["hops"] == 3 and json.loads((tmp_path / "runs" / "t" / "config.json").read_text())["synthetic"]["hops"] == 3


def test_bad_image_is_named_before_training(tmp_path):
    from engine.data.records import DataError
    from engine.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", n_train=12, n_val=6, hops=2, seed=3)
    bad = tmp_path / "data" / "images" / "val_000004.png"
    bad.write_bytes(bad.read_bytes()[:200])  # a valid header, the pixels cut off
    cfg = make_config(tmp_path, train_path=str(data["train"]), val_path=str(data["val"]))
    with pytest.raises(DataError, match=r"val\.jsonl:5: record 'val-000004': image .*val_000004\.png cannot be decoded"):
        Trainer(cfg).run()
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()  # nothing was trained


def test_failed_validation_keeps_the_trained_epoch_and_runs_again_at_resume(tmp_path, monkeypatch):
    real = Validator.generation_metrics
    calls = []

    def fail_second(self, stage, model):
        calls.append(stage)
        if len(calls) == 2:
            raise OSError("disk hiccup while reading an image")
        return real(self, stage, model)

    monkeypatch.setattr(Validator, "generation_metrics", fail_second)
    with pytest.raises(TrainingError, match=r"validation after epoch 2 failed.*saved in .*epoch_002.*resume=true"):
        Trainer(make_config(tmp_path, num_epochs=2)).run()
    ckpt = tmp_path / "runs" / "t" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "epoch_002"
    monkeypatch.setattr(Validator, "generation_metrics", real)
    result = Trainer(make_config(tmp_path, num_epochs=2, resume=True)).run()
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][1]["val_accuracy"] is not None and "validation_error" not in result["history"][1]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows if r["step"] == 6 and r["kind"] != "train"] == ["epoch", "validation"]


def test_weights_and_biases_logging_offline(tmp_path, monkeypatch):
    """wandb is optional and not installed here: a stand-in module records what the trainer sends it."""
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step=None):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = Trainer(make_config(tmp_path, num_epochs=1, wandb={"project": "coconut-tests", "mode": "offline"}))
    trainer.run()
    (init,) = calls["init"]
    assert init["mode"] == "offline" and init["project"] == "coconut-tests" and init["name"] == "t"
    assert init["id"] == trainer.run_info.run_id and init["resume"] == "allow" and init["config"]["lr"] == 1e-3
    assert [step for step, values in calls["log"] if "train/loss" in values] == [1, 2, 3]
    assert any("epoch/val_accuracy" in values for _, values in calls["log"]) and calls["finish"] == 1


def test_weights_and_biases_missing_is_a_config_error_before_the_run_directory(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails, as when it is not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        Trainer(make_config(tmp_path, wandb={"project": "x"}))
    assert not (tmp_path / "runs").exists()


def test_temporaries_of_an_interrupted_write_are_removed_at_the_next_start(two_epoch_run, tmp_path):
    run = copy_run(two_epoch_run, tmp_path)
    export_tmp = run / ".best.0123abcd.tmp"  # an export killed half-way (gigabytes at 1B)
    export_tmp.mkdir()
    (export_tmp / "model.safetensors").write_bytes(bytes(1000))
    legacy = run / ".final.a1b2_3c4"  # the temporary folder name of earlier versions (mkdtemp)
    legacy.mkdir()
    (run / "checkpoints" / ".tmp_epoch_003").mkdir()  # a checkpoint killed while DeepSpeed wrote it
    (run / ".metrics.jsonl.89abcdef.tmp").write_text("{")
    Trainer(make_config(tmp_path, num_epochs=2, keep_checkpoints=2, resume=True)).setup()  # setup starts the run
    assert not export_tmp.exists() and not legacy.exists() and not (run / ".metrics.jsonl.89abcdef.tmp").exists()
    assert not (run / "checkpoints" / ".tmp_epoch_003").exists() and (run / "best" / "config.json").is_file()


class _NanGradientEngine:
    """A DeepSpeed engine whose backward at one micro-step gets non-finite gradients behind a finite loss (as a
    kernel's broken backward would give)."""

    def __init__(self, engine, nan_at: int):
        self._engine, self._nan_at, self._calls = engine, nan_at, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):  # e.g. skipped_steps, which the device step's settling adds to
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)

    def __call__(self, **kwargs):
        return self._engine(**kwargs)

    def backward(self, loss):
        self._calls += 1
        return self._engine.backward(loss * float("nan") if self._calls == self._nan_at else loss)


@pytest.mark.parametrize("optimizer,zero_stage", [("auto", 2), ("adamw_fused", 2), ("adamw_fused", 3)])  # DeepSpeed's
# step with the multi-tensor checks; the device step (ZeRO-2 and ZeRO-3), whose skips reach the host at log steps and
# at the end of the epoch
def test_steps_skipped_for_non_finite_gradients_are_counted_and_reported(tmp_path, monkeypatch, caplog, optimizer,
                                                                         zero_stage):
    import logging

    import deepspeed

    from engine.training.zero_step import device_step_active

    import engine.training.trainer as trainer_module

    real_build = trainer_module.build_engine
    # 12 samples in steps of 2: the NaN gradients at the second epoch's second step
    monkeypatch.setattr(trainer_module, "build_engine", lambda *a, **k: _NanGradientEngine(real_build(*a, **k), 8))
    trainer = Trainer(make_config(tmp_path, num_epochs=2, batch_size_training=2, log_every_steps=3,
                                  optimizer=optimizer, zero_stage=zero_stage))
    trainer.setup()
    trainer.prepare_training()
    assert device_step_active(trainer.engine.optimizer) is (optimizer == "adamw_fused")

    def weights():  # whole, under ZeRO-3 too
        params = dict(trainer.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero_stage == 3):
            return {n: p.detach().clone() for n, p in params.items()}

    assert trainer.train_epoch(0, 0)["train_skipped_steps"] == 0
    before = weights()
    with caplog.at_level(logging.WARNING, logger="coconut.train"):
        stats = trainer.train_epoch(1, 0)
    assert stats["train_skipped_steps"] == 1 and stats["train_loss"] > 0
    assert trainer.engine._engine.skipped_steps == 1  # DeepSpeed's own count, which its checkpoints save
    assert "epoch 2: 1 of 6 optimizer steps skipped for non-finite gradients" in caplog.text
    after = weights()
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in after.values())  # the NaN step changed nothing
    assert any(not torch.equal(before[n], p) for n, p in after.items())  # the others trained


def test_an_unusable_save_path_is_a_config_error_before_anything_is_written(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"notes.txt is a file, not a folder"):
        Trainer(make_config(tmp_path, save_path=str(a_file)))
    with pytest.raises(ConfigError, match=r"notes.txt is a file, not a folder"):
        Trainer(make_config(tmp_path, save_path=str(a_file / "deeper")))
    assert a_file.read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cuda was asked for but torch sees no CUDA device"):
        Trainer(make_config(tmp_path, device="cuda"))


def test_a_synthetic_run_without_validation_records_trains(tmp_path):
    """synthetic.n_val=0 passed the config check, then failed on the empty val.jsonl: it is a run without
    validation, as one without val_path."""
    result = Trainer(make_config(tmp_path, num_epochs=1, synthetic={"n_train": 8, "n_val": 0, "hops": 2, "seed": 3})).run()
    assert len(result["history"]) == 1 and result["history"][0].get("val_accuracy") is None


def test_an_image_missing_at_its_first_read_names_its_record(tmp_path):
    """check_images=false: the missing file was named without its record."""
    from engine.data.dataset import CurriculumConfig, CurriculumDataset
    from engine.data.images import ImageError
    from engine.model.loading import load_model

    _, tokenizer, processor = load_model("tiny", model_overrides=dict(SMALL_MODEL), max_tiles=2)
    record = {"id": "q7", "image": str(tmp_path / "gone.png"), "question": "q?", "steps": ["s"], "answer": "a"}
    with pytest.raises(ImageError, match=r"record 'q7': image file not found: .*gone.png"):
        CurriculumDataset([record], tokenizer, processor, CurriculumConfig(max_latent_stage=1), 0)


def test_settings_that_would_fail_at_the_first_validation_are_refused_at_set_up(tmp_path, monkeypatch):
    """A max_new_tokens past the model's positions, or eval_kv_cache=paged without CUDA (or the interpreter), failed
    only after an epoch of training; a negative max_grad_norm turned clipping off without a word."""
    with pytest.raises(ConfigError, match=r"max_new_tokens=100000 leaves no room for a prompt in the model's "
                                          r"max_position_embeddings=\d+"):
        Trainer(make_config(tmp_path, max_new_tokens=100000)).setup()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"eval_kv_cache=paged needs CUDA .* the model is on cpu"):
        Trainer(make_config(tmp_path, eval_kv_cache="paged")).setup()
    assert not (tmp_path / "runs" / "t" / "run.json").exists()  # refused before the run directory was started
    with pytest.raises(ConfigError, match=r"max_grad_norm must be >= 0 \(0: no clipping\)"):
        make_config(tmp_path, max_grad_norm=-1.0)
    with pytest.raises(ConfigError, match=r"seed must be < 2\*\*63"):
        make_config(tmp_path, seed=2**64)


def test_a_validation_record_that_would_fail_at_the_first_validation_is_named_at_set_up(tmp_path):
    """A validation prompt past the model's positions (with max_new_tokens), or with overlong=error a validation
    sequence over max_length, failed only after an epoch of training, naming neither the record nor the file."""
    from engine.data.records import DataError

    def record(rid, words, steps=2):
        return {"id": rid, "image": None, "question": " ".join(["word"] * words) + "?",
                "steps": [f"step {j}" for j in range(steps)], "answer": "a"}

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(record(f"t{i}", 3)) + "\n" for i in range(8)))
    val.write_text(json.dumps(record("v0", 3)) + "\n" + json.dumps(record("v1", 5000)) + "\n")
    paths = dict(synthetic=None, train_path=str(train), val_path=str(val))
    with pytest.raises(DataError, match=r"val.jsonl: record 'v1': its prompt at stage 2 has \d+ tokens; with "
                                        r"max_new_tokens=12 its generation needs \d+ positions, more than the "
                                        r"model's max_position_embeddings=4096"):
        Trainer(make_config(tmp_path, **paths)).setup()
    val.write_text(json.dumps(record("v0", 3)) + "\n" + json.dumps(record("v1", 60)) + "\n")
    with pytest.raises(DataError, match=r"val.jsonl: record 'v1': its sequence at stage 0 has \d+ tokens .* more "
                                        r"than max_length=50"):
        Trainer(make_config(tmp_path, max_length=50, overlong="error", **paths)).setup()
    assert not (tmp_path / "runs" / "t" / "run.json").exists()  # both before the run directory was started
    train.write_text(json.dumps(record("t9", 60)) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl: record 't9': its sequence at stage 0"):
        Trainer(make_config(tmp_path, max_length=50, overlong="error", **paths)).setup()


def test_micro_batches_past_the_last_accumulation_cycle_are_named(tmp_path, caplog):
    """12 samples in micro-batches of 2 under gradient_accumulation_steps=4: 6 micro-batches, one cycle, 2 left out
    each epoch without a word."""
    import logging

    with caplog.at_level(logging.WARNING):
        Trainer(make_config(tmp_path, batch_size_training=2, gradient_accumulation_steps=4)).setup()
    assert "fill no whole accumulation cycle are left out (2 of 6 per rank, gradient_accumulation_steps=4)" in caplog.text


def test_wandb_disabled_needs_no_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    Trainer(make_config(tmp_path, wandb={"mode": "disabled"}, num_epochs=1)).run()
    with pytest.raises(ConfigError, match=r"wandb package is not installed"):
        Trainer(make_config(tmp_path, name="w", wandb={"project": "p"}))
