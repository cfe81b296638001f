"""The bench runner registry and each built-in runtime's greedy session, on the tiny model."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from edgekit.runtimes import NO_GPU, Runtime as Runner, describe, get_runtime as get_runner, runtimes as runners
from edgekit.runtimes import register_runtime as register_runner
from edgekit.errors import ConfigError

BUILTINS = {"llama.cpp": ("gguf",), "onnxruntime": ("onnx",), "onnxruntime-genai": ("onnx",),
            "pytorch": ("pytorch",)}
TEXT = "The quick brown fox jumps over the lazy dog. Hello world, how are you today? 1234567890 apples"


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test's registrations vanish with it."""
    from edgekit import registry as reg

    reg.REGISTRY.load()
    monkeypatch.setattr(reg.REGISTRY, "_entries", dict(reg.REGISTRY._entries))
    return reg.REGISTRY


@pytest.fixture(scope="module")
def exports(sharp_dir, tiny_export):
    """The tiny BPE Llama with 10x larger weights (so greedy tokens vary), exported to GGUF f32 and ONNX fp32."""
    return {"hf": sharp_dir, "gguf": str(tiny_export(sharp_dir, "gguf", "f32")),
            "onnx": str(tiny_export(sharp_dir, "onnx", "fp32"))}


def test_builtins_register_their_names_and_formats():
    assert {name: r.formats for name, r in runners().items() if name in BUILTINS} == BUILTINS
    assert get_runner("llama.cpp").gpu_variant and get_runner("onnxruntime").gpu_variant
    assert not get_runner("pytorch").gpu_variant


def test_unknown_runtime_names_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'.*llama.cpp.*onnxruntime"):
        get_runner("tensorrt")


def test_a_third_party_runner_registers_like_the_builtins(registry):
    plugin = Runner("tflite", ("tflite",), "tflite_runtime", "tflite-runtime", open=lambda *a, **k: None)
    assert register_runner(plugin) is plugin
    assert get_runner("tflite") is plugin and "tflite" in runners()


def test_missing_runtime_is_a_reason_with_the_pip_fix(monkeypatch):
    missing = Runner("nope", ("gguf",), "edgekit_no_such_runtime", "edgekit-no-such-runtime", open=lambda *a: None)
    assert missing.available() == "nope is not installed: pip install edgekit-no-such-runtime"
    assert missing.gpu_available().startswith(f"{NO_GPU}: nope is not installed")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    assert "pip install onnxruntime-genai" in get_runner("onnxruntime-genai").available()


def test_installed_runtimes_are_available_with_a_version():
    for name in BUILTINS:
        runner = get_runner(name)
        assert runner.available() is None, name
        assert runner.version()


def test_gpu_checks_answer_honestly():
    import onnxruntime
    import torch

    for name in BUILTINS:
        reason = get_runner(name).gpu_available()
        assert reason is None or reason.startswith(f"{NO_GPU}: "), (name, reason)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "CUDAExecutionProvider" in get_runner("onnxruntime").gpu_available()
    if not torch.cuda.is_available():
        assert "CUDA" in get_runner("pytorch").gpu_available()
    broken = Runner("broken", ("gguf",), "json", "json", open=lambda *a: None, probe_gpu=lambda: 1 / 0)
    assert broken.gpu_available() == f"{NO_GPU}: broken's GPU check failed (division by zero)"


def test_describe_reads_exports_and_hf_folders(exports, tmp_path):
    gguf = describe(exports["gguf"])
    assert (gguf.format, gguf.quant, gguf.label, gguf.model.name) == ("gguf", "f32", "gguf-f32", "model.gguf")
    assert gguf.source_model == exports["hf"] and gguf.file_bytes > 0 and gguf.params > 0
    hf = describe(exports["hf"])
    assert (hf.format, hf.quant, hf.label, hf.model, hf.params) == ("pytorch", "fp32", "pytorch-fp32", exports["hf"],
                                                                    gguf.params)
    with pytest.raises(ConfigError, match="neither an export artifact"):
        describe(tmp_path)


def test_pytorch_runs_the_source_model_and_formats_are_checked(exports):
    src = describe(exports["onnx"])
    assert get_runner("pytorch").target(src) == exports["hf"]
    assert get_runner("onnxruntime").target(src) == src.model
    with pytest.raises(ConfigError, match="llama.cpp cannot run .* it runs gguf, not onnx; pick one of onnxruntime"):
        get_runner("llama.cpp").target(src)


def test_every_runtime_decodes_the_same_greedy_tokens(exports):
    """Four independent implementations of prefill + KV-cache decode agree token for token."""
    results = {}
    for name, artifact in [("pytorch", exports["hf"]), ("llama.cpp", exports["gguf"]),
                           ("onnxruntime", exports["onnx"]), ("onnxruntime-genai", exports["onnx"])]:
        session = get_runner(name).session(artifact, threads=1, context=128)
        ids = session.tokenize(TEXT)
        first = session.prefill(ids)
        tokens = session.decode(16)
        again = (session.prefill(ids), session.decode(16))  # prefill starts a fresh sequence
        shorter = session.prefill(ids[:5])
        session.close()
        assert again == (first, tokens), name
        assert session.context == (511 if name == "onnxruntime-genai" else 512), name  # genai: see _GenaiSession
        results[name] = (ids, [first, *tokens], shorter)
    reference = results["pytorch"]
    assert len(reference[0]) > 10 and len(set(reference[1])) > 4  # the tokens really vary
    for name, got in results.items():
        assert got == reference, name


def test_genai_never_stops_at_eos(exports, tmp_path):
    """Even when greedy wants EOS at every step, decode(n) returns n tokens (genai's min_length)."""
    folder = tmp_path / "onnx"
    shutil.copytree(exports["onnx"], folder)
    session = get_runner("onnxruntime-genai").session(folder, threads=1, context=128)
    ids = session.tokenize(TEXT)
    tokens = [session.prefill(ids), *session.decode(6)]
    session.close()
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = sorted(set(tokens))
    (folder / "genai_config.json").write_text(json.dumps(config))
    session = get_runner("onnxruntime-genai").session(folder, threads=1, context=128)
    session.prefill(ids)
    decoded = session.decode(12)
    assert len(decoded) == 12 and not set(decoded) & set(tokens)  # EOS masked, not emitted
    session.close()


def test_llama_cpp_gpu_offload_is_refused_with_a_reason(exports):
    from edgekit.errors import ModelError

    with pytest.raises(ModelError, match="GPU offload is not wired yet"):
        get_runner("llama.cpp").session(exports["gguf"], threads=1, gpu=True)
