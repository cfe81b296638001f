"""`edgekit run` on a tiny recipe: every stage end to end, reuse, change propagation, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.cli import main


def _recipe(tmp_path: Path, teacher: Path, steps: int = 2, quant: str = "q8_0") -> Path:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        words = ["the quick brown fox", "hello world", "apples and 42 oranges", "def add(a, b): return a + b"]
        data.write_text("".join(json.dumps({"text": f"{words[i % 4]} {i} {words[(i * 7) % 4]}"}) + "\n"
                                for i in range(24)))
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
name: tiny
teacher: {teacher}
device: laptop-x86
context: 256
distill:
  student: {{layers: 1, hidden_size: 64, intermediate_size: 128, heads: 4, kv_heads: 2}}
  init: random
  data: {{sources: [data.jsonl], heldout_fraction: 0.25}}
  steps: {steps}
  batch_size: 2
  cache: none
exports:
  - {{format: gguf, quant: {quant}}}
fidelity: {{max_tokens: 128}}
bench: {{runtimes: [llama.cpp], repeats: 1, prompt_lengths: [8], decode_tokens: 4, threads: 1}}
package: {{formats: [gguf, ollama]}}
""")
    return path


def _stages(record: dict) -> dict:
    return {s["stage"]: s for s in record["stages"]}


