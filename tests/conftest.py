"""Shared fixtures. Tests never reach the network: the hub is forced offline here."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("EDGEKIT_QUIET", "1")

from edgekit.arch import Architecture  # noqa: E402


# ExecuTorch is an optional extra (pyproject `executorch`): without it, the tests that export or run a .pte are
# skipped with this reason (shown by -ra), and everything else still runs.
def _executorch_missing() -> str | None:
    try:
        found = importlib.util.find_spec("executorch") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "the optional ExecuTorch extra is not installed (pip install -e '.[executorch]')"


EXECUTORCH_MISSING = _executorch_missing()
needs_executorch = pytest.mark.skipif(EXECUTORCH_MISSING is not None, reason=EXECUTORCH_MISSING or "")


# Tests that build a .pte: ExecuTorch's lowering passes take ~30-40 s even for the tiny model (2-core machine), so
# these run in the full suite (`make test`) and stay out of the fast one: `pytest.param(..., marks=EXECUTORCH_EXPORT)`
# or `@pytest.mark.slow` next to the module's `needs_executorch`.
EXECUTORCH_EXPORT = [needs_executorch, pytest.mark.slow]


def skip_without_executorch() -> None:
    """In a fixture: skip every test that uses it when the ExecuTorch extra is missing."""
    if EXECUTORCH_MISSING:
        pytest.skip(EXECUTORCH_MISSING)

# SmolLM2-135M-Instruct, as its config.json and GGUF header state it.
SMOLLM2 = Architecture(layers=30, hidden_size=576, intermediate_size=1536, heads=9, kv_heads=3, head_dim=64,
                       vocab_size=49152, tie_embeddings=True, max_context=8192)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty EDGEKIT_HOME for one test."""
    h = tmp_path / "edgekit-home"
    monkeypatch.setenv("EDGEKIT_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def teacher_home(tmp_path_factory) -> Path:
    """An EDGEKIT_HOME shared by the slow tests, so the embedded teacher is converted once per session."""
    return tmp_path_factory.mktemp("teacher-home")


def resolved_in(home: Path, spec: str):
    """Yield the teacher ``spec`` resolved (converted on first use) with EDGEKIT_HOME set to ``home``."""
    from edgekit.models import resolve_teacher

    old = os.environ.get("EDGEKIT_HOME")
    os.environ["EDGEKIT_HOME"] = str(home)
    try:
        yield resolve_teacher(spec)
    finally:
        if old is None:
            os.environ.pop("EDGEKIT_HOME", None)
        else:
            os.environ["EDGEKIT_HOME"] = old


@pytest.fixture(scope="session")
def teacher(teacher_home):
    """The real embedded teacher, resolved (converted on first use) in the session's home."""
    yield from resolved_in(teacher_home, "default")


def _tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved as a safetensors HF folder, with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    _tiny_tokenizer(folder, 256)
    return folder


@pytest.fixture
def tiny_copy(tiny_llama_dir, tmp_path) -> Path:
    """A writable copy of the tiny model folder, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tiny_bpe_tokenizer(folder: Path, vocab_size: int) -> None:
    """A real byte-level BPE (GPT-2 style, like SmolLM2's), trained on a few sentences, with ChatML specials."""
    from tests.families import byte_level_bpe

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
              "Quantization trades bits for accuracy; distillation trades size for speed.",
              "def add(a, b):\n    return a + b\n", "1234567890 apples and 42 oranges"] * 20
    byte_level_bpe(folder, vocab_size, CHATML, corpus)


@pytest.fixture(scope="session")
def tiny_bpe_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64, vocab 320) with a byte-level BPE tokenizer and a ChatML template.

    Unlike ``tiny_llama_dir`` (word-level tokenizer), llama.cpp and onnxruntime-genai can load its tokenizer,
    so exporters round-trip it end to end.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-bpe-llama")
    _tiny_bpe_tokenizer(folder, 320)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_bpe_other_dir(tmp_path_factory, tiny_bpe_llama_dir) -> Path:
    """Another tiny random Llama with ``tiny_bpe_llama_dir``'s tokenizer and shape but other weights (seed 1): a
    different model over the same vocabulary, e.g. a teacher the first one was not distilled from."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-bpe-other")
    for f in tiny_bpe_llama_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, folder / f.name)
    torch.manual_seed(1)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_bpe_llama_dir)).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(family)``: a tiny random model of ``family`` (see tests/families.py), built once per session."""
    from tests.families import build_tiny

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


# --------------------------------------------------------------------------- the export store
#
# Exports of the tiny models are the most repeated setup in the suite: a dozen test files need the same
# GGUF / ONNX / ExecuTorch folders. The store builds each one once per test session, keyed by content:
# (the model folder's files, the level, format, quant and options). Two levels:
#
# - ``tiny_export(model, fmt, quant, **config)``: an export *artifact* made by the export stage
#   (``edgekit.export.pipeline.run``) in the store's own EDGEKIT_HOME, with its ``manifest.json``;
# - ``exporter_output(model, fmt, quant, **options)``: the bare output of the format's exporter function
#   (``export_gguf`` / ``export_onnx`` / ``export_executorch``) and the summary it returned.
#
# While the store runs the export stage, the stage's calls of the exporter functions are answered from the
# exporter level (the stage still lays out, hashes and renames its own folder), so an export that an exporter
# test already made is not made again for a stage test.
#
# Both return the stored path itself: tests only read it. A test that damages, renames or adds files works on
# ``writable_copy(path, tmp_path)``. As a safety net the store remembers every file's size and mtime and rebuilds
# an entry that a test changed anyway. Under pytest-xdist the workers share one store (a file lock
# per entry), so each export is still built once per run.


