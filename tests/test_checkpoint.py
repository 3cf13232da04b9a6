"""Checkpoints without DeepSpeed (a stand-in engine writes the files): manifests, verification and fallback,
pruning by run."""

import json
import logging
from pathlib import Path

import pytest

from engine.training import checkpoint as ckpt


class FakeEngine:
    """Writes what DeepSpeed writes for one rank of an fp32 ZeRO engine: a model-states file holding the client
    state, an optimizer file."""

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(json.dumps(client_state).encode() + bytes(range(256)) * 64)
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(20000))


def save(folder, epoch, run_id="run-a", keep=5):
    return ckpt.save_checkpoint(FakeEngine(), folder, epoch, {"epoch": epoch, "global_step": 10 * epoch},
                                is_main=True, keep=keep, run_id=run_id)


def test_manifest_names_every_file_and_verifies(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["run_id"] == "run-a" and manifest["epoch"] == 1 and manifest["global_step"] == 10
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert manifest["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["size"] == 20000
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.parametrize("damage", ["truncate", "empty", "zero_4k", "delete"])
def test_damaged_checkpoint_is_named_and_the_older_one_is_used(tmp_path, caplog, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    victim = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(range(256)) * 80
    victim.write_bytes(bytes(data))  # what was saved is replaced below; rewrite the manifest to match first
    ckpt.write_manifest(newest, json.loads((newest / ckpt.MANIFEST).read_text()))
    if damage == "truncate":
        victim.write_bytes(bytes(data[:5000]))
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "zero_4k":  # same size: only the digest can tell
        data[8192:12288] = bytes(4096)
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    problem = ckpt.verify_checkpoint(newest)
    assert problem is not None and victim.name in problem
    with caplog.at_level(logging.WARNING, logger="coconut"):
        assert ckpt.choose_resume_checkpoint(tmp_path) == "epoch_001"
    assert victim.name in caplog.text and "older checkpoint" in caplog.text


def test_no_checkpoint_that_verifies_is_an_error_naming_the_files(tmp_path):
    for epoch in (1, 2):
        path = save(tmp_path, epoch)
        (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"epoch_002: .*mp_rank_00_model_states.pt has 0 bytes.*epoch_001"):
        ckpt.choose_resume_checkpoint(tmp_path)


def test_dangling_latest_falls_back_to_a_checkpoint_on_disk(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "latest").write_text("epoch_007\n")
    assert ckpt.choose_resume_checkpoint(tmp_path) == "epoch_001"


def test_pruning_keeps_this_runs_newest_and_leaves_another_runs_alone(tmp_path):
    """An older, longer run's epoch_001..004 are in the folder: the new run's pruning must not delete its own
    fresh checkpoints by name order (it used to delete epoch_001 right after saving it, leaving `latest` dangling)."""
    for epoch in (1, 2, 3, 4):
        save(tmp_path, epoch, run_id="older-run", keep=10)
    # the new run writes epoch_001 and epoch_002 over the older run's folders of the same name
    save(tmp_path, 1, run_id="new-run", keep=2)
    assert ckpt.latest_tag(tmp_path) == "epoch_001"
    save(tmp_path, 2, run_id="new-run", keep=1)
    assert ckpt.latest_tag(tmp_path) == "epoch_002"
    assert ckpt.checkpoint_tags(tmp_path) == ["epoch_002", "epoch_003", "epoch_004"]  # 3 and 4: the other run's
    save(tmp_path, 3, run_id="new-run", keep=1)
    assert ckpt.checkpoint_tags(tmp_path) == ["epoch_003", "epoch_004"]
    assert ckpt.read_manifest(tmp_path / "epoch_004")["run_id"] == "older-run"
