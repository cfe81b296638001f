"""A full disk: the stage stops with one line naming the path and the space, and nothing earlier is lost.

The store lives on a small tmpfs (a real filesystem that really runs out: the kernel returns
ENOSPC to every writer, Python's and the C++ ones inside llama.cpp, onnx and safetensors). Two
ways to meet it:

- before starting: a stage estimates what it will write and refuses up front
  ("not enough disk space ... needs about X MB, Y MB free"), having written nothing;
- halfway (the estimate bypassed, as when another program fills the disk meanwhile): the
  write fails, the temporary folder is removed, the error names the path and the free space.

Either way every earlier artifact still verifies and no new folder looks complete. Mounting a
tmpfs needs root (or CAP_SYS_ADMIN), which CI has; elsewhere these tests skip and say why, and
tests/robust/test_disk_full.py::test_a_library_writer_that_hits_enospc_* still runs everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from edgekit import artifact
from edgekit.cli import main
from tests.robust.clean import assert_clean_failure, complete_artifacts, snapshot

DISK_MB = 24


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root or CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until the kernel says ENOSPC, then free ``leave`` bytes."""
    filler = disk / "filler.bin"
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


@pytest.fixture
def store_on_small_disk(small_disk, monkeypatch, tiny_bpe_llama_dir, capsys):
    """A store on the tmpfs holding one finished GGUF export; returns (home, export folder)."""
    home = small_disk / "home"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    assert main(["export", str(tiny_bpe_llama_dir), "--format", "gguf", "--quant", "f16", "--json", "-q"]) == 0
    export = Path(json.loads(capsys.readouterr().out)["path"])
    assert not artifact.verify_manifest(export)
    return home, export


def _intact(home: Path, before: dict) -> None:
    for name in complete_artifacts(home):
        assert not artifact.verify_manifest(home / "artifacts" / name), name
    assert snapshot(home / "artifacts") == before
    stray = [p for p in home.rglob(".*") if p.name.endswith(artifact.TEMP_SUFFIXES)]
    assert not stray, f"temporary files left behind: {stray}"


CASES = {  # what a user runs after the disk filled up, and what it writes
    "gguf-export": ["export", "{model}", "--format", "gguf", "--quant", "f32"],
    "gguf-quantize (llama.cpp)": ["quantize", "{model}", "--format", "gguf", "--quant", "q8_0"],
    "onnx-export": ["export", "{model}", "--format", "onnx", "--quant", "fp32"],
    "package": ["package", "{export}"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stage_refuses_up_front_when_the_disk_is_too_small(store_on_small_disk, tiny_bpe_llama_dir, case,
                                                            capsys):
    home, export = store_on_small_disk
    fill(home.parent, leave=64 << 10)
    before = snapshot(home / "artifacts")
    argv = [a.format(model=tiny_bpe_llama_dir, export=export) for a in CASES[case]]
    assert_clean_failure(capsys, argv, ["not enough disk space", "needs about", "MB free", "EDGEKIT_HOME",
                                        "Nothing was written"], watch=[home / "artifacts"], home=home)
    _intact(home, before)


@pytest.mark.parametrize("case", list(CASES))
def test_a_write_that_hits_a_full_disk_midway_fails_cleanly(store_on_small_disk, tiny_bpe_llama_dir, case,
                                                           capsys, monkeypatch):
    home, export = store_on_small_disk
    monkeypatch.setattr(artifact, "require_space", lambda *a, **k: None)  # as if the estimate were wrong
    fill(home.parent, leave=96 << 10)
    before = snapshot(home / "artifacts")
    argv = [a.format(model=tiny_bpe_llama_dir, export=export) for a in CASES[case]]
    line = assert_clean_failure(capsys, argv, ["MB free", "EDGEKIT_HOME", "earlier artifacts were left intact"],
                                watch=[home / "artifacts"], home=home)
    assert "disk full while writing" in line and str(home) in line
    _intact(home, before)
    (home.parent / "filler.bin").unlink()  # space again: the same command now succeeds
    assert main(argv + ["-q"]) == 0


def test_training_refuses_up_front_and_resumes_once_there_is_space(small_disk, tiny_bpe_llama_dir, monkeypatch,
                                                                   capsys, tmp_path):
    home = small_disk / "home"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello world number {i} of many"}) + "\n" for i in range(12)))
    argv = ["distill", "--teacher", str(tiny_bpe_llama_dir), "--data", str(data), "--steps", "2", "--cache", "none",
            "--init", "random", "--context", "128", "-q"]
    filler = fill(small_disk, leave=48 << 10)
    assert_clean_failure(capsys, argv, ["not enough disk space"], home=home)
    filler.unlink()
    assert main(argv) == 0


def test_a_library_writer_that_hits_enospc_is_one_line_and_leaves_the_store_intact(tiny_bpe_llama_dir, home,
                                                                                   monkeypatch, capsys):
    """Runs everywhere (no tmpfs): the GGUF writer's file write raises ENOSPC halfway through."""
    assert main(["export", str(tiny_bpe_llama_dir), "--format", "gguf", "--quant", "f16", "-q"]) == 0
    capsys.readouterr()
    before = snapshot(home / "artifacts")
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def full(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path or "model.gguf"))
        return real(self, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    line = assert_clean_failure(capsys, ["export", tiny_bpe_llama_dir, "--format", "gguf", "--quant", "f32"],
                                ["disk full while writing", "MB free"], watch=[home / "artifacts"], home=home)
    assert str(home) in line
    _intact(home, before)
