"""Benchmark measurement: statistics, the result schema, per-row isolation of failures, and one real short run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.bench import measure
from edgekit import runtimes as runners_mod
from edgekit.bench.measure import (SCHEMA, plan_rows, run_benchmark, run_worker, summarize, validate_results,
                                   worker_command)
from edgekit.runtimes import describe, get_runtime as get_runner
from edgekit.bench.worker import WorkerSpec
from edgekit.errors import ConfigError
from tests.conftest import skip_without_executorch

ROOT = Path(__file__).resolve().parents[2]
FAST = {"repeats": 2, "warmup": 1, "threads": 1, "prompt_lengths": (16, 32), "decode_tokens": 8, "progress": False}


@pytest.fixture(scope="module")
def bench_home(tmp_path_factory):
    """One EDGEKIT_HOME for the module: the host is measured once (devices.detect_host caches it)."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("bench-home")
        mp.setenv("EDGEKIT_HOME", str(home))
        yield home


@pytest.fixture
def fakes(monkeypatch, bench_home):
    """The fake runtimes of tests/bench/fake_runners.py in a private registry; workers can import them."""
    from edgekit import registry as reg

    reg.REGISTRY.load()
    monkeypatch.setattr(reg.REGISTRY, "_entries", dict(reg.REGISTRY._entries))
    from tests.bench import fake_runners

    for r in fake_runners.RUNNERS:
        runners_mod.register_runtime(r)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return fake_runners


def _fake_export(folder: Path, model_path: Path, fmt: str = "gguf") -> Path:
    folder.mkdir(parents=True)
    manifest = {"stage": "export", "format": fmt, "quant": "q8_0", "label": f"{fmt}-q8_0", "model_file": "model.gguf",
                "files": {}, "config": {"model_path": str(model_path)}, "metrics": {"size_bytes": 1000, "params": 500}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# --------------------------------------------------------------------------- statistics


def test_summarize_odd_count():
    s = summarize([5, 1, 3, 2, 4])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"], s["mean"], s["n"]) == (3, 2, 4, 2, 1, 5, 3, 5)
    assert s["values"] == [5, 1, 3, 2, 4]  # in measurement order


def test_summarize_even_count_interpolates_quartiles():
    s = summarize([4, 1, 3, 2])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["mean"]) == (2.5, 1.75, 3.25, 1.5, 2.5)


def test_summarize_single_value_and_empty():
    s = summarize([0.25])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"], s["n"]) == (0.25, 0.25, 0.25, 0, 0.25, 0.25, 1)
    with pytest.raises(ValueError):
        summarize([])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.001, 1e6), min_size=1, max_size=20))
def test_summarize_matches_numpy_percentiles(values):
    s = summarize(values)
    assert np.allclose([s["q1"], s["median"], s["q3"]], np.percentile(values, [25, 50, 75]), rtol=1e-9)
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"] and s["iqr"] >= 0


# --------------------------------------------------------------------------- the real benchmark


@pytest.fixture(scope="module")
def real(bench_home, tiny_bpe_llama_dir, tiny_export):
    """The tiny model exported to GGUF q8_0 and ONNX fp32, benchmarked once on every installed runtime for them
    (a real result, without the ExecuTorch build that keeps ``real_every_runtime`` out of the fast suite)."""
    gguf = tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")
    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "fp32")
    return run_benchmark([gguf, onnx], **FAST)


@pytest.fixture(scope="module")
def real_every_runtime(bench_home, tiny_bpe_llama_dir, tiny_export):
    """The tiny model exported to GGUF q8_0, ONNX fp32 and ExecuTorch 8da4w, benchmarked once on every installed
    runtime."""
    skip_without_executorch()
    gguf = tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")
    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "fp32")
    pte = tiny_export(tiny_bpe_llama_dir, "executorch", "8da4w", context=256)  # the run needs 136 positions
    return run_benchmark([gguf, onnx, pte], **FAST)


