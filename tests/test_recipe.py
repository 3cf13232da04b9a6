"""The recipe users run: one clear message per expected error, once (rank 0), traceback on request."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_coconut.py"
sys.path.insert(0, str(RECIPE.parent))

import train_coconut  # noqa: E402

from engine.training.config import ConfigError  # noqa: E402


def test_config_error_is_one_message_and_no_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COCONUT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_coconut.main(["--set", f"save_path={tmp_path}", "--set", "lr=.nan"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lr must be a finite number, got nan") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the message and the hint about --debug
    assert not any(tmp_path.iterdir()), "no run directory for a config that fails validation"


def test_debug_flag_and_environment_keep_the_traceback(tmp_path, monkeypatch):
    argv = ["--set", f"save_path={tmp_path}", "--set", "warmup_steps=-1"]
    with pytest.raises(ConfigError, match="warmup_steps"):
        train_coconut.main([*argv, "--debug"])
    monkeypatch.setenv("COCONUT_DEBUG", "1")
    with pytest.raises(ConfigError, match="warmup_steps"):
        train_coconut.main(argv)


def test_another_rank_prints_only_after_the_grace_period(tmp_path, capsys, monkeypatch):
    """Rank 0 prints what every rank meets and the launcher then stops the others; a rank still alive after the
    grace period failed alone (rank 0 may be blocked waiting for it) and says so itself."""
    slept = []
    monkeypatch.delenv("COCONUT_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train_coconut.time, "sleep", slept.append)
    with pytest.raises(SystemExit):
        train_coconut.main(["--set", f"save_path={tmp_path}", "--set", "synthetic={hop: 2}"])
    assert slept == [train_coconut.OTHER_RANK_GRACE_S] and slept[0] >= 1
    assert capsys.readouterr().err.startswith("error (rank 1): synthetic: unknown key(s) ['hop']")


@pytest.mark.distributed
def test_two_ranks_print_a_config_error_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.pop("COCONUT_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", free_port(), str(RECIPE),
           "--set", f"save_path={tmp_path}", "--set", "device=cpu", "--set", "synthetic={n_train: 4, hopz: 2}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: synthetic: unknown key(s) ['hopz']") == 1, output[-3000:]
    assert f'File "{RECIPE}"' not in output and "engine/training/" not in output, output[-3000:]  # no traceback of ours
