import errno
import json

import pytest

from edgekit import artifact
from edgekit.errors import CacheError


def test_atomic_dir_publishes_only_complete_folders(tmp_path):
    final = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with artifact.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed halfway")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with artifact.atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
        artifact.write_manifest(tmp, stage="test", config={"k": 1})
    assert (final / "a.bin").read_bytes() == b"abc"
    assert artifact.verify_manifest(final) == []


def test_verify_manifest_finds_changed_missing_and_resized_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"def")
    (tmp_path / "c.bin").write_bytes(b"ghi")
    m = artifact.write_manifest(tmp_path, stage="test", config={})
    assert set(m["files"]) == {"a.bin", "b.bin", "c.bin"}
    (tmp_path / "a.bin").write_bytes(b"abd")
    (tmp_path / "b.bin").unlink()
    (tmp_path / "c.bin").write_bytes(b"ghij")
    problems = artifact.verify_manifest(tmp_path)
    assert problems == ["a.bin: sha256 mismatch", "b.bin: missing", "c.bin: size 4 != 3"]


def test_unreadable_manifest_says_how_to_fix(tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(CacheError, match="delete"):
        artifact.read_manifest(tmp_path)


def test_disk_full_gives_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    artifact.atomic_write_text(target, json.dumps({"v": 1}))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact.os, "fsync", full)
    with pytest.raises(CacheError, match="disk full while writing .*x.json"):
        artifact.atomic_write_text(target, json.dumps({"v": 2}))
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_content_id_is_stable_and_sensitive():
    a = artifact.content_id("plan", {"b": 1, "a": 2}, ["x"])
    assert a == artifact.content_id("plan", {"a": 2, "b": 1}, ["x"])
    assert a != artifact.content_id("plan", {"a": 2, "b": 2}, ["x"])


def test_lock_is_exclusive_and_names_its_holder(home):
    import multiprocessing as mp

    import pytest

    from edgekit.artifact import locked
    from edgekit.errors import CacheError

    ready, release = mp.Event(), mp.Event()

    def hold():
        with locked("run-demo"):
            ready.set()
            release.wait(30)

    p = mp.get_context("fork").Process(target=hold)
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(CacheError, match=rf"locked by pid {p.pid}"):
            with locked("run-demo", wait=False):
                pass
    finally:
        release.set()
        p.join(30)
    with locked("run-demo", wait=False):  # free again once the holder is gone
        pass