@pytest.mark.slow  # it builds an ExecuTorch export (see conftest.EXECUTORCH_EXPORT)
def test_short_real_benchmark_on_every_installed_runtime(real_every_runtime, tiny_bpe_llama_dir):
    real = real_every_runtime
    validate_results(real)
    rows = {r["runtime"]: r for r in real["runs"]}
    assert [r["runtime"] for r in real["runs"]] == ["llama.cpp", "llama.cpp-gpu", "onnxruntime", "onnxruntime-gpu",
                                                     "onnxruntime-genai", "executorch", "pytorch"]
    for name in ("llama.cpp", "onnxruntime", "onnxruntime-genai", "executorch", "pytorch"):
        row = rows[name]
        assert row["status"] == "ok" and row["reason"] is None, (name, row["reason"])
        m = row["metrics"]
        for stats in (m["load_s"], m["decode_tok_s"], *m["ttft_s"].values(), *m["prefill_tok_s"].values()):
            assert stats["n"] == 2 and len(stats["values"]) == 2 and stats["median"] > 0 and stats["min"] > 0
        assert sorted(m["ttft_s"]) == sorted(m["prefill_tok_s"]) == ["16", "32"]
        assert m["peak_rss_bytes"] >= m["rss_after_load_bytes"] > 0
        assert row["file_bytes"] > 0 and row["params"] > 0 and row["device"] == row["measured_on"] == "host"
    assert (rows["pytorch"]["label"], rows["pytorch"]["artifact"]) == ("pytorch-fp32", str(tiny_bpe_llama_dir))
    assert (rows["llama.cpp"]["label"], rows["onnxruntime"]["label"], rows["executorch"]["label"]) == \
        ("gguf-q8_0", "onnx-fp32", "executorch-8da4w")
    assert real["settings"] == {"repeats": 2, "warmup": 1, "threads": 1, "prompt_lengths": [16, 32],
                                "decode_tokens": 8}
    host = real["host"]
    assert host["threads_used"] == 1 and host["cores_physical"] >= 1 and host["versions"]["onnxruntime"]
    assert host["memory_bandwidth_bytes_s"] > 0 and host["fp32_flops"] > 0


def test_gpu_rows_are_unavailable_with_the_reason_on_a_host_without_gpu(real):
    for runtime in ("llama.cpp", "onnxruntime"):
        expected = get_runner(runtime).gpu_available()
        if expected is None:  # GPU host: the row is measured (see test_a_gpu_variant_is_measured_when_the_gpu_is_there)
            pytest.skip(f"{runtime} has a GPU on this host")
        row = next(r for r in real["runs"] if r["runtime"] == f"{runtime}-gpu")
        assert (row["status"], row["reason"], row["metrics"]) == ("unavailable", expected, None)
        assert row["reason"].startswith("not available on this host: ")


def test_worker_decodes_exactly_decode_tokens_in_every_repeat(real):
    onnx = next(r["artifact"] for r in real["runs"] if r["runtime"] == "onnxruntime-genai")
    spec = {"artifact": onnx, "runtime": "onnxruntime-genai", "threads": 1, "repeats": 3, "warmup": 0,
            "prompt_lengths": [8], "decode_tokens": 5}
    out = run_worker(spec, timeout_s=120)
    assert out["status"] == "ok", out
    assert out["decoded"] == [5, 5, 5] and len(out["tokens"]) == 5 and len(out["load_s"]) == 3


# --------------------------------------------------------------------------- the schema


def test_validate_accepts_a_real_result_and_its_json_round_trip(real):
    validate_results(real)
    validate_results(json.loads(json.dumps(real)))


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.update(schema="edgekit.bench/0"), "schema is 'edgekit.bench/0'"),
    (lambda d: d.pop("settings"), "settings is missing"),
    (lambda d: d["host"].pop("cpu"), "host.cpu is missing"),
    (lambda d: d["host"]["versions"].pop("torch"), "host.versions.torch is missing"),
    (lambda d: d["runs"][0].pop("label"), r"runs\[0\].label is missing"),
    (lambda d: d["runs"][0].update(extra=1), r"runs\[0\].extra is not in the schema"),
    (lambda d: d["runs"][0].update(status="great"), r"runs\[0\].status is 'great'"),
    (lambda d: d["runs"][0]["metrics"].pop("load_s"), r"runs\[0\].metrics.load_s is missing"),
    (lambda d: d["runs"][0]["metrics"]["ttft_s"].pop("32"), "ttft_s must have one entry per prompt length"),
    (lambda d: d["runs"][0]["metrics"]["decode_tok_s"].pop("iqr"), "decode_tok_s must have exactly median"),
    (lambda d: d["runs"][0].update(metrics=None), r"runs\[0\].metrics must be an object for status ok"),
    (lambda d: d["runs"][1].update(reason=None), r"runs\[1\].reason is empty for status unavailable"),
    (lambda d: d["runs"][0].update(params="many"), r"runs\[0\].params has type str"),
])
def test_validate_rejects_a_broken_result(real, damage, message):
    broken = copy.deepcopy(real)
    damage(broken)
    with pytest.raises(ValueError, match=message):
        validate_results(broken)


