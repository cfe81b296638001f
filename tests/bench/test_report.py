"""The benchmark report: quality joined by artifact, Markdown tables, one self-contained HTML page, three files."""

from __future__ import annotations

import copy
import importlib.machinery
import json
import re
import sys
import types

import pytest

from edgekit.bench import report
from edgekit.bench.measure import validate_results
from edgekit.bench.project import project
from edgekit.devices import list_devices
from tests.conftest import SMOLLM2


@pytest.fixture
def joined(results, fidelity_report) -> dict:
    return report.join_quality(results, [fidelity_report])


@pytest.fixture
def projections(joined) -> list[dict]:
    return project(joined, list_devices(), SMOLLM2)


def _run(res: dict, label: str, runtime: str) -> dict:
    return next(r for r in res["runs"] if r["label"] == label and r["runtime"] == runtime)


# --------------------------------------------------------------------------- join_quality


def test_join_quality_matches_runs_to_fidelity_rows_by_artifact_folder_name(results, fidelity_report):
    before = copy.deepcopy(results)
    joined = report.join_quality(results, [fidelity_report])
    assert _run(joined, "gguf-q4_1", "llama.cpp")["quality"] == {
        "perplexity": 6.73, "kl_mean": 0.00334, "kl_p99": 0.022, "top1_agreement": 0.9733}
    # one ONNX artifact, two runtimes: both get its quality
    assert _run(joined, "onnx-int4", "onnxruntime")["quality"]["kl_mean"] == 0.395
    assert _run(joined, "onnx-int4", "onnxruntime-genai")["quality"]["kl_mean"] == 0.395
    assert results == before  # the input is left as it was



def test_runs_gain_the_teacher_columns_only_when_fidelity_scored_against_the_teacher(results, fidelity_report):
    plain = report.to_markdown(report.join_quality(results, [fidelity_report]), [])
    assert "KL to teacher" not in plain
    with_teacher = copy.deepcopy(fidelity_report)
    for row in with_teacher["rows"]:
        row.update(kl_to_teacher=0.25, top1_vs_teacher=0.625)
    joined = report.join_quality(results, [with_teacher])
    assert _run(joined, "gguf-q4_1", "llama.cpp")["quality"]["kl_to_teacher"] == 0.25
    md = report.to_markdown(joined, [])
    assert "| KL to teacher | top-1 vs teacher |" in md and "| 0.25 | 62.5% |" in md

def test_join_quality_gives_pytorch_runs_the_reference_row_and_unmatched_runs_none(joined):
    assert _run(joined, "pytorch-fp32", "pytorch")["quality"]["kl_mean"] == 0.0
    assert _run(joined, "gguf-q2_k", "llama.cpp")["quality"] is None  # no fidelity row for its artifact


def test_join_quality_matches_on_the_folder_name_not_the_label(results, fidelity_report):
    run = _run(results, "gguf-q8_0", "llama.cpp")
    run["label"] = "renamed"
    run["artifact"] = "/elsewhere/export-80b2e8d97614bc97/"
    joined = report.join_quality(results, [fidelity_report])
    assert _run(joined, "renamed", "llama.cpp")["quality"]["kl_mean"] == 0.00487


def test_a_later_fidelity_report_overrides_an_earlier_one(results, fidelity_report):
    newer = copy.deepcopy(fidelity_report)
    newer["rows"] = [dict(r, kl_mean=0.5) for r in newer["rows"] if r["label"] == "gguf-q4_1"]
    joined = report.join_quality(results, [fidelity_report, newer])
    assert _run(joined, "gguf-q4_1", "llama.cpp")["quality"]["kl_mean"] == 0.5
    assert _run(joined, "gguf-q8_0", "llama.cpp")["quality"]["kl_mean"] == 0.00487


# --------------------------------------------------------------------------- Markdown