def _model_key(folder: Path) -> str:
    """A model folder's content: sha256 of each file (size and mtime for files over 64 MB, e.g. the teacher)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        st = p.stat()
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        if st.st_size > 64 << 20:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@contextlib.contextmanager
def _edgekit_home(home: Path):
    old = os.environ.get("EDGEKIT_HOME")
    os.environ["EDGEKIT_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDGEKIT_HOME", None)
        else:
            os.environ["EDGEKIT_HOME"] = old


# format -> (module, function) of its exporter
EXPORTERS = {"gguf": ("edgekit.export.gguf", "export_gguf"), "onnx": ("edgekit.export.onnx", "export_onnx"),
             "executorch": ("edgekit.export.executorch", "export_executorch")}


class ExportStore:
    """Exports built once per session, content-addressed; see the comment above."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "edgekit-home"  # EDGEKIT_HOME of the export stage's artifacts
        self._done: dict[str, tuple[object, dict]] = {}  # key -> (result, snapshot of its files)
        self._real: dict[str, object] = {}  # format -> the exporter function, while the stage's calls are patched
        root.mkdir(parents=True, exist_ok=True)

    def _get(self, level: str, model: Path, fmt: str, quant: str | None, options: dict, build):
        key = hashlib.sha256(json.dumps([level, _model_key(model), fmt, quant, options], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        if key in self._done:
            result, snap = self._done[key]
            path = result[0] if isinstance(result, tuple) else result
            if path.exists() and _snapshot(path) == snap:
                return result
        with open(self.root / f"{key}.lock", "w") as lock:  # another xdist worker may be building the same entry
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = build(self.root / key)
        path = result[0] if isinstance(result, tuple) else result
        self._done[key] = (result, _snapshot(path))
        return result

    def stage(self, model: Path, fmt: str, quant: str | None = None, **config) -> Path:
        """The export stage's artifact folder for ``ExportConfig(model=model, format=fmt, quant=quant, **config)``."""

        def build(_):
            from edgekit.export.pipeline import ExportConfig, run

            # the stage reuses an intact artifact (and rebuilds a damaged one)
            with _edgekit_home(self.home), self._exporters_from_store():
                return Path(run(ExportConfig(model=str(model), format=fmt, quant=quant, **config))["path"])

        return self._get("stage", model, fmt, quant, config, build)

    def exporter(self, model: Path, fmt: str, quant: str, **options) -> tuple[Path, dict]:
        """``(path, summary)`` of the format's exporter function run on ``model`` (a folder; a file for gguf)."""

        def build(folder: Path):
            done = folder / "summary.json"
            out = folder / (f"model-{quant}.gguf" if fmt == "gguf" else quant)
            if done.is_file() and out.exists():  # built by another xdist worker
                return out, json.loads(done.read_text())
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            export = self._real.get(fmt) or getattr(importlib.import_module(EXPORTERS[fmt][0]), EXPORTERS[fmt][1])
            summary = export(model, out, quant, progress=False, **options)
            done.write_text(json.dumps(summary, default=str))
            return out, summary

        options = {k: v for k, v in options.items() if v is not None}  # an omitted option is the same export
        return self._get("exporter", Path(model), fmt, quant, options, build)

    @contextlib.contextmanager
    def _exporters_from_store(self):
        """Answer the export stage's calls of ``export_gguf`` / ``export_onnx`` / ``export_executorch`` from
        :meth:`exporter` (a copy of the stored output), for as long as the stage runs."""
        patched = []
        for fmt, (module, name) in EXPORTERS.items():
            try:
                mod = importlib.import_module(module)
            except ImportError:  # e.g. the executorch extra is missing
                continue
            real = getattr(mod, name, None)
            if real is None or fmt in self._real:
                continue

            def from_store(model_dir, out, quant, *, progress=True, _fmt=fmt, **options):
                src, summary = self.exporter(Path(model_dir), _fmt, quant, **options)
                if src.is_dir():
                    shutil.copytree(src, out)
                else:
                    shutil.copy2(src, out)
                return copy.deepcopy(summary)

            self._real[fmt] = real
            setattr(mod, name, from_store)
            patched.append((fmt, mod, name, real))
        try:
            yield
        finally:
            for fmt, mod, name, real in patched:
                setattr(mod, name, real)
                del self._real[fmt]


@pytest.fixture(scope="session")
def export_store(tmp_path_factory) -> ExportStore:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker has its own basetemp under one shared parent
        base = base.parent
    return ExportStore(base / "export-store")


@pytest.fixture(scope="session")
def tiny_export(export_store):
    """``tiny_export(model_dir, fmt, quant=None, **config) -> Path``: an export artifact, built once per session."""
    return export_store.stage


@pytest.fixture(scope="session")
def exporter_output(export_store):
    """``exporter_output(model_dir, fmt, quant, **options) -> (path, summary)``: an exporter's bare output, once."""
    return export_store.exporter


def writable_copy(src: Path, tmp_path: Path) -> Path:
    """A private copy of a stored export (file or folder) under ``tmp_path``, for tests that change it."""
    dst = tmp_path / Path(src).name
    if Path(src).is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst
