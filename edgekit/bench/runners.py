"""Bench runtimes: a small registry of runners, each able to load one model format and step it.

A :class:`Runner` names a runtime (``llama.cpp``, ``onnxruntime``, ``onnxruntime-genai``,
``executorch``, ``pytorch``), the formats it runs, and how to open a :class:`Session` on an artifact. A
session is the only thing the benchmark worker times:

- ``prefill(ids) -> token``: start a fresh sequence, run the whole prompt, return the first
  greedy token (the argmax of the last position's logits);
- ``decode(n) -> [token] * n``: ``n`` more greedy tokens, one forward pass each. It never
  stops at EOS, so every repeat decodes exactly the same count.

The ``pytorch`` format means an HF folder: given an export artifact, the PyTorch reference
runs the float model the export came from (``config.model_path`` in its manifest), in fp32.

Built-ins register through :func:`register`, this module's entry point in the ``edgekit`` group,
exactly as a third party would (see :mod:`edgekit.registry`). Importing this module imports no runtime: ``available()`` only looks
for the module, so listing runners stays cheap and a missing runtime is a reason, not a crash.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgekit import artifact, registry
from edgekit.errors import ConfigError, ModelError, one_line
from edgekit.integrity import check_model_path, check_weights_folder

log = logging.getLogger(__name__)

NO_GPU = "not available on this host"


class Session(Protocol):
    """A loaded model, batch 1, greedy."""

    context: int | None  # positions the model handles (prompt + generated), None if unknown

    def tokenize(self, text: str) -> list[int]: ...

    def prefill(self, ids: list[int]) -> int: ...

    def decode(self, n: int) -> list[int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Source:
    """What an artifact path holds, as the benchmark needs it."""

    path: Path  # the artifact folder (or the HF folder itself)
    format: str  # gguf | onnx | pytorch | ...
    quant: str
    label: str
    model: Path  # what the format's runner loads: the .gguf file, the ONNX folder, the HF folder
    source_model: Path | None  # the float HF folder it came from (for the PyTorch reference)
    file_bytes: int | None
    params: int | None


@dataclass(frozen=True)
class Runner:
    name: str
    formats: tuple[str, ...]
    module: str  # must be importable for the runner to be usable
    package: str  # pip distribution: the install hint and the version
    open: Callable[..., Session] = field(repr=False)  # open(model, threads, *, gpu, context) -> Session
    probe_gpu: Callable[[], str | None] | None = field(default=None, repr=False)
    gpu_variant: bool = False  # benchmarks list a GPU row for it (measured when a GPU is there)
    description: str = ""

    def available(self) -> str | None:
        """None when the runtime can be imported, else why not and the fix."""
        try:
            found = importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or sys.modules holds None
            found = False
        return None if found else f"{self.name} is not installed: pip install {self.package}"

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
        return package_version(self.package)

    def session(self, artifact_path: Path, threads: int, *, gpu: bool = False, context: int | None = None) -> Session:
        """Load ``artifact_path`` (an export folder, or an HF folder for ``pytorch``) on ``threads`` threads.

        ``context`` is the most positions the caller will use (prompt + new tokens); runtimes
        that size a cache up front (llama.cpp, onnxruntime-genai) allocate that much.
        """
        src = describe(artifact_path)
        return self.open(self.target(src), threads, gpu=gpu, context=context)

    def target(self, src: Source) -> Path:
        """The file or folder this runner loads for ``src``."""
        if src.format in self.formats:
            return src.model
        if "pytorch" in self.formats and src.source_model is not None:
            return src.source_model
        able = [r.name for r in runners().values() if r.can_run(src)]
        raise ConfigError(f"runtime {self.name} cannot run {src.path}: it runs {', '.join(self.formats)}, not "
                          f"{src.format}; pick one of {', '.join(able) or '(none registered)'}")

    def can_run(self, src: Source) -> bool:
        return src.format in self.formats or ("pytorch" in self.formats and src.source_model is not None)


def register_runner(runner: Runner) -> Runner:
    """Register ``runner`` directly (code that is not an installed plugin: a test, a benchmark worker's module)."""
    return registry.REGISTRY.add(registry.RUNTIME, runner.name, runner)


def runners() -> dict[str, Runner]:
    return registry.items(registry.RUNTIME)


def get_runner(name: str) -> Runner:
    return registry.get(registry.RUNTIME, name, what="runtime")


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
        from edgekit.arch import Architecture

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



def _genai_context(folder: Path) -> int | None:
    """``context_length`` from the folder's genai_config.json (the loaders have checked the file is there)."""
    try:
        return json.loads((Path(folder) / "genai_config.json").read_text(encoding="utf-8"))["model"]["context_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hf_tokenize(folder: Path) -> Callable[[str], list[int]]:
    """Token ids of a text with the folder's tokenizer.json (the light ``tokenizers`` library), no specials."""
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(folder))
    return lambda text: auto(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- llama.cpp


class _LlamaSession:
    def __init__(self, path: Path, threads: int, *, gpu: bool = False, context: int | None = None):
        import llama_cpp

        from edgekit.bench.llamacpp import last_logits, open_llama

        if gpu:
            raise ModelError("llama.cpp GPU offload is not wired yet: edgekit.bench.llamacpp.open_llama takes no "
                             "n_gpu_layers; benchmark llama.cpp on the CPU")
        self._logits = last_logits
        self.llm = open_llama(path, n_ctx=context or 2048, n_threads=threads)
        # open_llama sets n_threads only; llama-cpp-python defaults the batch (prefill) threads to every CPU.
        llama_cpp.llama_set_n_threads(self.llm.ctx, threads, threads)
        self.context = llama_cpp.llama_model_n_ctx_train(self.llm.model)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return int(self._logits(self.llm).argmax())

    def decode(self, n: int) -> list[int]:
        out = []
        token = int(self._logits(self.llm).argmax())
        for _ in range(n):
            self.llm.eval([token])
            token = int(self._logits(self.llm).argmax())
            out.append(token)
        return out

    def close(self) -> None:
        self.llm.close()


def _llama_gpu() -> str | None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return None
    return f"{NO_GPU}: this llama-cpp-python build has no GPU offload (rebuild with CMAKE_ARGS=-DGGML_CUDA=on)"


# --------------------------------------------------------------------------- onnxruntime (our KV-cache loop)


class _OrtSession:
    """The first token after the prompt is prefill's argmax; ``decode`` feeds each token back with the cache."""

    def __init__(self, folder: Path, threads: int, *, gpu: bool = False, context: int | None = None):
        from edgekit.bench.onnxruntime import OrtLM

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        self.lm = OrtLM(folder, threads=threads, providers=providers)
        self.context = _genai_context(folder)
        self._tokenize = _hf_tokenize(folder)
        self._past, self._pos, self._token = None, 0, None

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text)

    def prefill(self, ids: list[int]) -> int:
        logits, self._past = self.lm.forward(list(ids))
        self._pos, self._token = len(ids), int(logits[-1].argmax())
        return self._token

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            logits, self._past = self.lm.forward([self._token], self._past, self._pos)
            self._pos += 1
            self._token = int(logits[-1].argmax())
            out.append(self._token)
        return out

    def close(self) -> None:
        self._past = None
        del self.lm


def _ort_gpu() -> str | None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return None
    return (f"{NO_GPU}: onnxruntime has no CUDAExecutionProvider "
            f"(providers: {', '.join(onnxruntime.get_available_providers())}; install onnxruntime-gpu)")


# --------------------------------------------------------------------------- onnxruntime-genai


class _GenaiSession:
    """onnxruntime-genai's own loop; threads go in through a config overlay of the decoder's session options.

    Greedy search with ``min_length == max_length`` so generation never ends at EOS (genai then
    masks EOS out of the argmax: the one runtime where an EOS-wanting step picks the runner-up).
    """

    def __init__(self, folder: Path, threads: int, *, gpu: bool = False, context: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        limit = _genai_context(folder)
        # genai counts the sampled token in max_length, which may not exceed context_length: a prompt can fill
        # all but one position if a token is to follow it.
        self.context = limit - 1 if limit else None
        check_model_path(folder)  # the ONNX files, before onnxruntime-genai opens them
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                             "inter_op_num_threads": 1}}}}))
        if gpu:
            config.clear_providers()
            config.append_provider("cuda")
        try:
            self.model = og.Model(config)
        except Exception as e:  # og raises RuntimeError / OrtException with the loader's message
            raise ModelError(f"onnxruntime-genai cannot load {folder}: {one_line(e)}") from e
        self.max_length = min(context or limit or 2048, limit or 2048)
        self._tokenize = _hf_tokenize(folder)
        self.generator = None

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text)

    def prefill(self, ids: list[int]) -> int:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, min_length=self.max_length, do_sample=False,
                                  num_beams=1)
        self.generator = None  # free the previous sequence's cache before the next one
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(list(ids))
        return self._next()

    def decode(self, n: int) -> list[int]:
        return [self._next() for _ in range(n)]

    def _next(self) -> int:
        if self.generator.is_done():
            raise ModelError(f"onnxruntime-genai stopped at max_length {self.max_length}; pass a larger context")
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def close(self) -> None:
        self.generator = None
        del self.model


def _genai_gpu() -> str | None:
    import onnxruntime_genai as og

    if og.is_cuda_available():
        return None
    return f"{NO_GPU}: this onnxruntime-genai build has no CUDA (install onnxruntime-genai-cuda)"


# --------------------------------------------------------------------------- ExecuTorch (XNNPACK, CPU)


class _EtSession:
    """ExecuTorch's Python runtime on the .pte; the program holds its K/V cache, a new prompt restarts at 0."""

    def __init__(self, folder: Path, threads: int, *, gpu: bool = False, context: int | None = None):
        from edgekit.bench.executorch import EtLM

        if gpu:
            raise ModelError("edgekit's ExecuTorch programs are lowered to XNNPACK (CPU); a GPU needs a Vulkan, "
                             "MPS or Core ML export, which edgekit does not write yet")
        self.lm = EtLM(folder, threads=threads)
        self.context = self.lm.context
        self._tokenize = _hf_tokenize(folder)
        self._token = None

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text)

    def prefill(self, ids: list[int]) -> int:
        self._token = int(self.lm.prefill_logits(list(ids)).argmax())
        return self._token

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            self._token = int(self.lm.forward([self._token], self.lm.pos).argmax())
            out.append(self._token)
        return out

    def close(self) -> None:
        self.lm.close()


def _et_gpu() -> str | None:
    return f"{NO_GPU}: edgekit lowers ExecuTorch programs to XNNPACK, a CPU backend"


# --------------------------------------------------------------------------- PyTorch (the float reference)


class _TorchSession:
    """The HF model in fp32 with transformers' KV cache (``DynamicCache``), no ``generate()`` logic."""

    def __init__(self, folder: Path, threads: int, *, gpu: bool = False, context: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if gpu else "cpu"
        check_weights_folder(folder)  # safetensors only: a pickle-only folder is refused, never unpickled
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True
                                                          ).to(self.device).eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self._tokenize = _hf_tokenize(folder)
        self._past, self._token = None, None

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text)

    def _step(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids], device=self.device), past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        self._token = int(out.logits[0, -1].argmax())
        return self._token

    def prefill(self, ids: list[int]) -> int:
        from transformers import DynamicCache

        self._past = DynamicCache()
        return self._step(list(ids))

    def decode(self, n: int) -> list[int]:
        return [self._step([self._token]) for _ in range(n)]

    def close(self) -> None:
        self._past = None
        del self.model


def _torch_gpu() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
    return f"{NO_GPU}: {why}"


BUILTIN = (
    Runner("llama.cpp", ("gguf",), "llama_cpp", "llama-cpp-python", _LlamaSession, _llama_gpu,
               gpu_variant=True, description="llama.cpp through llama-cpp-python"),
    Runner("onnxruntime", ("onnx",), "onnxruntime", "onnxruntime", _OrtSession, _ort_gpu,
               gpu_variant=True, description="onnxruntime with edgekit's KV-cache loop (OrtLM)"),
    Runner("onnxruntime-genai", ("onnx",), "onnxruntime_genai", "onnxruntime-genai", _GenaiSession,
               _genai_gpu, description="onnxruntime-genai's generator"),
    Runner("executorch", ("executorch",), "executorch", "executorch", _EtSession, _et_gpu,
               description="ExecuTorch's Python runtime (XNNPACK delegate, portable + LLM kernels)"),
    Runner("pytorch", ("pytorch",), "torch", "torch", _TorchSession, _torch_gpu,
               description="the float HF model in PyTorch (fp32 reference)"),
)


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``): the built-in runtimes."""
    for runner in BUILTIN:
        reg.add(registry.RUNTIME, runner.name, runner)
