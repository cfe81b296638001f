"""The coverage-guided run (benchmarks/fuzz_guided.py, atheris) on three parsers, briefly: libFuzzer's loop ends the
process, so each run is a subprocess; its JSON says how many inputs were accepted, refused, or found."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", ["gguf", "pte", "bundle-manifest"])
def test_a_short_coverage_guided_run_finds_nothing_and_exercises_both_sides(target, tmp_path):
    pytest.importorskip("atheris", reason="pip install atheris (it is in the test extra and requirements.lock)")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_guided.py"), "--target", target, "--runs",
                          "3000", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / f"fuzz-guided-{target}.json").read_text())
    assert result["cases"] == 3000 and result["accepted"] + result["refused"] == 3000, result
    assert result["crashes"] == result["slow"] == result["wrote"] == 0, result
    assert result["accepted"] > 0 and result["refused"] > 0, result
    # the parser's code is instrumented: libFuzzer found inputs that reach new branches (not "no interesting inputs")
    assert re.search(r"\bNEW\s+cov: \d+", run.stderr) and "no interesting inputs" not in run.stderr, run.stderr[-1500:]
    assert not (tmp_path / "fuzz-guided").exists()


def test_a_crash_stops_the_run_and_keeps_its_input(tmp_path):
    """A parser that raises something other than edgekit's error is a crash: the input and traceback are kept."""
    pytest.importorskip("atheris", reason="pip install atheris")
    script = tmp_path / "crashy.py"
    script.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.fuzz import targets\n"
        "from tests.fuzz.harness import Target\n"
        "def run(path):\n"
        "    if len(path.read_bytes()) >= 3:\n"
        "        raise KeyError('boom')\n"
        "targets.TARGETS['crashy'] = Target('crashy', lambda: [b'x', b'y'], run, '.bin', text=False)\n"
        f"sys.argv = [{str(ROOT / 'benchmarks' / 'fuzz_guided.py')!r}, '--target', 'crashy', '--runs', '500',\n"
        f"            '--out', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'fuzz_guided.py')!r}, run_name='__main__')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    result = json.loads((tmp_path / "fuzz-guided-crashy.json").read_text())
    assert result["crashes"] == 1
    (kept,) = (tmp_path / "fuzz-guided" / "crashy").glob("crash-*.bin")
    assert len(kept.read_bytes()) >= 3 and "KeyError" in kept.with_suffix(".txt").read_text()
