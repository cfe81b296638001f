"""Runtimes: what runs an exported model, each in one module of this package.

A :class:`Runtime` describes one runtime (``llama.cpp``, ``onnxruntime``, ``onnxruntime-genai``,
``executorch``, ``pytorch``): the formats it runs, the module to import, the pip package and the
minimum version, whether it can use a GPU here, how to open a session on an artifact, and what an
app bundle ships to run its formats (a :class:`Loader`: example script, export files, notes). Each
runtime module defines ONE session type and registers its descriptor through its own entry
point in the ``edgekit`` group, exactly as a third-party runtime would (see :mod:`edgekit.registry`).

A session is a loaded model, batch 1, greedy. Every caller -- benchmarks, fidelity, the exporters'
load checks, doctor -- goes through it:

- ``tokenize(text) -> ids`` with the model's own tokenizer, no special tokens;
- ``logits(ids) -> [len(ids), vocab]`` float32, a fresh sequence (open with ``all_logits=True``
  for runtimes that only keep the last position otherwise);
- ``prefill(ids) -> token``: start a fresh sequence, run the whole prompt, return the first greedy
  token (the argmax of the last position's logits);
- ``decode(n) -> [token] * n``: ``n`` more greedy tokens, one forward pass each; it never stops at
  EOS, so every benchmark repeat decodes exactly the same count;
- ``generate(ids, n, eos_ids=()) -> tokens``: up to ``n`` greedy tokens after ``ids``, stopping
  after one in ``eos_ids``;
- ``close()``; ``context``: positions the model handles (prompt + generated), None if unknown.

The ``pytorch`` format means an HF folder: given an export artifact, the PyTorch reference runs
the float model the export came from (``config.model_path`` in its manifest), in fp32.

Importing this package (or any runtime module in it) imports no runtime library and no torch:
``available()`` only looks for the module, so listing runtimes stays cheap and a missing runtime
is a reason, not a crash.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekit import artifact, registry
from edgekit.arch import Architecture
from edgekit.errors import ConfigError, ModelError, one_line

NO_GPU = "not available on this host"
LOADERS = Path(__file__).resolve().parent.parent / "resources" / "loaders"  # edgekit's standalone example loaders


class Session(Protocol):
    """A loaded model, batch 1, greedy (see the module docstring)."""

    context: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def logits(self, ids: list[int]) -> Any: ...

    def prefill(self, ids: list[int]) -> int: ...

    def decode(self, n: int) -> list[int]: ...

    def generate(self, ids: list[int], n: int, eos_ids=()) -> list[int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Source:
    """What an artifact path holds, as a runtime needs it."""

    path: Path  # the artifact folder (or the HF folder itself)
    format: str  # gguf | onnx | pytorch | ...
    quant: str
    label: str
    model: Path  # what the format's runtime loads: the .gguf file, the ONNX folder, the HF folder
    source_model: Path | None  # the float HF folder it came from (for the PyTorch reference)
    file_bytes: int | None
    params: int | None


@dataclass(frozen=True)
class Loader:
    """What an app bundle (:mod:`edgekit.package`) ships to run an export on this runtime.

    ``script`` is a standalone example loader (it needs only the runtime, never edgekit), copied into
    the bundle under its own name; a plugin points it at a file of its own package. ``files`` are the
    export's files the runtime loads besides the manifest's ``model_file`` (a name must be there; a
    glob pattern copies whatever matches). ``min_version`` is the oldest runtime version the script
    works with (default: the runtime's ``min_version``). ``note`` is a paragraph for the bundle's
    README; ``{loader}`` and ``{context}`` are filled in.
    """

    script: Path
    files: tuple[str, ...] = ()
    min_version: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Runtime:
    """One runtime: what it runs, what it needs installed, and how to open a :class:`Session`."""

    name: str
    formats: tuple[str, ...]
    module: str  # must be importable for the runtime to be usable
    package: str  # pip distribution: the install hint and the version
    open: Callable[..., Session] = field(repr=False)  # open(model, threads, *, gpu, context[, all_logits])
    probe_gpu: Callable[[], str | None] | None = field(default=None, repr=False)
    gpu_variant: bool = False  # benchmarks list a GPU row for it (measured when a GPU is there)
    description: str = ""
    min_version: str | None = None  # oldest ``package`` version edgekit works with
    full_logits: bool = True  # its sessions give every position's logits (fidelity needs them)
    loader: Loader | None = None  # what an app bundle ships to run its formats on it; None: bundles only list it
    # Opt-in runtimes (the browser ones) are measured only when named: never picked to run a format, listed in a
    # bundle, counted on a host or benchmarked by default.
    opt_in: bool = False
    check: Callable[[], str | None] | None = field(default=None, repr=False)  # what else it needs: None or why not
    version_of: Callable[[], str | None] | None = field(default=None, repr=False)  # its version, if not a pip one
    # measure(worker_spec, prompt_text) -> the bench worker's result, for a runtime without token-level sessions
    measure: Callable[..., dict] | None = field(default=None, repr=False)

    def available(self) -> str | None:
        """None when the runtime can be imported (at ``min_version`` or later), else why not and the fix."""
        try:
            found = importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or sys.modules holds None
            found = False
        if not found:
            return f"{self.name} is not installed: pip install {self.package}"
        if self.check is not None:
            reason = self.check()
            if reason:
                return reason
        version = self.version()
        if self.min_version and version and _version_key(version) < _version_key(self.min_version):
            return (f"{self.name} needs {self.package} {self.min_version} or later, this is {version}: "
                    f"pip install '{self.package}>={self.min_version}'")
        return None

    def gpu_available(self) -> str | None:
        """None when this runtime can use a GPU here, else ``"not available on this host: <why>"``."""
        missing = self.available()
        if missing:
            return f"{NO_GPU}: {missing}"
        if self.probe_gpu is None:
            return f"{NO_GPU}: edgekit runs {self.name} on the CPU only"
        try:
            return self.probe_gpu()
        except Exception as e:  # a runtime's own probe failing is an answer too
            return f"{NO_GPU}: {self.name}'s GPU check failed ({one_line(e)})"

    def version(self) -> str | None:
        return self.version_of() if self.version_of is not None else package_version(self.package)

    def session(self, artifact_path: Path, threads: int | None, *, gpu: bool = False, context: int | None = None,
                all_logits: bool = False) -> Session:
        """Load ``artifact_path`` (an export folder, or an HF folder for ``pytorch``) on ``threads`` threads.

        ``context`` is the most positions the caller will use (prompt + new tokens); runtimes that
        size a cache up front (llama.cpp, onnxruntime-genai) allocate that much. ``all_logits``: the
        caller wants :meth:`Session.logits` of every position (llama.cpp keeps only the last otherwise).
        """
        src = describe(artifact_path)
        extra = {"all_logits": True} if all_logits else {}
        return self.open(self.target(src), threads, gpu=gpu, context=context, **extra)

    def target(self, src: Source) -> Path:
        """The file or folder this runtime loads for ``src``."""
        if src.format in self.formats:
            return src.model
        if "pytorch" in self.formats and src.source_model is not None:
            return src.source_model
        able = [r.name for r in runtimes().values() if r.can_run(src)]
        raise ConfigError(f"runtime {self.name} cannot run {src.path}: it runs {', '.join(self.formats)}, not "
                          f"{src.format}; pick one of {', '.join(able) or '(none registered)'}")

    def can_run(self, src: Source) -> bool:
        return src.format in self.formats or ("pytorch" in self.formats and src.source_model is not None)


def register_runtime(runtime: Runtime) -> Runtime:
    """Register ``runtime`` directly (code that is not an installed plugin: a test, a benchmark worker's module)."""
    return registry.REGISTRY.add(registry.RUNTIME, runtime.name, runtime)


def runtimes(*, opt_in: bool = True) -> dict[str, Runtime]:
    """Every registered runtime, the opt-in ones (measured only when named, see Runtime.opt_in) last; ``opt_in=False``
    leaves those out."""
    every = registry.items(registry.RUNTIME)
    later = {n: r for n, r in every.items() if getattr(r, "opt_in", False)}
    return {**{n: r for n, r in every.items() if n not in later}, **(later if opt_in else {})}


def get_runtime(name: str) -> Runtime:
    return registry.get(registry.RUNTIME, name, what="runtime")


def for_format(fmt: str, *, full_logits: bool = False) -> Runtime:
    """The first registered runtime that runs ``fmt`` and is installed (built-ins first).

    ``full_logits``: only a runtime whose sessions give every position's logits will do.
    """
    able = [r for r in runtimes(opt_in=False).values() if fmt in r.formats and (r.full_logits or not full_logits)]
    for runtime in able:
        if runtime.available() is None:
            return runtime
    if able:
        raise ModelError(f"no installed runtime runs {fmt}: {'; '.join(r.available() for r in able)}")
    what = "gives every position's logits for" if full_logits else "runs"
    raise ModelError(f"no registered runtime {what} the {fmt} format; install a plugin package that adds one")


def for_bundle(fmt: str) -> list[Runtime]:
    """Every registered runtime that runs ``fmt``, those with a :class:`Loader` first (registration order within).

    Installed or not: a bundle runs on another machine. The first one with a loader is the bundle's
    primary runtime; an empty list, or one without a loader, means ``fmt`` cannot be bundled.
    """
    able = [r for r in runtimes(opt_in=False).values() if fmt in r.formats]
    return [r for r in able if getattr(r, "loader", None)] + [r for r in able if not getattr(r, "loader", None)]


def describe(path: Path) -> Source:
    """Read an export artifact's manifest (or an HF folder's config.json) into a :class:`Source`."""
    path = Path(path)
    is_hf = (path / "config.json").is_file()
    if (path / artifact.MANIFEST).is_file() and not (is_hf and artifact.read_manifest(path).get("stage") != "export"):
        m = artifact.read_manifest(path)
        if m.get("stage") != "export" or "format" not in m:
            raise ConfigError(f"{path} is a {m.get('stage')!r} artifact, not an export; benchmark the folder "
                              "`edgekit export` wrote (export-<id>/)")
        fmt = m["format"]
        model = path / m["model_file"] if fmt == "gguf" else path
        source = m.get("config", {}).get("model_path")
        metrics = m.get("metrics", {})
        return Source(path=path, format=fmt, quant=m.get("quant", "?"), label=m.get("label", f"{fmt}-{m.get('quant')}"),
                      model=model, source_model=Path(source) if source else None,
                      file_bytes=metrics.get("size_bytes"), params=metrics.get("params"))
    if is_hf:  # an HF folder (a teacher cache or a distilled student are ones too): the PyTorch reference
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        try:
            params = Architecture.from_hf_config(cfg, str(path / "config.json")).params
        except ModelError:
            params = None
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
        return Source(path=path, format="pytorch", quant="fp32", label="pytorch-fp32", model=path, source_model=path,
                      file_bytes=sum(p.stat().st_size for p in weights) or None, params=params)
    raise ConfigError(f"{path} is neither an export artifact (no manifest.json) nor an HF model folder "
                      "(no config.json); pass an export-<id>/ folder from `edgekit export`")


def package_version(package: str) -> str | None:
    """The installed version of a distribution (``onnxruntime-genai``), or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_key(version: str) -> tuple[int, ...]:
    """``"0.3.16.post1"`` -> (0, 3, 16): release numbers only, enough to compare with a minimum."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0].split("-")[0])[:4])


def open_export(folder: Path, context: int, threads: int | None = None) -> tuple[Session, dict]:
    """A session on an export artifact folder, in the first installed runtime that scores its format (every
    position's logits), and its manifest.

    The ``.pte`` returns last-position logits only, so ExecuTorch's full-sequence logits take one program
    call per token.
    """
    folder = Path(folder)
    manifest = artifact.read_manifest(folder)
    if manifest.get("stage") != "export":
        raise ModelError(f"{folder} is a {manifest.get('stage')!r} artifact, not an export; pass folders made by "
                         "`edgekit export` / `edgekit quantize`")
    runtime = for_format(manifest["format"], full_logits=True)
    return runtime.session(folder, threads, context=context, all_logits=True), manifest


def greedy(session: Session, ids: list[int], n: int, eos_ids=()) -> list[int]:
    """Up to ``n`` greedy tokens after ``ids`` through ``prefill`` / ``decode``; stops after one in ``eos_ids``."""
    stop = {int(i) for i in eos_ids}
    out: list[int] = []
    if n <= 0:
        return out
    out.append(session.prefill(list(ids)))
    while len(out) < n and out[-1] not in stop:
        out.extend(session.decode(1))
    return out


def hf_tokenizer(folder: Path) -> Callable[[str], list[int]]:
    """Token ids of a text with the folder's tokenizer.json (the light ``tokenizers`` library), no specials."""
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(folder))
    return lambda text: auto(text, add_special_tokens=False).input_ids


@dataclass
class GenerationStats:
    """Timings of a session's last ``generate`` (or ``logits``) call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one entry per decoded token after the first

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": round(self.prefill_s, 6), "decode_s_total": round(sum(self.decode_s), 6),
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2)}
