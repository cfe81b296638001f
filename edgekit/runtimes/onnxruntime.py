"""onnxruntime with edgekit's own KV-cache loop: runs an exported ONNX folder (model.onnx + genai_config.json).

:class:`OrtSession` needs only ``onnxruntime``: one prefill with an empty K/V cache, then one token per
step, feeding each ``present.*`` output back as the next ``past_key_values.*`` while
``attention_mask`` and ``position_ids`` grow. ``generate`` records prefill and per-token decode times.
The folder's input/output names come from ``genai_config.json`` (written by ``edgekit.export.onnx``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

from edgekit import registry
from edgekit.arch import DEFAULT_CONTEXT
from edgekit.errors import ModelError, one_line
from edgekit.integrity import load_checked_onnx
from edgekit.runtimes import NO_GPU, GenerationStats, Runtime, hf_tokenizer

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"


def read_genai_config(folder: Path) -> dict:
    """The folder's genai_config.json; a missing or broken one is a ModelError with the fix."""
    path = Path(folder) / GENAI_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelError(f"{path} is missing: {folder} is not an edgekit ONNX export; run the ONNX export again") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); run the ONNX export again") from e


def genai_context(folder: Path) -> int | None:
    """``context_length`` from the folder's genai_config.json, None when it has none."""
    try:
        return read_genai_config(folder)["model"]["context_length"]
    except (ModelError, KeyError, TypeError):
        return None


