"""Two edgekit processes on one artifact store: they take turns, say so, and corrupt nothing.

Every command that writes the store holds ``$EDGEKIT_HOME/locks/store.lock`` (an flock: the
kernel releases it when the holder dies, even by SIGKILL). The second process logs
"waiting for ..., locked by pid N on HOST (edgekit run ...)" and starts when the first ends;
it then reuses what the first finished. Underneath, ``artifact.atomic_dir`` stays safe for
library callers that take no lock: two writers of the same content-addressed artifact leave one
whole copy, never a mix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgekit import artifact
from tests.robust.test_faults import audit
from tests.test_run import _recipe


def _start(home: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "EDGEKIT_HOME": str(home), "HF_HUB_OFFLINE": "1", "EDGEKIT_QUIET": "1"}
    env.pop("EDGEKIT_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "edgekit.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_of_one_recipe_take_turns_and_the_second_reuses_everything(tiny_bpe_llama_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_bpe_llama_dir)
    home = tmp_path / "home"
    first = _start(home, "run", recipe, "--json")
    lock = home / "locks" / f"{artifact.STORE_LOCK}.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.is_file() and lock.read_text().startswith("pid")):
        time.sleep(0.1)
    assert lock.read_text().startswith(f"pid {first.pid} "), "the first run never took the store lock"
    second = _start(home, "run", recipe, "--json")
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 0, err2[-2000:]
    assert f"locked by pid {first.pid} " in err2 and "edgekit run" in err2  # says whom it waits for
    a, b = json.loads(out1), json.loads(out2)
    assert not any(s["reused"] for s in a["stages"])
    assert all(s["reused"] for s in b["stages"]), [(s["stage"], s["reused"]) for s in b["stages"]]
    assert [s["path"] for s in a["stages"]] == [s["path"] for s in b["stages"]]
    assert audit(home) >= 5
    assert lock.read_text() == ""  # released


@pytest.mark.slow
def test_an_export_started_during_a_run_waits_then_finds_its_artifact(tiny_bpe_llama_dir, tmp_path):
    home = tmp_path / "home"
    run = _start(home, "run", _recipe(tmp_path, tiny_bpe_llama_dir, quant="q4_0"), "--json")
    lock = home / "locks" / f"{artifact.STORE_LOCK}.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.is_file() and lock.read_text().startswith("pid")):
        time.sleep(0.1)
    export = _start(home, "export", tiny_bpe_llama_dir, "--format", "gguf", "--quant", "q8_0", "--json")
    out_r, err_r = run.communicate(timeout=600)
    out_e, err_e = export.communicate(timeout=600)
    assert run.returncode == 0 and export.returncode == 0, (err_r[-1500:], err_e[-1500:])
    assert f"locked by pid {run.pid}" in err_e
    assert audit(home) >= 6


def test_two_writers_of_the_same_artifact_leave_one_whole_copy(tmp_path):
    """No lock here (library use): both build the same content; the second keeps the first's folder."""
    final = tmp_path / "export-same"
    inode = {}
    gate = threading.Barrier(2)

    def build(who: str):
        with artifact.atomic_dir(final) as tmp:
            (tmp / "model.bin").write_bytes(b"x" * 4096)
            artifact.write_manifest(tmp, "export", {"k": 1})
            gate.wait()  # both are complete in their temp folders before either renames
            if who == "b":
                time.sleep(0.2)
        inode[who] = final.stat().st_ino

    threads = [threading.Thread(target=build, args=(w,)) for w in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inode["a"] == inode["b"]  # b found identical files in place and dropped its copy
    assert not artifact.verify_manifest(final)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_killed_writers_temp_folder_is_swept_but_a_live_ones_is_not(tmp_path):
    final = tmp_path / "export-x"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".export-x.{dead.stdout.strip()}-abcd1234.partial"
    live = tmp_path / f".export-x.{os.getppid()}-abcd1234.partial"
    other = tmp_path / f".export-y.{dead.stdout.strip()}-abcd1234.partial"
    for p in (stale, live, other):
        p.mkdir()
    with artifact.atomic_dir(final) as tmp:
        (tmp / "f").write_text("1")
    assert not stale.exists()  # left by a dead process building the same artifact: removed
    assert live.exists()  # a live process's work in progress: untouched
    assert other.exists()  # another artifact's: not ours to sweep