def test_validate_rejects_duplicate_ids(real):
    broken = copy.deepcopy(real)
    broken["runs"][1]["id"] = broken["runs"][0]["id"]
    with pytest.raises(ValueError, match=r"runs\[1\].id .* is not unique"):
        validate_results(broken)


def test_bad_settings_are_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="repeats must be at least 1.*prompt_lengths must be positive"):
        run_benchmark([tmp_path], repeats=0, prompt_lengths=())


def test_validate_lists_every_problem_at_once(real):
    broken = copy.deepcopy(real)
    broken["schema"] = "other"
    del broken["host"]["cpu"]
    with pytest.raises(ValueError, match=f"do not follow {SCHEMA}: schema is 'other'.*; host.cpu is missing"):
        validate_results(broken)
    with pytest.raises(ValueError, match="must be a JSON object"):
        validate_results([])


# --------------------------------------------------------------------------- failures stay in their row


def test_missing_crashed_and_short_runtimes_fail_alone(fakes, tmp_path):
    artifact = _fake_export(tmp_path / "export-abc", tmp_path / "model")
    result = run_benchmark([artifact], ["fake-ok", "fake-missing", "fake-crash", "fake-short"], **FAST)
    validate_results(result)
    rows = {r["id"]: r for r in result["runs"]}
    assert list(rows) == ["export-abc:fake-ok", "export-abc:fake-ok-gpu", "export-abc:fake-missing",
                          "export-abc:fake-crash", "export-abc:fake-short"]
    assert rows["export-abc:fake-ok"]["status"] == "ok"
    assert rows["export-abc:fake-ok"]["metrics"]["decode_tok_s"]["n"] == 2
    assert (rows["export-abc:fake-ok"]["file_bytes"], rows["export-abc:fake-ok"]["params"]) == (1000, 500)
    assert rows["export-abc:fake-ok-gpu"]["status"] == "unavailable"
    assert rows["export-abc:fake-ok-gpu"]["reason"] == "not available on this host: fake has no GPU"
    missing = rows["export-abc:fake-missing"]
    assert (missing["status"], missing["metrics"]) == ("unavailable", None)
    assert missing["reason"] == "fake-missing is not installed: pip install edgekit-fake-runtime"
    crash = rows["export-abc:fake-crash"]
    assert crash["status"] == "failed"
    assert crash["reason"] == "worker killed by SIGABRT; last stderr: fake runtime: illegal instruction in kernel_q8"
    short = rows["export-abc:fake-short"]
    assert short["status"] == "failed" and "decoded [7, 7] tokens per repeat, expected 8" in short["reason"]


def test_a_gpu_variant_is_measured_when_the_gpu_is_there(fakes, tmp_path):
    artifact = _fake_export(tmp_path / "export-abc", tmp_path / "model")
    result = run_benchmark([artifact], ["fake-gpu"], **FAST)
    assert [(r["runtime"], r["status"]) for r in result["runs"]] == [("fake-gpu", "ok"), ("fake-gpu-gpu", "ok")]


def test_a_hanging_worker_times_out_with_a_reason(fakes, tmp_path):
    artifact = _fake_export(tmp_path / "export-abc", tmp_path / "model")
    spec = {"artifact": str(artifact), "runtime": "fake-hang", "module": "tests.bench.fake_runners", "threads": 1}
    out = run_worker(spec, timeout_s=1.5)
    assert out["status"] == "failed" and out["reason"].startswith("timed out after 1.5s")


def test_prompts_longer_than_the_model_context_fail_with_the_fix(fakes, tmp_path):
    artifact = _fake_export(tmp_path / "export-abc", tmp_path / "model")
    spec = {"artifact": str(artifact), "runtime": "fake-ok", "module": "tests.bench.fake_runners", "threads": 1,
            "prompt_lengths": [5000]}
    out = run_worker(spec, timeout_s=60)
    assert out == {"status": "failed", "reason": f"the benchmark needs 5000 positions but {artifact} handles 4096; "
                                                 "lower prompt_lengths or decode_tokens"}