def check_onnx(path: Path) -> dict[str, int]:
    """Check that ``path`` (a model.onnx or its folder) is a whole ONNX model; return its op counts.

    Reads the protobuf and checks its tensors with :func:`edgekit.integrity.load_checked_onnx`
    (shapes, byte counts, external data inside the folder and long enough), then that every
    node input is defined. Raises ModelError with one line naming the file otherwise.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; export the model again (edgekit export --format onnx)")
    model = load_checked_onnx(path)
    problem = _graph_problem(model)
    if problem:
        raise ModelError(f"{path} is incomplete ({problem}); it is truncated or its data file is damaged: "
                         "delete the folder and export again")
    return op_counts(model)


def op_counts(model) -> dict[str, int]:
    """How many nodes of each op type the main graph has (sorted by name)."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _graph_problem(model) -> str | None:
    """A node reading a tensor nothing defines, or an output nothing computes (tensor bytes: edgekit.integrity)."""
    defined = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        for name in node.input:
            if name not in defined:
                return f"node {node.name or node.op_type} reads undefined tensor {name!r}"
        defined.update(node.output)
    for out in model.graph.output:
        if out.name not in defined:
            return f"output {out.name!r} is never computed"
    return None


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, always with the CPU provider as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtSession:
    """A decoder-only ONNX folder run with plain onnxruntime, batch 1.

    ``providers`` wins when given; else ``gpu`` True asks for CUDA (CPU as the fallback), False for the
    CPU only, and None takes :func:`default_providers`.
    """

    def __init__(self, folder: Path, threads: int | None = None, providers: list[str] | None = None, *,
                 gpu: bool | None = None, context: int | None = None, all_logits: bool = False):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        self.folder = Path(folder)
        genai = read_genai_config(self.folder)
        decoder = genai["model"]["decoder"]
        self.context = genai["model"].get("context_length")
        self.path = self.folder / decoder.get("filename", MODEL_FILE)
        check_onnx(self.path)
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        names_in, names_out = decoder["inputs"], decoder["outputs"]
        self.past_names = [(names_in["past_key_names"] % i, names_in["past_value_names"] % i)
                           for i in range(self.layers)]
        self.present_names = [(names_out["present_key_names"] % i, names_out["present_value_names"] % i)
                              for i in range(self.layers)]
        self.input_names = {k: names_in[k] for k in ("input_ids", "attention_mask", "position_ids") if k in names_in}
        self.logits_name = names_out["logits"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if providers:
            self.providers = list(providers)
        elif gpu is None:
            self.providers = default_providers()
        else:
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise ModelError(f"onnxruntime cannot load {self.path}: {one_line(e)}") from e
        past_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0][0])
        self.kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        self.output_names = [self.logits_name] + [n for pair in self.present_names for n in pair]
        # A GroupQueryAttention graph (genai's past_present_share_buffer) updates one preallocated cache in place:
        # prefill/decode bind the same buffer as past and present instead of copying a growing cache every step.
        # (CPU buffers: on CUDA the cache is fed as before.)
        self.shared = (bool(genai.get("search", {}).get("past_present_share_buffer"))
                       and self.providers[0] == "CPUExecutionProvider")
        self.buffer_len = min(context or self.context or DEFAULT_CONTEXT, self.context or DEFAULT_CONTEXT)
        self.stats = GenerationStats()
        self._tokenize = None
        self._past, self._pos, self._token, self._buffers, self._io = None, 0, None, None, None

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = hf_tokenizer(self.folder)
        return self._tokenize(text)

    def forward(self, ids: list[int], past: list | None = None, start: int = 0):
        """One run of the graph: logits ``[len(ids), vocab]`` and the new cache (``past`` None: empty).

        ``start`` is the number of positions already in ``past``; the cache is a list of (key, value)
        arrays per layer, ``[1, kv_heads, positions, head_dim]``.
        """
        np = self.np
        past = self._empty_past() if past is None else past
        n = len(ids)
        feed = {self.input_names["input_ids"]: np.asarray([ids], dtype=np.int64)}
        if "attention_mask" in self.input_names:
            feed[self.input_names["attention_mask"]] = np.ones((1, start + n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed[self.input_names["position_ids"]] = np.arange(start, start + n, dtype=np.int64)[None]
        for (k_name, v_name), (k, v) in zip(self.past_names, past):
            feed[k_name], feed[v_name] = k, v
        out = self.session.run(self.output_names, feed)
        return out[0][0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.layers)]

    def _empty_past(self) -> list:
        empty = self.np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [(empty, empty)] * self.layers

    def logits(self, ids: list[int]):
        """Logits ``[len(ids), vocab]`` (float32) of one prefill with an empty cache."""
        if not ids:
            raise ValueError("logits() needs at least one token id")
        t = time.perf_counter()
        logits, _ = self.forward(list(ids))
        self.stats = GenerationStats(prompt_tokens=len(ids), prefill_s=time.perf_counter() - t)
        return logits.astype(self.np.float32, copy=False)

    def prefill(self, ids: list[int]) -> int:
        if self.shared:
            logits = self._step(list(ids), 0)
        else:
            logits, self._past = self.forward(list(ids))
        self._pos, self._token = len(ids), int(logits[-1].argmax())
        return self._token

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self.shared:
                logits = self._step([self._token], self._pos)
            else:
                logits, self._past = self.forward([self._token], self._past, self._pos)
            self._pos += 1
            self._token = int(logits[-1].argmax())
            out.append(self._token)
        return out

    def _step(self, ids: list[int], start: int):
        """One run with the K/V cache in preallocated ``[1, kv_heads, buffer_len, head_dim]`` buffers bound as both
        past and present (GroupQueryAttention writes the new positions in place); returns the logits."""
        np = self.np
        if start + len(ids) > self.buffer_len:
            raise ModelError(f"{self.folder}: {start + len(ids)} positions do not fit the {self.buffer_len}-position "
                             "K/V cache; open the session with a larger context")
        if self._buffers is None:  # allocated and bound once; each step rebinds the small inputs and the logits
            import onnxruntime as ort

            shape = (1, self.kv_heads, self.buffer_len, self.head_dim)
            self._buffers = [(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype)),
                              ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype)))
                             for _ in range(self.layers)]
            self._io = io = self.session.io_binding()
            io.bind_output(self.logits_name)  # first: get_outputs() lists outputs in binding order
            for (k_in, v_in), (k_out, v_out), (k, v) in zip(self.past_names, self.present_names, self._buffers):
                io.bind_ortvalue_input(k_in, k)
                io.bind_ortvalue_input(v_in, v)
                io.bind_ortvalue_output(k_out, k)
                io.bind_ortvalue_output(v_out, v)
        io = self._io
        io.bind_cpu_input(self.input_names["input_ids"], np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input(self.input_names["attention_mask"], np.ones((1, start + len(ids)), dtype=np.int64))
        io.bind_output(self.logits_name)  # unallocated again: its shape follows the number of ids
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()[0]

    def generate(self, ids: list[int], n: int, eos_ids=(), greedy: bool = True, seed: int = 0) -> list[int]:
        """New token ids after ``ids`` (the prompt is not included); stops after an id in ``eos_ids``.

        ``greedy=False`` samples from the full softmax (temperature 1) with ``seed``.
        Timings land in :attr:`stats`.
        """
        np = self.np
        if not ids:
            raise ValueError("generate() needs a non-empty prompt")
        rng = np.random.default_rng(seed)
        stop = set(int(i) for i in eos_ids)
        stats = GenerationStats(prompt_tokens=len(ids))
        out: list[int] = []
        t = time.perf_counter()
        logits, past = self.forward(list(ids))
        stats.prefill_s = time.perf_counter() - t
        pos = len(ids)
        while len(out) < n:
            token = _pick(np, logits[-1], greedy, rng)
            out.append(token)
            if token in stop or len(out) == n:
                break
            t = time.perf_counter()
            logits, past = self.forward([token], past, pos)
            stats.decode_s.append(time.perf_counter() - t)
            pos += 1
        stats.new_tokens = len(out)
        self.stats = stats
        return out

    def close(self) -> None:
        self._past = self._buffers = self._io = None
        self.session = None


def _pick(np, logits, greedy: bool, rng) -> int:
    if greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


def _gpu() -> str | None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return None
    return (f"{NO_GPU}: onnxruntime has no CUDAExecutionProvider "
            f"(providers: {', '.join(onnxruntime.get_available_providers())}; install onnxruntime-gpu)")


RUNTIME = Runtime("onnxruntime", ("onnx",), "onnxruntime", "onnxruntime", OrtSession, _gpu, gpu_variant=True,
                  description="onnxruntime with edgekit's KV-cache loop", min_version="1.20")


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    reg.add(registry.RUNTIME, RUNTIME.name, RUNTIME)