def test_markdown_has_one_row_per_run_with_medians_ranges_and_quality(joined, projections):
    md = report.to_markdown(joined, projections)
    assert "## Measured on host: Intel(R) Xeon(R) Processor" in md
    assert "| TTFT @128 ms | TTFT @512 ms | prefill tok/s @512 | decode tok/s |" in md
    row = next(line for line in md.splitlines() if line.startswith("| gguf-q4_1 | llama.cpp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "98.4MB" and cells[7] == "152.0 (147.4–156.6)"  # decode median (min–max)
    assert cells[-4:] == ["6.730", "0.00334", "97.3%", "ok"]
    runs_table = md.split("## Predicted")[0]
    assert sum(line.startswith("| ") for line in runs_table.splitlines()) == 1 + len(joined["runs"])


def test_markdown_shows_reasons_for_unavailable_and_failed_runs(joined):
    md = report.to_markdown(joined, [])
    assert "unavailable: onnxruntime-genai is not installed; pip install onnxruntime-genai" in md
    assert "failed: worker exited with signal 11" in md
    assert "Predicted" not in md  # no devices, no predictions


def test_markdown_labels_every_device_table_predicted(joined, projections):
    md = report.to_markdown(joined, projections)
    devices = {p["device"] for p in projections}
    for d in devices:
        assert re.search(rf"^### .* \(`{d}`\): predicted$", md, re.M), d
    assert "decode tok/s (predicted)" in md and "**These numbers are predictions.**" in md
    pi5 = md.split("(`pi-5-8gb`): predicted")[1].split("###")[0]
    assert "| gguf-q4_1 | llama.cpp | 78.8 | 140 | 47% / 25% | yes (223MB of 6.00GB) |" in pi5
    assert "Not projected, runtime not on this device: pytorch-fp32 (pytorch)." in pi5
    esp32 = md.split("(`esp32-s3-psram`): predicted")[1].split("###")[0]
    assert "Nothing measured runs here: the device lists none of llama.cpp, onnxruntime" in esp32
    assert "predicted decode tok/s = efficiency (decode) × device bandwidth ÷ bytes read per token" in md


def test_markdown_escapes_pipes_in_labels(joined):
    _run(joined, "gguf-q4_0", "llama.cpp")["label"] = "a|b"
    assert "| a\\|b | llama.cpp |" in report.to_markdown(joined, [])


# --------------------------------------------------------------------------- HTML


def test_html_is_one_self_contained_page(joined, projections):
    html = report.to_html(joined, projections)
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "http://" not in html and "https://" not in html  # nothing fetched, not even a namespace
    assert not re.search(r"<(script|link|img|iframe)\b", html) and "@import" not in html and "url(http" not in html
    assert re.search(r"<style>.+</style>", html, re.S)


def test_html_has_the_three_charts_with_runtimes_in_their_legends(joined, projections):
    html = report.to_html(joined, projections)
    panels = {p["device"] for p in projections if p["runtime_on_device"]}
    assert html.count("<svg") == 2 + len(panels)  # speed scatter, quality scatter, one bar panel per device
    assert "Decode speed vs file size" in html and "Quality vs size" in html and "Predicted on devices" in html
    legends = re.findall(r'<div class="legend">(.*?)</div>', html)
    speed_legend = legends[0]
    for runtime in ("llama.cpp", "onnxruntime", "onnxruntime-genai", "pytorch"):
        assert f"</span>{runtime}</span>" in speed_legend
    assert "file size (MB, log scale)" in html and "decode (tokens/s)" in html  # axis labels with units
    assert "predicted decode (tokens/s)" in html


def test_html_labels_every_device_panel_predicted(joined, projections):
    html = report.to_html(joined, projections)
    panels = re.findall(r"<figure><h3>(.*?)</h3>", html)
    device_panels = [p for p in panels if "Decode speed" not in p and "Quality" not in p]
    assert device_panels and all('<span class="tag">predicted</span>' in p for p in device_panels)
    assert "esp32-s3-psram" in html  # a device none of the runtimes runs on is named, not silently dropped


def test_html_escapes_labels_with_special_characters(joined, projections):
    evil = '<script>alert("x")</script> & co'
    _run(joined, "gguf-q4_1", "llama.cpp")["label"] = evil
    _run(joined, "onnx-int8", "onnxruntime-genai")["reason"] = "<b>bold</b>"
    html = report.to_html(joined, project(joined, list_devices(), SMOLLM2))
    assert "<script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in html


def test_html_lists_unavailable_and_failed_runs_with_their_reasons(joined):
    html = report.to_html(joined, [])
    problems = html.split("Runs that did not complete")[1].split("</ul>")[0]
    assert "onnxruntime-genai is not installed; pip install onnxruntime-genai" in problems
    assert "worker exited with signal 11 (segmentation fault)" in problems
    assert "Predicted on devices" not in html


def test_html_footnotes_carry_the_formulas_and_assumptions(joined, projections):
    html = report.to_html(joined, projections)
    notes = html.split("Notes and assumptions")[1]
    assert "predicted prefill tok/s = efficiency (prefill) × device FP32 FLOP/s ÷ (2 × parameters)" in notes
    assert "no GPU or NPU is used" in notes and "llama_cpp_python 0.3.36" in notes


def test_html_names_duplicate_labels_by_runtime(joined, projections):
    html = report.to_html(joined, projections)
    assert "onnx-int4 (ORT)" in html and "onnx-int4 (ORT-GenAI)" in html
    assert "gguf-q4_1 (" not in html  # a label used once keeps its plain name


# --------------------------------------------------------------------------- write_report


def test_write_report_writes_three_files(results, fidelity_report, tmp_path):
    paths = report.write_report(results, tmp_path / "out", [fidelity_report], list_devices(), SMOLLM2)
    assert {p.name for p in paths.values()} == {"results.json", "report.md", "report.html"}
    assert all(p.is_file() for p in paths.values())
    written = json.loads(paths["json"].read_text())
    validate_results(written)  # still valid bench/1, with the optional quality joined into each run
    assert [{k: v for k, v in r.items() if k != "quality"} for r in written["runs"]] == results["runs"]
    assert sum(r["quality"] is not None for r in written["runs"]) > 0
    assert "| 6.730 | 0.00334 | 97.3% |" in paths["markdown"].read_text()  # quality joined in the reports
    assert "predicted" in paths["markdown"].read_text() and "<svg" in paths["html"].read_text()
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_write_report_without_devices_writes_no_predictions(results, tmp_path):
    paths = report.write_report(results, tmp_path)
    assert "Predicted" not in paths["markdown"].read_text()


def test_write_report_validates_through_measure_when_that_module_exists(results, tmp_path, monkeypatch):
    seen = []

    def validate_results(res):
        seen.append(res["schema"])
        raise ValueError("bad results")

    fake = types.ModuleType("edgekit.bench.measure")
    fake.__spec__ = importlib.machinery.ModuleSpec("edgekit.bench.measure", None)
    fake.validate_results = validate_results
    monkeypatch.setitem(sys.modules, "edgekit.bench.measure", fake)
    with pytest.raises(ValueError, match="bad results"):
        report.write_report(results, tmp_path / "out")
    assert seen == ["edgekit.bench/1"] and not (tmp_path / "out" / "results.json").exists()