def test_worker_turns_any_error_into_one_json_line(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"artifact": str(tmp_path), "runtime": "pytorch", "threads": 1, "color": "red"}))
    proc = subprocess.run([sys.executable, "-m", "edgekit.bench.worker", "--spec", str(spec)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
    out = json.loads(proc.stdout)
    assert out["status"] == "failed" and "unknown spec keys ['color']" in out["reason"]
    spec.write_text(json.dumps({"artifact": str(tmp_path), "runtime": "onnxruntime", "threads": 1}))
    proc = subprocess.run([sys.executable, "-m", "edgekit.bench.worker", "--spec", str(spec)], capture_output=True,
                          text=True, timeout=60)
    assert "is neither an export artifact" in json.loads(proc.stdout)["reason"]


def test_worker_spec_defaults_and_context():
    spec = WorkerSpec.from_dict({"artifact": "a", "runtime": "pytorch", "threads": 2})
    assert (spec.repeats, spec.warmup, spec.prompt_lengths, spec.decode_tokens) == (5, 1, (128, 512), 128)
    assert spec.context == 513
    assert WorkerSpec.from_dict({"artifact": "a", "runtime": "x", "threads": 1, "prompt_lengths": [16],
                                 "decode_tokens": 200}).context == 329
    with pytest.raises(ConfigError, match="repeats"):
        WorkerSpec.from_dict({"artifact": "a", "runtime": "x", "threads": 1, "repeats": 0})


# --------------------------------------------------------------------------- planning and remote


def test_pytorch_reference_runs_once_per_source_model(tmp_path, tiny_llama_dir):
    a = describe(_fake_export(tmp_path / "export-a", tiny_llama_dir))
    b = describe(_fake_export(tmp_path / "export-b", tiny_llama_dir, fmt="onnx"))
    gone = describe(_fake_export(tmp_path / "export-c", tmp_path / "deleted-model"))
    hf = describe(tiny_llama_dir)
    plan = plan_rows([a, b, hf, gone], [get_runner(n) for n in ("llama.cpp", "onnxruntime", "pytorch")])
    assert [(src.path.name, r.name, err is None) for src, r, err in plan] == [
        ("export-a", "llama.cpp", True), ("export-b", "onnxruntime", True), ("export-c", "llama.cpp", True),
        (tiny_llama_dir.name, "pytorch", True), ("deleted-model", "pytorch", False)]
    assert "deleted-model is neither an export artifact" in plan[-1][2]


def test_remote_runs_the_worker_over_ssh(fakes, tmp_path, monkeypatch):
    assert worker_command() == [sys.executable, "-m", "edgekit.bench.worker", "--spec", "-"]
    cmd = worker_command("pi@rpi5.local", "python3", threads=4)
    assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", "pi@rpi5.local"]
    assert cmd[4] == ("env OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 VECLIB_MAXIMUM_THREADS=4 "
                      "python3 -m edgekit.bench.worker --spec -")
    seen = []
    ok = {"status": "ok", "gpu": "not available on this host: remote", "load_s": [1.0, 2.0],
          "ttft_s": {"16": [0.1, 0.2], "32": [0.2, 0.3]}, "prefill_tok_s": {"16": [80.0, 160.0], "32": [100.0, 160.0]},
          "decode_tok_s": [10.0, 12.0], "decoded": [8, 8], "peak_rss_bytes": 100, "rss_after_load_bytes": 50}

    def fake_run(cmd, input, **kw):
        seen.append((cmd, json.loads(input)))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(ok) + "\n", stderr="")

    monkeypatch.setattr(measure.subprocess, "run", fake_run)
    artifact = _fake_export(tmp_path / "export-abc", tmp_path / "model")
    result = run_benchmark([artifact], ["fake-ok", "fake-missing"], remote="pi@rpi5.local", remote_python="python3",
                           **FAST)
    validate_results(result)
    assert all(cmd[:4] == ["ssh", "-o", "BatchMode=yes", "pi@rpi5.local"] for cmd, _ in seen)
    assert seen[0][1]["artifact"] == str(artifact) and seen[0][1]["threads"] == 1
    assert {(r["runtime"], r["status"], r["device"], r["measured_on"]) for r in result["runs"]} == {
        ("fake-ok", "ok", "measured on rpi5.local", "measured on rpi5.local"),
        ("fake-ok-gpu", "unavailable", "measured on rpi5.local", "measured on rpi5.local"),
        ("fake-missing", "ok", "measured on rpi5.local", "measured on rpi5.local")}  # availability is the remote's
    assert result["runs"][0]["metrics"]["load_s"]["median"] == 1.5
