"""The export stage: artifact folders, reuse, ids, config validation, CLI summaries."""

from __future__ import annotations

import json

import pytest

from edgekit import artifact
from edgekit.cli import main
from edgekit.errors import RecipeError
from edgekit.export.pipeline import ExportConfig, run
from tests.conftest import needs_executorch


def test_config_defaults_and_validation():
    assert ExportConfig(format="gguf").quant == "f16"
    assert ExportConfig(format="onnx").quant == "fp32"
    assert ExportConfig(format="gguf", quant="Q4_K_M").quant == "q4_k_m"
    with pytest.raises(RecipeError, match="unknown quant 'q9'"):
        ExportConfig(format="gguf", quant="q9")
    with pytest.raises(RecipeError, match="calibrate needs a quantized type"):
        ExportConfig(format="gguf", quant="f16", calibrate=True)
    with pytest.raises(RecipeError, match="onnx int4, auto only"):
        ExportConfig(format="onnx", quant="int8", calibrate=True)
    with pytest.raises(ValueError, match="extra"):
        ExportConfig(format="gguf", quantization="q4_0")


def test_calibrated_onnx_name_is_the_int4_flag():
    cfg = ExportConfig(format="onnx", quant="int4-awq")
    assert (cfg.quant, cfg.calibrate, cfg.exporter_quant, cfg.label) == ("int4", True, "int4-awq",
                                                                         "onnx-int4-calibrated")


def test_gguf_export_writes_an_artifact_and_reuses_it(tiny_bpe_llama_dir, home):
    cfg = ExportConfig(model=str(tiny_bpe_llama_dir), format="gguf", quant="q8_0")
    first = run(cfg)
    folder = first["path"]
    assert not first["reused"]
    m = artifact.read_manifest(folder)
    assert m["stage"] == "export" and m["format"] == "gguf" and m["quant"] == "q8_0"
    assert set(m["files"]) == {"model.gguf", "quant_report.json"}  # the f32 source is not left behind
    assert 8.0 < m["metrics"]["bits_per_weight"] < 9.0  # q8_0 is 8.5 bpw; norms are f32
    assert artifact.verify_manifest(folder) == []
    again = run(cfg)
    assert again["reused"] and again["path"] == folder
    # a different quant is a different artifact
    assert run(ExportConfig(model=str(tiny_bpe_llama_dir), format="gguf", quant="q4_0"))["path"] != folder


def test_damaged_artifact_is_rebuilt_not_reused(tiny_bpe_llama_dir, home):
    from pathlib import Path

    cfg = ExportConfig(model=str(tiny_bpe_llama_dir), format="gguf", quant="f16")
    folder = Path(run(cfg)["path"])
    gguf = folder / "model.gguf"
    gguf.write_bytes(gguf.read_bytes()[:100])
    again = run(cfg)
    assert not again["reused"] and artifact.verify_manifest(folder) == []


def test_word_level_tokenizer_is_refused_with_the_fix(tiny_copy, home):
    """tiny_copy has a word-level tokenizer, which llama.cpp cannot run: the error says so, nothing is left."""
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="(?i)tokenizer"):
        run(ExportConfig(model=str(tiny_copy), format="gguf", quant="f16"))
    assert not list((home / "artifacts").glob("*export-*")) if (home / "artifacts").exists() else True


def test_changed_weights_are_a_new_artifact(tiny_bpe_llama_dir, tmp_path, home):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_bpe_llama_dir, model)
    cfg = ExportConfig(model=str(model), format="gguf", quant="f16")
    first = run(cfg)["path"]
    st = model / "model.safetensors"
    weights = load_file(st)
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, st, metadata={"format": "pt"})
    assert run(cfg)["path"] != first


def test_cli_quantize_json_summary(tiny_bpe_llama_dir, home, capsys):
    assert main(["quantize", str(tiny_bpe_llama_dir), "--format", "gguf", "--quant", "q4_0", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "gguf" and out["quant"] == "q4_0" and out["model_file"] == "model.gguf"
    assert out["metrics"]["size_bytes"] > 0


def test_cli_quantize_without_quant_is_one_line_error(capsys):
    assert main(["quantize", "default"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgekit: error:") and "--quant" in err and "\n" not in err


def test_cli_export_of_truncated_weights_names_the_file(tiny_copy, home, capsys):
    st = tiny_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert main(["export", str(tiny_copy), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and "\n" not in err and "Traceback" not in err


def test_executorch_config_context_and_calibrate_rules():
    assert ExportConfig(format="executorch").quant == "fp32"
    assert ExportConfig(format="executorch", quant="8da4w", context=256).context == 256
    with pytest.raises(RecipeError, match="drop --context"):
        ExportConfig(format="gguf", quant="q4_0", context=256)
    with pytest.raises(RecipeError, match="calibrate is available for executorch 8da4w, auto only, not 8da8w"):
        ExportConfig(format="executorch", quant="8da8w", calibrate=True)
    assert ExportConfig(format="executorch", quant="8da4w", calibrate=True).label == "executorch-8da4w-calibrated"
    with pytest.raises(RecipeError, match="unknown quant 'int4' for format executorch"):
        ExportConfig(format="executorch", quant="int4")
    # gguf/onnx artifact ids do not depend on the executorch-only key
    from edgekit.export.pipeline import artifact_dir

    assert artifact_dir(ExportConfig(format="gguf"), "m").name == artifact_dir(ExportConfig(format="gguf"), "m").name
    assert artifact_dir(ExportConfig(format="executorch", context=64), "m") != \
        artifact_dir(ExportConfig(format="executorch", context=128), "m")


@pytest.mark.slow  # a real ExecuTorch export through the CLI (see conftest.EXECUTORCH_EXPORT)
@needs_executorch
def test_cli_executorch_export_writes_an_artifact_and_reuses_it(tiny_bpe_llama_dir, home, capsys):
    args = ["export", str(tiny_bpe_llama_dir), "--format", "executorch", "--quant", "8da4w", "--context", "64",
            "--json", "-q"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["format"], out["quant"], out["model_file"], out["reused"]) == ("executorch", "8da4w", "model.pte",
                                                                                False)
    m = artifact.read_manifest(out["path"])
    assert {"model.pte", "executorch_config.json", "tokenizer.json"} <= set(m["files"])
    assert m["metrics"]["context"] == 64 and artifact.verify_manifest(out["path"]) == []
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["reused"]


def test_cli_context_for_gguf_is_one_line_error(capsys):
    assert main(["export", "default", "--format", "gguf", "--context", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert "drop --context" in err and "\n" not in err