def test_run_end_to_end_then_reuse_then_one_changed_key(tiny_bpe_llama_dir, home, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_bpe_llama_dir)
    assert main(["run", str(recipe), "--json", "-q"]) == 0
    first = json.loads(capsys.readouterr().out)
    stages = _stages(first)
    assert list(stages) == ["distill", "export gguf-q8_0", "fidelity", "bench", "package gguf", "package gguf ollama"]
    assert (Path(stages["package gguf ollama"]["path"]) / "Modelfile").is_file()
    assert not any(s["reused"] for s in first["stages"])
    vs = first["against_teacher"]  # what ships, scored against the teacher on the data stage's held-out chats
    held = Path(vs["texts"][0])
    assert vs["teacher"] == str(tiny_bpe_llama_dir) and len(vs["texts"]) == 1
    assert held.name == "heldout.jsonl" and held.parent.name.startswith("data-")
    assert [r["model"] for r in vs["rows"]] == ["teacher", "student (fp32)", "gguf-q8_0"]
    assert vs["rows"][0]["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and vs["rows"][0]["top1_vs_teacher"] == 1
    assert all(r["kl_to_teacher"] > 0 for r in vs["rows"][1:])  # a 2-step random student is not its teacher
    assert len(vs["answers"]) == 5 and all(len(a["answers"]) == 3 for a in vs["answers"])
    bundle = stages["package gguf"]["path"]
    assert main(["verify", stages["package gguf"]["tarball"] or bundle, "-q"]) == 0
    capsys.readouterr()

    t0 = time.perf_counter()
    assert main(["run", str(recipe), "--json", "-q"]) == 0  # nothing changed: every stage reused
    again = json.loads(capsys.readouterr().out)
    assert all(s["reused"] for s in again["stages"]), [(s["stage"], s["reused"]) for s in again["stages"]]
    assert [s["path"] for s in again["stages"]] == [s["path"] for s in first["stages"]]
    assert time.perf_counter() - t0 < 30
    assert again["against_teacher"] == first["against_teacher"]

    assert main(["run", str(recipe), "-q"]) == 0  # reused again, and the printout ends with the teacher table
    out = capsys.readouterr().out
    table = out[out.index("against the teacher"):]
    assert "KL to teacher" in table and "top-1 vs teacher" in table
    for row in vs["rows"]:
        assert row["model"] in table and f"{row['kl_to_teacher']:.4f}" in table
    for a in vs["answers"]:
        assert a["question"] in table

    _recipe(tmp_path, tiny_bpe_llama_dir, quant="q4_0")  # change one export key: distill is reused
    assert main(["run", str(recipe), "--json", "-q"]) == 0
    changed = _stages(json.loads(capsys.readouterr().out))
    assert changed["distill"]["reused"] and changed["distill"]["path"] == stages["distill"]["path"]
    assert not changed["export gguf-q4_0"]["reused"]
    assert not changed["fidelity"]["reused"] and not changed["bench"]["reused"]

    assert main(["runs", "--json", "-q"]) == 0
    listed = {r["id"] for r in json.loads(capsys.readouterr().out)}
    assert Path(stages["export gguf-q8_0"]["path"]).name in listed
    assert main(["show", Path(stages["fidelity"]["path"]).name[:16]]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "fidelity"


def _no_distill_recipe(tmp_path: Path, teacher: Path, name: str, exports: list[tuple[str, str]], fidelity: str,
                       package: str) -> Path:
    """A recipe that exports the teacher itself: no distillation, no bench."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"""
name: {name}
teacher: {teacher}
device: laptop-x86
context: 256
distill: null
exports:
""" + "".join(f"  - {{format: {fmt}, quant: {quant}}}\n" for fmt, quant in exports) + f"""\
fidelity: {fidelity}
bench: null
package: {package}
""")
    return recipe


def test_run_without_distillation_has_no_teacher_table(tiny_bpe_llama_dir, home, tmp_path, capsys):
    recipe = _no_distill_recipe(tmp_path, tiny_bpe_llama_dir, "plain", [("gguf", "q8_0")], "{max_tokens: 64}",
                                "null")
    assert main(["run", str(recipe), "-q"]) == 0
    out = capsys.readouterr().out
    assert "fidelity" in out and "against the teacher" not in out and "KL to teacher" not in out


def test_run_puts_every_export_in_one_hf_repository(tiny_bpe_llama_dir, home, tmp_path, capsys):
    recipe = _no_distill_recipe(tmp_path, tiny_bpe_llama_dir, "repo", [("gguf", "q8_0"), ("onnx", "fp32")], "null",
                                "{formats: [gguf, hf]}")
    assert main(["run", str(recipe), "--json", "-q"]) == 0
    stages = _stages(json.loads(capsys.readouterr().out))
    assert [s for s in stages if s.startswith("package")] == ["package gguf", "package hf"]
    m = json.loads((Path(stages["package hf"]["path"]) / "manifest.json").read_text())
    assert [(e["folder"], e["format"]) for e in m["exports"]] == [("gguf", "gguf"), ("onnx", "onnx")]


def test_invalid_recipe_is_refused_before_any_work(tmp_path, home, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: no-such-device\nexports: [{format: gguf, quant: q9_9}]\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-device" in err and "q9_9" in err
    assert not (home / "artifacts").exists() or not any((home / "artifacts").iterdir())


def test_every_shipped_recipe_validates_through_the_cli(capsys):
    recipes = sorted(str(p) for p in Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml")
                     if "esp32" not in p.name)  # esp32: no student of this teacher fits (tests/test_recipe.py)
    assert main(["validate", *recipes]) == 0
    assert capsys.readouterr().out.count(": ok") == len(recipes)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_bpe_llama_dir, tmp_path):
    """SIGKILL during training, then the same command: it completes, reusing what was finished."""
    recipe = _recipe(tmp_path, tiny_bpe_llama_dir, steps=400)
    env = {**os.environ, "EDGEKIT_HOME": str(tmp_path / "home"), "EDGEKIT_QUIET": "1"}
    cmd = [sys.executable, "-m", "edgekit.cli", "run", str(recipe), "--json", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and ckpt is None:  # wait until training has written a checkpoint
        ckpt = next((tmp_path / "home" / "artifacts").glob("distill-*.inprogress/ckpt-*"), None) \
            if (tmp_path / "home" / "artifacts").exists() else None
        time.sleep(0.2)
    assert ckpt is not None, "training never wrote a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "home" / "artifacts").glob("export-*"))  # it died before exporting
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    assert [s["stage"] for s in record["stages"]][-2:] == ["package gguf", "package gguf ollama"]
