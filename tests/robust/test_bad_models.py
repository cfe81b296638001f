"""Corrupt and hostile model files are refused with one clear line, before anything big is allocated or any code runs.

Every damaged file is made from a real small one -- the tiny random Llama's safetensors, a GGUF
and an ONNX export of the tiny BPE Llama (made once per session through the export stage), and
a small ``.pte`` written by ExecuTorch itself -- and fed to the command a user would run
(``edgekit teacher``, ``export``, ``bench``, ``fidelity``). Each must exit 2 with one
``edgekit: error:`` line naming the file, no traceback, the input untouched and no new artifact
(:func:`tests.robust.clean.assert_clean_failure`). The checks in :mod:`edgekit.integrity` are
also shown to accept the good files, so they can fail in both directions.

Hostile folders: pickle weights are never unpickled (the test pickle would create a marker
file), a folder's own Python code never runs without ``--trust-remote-code`` (and the flag logs
a loud warning), and no source file in the package loads a pickle.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from edgekit import integrity
from edgekit.cli import main
from edgekit.errors import ModelError
from tests.conftest import skip_without_executorch
from tests.export.test_onnx import DAMAGES, damaged_copy
from tests.robust.clean import assert_clean_failure

PACKAGE = Path(__file__).resolve().parents[2] / "edgekit"


# --------------------------------------------------------------------------- good files, made once


@pytest.fixture(scope="session")
def exports(tiny_bpe_llama_dir, tiny_export) -> dict[str, Path]:
    """A GGUF (f16) and an ONNX (fp32) export artifact of the tiny BPE Llama, through the export stage, once
    (the session's export store; tests damage copies)."""
    return {fmt: tiny_export(tiny_bpe_llama_dir, fmt, quant) for fmt, quant in (("gguf", "f16"), ("onnx", "fp32"))}


@pytest.fixture(scope="session")
def pte_bytes() -> bytes:
    """A small program written by ExecuTorch 1.5 itself (one matmul; a fraction of a second to lower)."""
    skip_without_executorch()
    import torch
    from executorch.exir import to_edge

    class MatMul(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.w

    return to_edge(torch.export.export(MatMul(), (torch.randn(2, 8),))).to_executorch().buffer


@pytest.fixture
def et_export(pte_bytes, tiny_bpe_llama_dir, tmp_path) -> Path:
    """An ExecuTorch export folder as `edgekit export --format executorch` lays it out, around the small program."""
    folder = tmp_path / "export-et"
    folder.mkdir()
    (folder / "model.pte").write_bytes(pte_bytes)
    (folder / "executorch_config.json").write_text(json.dumps({"context": 32, "quant": "fp32"}))
    manifest = {"stage": "export", "format": "executorch", "quant": "fp32", "label": "executorch-fp32",
                "model_file": "model.pte", "files": {}, "config": {"model_path": str(tiny_bpe_llama_dir)},
                "metrics": {"size_bytes": len(pte_bytes)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def copy_export(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- the checks accept good files


def test_checks_accept_the_good_files(tiny_llama_dir, exports, pte_bytes, tmp_path):
    from gguf import GGUFReader
    from safetensors import safe_open

    weights = next(tiny_llama_dir.glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as f:
        want = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert integrity.check_safetensors(weights) == want
    assert integrity.check_weights_folder(tiny_llama_dir) == want

    gguf = exports["gguf"] / "model.gguf"
    assert integrity.check_gguf(gguf) == sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)

    model = exports["onnx"] / "model.onnx"
    assert integrity.check_onnx(model) > 0
    assert integrity.check_model_path(exports["onnx"]) == integrity.check_onnx(model)

    pte = tmp_path / "model.pte"
    pte.write_bytes(pte_bytes)
    assert pte_bytes[4:8] == b"ET12" and integrity.check_pte(pte) == len(pte_bytes)


def test_the_embedded_teachers_gguf_passes_quickly():
    from edgekit.models import embedded_gguf_path

    t = time.perf_counter()
    assert integrity.check_gguf(embedded_gguf_path()) > 90_000_000
    assert time.perf_counter() - t < 2  # header only: 49k tokens and merges are skipped, not read


def test_the_header_walk_reads_what_gguf_py_reads():
    """read_gguf (integrity.gguf_table's walk) against gguf-py's GGUFReader on the embedded teacher: every scalar and
    string value, the vocabulary's length and every tensor's name, type, shape and size."""
    from gguf import GGUFReader, GGUFValueType

    from edgekit.models import embedded_gguf_path
    from edgekit.quantize.gguf import read_gguf

    path = embedded_gguf_path()
    got, reader = read_gguf(path), GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    scalars = {k: f.contents() for k, f in fields.items() if f.types[0] != GGUFValueType.ARRAY}
    assert got["metadata"] == scalars and "tokenizer.chat_template" in scalars
    assert got["n_vocab"] == len(fields["tokenizer.ggml.tokens"].data) == 49152
    assert got["tensors"] == [{"name": t.name, "type": t.tensor_type.name.lower(), "shape": [int(d) for d in t.shape],
                               "nbytes": int(t.n_bytes)} for t in reader.tensors]
    assert integrity.gguf_table(path)["arrays"]["tokenizer.ggml.merges"] == len(fields["tokenizer.ggml.merges"].data)


def test_external_data_inside_the_folder_is_accepted(exports, tmp_path):
    folder = _external_copy(exports["onnx"], tmp_path)
    assert integrity.check_onnx(folder / "model.onnx") > 0


# --------------------------------------------------------------------------- safetensors


def _rewrite_header(path: Path, change) -> None:
    """Rewrite a safetensors header (``change`` edits the parsed dict), keeping the data section."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__")


SAFETENSORS_DAMAGES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "header_length_absurd": (lambda p: p.write_bytes(struct.pack("<Q", 1 << 62) + p.read_bytes()[8:]), "absurd"),
    "header_length_beyond_file": (lambda p: p.write_bytes(struct.pack("<Q", p.stat().st_size) + p.read_bytes()[8:]),
                                  "more than the"),
    "header_not_json": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{\x00\xffnot json" + p.read_bytes()[19:]),
                        "not JSON"),
    "offsets_beyond_file": (lambda p: _rewrite_header(p, lambda h: _first_tensor(h).update(
        data_offsets=[10**12, 10**12 + 4])), "ends at byte 1000000000004"),
    "tensor_dims_absurd": (lambda p: _rewrite_header(p, lambda h: _first_tensor(h).update(shape=[1 << 41, 64])),
                           "more than 2^40 elements"),
    "overlapping_offsets": (lambda p: _rewrite_header(p, lambda h: [v.update(data_offsets=[0, v["data_offsets"][1]
                                                                                            - v["data_offsets"][0]])
                                                                   for k, v in h.items() if k != "__metadata__"]),
                            "overlaps"),
    "unknown_dtype": (lambda p: _rewrite_header(p, lambda h: _first_tensor(h).update(dtype="F128")), "unknown dtype"),
}


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGES)
def test_damaged_safetensors_is_refused_by_teacher(capsys, home, tiny_copy, damage):
    weights = next(tiny_copy.glob("*.safetensors"))
    hurt, why = SAFETENSORS_DAMAGES[damage]
    hurt(weights)
    assert_clean_failure(capsys, ["teacher", "--teacher", tiny_copy], [str(weights), "safetensors", why, "re-download"],
                         watch=[tiny_copy], home=home)


def test_damaged_safetensors_is_refused_by_export_before_any_work(capsys, home, tiny_copy):
    weights = next(tiny_copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_clean_failure(capsys, ["export", tiny_copy, "--format", "gguf"], [str(weights), "truncated"],
                         watch=[tiny_copy], home=home)
    assert not (home / "artifacts").exists() or not any((home / "artifacts").iterdir())


def test_absurd_safetensors_dims_are_rejected_before_allocating(tiny_copy):
    weights = next(tiny_copy.glob("*.safetensors"))
    _rewrite_header(weights, lambda h: _first_tensor(h).update(shape=[1 << 30, 1 << 30]))
    _assert_rejected_fast(integrity.check_safetensors, weights, "2\\^40")


def _assert_rejected_fast(check, path: Path, fragment: str) -> None:
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(ModelError, match=fragment) as e:
            check(path)
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1 and peak < 16 * 2**20, (seconds, peak)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- GGUF


def _gguf_layout(path: Path) -> dict[str, int]:
    """Byte offsets inside a good GGUF (found with gguf-py, which is fine on a good file)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    name = r.fields["general.name"]
    tensor = r.tensors[0]
    name_len = len(tensor.name.encode())
    return {"kv": r.fields["tokenizer.ggml.tokens"].offset + 40,
            "infos": tensor.field.offset + 5,
            "data": r.data_offset + 64,
            # general.name: u64 key length, key, u32 type, then the value's u64 length
            "name_len": name.offset + 8 + len("general.name") + 4,
            # the first tensor info: u64 name length, name, u32 n_dims, then the u64 dims
            "dim0": tensor.field.offset + 8 + name_len + 4,
            "n_dims": len(tensor.shape)}


def _patch(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _gguf_damage(good: Path, damage: str) -> tuple[bytes, str]:
    data, at = good.read_bytes(), _gguf_layout(good)
    return {
        "truncated_header": (data[:14], "truncated in the header"),
        "truncated_kv_section": (data[:at["kv"]], "truncated in metadata 'tokenizer.ggml.tokens'"),
        "truncated_tensor_infos": (data[:at["infos"]], "truncated in tensor info"),
        "truncated_data": (data[:at["data"]], "needs bytes up to"),
        "truncated_last_bytes": (data[:-1000], "needs bytes up to"),
        "bad_magic": (_patch(data, 0, b"GGML"), "not a GGUF file"),
        "bad_version": (_patch(data, 4, struct.pack("<I", 7)), "version 7"),
        "absurd_tensor_count": (_patch(data, 8, struct.pack("<Q", 1 << 40)), "tensor count"),
        "absurd_dims": (_patch(data, at["dim0"], struct.pack("<Q", 1 << 45)), "more than 2^40 elements"),
        "dims_beyond_file": (_patch(data, at["dim0"] + 8 * (at["n_dims"] - 1), struct.pack("<Q", 1 << 20)),
                             "needs bytes up to"),
        "huge_kv_string_length": (_patch(data, at["name_len"], struct.pack("<Q", 1 << 60)),
                                  "claims 1152921504606846976 bytes"),
        "empty": (b"", "not a GGUF file"),
    }[damage]


GGUF_DAMAGES = ["truncated_header", "truncated_kv_section", "truncated_tensor_infos", "truncated_data",
                "truncated_last_bytes", "bad_magic", "bad_version", "absurd_tensor_count", "absurd_dims",
                "dims_beyond_file", "huge_kv_string_length", "empty"]


@pytest.mark.parametrize("damage", GGUF_DAMAGES)
def test_damaged_gguf_is_refused_by_teacher(capsys, home, exports, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data, why = _gguf_damage(exports["gguf"] / "model.gguf", damage)
    bad.write_bytes(data)
    assert_clean_failure(capsys, ["teacher", "--teacher", bad], [str(bad), "not a readable GGUF", why, "re-export"],
                         watch=[bad], home=home)
    assert not (home / "teachers").exists() or not any((home / "teachers").iterdir())


def test_absurd_gguf_dims_are_rejected_before_allocating(exports, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_gguf_damage(exports["gguf"] / "model.gguf", "absurd_dims")[0])
    _assert_rejected_fast(integrity.check_gguf, bad, "2\\^40")


@pytest.mark.parametrize("command", ["bench", "fidelity"])
def test_truncated_gguf_export_is_refused_by_bench_and_fidelity(capsys, home, exports, tmp_path, command):
    folder = copy_export(exports["gguf"], tmp_path)
    model = folder / "model.gguf"
    model.write_bytes(model.read_bytes()[:-5000])
    argv = ["bench", folder, "--runtimes", "llama.cpp", "--out", tmp_path / "report"] if command == "bench" else \
        ["fidelity", folder]
    assert_clean_failure(capsys, argv, [str(model), "not a readable GGUF"], watch=[folder], home=home)
    assert not (tmp_path / "report").exists()


def test_open_llama_checks_before_llama_cpp_sees_the_file(exports, tmp_path, monkeypatch):
    import llama_cpp

    from edgekit.runtimes.llamacpp import open_llama

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_gguf_damage(exports["gguf"] / "model.gguf", "absurd_dims")[0])
    monkeypatch.setattr(llama_cpp, "Llama", lambda *a, **k: pytest.fail("llama.cpp was handed the file"))
    with pytest.raises(ModelError, match="bad.gguf is not a readable GGUF"):
        open_llama(bad)


# --------------------------------------------------------------------------- ONNX


def _onnx_model(folder: Path):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _largest_initializer(model):
    return max(model.graph.initializer, key=lambda t: len(t.raw_data))


def _externalize(folder: Path, location: str, offset: int = 0) -> None:
    """Point the largest initializer's data at ``location`` (raw data dropped), as a hostile file would."""
    import onnx

    model = _onnx_model(folder)
    t = _largest_initializer(model)
    length = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    (folder / "model.onnx").write_bytes(model.SerializeToString())


def _external_copy(src: Path, tmp_path: Path) -> Path:
    """A copy of an ONNX export whose tensors live in model.onnx.data, the way large models are saved."""
    import onnx

    folder = copy_export(src, tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return folder


def _onnx_absurd_dims(folder: Path) -> None:
    model = _onnx_model(folder)
    t = _largest_initializer(model)
    del t.dims[:]
    t.dims.extend([1 << 30, 1 << 30, 4])
    (folder / "model.onnx").write_bytes(model.SerializeToString())


def _onnx_offset_beyond_file(folder: Path) -> None:
    import onnx

    model = _onnx_model(folder)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    size = (folder / "model.onnx.data").stat().st_size
    for entry in t.external_data:
        if entry.key == "offset":
            entry.value = str(size + 4096)
    (folder / "model.onnx").write_bytes(model.SerializeToString())


def _onnx_symlink_escape(folder: Path) -> None:
    outside = folder.parent / "outside.bin"
    outside.write_bytes(b"\x00" * (1 << 20))
    (folder / "weights.bin").symlink_to(outside)
    _externalize(folder, "weights.bin")


ONNX_DAMAGES = {
    "truncate": (lambda f: None, "does not parse"),
    "garbage": (lambda f: None, "does not parse"),
    "cut_tail": (lambda f: None, "ONNX model"),
    "initializer_dims_absurd": (_onnx_absurd_dims, "more than 2^40 elements"),
    "external_parent_path": (lambda f: _externalize(f, "../../etc/passwd"), "'../../etc/passwd'"),
    "external_absolute_path": (lambda f: _externalize(f, "/etc/passwd"), "'/etc/passwd'"),
    "external_symlink_escape": (_onnx_symlink_escape, "outside the model's folder"),
    "external_offset_beyond_file": (_onnx_offset_beyond_file, "is shorter than"),
    "external_file_missing": (lambda f: (f / "model.onnx.data").unlink(), "model.onnx.data is missing"),
}


def _onnx_damaged(exports, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    if damage in DAMAGES:  # the ONNX export tests' own damages: cut in half, garbage, last 1000 bytes gone
        return damaged_copy(exports["onnx"], "model.onnx", damage, tmp_path)
    if damage in ("external_offset_beyond_file", "external_file_missing"):
        folder = _external_copy(exports["onnx"], tmp_path)
    else:
        folder = copy_export(exports["onnx"], tmp_path)
    ONNX_DAMAGES[damage][0](folder)
    return folder, folder / "model.onnx"


@pytest.mark.parametrize("damage", ONNX_DAMAGES)
def test_damaged_onnx_is_refused_by_bench(capsys, home, exports, tmp_path, damage):
    folder, path = _onnx_damaged(exports, tmp_path, damage)
    assert_clean_failure(capsys, ["bench", folder, "--runtimes", "onnxruntime", "--out", tmp_path / "report"],
                         [str(path), ONNX_DAMAGES[damage][1], "export"], watch=[folder], home=home)
    assert not (tmp_path / "report").exists()


def test_hostile_onnx_is_refused_by_fidelity(capsys, home, exports, tmp_path):
    folder, path = _onnx_damaged(exports, tmp_path, "external_parent_path")
    assert_clean_failure(capsys, ["fidelity", folder], [str(path), "'../../etc/passwd'", "escapes"],
                         watch=[folder], home=home)


@pytest.mark.parametrize("damage", ["external_parent_path", "initializer_dims_absurd", "truncate"])
def test_onnxruntime_never_sees_a_refused_file(exports, tmp_path, monkeypatch, damage):
    import onnxruntime

    from edgekit.runtimes.onnxruntime import OrtSession as OrtLM

    folder, path = _onnx_damaged(exports, tmp_path, damage)
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: pytest.fail("onnxruntime got the file"))
    with pytest.raises(ModelError) as e:
        OrtLM(folder, threads=1)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_absurd_onnx_dims_are_rejected_before_allocating(exports, tmp_path):
    folder, path = _onnx_damaged(exports, tmp_path, "initializer_dims_absurd")
    _assert_rejected_fast(integrity.check_onnx, path, "2\\^40")


# --------------------------------------------------------------------------- ExecuTorch .pte


PTE_DAMAGES = {
    "truncated": (lambda b: b[: len(b) // 2], "truncated"),
    "segments_cut": (lambda b: b[:-16], "data segments need bytes"),
    "wrong_identifier": (lambda b: _patch(b, 4, b"ET11"), "another ExecuTorch schema version"),
    "not_a_pte": (lambda b: b"PK\x03\x04" + b"\x00" * 60, "not a .pte"),
    "empty": (lambda b: b"", "0 bytes"),
}


@pytest.mark.parametrize("damage", PTE_DAMAGES)
def test_damaged_pte_is_refused_by_bench(capsys, home, et_export, tmp_path, damage):
    pte = et_export / "model.pte"
    hurt, why = PTE_DAMAGES[damage]
    pte.write_bytes(hurt(pte.read_bytes()))
    assert_clean_failure(capsys, ["bench", et_export, "--runtimes", "executorch", "--out", tmp_path / "report"],
                         [str(pte), "not a readable ExecuTorch program", why, "export"], watch=[et_export], home=home)


@pytest.mark.parametrize("damage", ["truncated", "wrong_identifier"])
def test_etlm_checks_before_the_runtime_loads(et_export, monkeypatch, damage):
    from edgekit.runtimes import executorch as et

    pte = et_export / "model.pte"
    pte.write_bytes(PTE_DAMAGES[damage][0](pte.read_bytes()))
    monkeypatch.setattr(et, "_runtime", lambda: pytest.fail("ExecuTorch's runtime was handed the file"))
    with pytest.raises(ModelError, match="model.pte is not a readable ExecuTorch program"):
        et.EtSession(et_export, threads=1)


# --------------------------------------------------------------------------- hostile folders


class _Trap:
    """Unpickling this opens (creates) ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_pickle_trap_works(tmp_path):
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Trap(marker))).close()
    assert marker.exists()  # so the marker's absence below means the pickle was never loaded


@pytest.mark.parametrize("command", ["teacher", "export", "bench"])
def test_pickle_weights_are_refused_and_never_unpickled(capsys, home, tiny_copy, tmp_path, command):
    marker = tmp_path / "unpickled"
    for w in tiny_copy.glob("*.safetensors"):
        w.unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    argv = {"teacher": ["teacher", "--teacher", tiny_copy], "export": ["export", tiny_copy, "--format", "onnx"],
            "bench": ["bench", tiny_copy, "--runtimes", "pytorch", "--out", tmp_path / "report"]}[command]
    assert_clean_failure(capsys, argv, [str(tiny_copy), "pytorch_model.bin", "pickle weights are never loaded",
                                        "safe_serialization=True"], watch=[tiny_copy], home=home)
    assert not marker.exists()


def _remote_code_folder(folder: Path, marker: Path) -> None:
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("command", ["teacher", "export"])
def test_remote_code_needs_the_flag_and_never_runs_without_it(capsys, home, tiny_copy, tmp_path, command):
    marker = tmp_path / "imported"
    _remote_code_folder(tiny_copy, marker)
    argv = ["teacher", "--teacher", tiny_copy] if command == "teacher" else ["export", tiny_copy]
    assert_clean_failure(capsys, argv, [str(tiny_copy / "config.json"), "--trust-remote-code", "Python code"],
                         watch=[tiny_copy], home=home)
    assert not marker.exists()


def test_trust_remote_code_logs_a_loud_warning(capsys, caplog, home, tiny_copy, tmp_path):
    _remote_code_folder(tiny_copy, tmp_path / "imported")
    with caplog.at_level("WARNING", logger="edgekit"):
        rc = main(["teacher", "--teacher", str(tiny_copy), "--trust-remote-code", "--json"])
    assert rc == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("WARNING: --trust-remote-code") and str(tiny_copy) in m and "modeling_evil" in m
               for m in warnings), warnings


# --------------------------------------------------------------------------- no pickle anywhere in the package


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Calls in ``source`` that could unpickle: torch.load without weights_only=True, pickle/dill/joblib loads,
    np.load(allow_pickle=True)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle", "joblib") \
                and any(a.name in ("load", "loads", "Unpickler") for a in node.names):
            found.append(f"{filename}:{node.lineno}: from {node.module} import a loader")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        kw = {k.arg: k.value for k in node.keywords}

        def true(name: str) -> bool:
            return isinstance(kw.get(name), ast.Constant) and kw[name].value is True

        call = f"{owner}.{node.func.attr}"
        if call == "torch.load" and not true("weights_only"):
            found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        elif owner in ("pickle", "dill", "cloudpickle", "joblib") and node.func.attr in ("load", "loads", "Unpickler"):
            found.append(f"{filename}:{node.lineno}: {call}")
        elif call in ("np.load", "numpy.load") and "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            found.append(f"{filename}:{node.lineno}: {call} with allow_pickle")
    return found


def test_the_scanner_finds_every_unsafe_load():
    bad = ("import torch, pickle, numpy as np, joblib\nfrom pickle import loads\n"
           "torch.load('a')\ntorch.load('a', weights_only=False)\npickle.load(f)\npickle.loads(b)\n"
           "np.load('x.npy', allow_pickle=True)\njoblib.load('m')\n")
    good = ("import torch, numpy as np\ntorch.load('a', weights_only=True)\nnp.load('x.npy')\n"
            "np.load('x.npy', allow_pickle=False)\njson.loads(s)\n")
    assert len(unsafe_loads(bad)) == 7
    assert unsafe_loads(good) == []


def test_no_source_file_in_the_package_can_unpickle():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert found == []
