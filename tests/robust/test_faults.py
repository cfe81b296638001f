"""Kill -9 at many points of every long stage, re-run, and check that nothing was lost.

Each stage runs as a real ``edgekit`` subprocess. ``EDGEKIT_FAULT=point[:n]`` makes the process
SIGKILL itself the n-th time it reaches ``artifact.fault_point(point)`` (between writing a file and
renaming it, mid journal record, after a checkpoint, ...); timed kills from outside hit whatever is
running then, C++ code included (llama.cpp's quantizer, onnxruntime). After every kill:

- every folder in the store that has a ``manifest.json`` verifies (no half artifact looks whole);
- the next run of the same command resumes (it says so where the stage keeps in-progress work);
- the final result equals the uninterrupted reference run: the same bytes where the stage is
  deterministic, the same tensors within 1e-6 for training, the same rows for benchmarks.

Each chain runs its kills in execution order, each run resuming the previous one's leftovers,
so one chain also checks that resuming survives repeated interruptions. The counts these tests
reach are listed in tests/README.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from edgekit import artifact

pytestmark = pytest.mark.slow

TEMP_SUFFIXES = (".partial", ".old", ".tmp")


# --------------------------------------------------------------------------- harness


def edgekit(home: Path, *args, fault: str | None = None, kill_after: float | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``edgekit *args`` in a subprocess with its own store; optionally armed with a fault or a timed kill."""
    env = {**os.environ, "EDGEKIT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "EDGEKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("EDGEKIT_FAULT", None)
    if fault:
        env["EDGEKIT_FAULT"] = fault
    cmd = [sys.executable, "-m", "edgekit.cli", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            proc.kill()
            raise
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def audit(home: Path) -> int:
    """Assert that every folder under ``home`` holding a manifest is whole; returns how many were checked.

    Folders inside temporary siblings (``.x.<pid>-<hex>.partial``) are work in progress and
    exempt: their names say they are not finished.
    """
    checked = 0
    for manifest in sorted(Path(home).rglob(artifact.MANIFEST)):
        folder = manifest.parent
        rel = folder.relative_to(home).parts
        if any(part.startswith(".") and part.endswith(TEMP_SUFFIXES) for part in rel):
            continue
        problems = artifact.verify_manifest(folder)
        assert not problems, f"{folder} looks complete but is not: {problems}"
        checked += 1
    for tarball in Path(home).rglob("*.tar.gz"):  # a bundle tarball that exists is whole
        with tarfile.open(tarball) as tf:
            assert tf.getmembers()
    return checked


def kill_chain(home: Path, args: list, faults: list[str]) -> dict:
    """Run ``args`` once per fault (each must kill the run), auditing the store after each; then to completion."""
    tried = []
    for fault in faults:
        r = edgekit(home, *args, fault=fault)
        assert r.returncode == -signal.SIGKILL, (
            f"fault point {fault} was never reached (exit {r.returncode}); stderr: {r.stderr[-1500:]}")
        where = r.stderr.rsplit("SIGKILL in ", 1)[-1].strip()
        checked = audit(home)
        print(f"{args[0]}: killed at {fault} in {where}; {checked} complete-looking folders verified")
        tried.append(fault)
    return _finish(home, args, tried)


def timed_chain(home: Path, args: list, reference_s: float, fractions=(0.6, 0.85)) -> dict:
    """Kill from outside after a fraction of the uninterrupted run's time (each run resumes the last); then finish."""
    tried = []
    for f in fractions:
        delay = max(1.0, f * reference_s)
        r = edgekit(home, *args, kill_after=delay)
        assert r.returncode in (0, -signal.SIGKILL), r.stderr[-1500:]
        checked = audit(home)
        print(f"{args[0]}: {'killed' if r.returncode else 'finished before the kill'} {delay:.1f}s after start; "
              f"{checked} complete-looking folders verified")
        tried.append(delay)
    return _finish(home, args, tried)


def _finish(home: Path, args: list, tried: list) -> dict:
    final = edgekit(home, *args)
    assert final.returncode == 0, final.stderr[-3000:]
    audit(home)
    return {"tried": tried, "final": final}


def reference(home: Path, *args) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = edgekit(home, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, time.perf_counter() - t0


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
        diff = (ta[k].float() - tb[k].float()).abs().max().item() if ta[k].numel() else 0.0
        assert diff <= atol, f"{k}: max |diff| {diff} after resuming"


def file_hashes(folder: Path, skip: set[str] = frozenset()) -> dict:
    m = artifact.read_manifest(folder)["files"]
    return {k: v["sha256"] for k, v in m.items() if k not in skip}


def leftovers(home: Path) -> list[Path]:
    return [p for p in Path(home).rglob(".*") if p.name.endswith(TEMP_SUFFIXES)]


# --------------------------------------------------------------------------- distill (data + cache + train)

DISTILL_FAULTS = [
    "data.journal-torn:1",   # teacher answers: killed in the middle of a journal record
    "data.journal:2",        # after the second group of answers was fsynced
    "write.before-rename:1",  # a file written and fsynced but not yet renamed into place
    "cache.shard:1",         # logit cache: after the first shard
    "cache.shard:1",         # ... and after the next one (the first is kept)
    "train.step:3",          # training: after step 3 (last checkpoint: step 2)
    "train.checkpoint:2",    # right after the second checkpoint of that run was published
    "dir.before-rename:2",   # the trained student complete in its temp folder, not yet renamed
]


def _distill_config(tmp: Path, teacher: Path) -> Path:
    prompts = tmp / "prompts.jsonl"
    topics = ["the sea", "a red fox", "numbers", "rain", "a small robot", "bread", "music", "the moon"]
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {t}, part {i}."}) + "\n"
                               for i in range(2) for t in topics))
    cfg = tmp / "distill.yaml"
    cfg.write_text(f"""
teacher: {teacher}
student: {{layers: 1, hidden_size: 64, intermediate_size: 128, heads: 4, kv_heads: 2, init: random, context: 128}}
data: {{sources: [{prompts}], max_new_tokens: 6, batch_size: 4, heldout_fraction: 0.25, max_seq_len: 64}}
cache: {{mode: topk, k: 8, sequences_per_shard: 4, batch_size: 2}}
train: {{steps: 8, batch_size: 2, checkpoint_every: 2, time_budget_s: null}}
eval: {{prompts: ["Hello"], max_new_tokens: 4, max_sequences: 8, baselines: []}}
""")
    return cfg


def _distill_artifacts(home: Path) -> dict[str, Path]:
    """stage -> folder, for the finished artifacts of one distill run."""
    out = {}
    for folder in (home / "artifacts").iterdir():
        if (folder / artifact.MANIFEST).is_file():
            out.setdefault(artifact.read_manifest(folder)["stage"], []).append(folder)
    return {k: v[0] for k, v in out.items() if len(v) == 1} | {f"{k}*": v for k, v in out.items() if len(v) > 1}


def test_distill_survives_kill_9_at_every_point_and_matches_the_uninterrupted_run(tiny_bpe_llama_dir, tmp_path):
    cfg = _distill_config(tmp_path, tiny_bpe_llama_dir)
    argv = ["distill", cfg, "--json"]
    ref_home = tmp_path / "ref"
    _, seconds = reference(ref_home, *argv)
    for name, chain in (("faulted", lambda h: kill_chain(h, argv, DISTILL_FAULTS)),
                        ("timed", lambda h: timed_chain(h, argv, seconds))):
        home = tmp_path / name
        chain(home)
        assert not leftovers(home), leftovers(home)
        assert not list((home / "artifacts").glob("*.inprogress")), "in-progress work left after completion"
        a, b = _distill_artifacts(ref_home), _distill_artifacts(home)
        assert set(a) == set(b), (set(a), set(b))
        assert file_hashes(a["data"]) == file_hashes(b["data"])  # the same teacher answers, byte for byte
        assert file_hashes(a["logit-cache"]) == file_hashes(b["logit-cache"])
        assert_same_tensors(a["distill"] / "model.safetensors", b["distill"] / "model.safetensors")
        losses = [[json.loads(ln)["loss"] for ln in (x["distill"] / "metrics.jsonl").read_text().splitlines()]
                  for x in (a, b)]
        assert losses[1] == pytest.approx(losses[0], abs=1e-5)  # one line per step, none lost or doubled


# --------------------------------------------------------------------------- quantize, export, bench, package


@pytest.fixture(scope="module")
def student(tiny_bpe_llama_dir) -> Path:
    """The tiny model every later stage starts from (a folder outside any store)."""
    return tiny_bpe_llama_dir


QUANTIZE_FAULTS = ["gguf.tensor:3", "gguf.tensor:9", "quantize.done:1", "write.before-rename:1",
                   "dir.before-rename:1"]
EXPORT_FAULTS = ["onnx.step:1", "onnx.step:2", "onnx.step:3", "write.before-rename:1", "dir.before-rename:1"]


@pytest.mark.parametrize("args,faults", [
    (["quantize", "--format", "gguf", "--quant", "q4_k_m"], QUANTIZE_FAULTS),
    (["export", "--format", "onnx", "--quant", "int8"], EXPORT_FAULTS),
], ids=["quantize-gguf", "export-onnx"])
def test_export_survives_kill_9_and_matches_the_uninterrupted_run(student, tmp_path, args, faults):
    argv = [args[0], student, *args[1:], "--json", "--threads", "1"]
    ref, seconds = reference(tmp_path / "ref", *argv)
    a = json.loads(ref.stdout)["path"]
    for name, chain in (("faulted", lambda h: kill_chain(h, argv, faults)),
                        ("timed", lambda h: timed_chain(h, argv, seconds))):
        home = tmp_path / name
        b = json.loads(chain(home)["final"].stdout)["path"]
        assert not leftovers(home), leftovers(home)
        assert Path(a).name == Path(b).name  # the same content-addressed artifact
        timed_files = {"quant_report.json"}  # records how long quantizing took
        assert file_hashes(Path(a), skip=timed_files) == file_hashes(Path(b), skip=timed_files)  # the same bytes
        for f in timed_files & set(artifact.read_manifest(Path(a))["files"]):
            ra, rb = (json.loads((Path(p) / f).read_text()) for p in (a, b))
            assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> tuple[Path, Path]:
    """A store holding one q8_0 GGUF export of the tiny model: (home, export folder)."""
    home = tmp_path_factory.mktemp("exported-home")
    r = edgekit(home, "export", student, "--format", "gguf", "--quant", "q8_0", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return home, Path(json.loads(r.stdout)["path"])


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_bench_resumes_finished_rows_after_kill_9(exported, tmp_path):
    src_home, export = exported
    home = _copy_store(src_home, tmp_path / "home")
    export = home / "artifacts" / export.name
    out = tmp_path / "report"
    argv = ["bench", export, "--runtimes", "llama.cpp,onnxruntime,pytorch", "--repeats", "1",
            "--prompt-lengths", "8", "--decode-tokens", "4", "--threads", "1", "--device", "laptop-x86",
            "--out", out, "--json"]
    ref, seconds = reference(home, *argv[:-3], "--out", tmp_path / "ref-report", "--json")
    rows = lambda res: sorted((r["id"], r["status"]) for r in res["runs"])  # noqa: E731
    chain = kill_chain(home, argv, ["bench.row:1", "bench.row:1", "write.before-rename:1"])
    assert chain["final"].stderr.count("measured before the interruption") == 2  # resumed, not restarted
    assert rows(json.loads(chain["final"].stdout)) == rows(json.loads(ref.stdout))
    timed = timed_chain(home, argv[:-3] + ["--out", tmp_path / "timed-report", "--json"], seconds)
    assert rows(json.loads(timed["final"].stdout)) == rows(json.loads(ref.stdout))
    assert not list((home / "artifacts").glob(".bench-*.journal.jsonl")), "journal left after completion"


PACKAGE_FAULTS = ["write.before-rename:1", "write.before-rename:2", "dir.before-rename:1", "package.before-tarball:1"]


def test_package_survives_kill_9_and_matches_the_uninterrupted_run(exported, tmp_path):
    src_home, export = exported
    ref_home = _copy_store(src_home, tmp_path / "ref")
    ref, seconds = reference(ref_home, "package", ref_home / "artifacts" / export.name, "--json")
    a = json.loads(ref.stdout)
    skip = {"README.md"}  # the model card dates itself
    for name, chain in (("faulted", lambda h, argv: kill_chain(h, argv, PACKAGE_FAULTS)),
                        ("timed", lambda h, argv: timed_chain(h, argv, seconds))):
        home = _copy_store(src_home, tmp_path / name)
        b = json.loads(chain(home, ["package", home / "artifacts" / export.name, "--json"])["final"].stdout)
        ma = json.loads((Path(a["path"]) / artifact.MANIFEST).read_text())["files"]
        mb = json.loads((Path(b["path"]) / artifact.MANIFEST).read_text())["files"]
        assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}
        assert edgekit(home, "verify", b["tarball"]).returncode == 0
        assert not leftovers(home), leftovers(home)
