"""`edgekit bench` and `edgekit report` end to end on the tiny model (threads=1, tiny settings)."""

from __future__ import annotations

import json

from edgekit.cli import main


def test_bench_then_report(tiny_bpe_llama_dir, tiny_export, home, tmp_path, capsys):
    gguf = str(tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0"))
    onnx = str(tiny_export(tiny_bpe_llama_dir, "onnx", "fp32"))
    fid = tmp_path / "fidelity.json"
    fid.write_text(json.dumps({"schema": "edgekit.fidelity/1", "rows": [
        {"label": "gguf-q8_0", "format": "gguf", "artifact": gguf.rsplit("/", 1)[-1], "perplexity": 300.0,
         "kl_mean": 0.001, "kl_p99": 0.01, "top1_agreement": 0.99}]}))
    out = tmp_path / "bench"
    argv = ["bench", gguf, onnx, "--runtimes", "llama.cpp,onnxruntime", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--prompt-lengths", "8", "16", "--decode-tokens", "4", "--device", "pi-5-8gb",
            "--fidelity", str(fid), "--out", str(out), "--json", "-q"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    ok = {r["runtime"]: r for r in results["runs"] if r["status"] == "ok"}
    assert set(ok) == {"llama.cpp", "onnxruntime"}
    assert ok["llama.cpp"]["quality"]["kl_mean"] == 0.001 and ok["onnxruntime"]["quality"] is None
    assert ok["llama.cpp"]["metrics"]["decode_tok_s"]["median"] > 0
    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "report.html"}
    html = (out / "report.html").read_text()
    assert "<svg" in html and "predicted" in html.lower() and "Raspberry Pi 5" in html

    assert main(["report", str(out / "results.json"), "--html", str(tmp_path / "copy.html"), "-q"]) == 0
    assert (tmp_path / "copy.html").read_text().startswith("<!")


def test_report_of_a_non_result_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text('{"schema": "something-else", "runs": []}')
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgekit: error:") and "\n" not in err and "results.json" in err


def test_bench_is_a_stored_artifact_listed_by_runs_and_reused(tiny_bpe_llama_dir, tiny_export, home, capsys):
    from edgekit import artifact

    gguf = str(tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0"))
    argv = ["bench", gguf, "--runtimes", "llama.cpp", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--prompt-lengths", "8", "--decode-tokens", "4", "--device", "pi-5-8gb", "--json", "-q"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    folders = list((home / "artifacts").glob("bench-*"))
    assert len(folders) == 1 and artifact.verify_manifest(folders[0]) == []
    m = artifact.read_manifest(folders[0])
    assert m["stage"] == "bench" and m["config"]["devices"] == ["pi-5-8gb"] and m["config"]["repeats"] == 1
    assert not list((home / "artifacts").glob("*.inprogress")) and not list((home / "artifacts").glob(".*"))
    assert main(argv) == 0  # the same exports and settings: reused, not measured again
    assert json.loads(capsys.readouterr().out) == first
    assert list((home / "artifacts").glob("bench-*")) == folders
    assert main(["runs", "--json", "-q"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[folders[0].name]["stage"] == "bench"
    assert main(argv[:-4] + ["--device", "laptop-x86", "--json", "-q"]) == 0  # another device: another report
    capsys.readouterr()
    assert len(list((home / "artifacts").glob("bench-*"))) == 2
