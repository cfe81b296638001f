"""Running an exported ONNX folder: our own plain-onnxruntime loop, and onnxruntime-genai's.

:class:`OrtLM` needs only ``onnxruntime``: one prefill with an empty K/V cache, then one
token per step, feeding each ``present.*`` output back as the next ``past_key_values.*``
while ``attention_mask`` and ``position_ids`` grow. It records prefill and per-token decode
times for the benchmarks. :func:`genai_generate` runs the same folder through
onnxruntime-genai, which reads ``genai_config.json`` (written by ``edgekit.export.onnx``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import ModelError

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


@dataclass
class GenerationStats:
    """Timings of the last :meth:`OrtLM.generate` (or :meth:`OrtLM.logits`) call."""

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


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, always with the CPU provider as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtLM:
    """A decoder-only ONNX folder (model.onnx + genai_config.json) run with plain onnxruntime, batch 1."""

    def __init__(self, folder: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        from edgekit.export.onnx import check_onnx

        self.folder = Path(folder)
        decoder = _read_genai_config(self.folder)["model"]["decoder"]
        self.path = self.folder / decoder.get("filename", "model.onnx")
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
        self.providers = list(providers) if providers else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise ModelError(f"onnxruntime cannot load {self.path}: {str(e).strip().splitlines()[0][:300]}") from e
        past_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0][0])
        self.kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        self.output_names = [self.logits_name] + [n for pair in self.present_names for n in pair]
        self.stats = GenerationStats()

    def forward(self, ids: list[int], past: list | None = None, start: int = 0) -> tuple[np.ndarray, list]:
        """One run of the graph: logits ``[len(ids), vocab]`` and the new cache (``past`` None: empty).

        ``start`` is the number of positions already in ``past``; the cache is a list of (key, value)
        arrays per layer, ``[1, kv_heads, positions, head_dim]``.
        """
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
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [(empty, empty)] * self.layers

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` (float32) of one prefill with an empty cache."""
        if not ids:
            raise ValueError("logits() needs at least one token id")
        t = time.perf_counter()
        logits, _ = self.forward(list(ids))
        self.stats = GenerationStats(prompt_tokens=len(ids), prefill_s=time.perf_counter() - t)
        return logits.astype(np.float32, copy=False)

    def generate(self, ids: list[int], max_new_tokens: int, eos_ids=(), greedy: bool = True,
                 seed: int = 0) -> list[int]:
        """New token ids after ``ids`` (the prompt is not included); stops after an id in ``eos_ids``.

        ``greedy=False`` samples from the full softmax (temperature 1) with ``seed``.
        Timings land in :attr:`stats`.
        """
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
        while len(out) < max_new_tokens:
            token = _pick(logits[-1], greedy, rng)
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            t = time.perf_counter()
            logits, past = self.forward([token], past, pos)
            stats.decode_s.append(time.perf_counter() - t)
            pos += 1
        stats.new_tokens = len(out)
        self.stats = stats
        return out


def _pick(logits: np.ndarray, greedy: bool, rng) -> int:
    if greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


def genai_generate(folder: Path, ids: list[int], max_new_tokens: int, *, timings: dict | None = None) -> list[int]:
    """Greedy new token ids after ``ids`` through onnxruntime-genai (stops at genai_config's eos ids).

    If ``timings`` is given it receives ``load_s``, ``prefill_s`` (prompt + first token) and ``decode_s``.
    """
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise ModelError(f"onnxruntime-genai is not installed ({e}); pip install onnxruntime-genai") from e
    from edgekit.integrity import check_model_path

    folder = Path(folder)
    _read_genai_config(folder)
    check_model_path(folder)  # the ONNX files' headers, before onnxruntime-genai opens them
    t = time.perf_counter()
    try:
        model = og.Model(str(folder))
    except Exception as e:  # og raises RuntimeError / OrtException with the loader's message
        raise ModelError(f"onnxruntime-genai cannot load {folder}: {str(e).strip().splitlines()[0][:300]}") from e
    load_s = time.perf_counter() - t
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False, num_beams=1)
    generator = og.Generator(model, params)
    out: list[int] = []
    t = time.perf_counter()
    generator.append_tokens(list(ids))
    prefill_s = decode_start = None
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
        if prefill_s is None:
            decode_start = time.perf_counter()
            prefill_s = decode_start - t
    if timings is not None:
        timings.update({"load_s": load_s, "prefill_s": prefill_s or 0.0,
                        "decode_s": time.perf_counter() - decode_start if decode_start else 0.0,
                        "new_tokens": len(out)})
    return out


def _read_genai_config(folder: Path) -> dict:
    path = Path(folder) / GENAI_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelError(f"{path} is missing: {folder} is not an edgekit ONNX export; run the ONNX export again") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); run the ONNX export again") from e
