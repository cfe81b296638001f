import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------- the stage contract


def _build(calls: list, config: dict, inputs: dict | None = None, **kw) -> artifact.Artifact:
    """A toy stage: one file whose content is the config."""
    with artifact.stage("toy", config, inputs, **kw) as st:
        if not st.reused:
            calls.append(st.tmp)
            (st.tmp / "out.json").write_text(json.dumps(config))
            st.metrics = {"n": len(config)}
            st.extra = {"label": "toy artifact"}
            st.result = {"answer": 42}
    return st.artifact


def test_stage_builds_once_then_reuses_with_the_same_id_and_manifest(home):
    calls = []
    first = _build(calls, {"k": 1}, {"model": "abc"})
    assert not first.reused and len(calls) == 1
    assert first.path.parent == home / "artifacts" and first.path.name == first.id and first.id.startswith("toy-")
    m = artifact.read_manifest(first.path)
    assert m == first.manifest and artifact.verify_manifest(first.path) == []
    assert (m["stage"], m["config"], m["inputs"], m["metrics"], m["label"]) == \
           ("toy", {"k": 1}, {"model": "abc"}, {"n": 1}, "toy artifact")
    assert first.result == {"answer": 42} and first["answer"] == 42 and first["path"] == str(first.path)
    assert first.as_dict()["path"] == str(first.path) and first.as_dict()["reused"] is False
    again = _build(calls, {"k": 1}, {"model": "abc"})
    assert again.reused and len(calls) == 1  # nothing was built the second time
    assert (again.path, again.id, again.manifest) == (first.path, first.id, first.manifest)
    other = _build(calls, {"k": 2}, {"model": "abc"})
    assert not other.reused and other.id != first.id and len(calls) == 2  # a changed config is a new artifact
    assert _build(calls, {"k": 1}, {"model": "xyz"}).id not in (first.id, other.id)  # so is a changed input


def test_stage_rebuilds_a_damaged_artifact_and_a_stale_one_at_a_chosen_folder(home, tmp_path):
    calls = []
    first = _build(calls, {"k": 1})
    (first.path / "out.json").write_text("tampered")
    again = _build(calls, {"k": 1})
    assert not again.reused and again.path == first.path and artifact.verify_manifest(again.path) == []
    (again.path / artifact.MANIFEST).write_text("{")  # an unreadable manifest: rebuilt, not an error
    assert not _build(calls, {"k": 1}).reused
    at = tmp_path / "mine"
    assert not _build(calls, {"k": 1}, at=at).reused and _build(calls, {"k": 1}, at=at).reused
    changed = _build(calls, {"k": 2}, at=at)  # a chosen folder is named by its caller: the config is compared
    assert not changed.reused and json.loads((at / "out.json").read_text()) == {"k": 2}


def test_stage_that_fails_publishes_nothing_and_removes_its_temp_folder(home):
    with pytest.raises(RuntimeError):
        with artifact.stage("toy", {"k": 1}) as st:
            (st.tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("failed halfway")
    assert not st.path.exists() and [p.name for p in st.path.parent.iterdir()] == []


def test_stage_refuses_to_replace_a_chosen_folder_that_is_not_an_artifact(home, tmp_path):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not an edgekit artifact"):
        _build([], {"k": 1}, at=mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_stage_checks_disk_space_before_writing(home, monkeypatch):
    monkeypatch.setattr(artifact, "free_bytes", lambda path: 1000)
    with pytest.raises(CacheError, match="not enough disk space for the toy thing"):
        _build([], {"k": 1}, needed=10**9, what="the toy thing")
    assert not (home / "artifacts").exists() or not any((home / "artifacts").iterdir())


def test_stage_holds_the_store_lock_while_it_builds(home):
    held = []
    with artifact.stage("toy", {"k": 1}) as st:
        held.append((home / "locks" / f"{artifact.STORE_LOCK}.lock").read_text())
        (st.tmp / "f").write_text("1")
    assert held[0].startswith(f"pid {os.getpid()} ")
    assert (home / "locks" / f"{artifact.STORE_LOCK}.lock").read_text() == ""  # released


def test_stage_work_folder_survives_a_failure_and_is_removed_once_published(home):
    with pytest.raises(RuntimeError):
        with artifact.stage("toy", {"k": 1}) as st:
            st.work.mkdir()
            (st.work / "journal.jsonl").write_text('{"row": 1}\n')
            raise RuntimeError("killed")
    assert (st.work / "journal.jsonl").is_file()  # kept for the next run to resume from
    with artifact.stage("toy", {"k": 1}) as st2:
        assert st2.work == st.work and (st2.work / "journal.jsonl").is_file()
        (st2.tmp / "f").write_text("1")
    assert not st.work.exists() and st2.artifact.path.is_dir()


_KILLED_STAGE = """
import json, sys
from edgekit import artifact
with artifact.stage("toy", {"k": 1}) as st:
    if not st.reused:
        (st.tmp / "big.bin").write_bytes(b"x" * 100000)
print(json.dumps({"path": str(st.artifact.path), "reused": st.artifact.reused}))
"""


def test_stage_killed_before_its_rename_leaves_nothing_whole_and_the_next_run_builds_it(home):
    env = {**os.environ, "EDGEKIT_HOME": str(home), "EDGEKIT_FAULT": "dir.before-rename"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_STAGE], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = list((home / "artifacts").iterdir())
    assert [p.name.endswith(".partial") and p.name.startswith(".toy-") for p in left] == [True]  # only the temp
    assert not list((home / "artifacts").glob("toy-*"))
    env.pop("EDGEKIT_FAULT")
    runs = [subprocess.run([sys.executable, "-c", _KILLED_STAGE], env=env, capture_output=True, text=True)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    built, reused = (json.loads(r.stdout) for r in runs)
    assert (built["reused"], reused["reused"]) == (False, True) and built["path"] == reused["path"]
    assert [p.name for p in (home / "artifacts").iterdir()] == [Path(built["path"]).name]  # the temp was swept
    assert artifact.verify_manifest(Path(built["path"])) == []
