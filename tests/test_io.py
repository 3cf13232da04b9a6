"""Durable outputs: atomic directories (fsync before the rename, ordinary permissions) and the clean-up of an
interrupted write."""

import os
import stat

from engine.utils import io


def test_atomic_directory_fsyncs_before_the_rename_and_respects_the_umask(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    old_umask = os.umask(0o022)
    try:
        with io.atomic_directory(tmp_path / "export") as tmp:
            (tmp / "weights.bin").write_bytes(b"w")
            fd = os.open(tmp / "secret.json", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors and mkstemp do
            os.close(fd)
        io.atomic_write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old_umask)
    out = tmp_path / "export"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "weights.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "secret.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o644
    rename_at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    synced = [e[1] for e in events[:rename_at] if e[0] == "fsync"]
    assert any(p.endswith("weights.bin") for p in synced) and any(p.endswith("secret.json") for p in synced)
    assert any(e == ("fsync", str(tmp_path)) for e in events[rename_at:]), "the parent folder is fsynced after"


def test_stale_temporaries_are_removed_and_a_replaced_directory_restored(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / ".best.0123abcd.tmp").mkdir()
    (tmp_path / ".best.0123abcd.tmp" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".config.json.89abcdef.tmp").write_text("{")
    (tmp_path / ".final.fedcba98.old").mkdir()  # a crash between moving final aside and renaming the new one
    (tmp_path / "notes.txt").write_text("mine")
    touched = io.remove_stale_temporaries(tmp_path)
    assert len(touched) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final", "notes.txt"]
