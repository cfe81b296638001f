"""Every parser under a short, deterministic fuzz run: no case ends in anything but acceptance or edgekit's own
error, none takes over a second, none writes a file beside its input; and every crash the fuzzer ever found
(tests/robust/corpus/fuzz/) stays fixed.

The long runs (a million cases per parser) are `make fuzz` / benchmarks/fuzz.py; figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from tests.fuzz.harness import fuzz
from tests.fuzz.targets import TARGETS

# Cases per parser in the test suite: a few seconds each on a 2-core machine (seed 0, so a failure replays).
CASES = {"recipe": 600, "device": 1500, "data-jsonl": 3000, "data-text": 3000, "chat-template": 1000, "gguf": 5000,
         "safetensors": 5000, "onnx": 5000, "pte": 5000, "bundle-tar": 1500, "bundle-manifest": 3000, "units": 5000,
         "cli": 150}
FOUND = Path(__file__).resolve().parents[1] / "robust" / "corpus" / "fuzz"


def test_every_target_has_a_case_count():
    assert set(CASES) == set(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_short_run(name, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    report = fuzz(TARGETS[name], CASES[name], seed=0, workdir=tmp_path / "case")
    assert report.cases == CASES[name] and report.accepted + report.refused == report.cases, report.summary()
    for kind in ("crashes", "slow", "wrote"):
        found = getattr(report, kind)
        assert not found, f"{name}: {len(found)} {kind}; first: {found[0]}"
    # the run exercised both sides: some inputs were taken and some refused
    assert report.accepted > 0 and report.refused > 0, report.summary()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("case", "store")]


@pytest.mark.parametrize("path", sorted(p for p in FOUND.rglob("*") if p.is_file() and p.name != "README.md"),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_crash_the_fuzzer_found_is_now_a_clean_refusal(path, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "store"))
    target = TARGETS[path.parent.name]
    case = tmp_path / (target.filename or f"input{target.suffix}")
    for name, content in target.extra.items():
        (tmp_path / name).write_bytes(content)
    case.write_bytes(target.seeds()[0])  # warm-up, untimed, as the harness does: imports and caches
    with contextlib.suppress(EdgekitError):
        target.run(case)
    case.write_bytes(path.read_bytes())
    t0 = time.perf_counter()
    with pytest.raises(EdgekitError) as e:
        target.run(case)
    assert "\n" not in str(e.value).strip()
    assert time.perf_counter() - t0 < 1.0  # some were hangs (units/huge-exponent-hang.txt took over 10 s)


def test_a_case_counts_as_slow_only_if_it_is_slow_twice(tmp_path):
    """A busy CPU can stall any one call; an input that makes a parser slow does so every time."""
    from tests.fuzz.harness import Target

    calls = []

    def stalls_once(path: Path) -> None:
        calls.append(path.read_bytes())
        if len(calls) == 2:  # the first timed call (the first is the untimed warm-up)
            time.sleep(0.3)

    def always_slow(path: Path) -> None:
        time.sleep(0.3)

    once = fuzz(Target("once", lambda: [b"x"], stalls_once), 1, seed=0, workdir=tmp_path / "a", max_seconds=0.2)
    assert not once.slow and once.max_case_seconds < 0.2 and len(calls) == 3  # timed again, fast the second time
    slow = fuzz(Target("slow", lambda: [b"x"], always_slow), 1, seed=0, workdir=tmp_path / "b", max_seconds=0.2)
    assert [c["input"] for c in slow.slow] == [b"x"] and slow.max_case_seconds >= 0.3
