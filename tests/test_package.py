"""Bundles: contents and manifest, the example loaders run standalone, verification, unsafe archives refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from edgekit import artifact
from edgekit.errors import ConfigError, RecipeError
from edgekit.package import LICENSE_NOTE, SCHEMA, package, verify
from tests.conftest import EXECUTORCH_EXPORT, needs_executorch


class _OnFirstUse(dict):
    """A dict whose values are built when first read, so a test that reads only "gguf" builds no ExecuTorch export."""

    def __init__(self, build):
        super().__init__()
        self._build = build

    def __missing__(self, key):
        self[key] = value = self._build(key)
        return value


EXPORTED = {"gguf": ("q8_0", {}), "onnx": ("fp32", {}), "executorch": ("8da4w", {"context": 64})}


@pytest.fixture(scope="module")
def exports(tiny_bpe_llama_dir, tiny_export) -> dict[str, Path]:
    """A tiny GGUF (q8_0), ONNX (fp32) and ExecuTorch (8da4w) export artifact, from the session's export store,
    each made when a test first reads it."""
    return _OnFirstUse(lambda fmt: tiny_export(tiny_bpe_llama_dir, fmt, EXPORTED[fmt][0], **EXPORTED[fmt][1]))


@pytest.fixture(scope="module")
def bundles(exports, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bundles")
    return _OnFirstUse(lambda fmt: package(exports[fmt], out_dir=out, context=256))


def _copy(bundle: dict, tmp_path: Path) -> Path:
    dst = tmp_path / Path(bundle["path"]).name
    shutil.copytree(bundle["path"], dst)
    return dst


COMMON = {"README.md", "manifest.json", "generation.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja"}


@pytest.mark.parametrize("fmt, own", [("gguf", {"model.gguf", "run_llamacpp.py"}),
                                      ("onnx", {"model.onnx", "genai_config.json", "run_genai.py"}),
                                      pytest.param("executorch", {"model.pte", "executorch_config.json",
                                                                  "run_executorch.py"}, marks=EXECUTORCH_EXPORT)])
def test_package_writes_model_tokenizer_loader_card_and_manifest(bundles, exports, fmt, own):
    b = bundles[fmt]
    folder = Path(b["path"])
    assert folder.name.startswith("tiny-bpe-llama") and f"-{fmt}-" in folder.name
    assert folder.name.endswith(exports[fmt].name.removeprefix("export-")[:8])
    assert {p.name for p in folder.iterdir()} == COMMON | own
    assert Path(b["tarball"]) == folder.with_name(folder.name + ".tar.gz")
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers

    m = json.loads((folder / "manifest.json").read_text())
    assert m == b["manifest"]
    # an ExecuTorch program's cache is sized at export (64 here): the bundle says so rather than the asked 256
    assert m["schema"] == SCHEMA and m["format"] == fmt and m["context"] == (64 if fmt == "executorch" else 256)
    assert m["source_artifact"]["id"] == exports[fmt].name
    assert set(m["files"]) == (COMMON | own) - {"manifest.json"}
    for rel, meta in m["files"].items():
        assert meta == {"sha256": artifact.sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
    assert m["min_ram_bytes"] > m["size_bytes"] > 0
    assert m["runtimes"][0]["min_version"] and m["loader"] in own
    assert m["teacher"]["license_note"] == LICENSE_NOTE
    assert m["device"] is None and m["speed"] == [] and m["quality"] == []

    card = (folder / "README.md").read_text()
    assert m["quant"] in card and fmt.upper() in card and m["loader"] in card and LICENSE_NOTE in card
    gen = json.loads((folder / "generation.json").read_text())
    assert gen["eos_token_ids"] == [2] and gen["stop"] == ["<|im_end|>"] and gen["max_new_tokens"] > 0


# What each built-in format's bundle lists (each runtime's descriptor says it; package.py keeps no table).
BUNDLE_RUNTIMES = {
    "gguf": [{"name": "llama.cpp", "package": "llama-cpp-python", "min_version": "0.3.0", "loader": "run_llamacpp.py"}],
    "onnx": [{"name": "onnxruntime-genai", "package": "onnxruntime-genai", "min_version": "0.16",
              "loader": "run_genai.py"},
             {"name": "onnxruntime", "package": "onnxruntime", "min_version": "1.20", "loader": None}],
    "executorch": [{"name": "executorch", "package": "executorch", "min_version": "1.5.1",
                    "loader": "run_executorch.py"}],
}
CARD_NOTES = {"gguf": "`run_llamacpp.py` turns them off when it sees AMX",
              "executorch": "The program holds a static K/V cache of 64 positions"}


@pytest.mark.parametrize("fmt", ["gguf", "onnx", pytest.param("executorch", marks=EXECUTORCH_EXPORT)])
def test_bundle_lists_the_runtimes_of_its_format_from_their_descriptors(bundles, fmt):
    m = bundles[fmt]["manifest"]
    assert m["runtimes"] == BUNDLE_RUNTIMES[fmt] and m["loader"] == BUNDLE_RUNTIMES[fmt][0]["loader"]
    assert m["memory"]["runtime"] == BUNDLE_RUNTIMES[fmt][0]["name"]
    card = (Path(bundles[fmt]["path"]) / "README.md").read_text()
    for other, note in CARD_NOTES.items():
        assert (note in card) == (other == fmt), (other, fmt)
    first = BUNDLE_RUNTIMES[fmt][0]
    assert f'pip install "{first["package"]}>={first["min_version"]}"' in card


def test_min_ram_grows_with_context_and_context_is_capped_at_the_model_maximum(exports, tmp_path):
    small = package(exports["gguf"], out_dir=tmp_path / "a", context=128)["manifest"]
    capped = package(exports["gguf"], out_dir=tmp_path / "b", context=100_000)["manifest"]
    assert capped["context"] == 512  # the tiny model's max_position_embeddings
    assert capped["min_ram_bytes"] > small["min_ram_bytes"] > 0
    with pytest.raises(ConfigError, match="context"):
        package(exports["gguf"], out_dir=tmp_path / "c", context=0)


def test_package_for_a_device_records_its_budget_and_the_fit(exports, tmp_path):
    m = package(exports["gguf"], out_dir=tmp_path, device="pi-zero-2w", context=256)["manifest"]
    d = m["device"]
    assert d["name"] == "pi-zero-2w" and d["runtime"] == "llama.cpp" and d["fits"] is True
    assert d["headroom_bytes"] == d["memory_budget_bytes"] - m["min_ram_bytes"]
    assert "Raspberry Pi Zero 2 W" in (tmp_path / m["name"] / "README.md").read_text()


def test_package_for_a_device_without_the_runtime_is_refused(exports, tmp_path):
    with pytest.raises(RecipeError, match="esp32-s3-psram"):
        package(exports["gguf"], out_dir=tmp_path, device="esp32-s3-psram")
    assert not list(tmp_path.iterdir())


def test_package_takes_speed_and_quality_rows_of_this_artifact_only(exports, tmp_path):
    gguf, other = exports["gguf"], exports["onnx"]
    ok = {"decode_tok_s": {"median": 123.4}, "peak_rss_bytes": 98_000_000}
    bench = {"schema": "edgekit.bench/1", "runs": [
        {"artifact": f"/elsewhere/artifacts/{gguf.name}", "runtime": "llama.cpp", "device": "host", "status": "ok",
         "metrics": ok},
        {"artifact": str(other), "runtime": "onnxruntime", "device": "host", "status": "ok", "metrics": ok},
        {"artifact": str(gguf), "runtime": "llama.cpp", "device": "host", "status": "failed", "metrics": None}]}
    fidelity = {"schema": "edgekit.fidelity/1", "reference": "ref", "rows": [
        {"artifact": gguf.name, "perplexity": 12.5, "ppl_delta_pct": 1.5, "kl_mean": 0.01, "top1_agreement": 0.97},
        {"artifact": other.name, "perplexity": 99.0, "ppl_delta_pct": 0.0, "kl_mean": 0.0, "top1_agreement": 1.0}]}
    m = package(gguf, out_dir=tmp_path, bench=bench, fidelity=fidelity, recipe="pi-zero-2w-smollm2",
                context=256)["manifest"]
    assert m["speed"] == [{"runtime": "llama.cpp", "device": "host", "decode_tok_s": 123.4,
                           "peak_rss_bytes": 98_000_000}]
    assert [q["perplexity"] for q in m["quality"]] == [12.5] and m["recipe"] == "pi-zero-2w-smollm2"
    card = (tmp_path / m["name"] / "README.md").read_text()
    assert "123.4" in card and "12.500" in card and "97.0%" in card
    with pytest.raises(ConfigError, match="edgekit.bench/1"):
        package(gguf, out_dir=tmp_path, bench={"runs": []})


def test_model_card_shows_the_exports_quality_against_the_teacher(exports, tmp_path):
    gguf = exports["gguf"]
    fidelity = {"schema": "edgekit.fidelity/1", "reference": "ref",
                "teacher": {"path": "/teachers/t", "perplexity": 9.25, "kl_to_teacher": 0.0, "top1_vs_teacher": 1.0},
                "rows": [{"artifact": gguf.name, "perplexity": 12.5, "ppl_delta_pct": 1.5, "kl_mean": 0.01,
                          "top1_agreement": 0.97, "kl_to_teacher": 0.4321, "top1_vs_teacher": 0.625}]}
    m = package(gguf, out_dir=tmp_path, fidelity=fidelity, context=256)["manifest"]
    assert m["quality"][0]["kl_to_teacher"] == 0.4321 and m["quality"][0]["teacher"] == "/teachers/t"
    card = (tmp_path / m["name"] / "README.md").read_text()
    assert "KL to teacher" in card and "0.4321" in card and "62.5%" in card and "9.250" in card


def _run_standalone(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a loader from another folder with ``import edgekit`` made impossible: it must need only the runtime."""
    code = ("import runpy, sys; sys.modules['edgekit'] = None; "
            f"sys.argv = {[str(script), *args]!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=script.parent.parent, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_llamacpp_loader_runs_standalone(bundles):
    script = Path(bundles["gguf"]["path"]) / "run_llamacpp.py"
    # This host has AMX: the flag and the env var both turn llama.cpp's extra buffer types off.
    r = _run_standalone(script, "--no-extra-buffers", "--max-tokens", "4", "hi", env={"NO_EXTRA_BUFFERS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.endswith("\n") and "4 tokens" in r.stderr


def test_genai_loader_runs_standalone(bundles):
    script = Path(bundles["onnx"]["path"]) / "run_genai.py"
    r = _run_standalone(script, "--max-tokens", "4", "hi")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.endswith("\n") and "tokens in" in r.stderr


@pytest.mark.slow
@needs_executorch
def test_executorch_loader_runs_standalone(bundles):
    script = Path(bundles["executorch"]["path"]) / "run_executorch.py"
    r = _run_standalone(script, "--max-tokens", "4", "hi")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.endswith("\n") and "tokens in" in r.stderr


RUNNER = r"""
import json, sys
import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  the program's llama:: kernels
import executorch.kernels.quantized  # noqa: F401  quantized_decomposed::embedding_byte
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
runner = TextLLMRunner(sys.argv[1] + "/model.pte", sys.argv[1] + "/tokenizer.json")
pieces = []
runner.generate(sys.argv[2], GenerationConfig(echo=False, max_new_tokens=int(sys.argv[3]), temperature=0.0),
                token_callback=pieces.append)
print(json.dumps("".join(pieces)))
"""


@pytest.mark.slow
@needs_executorch
def test_executorch_bundle_runs_in_executorchs_own_llm_runner(bundles):
    """The runner ExecuTorch ships for phones (its C++ TextLLMRunner, via the pip package's bindings) loads the
    bundle's model.pte and tokenizer.json as they are and answers greedily what edgekit's ExecuTorch session does."""
    from tokenizers import Tokenizer

    from edgekit.runtimes.executorch import EtSession

    folder = Path(bundles["executorch"]["path"])
    prompt = "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    r = subprocess.run([sys.executable, "-c", RUNNER, str(folder), prompt, "8"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = json.loads(r.stdout.strip().splitlines()[-1])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = EtSession(folder, 1)
    ids = session.generate(tok.encode(prompt, add_special_tokens=False).ids, 8, eos_ids=(2,))
    session.close()
    assert text and text == tok.decode(ids, skip_special_tokens=False)


def test_runner_tokenizer_drops_an_empty_normalizer_sequence_and_keeps_the_ids(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from edgekit.package import runner_tokenizer

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, " ": 3, "<unk>": 4}, merges=[("a", "b")],
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    texts = ["ab ab", "ba", "abab b a"]
    before = [tok.encode(t).ids for t in texts]
    assert json.loads(path.read_text())["normalizer"] == {"type": "Sequence", "normalizers": []}
    assert runner_tokenizer(path) and json.loads(path.read_text())["normalizer"] is None
    assert [Tokenizer.from_file(str(path)).encode(t).ids for t in texts] == before
    assert not runner_tokenizer(path)  # nothing left to change


@pytest.mark.parametrize("fmt", ["gguf", "onnx", pytest.param("executorch", marks=EXECUTORCH_EXPORT)])
def test_bundle_folder_and_tarball_verify(bundles, fmt):
    for where in (bundles[fmt]["path"], bundles[fmt]["tarball"]):
        result = verify(Path(where))
        assert result["ok"] and result["problems"] == []
        assert set(result["files"]) == set(bundles[fmt]["manifest"]["files"])


def test_a_tampered_file_fails_verification_naming_it(bundles, tmp_path):
    folder = _copy(bundles["gguf"], tmp_path)
    with open(folder / "model.gguf", "r+b") as f:  # same size, one byte flipped
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (folder / "extra.bin").write_bytes(b"smuggled")
    result = verify(folder, strict=False)
    assert not result["ok"]
    assert any(p.startswith("model.gguf: sha256") for p in result["problems"])
    assert any(p.startswith("extra.bin: not listed") for p in result["problems"])
    with pytest.raises(ConfigError, match="model.gguf") as e:
        verify(folder)
    assert "\n" not in str(e.value)

    tarball = tmp_path / "tampered.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    with pytest.raises(ConfigError, match="model.gguf: sha256"):
        verify(tarball)


def test_a_missing_file_or_manifest_is_reported(bundles, tmp_path):
    folder = _copy(bundles["onnx"], tmp_path)
    (folder / "genai_config.json").unlink()
    assert verify(folder, strict=False)["problems"] == ["genai_config.json: missing"]
    (folder / "manifest.json").unlink()
    assert verify(folder, strict=False)["problems"] == ["manifest.json: missing"]


def _evil_tar(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("bundle/manifest.json")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"{}"))
        for m in members:
            tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def _file(name: str, size: int = 4) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, reason", [
    (_file("bundle/../evil"), "'..'"),
    (_file("/tmp/evil-absolute"), "absolute path"),
    (_link("bundle/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (_link("bundle/hard", tarfile.LNKTYPE, "bundle/manifest.json"), "hard link"),
    (_link("bundle/dev", tarfile.CHRTYPE, ""), "device"),
    (_file("other/file"), "outside the bundle's top folder"),
    (_file("loose-file"), "outside the bundle's top folder"),
])
def test_unsafe_archive_members_are_refused_before_anything_is_extracted(tmp_path, monkeypatch, member, reason):
    tarball = _evil_tar(tmp_path / "evil.tar.gz", member)
    scratch = tmp_path / "scratch"  # where verify() would extract
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(scratch)
    with pytest.raises(ConfigError, match=reason) as e:
        verify(tarball)
    msg = str(e.value)
    assert repr(member.name) in msg and "nothing was extracted" in msg and "\n" not in msg
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-absolute").exists()


def test_oversized_archive_is_refused(bundles, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(ConfigError, match="byte limit"):
        verify(Path(bundles["gguf"]["tarball"]), max_bytes=10_000)
    assert list(scratch.iterdir()) == []


def test_packaging_something_that_is_no_export_is_a_one_line_config_error(tmp_path, tiny_bpe_llama_dir):
    not_artifact = tmp_path / "plain"
    not_artifact.mkdir()
    distill = tmp_path / "distill-123"
    distill.mkdir()
    artifact.write_manifest(distill, "distill", {})
    for path in (not_artifact, distill, tmp_path / "missing", tiny_bpe_llama_dir):
        with pytest.raises(ConfigError) as e:
            package(path, out_dir=tmp_path / "out")
        assert str(path) in str(e.value) and "edgekit export" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_packaging_a_damaged_export_is_refused(exports, tmp_path):
    damaged = tmp_path / exports["gguf"].name
    shutil.copytree(exports["gguf"], damaged)
    (damaged / "model.gguf").write_bytes(b"GGUF truncated")
    with pytest.raises(ConfigError, match="damaged.*model.gguf"):
        package(damaged, out_dir=tmp_path / "out")
