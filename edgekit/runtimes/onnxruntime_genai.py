"""onnxruntime-genai's own generation loop on an exported ONNX folder (it reads genai_config.json).

Threads go in through a config overlay of the decoder's session options. The benchmark's
``prefill`` / ``decode`` use greedy search with ``min_length == max_length`` so generation never
ends at EOS (genai then masks EOS out of the argmax: the one runtime where an EOS-wanting step picks
the runner-up). genai gives no per-position logits, so :meth:`GenaiSession.logits` is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgekit import registry
from edgekit.errors import ModelError, one_line
from edgekit.integrity import check_model_path
from edgekit.arch import DEFAULT_CONTEXT
from edgekit.runtimes import LOADERS, NO_GPU, Loader, Runtime, hf_tokenizer
from edgekit.runtimes.onnxruntime import read_genai_config


class GenaiSession:
    def __init__(self, folder: Path, threads: int | None = None, *, gpu: bool = False, context: int | None = None,
                 all_logits: bool = False):
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise ModelError(f"onnxruntime-genai is not installed ({e}); pip install onnxruntime-genai") from e
        self.og = og
        self.folder = Path(folder)
        limit = read_genai_config(self.folder).get("model", {}).get("context_length")
        # genai counts the sampled token in max_length, which may not exceed context_length: a prompt can fill
        # all but one position if a token is to follow it.
        self.context = limit - 1 if limit else None
        check_model_path(self.folder)  # the ONNX files' headers, before onnxruntime-genai opens them
        config = og.Config(str(self.folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                                 "inter_op_num_threads": 1}}}}))
        if gpu:
            config.clear_providers()
            config.append_provider("cuda")
        try:
            self.model = og.Model(config)
        except Exception as e:  # og raises RuntimeError / OrtException with the loader's message
            raise ModelError(f"onnxruntime-genai cannot load {self.folder}: {one_line(e)}") from e
        self.max_length = min(context or limit or DEFAULT_CONTEXT, limit or DEFAULT_CONTEXT)
        self._tokenize = None
        self.generator = None

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = hf_tokenizer(self.folder)
        return self._tokenize(text)

    def logits(self, ids: list[int]):
        raise ModelError("onnxruntime-genai gives no per-position logits; score an ONNX export with the "
                         "onnxruntime runtime")

    def _start(self, ids: list[int], max_length: int, min_length: int) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False, num_beams=1)
        self.generator = None  # free the previous sequence's cache before the next one
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(list(ids))

    def prefill(self, ids: list[int]) -> int:
        self._start(ids, self.max_length, self.max_length)
        return self._next()

    def decode(self, n: int) -> list[int]:
        return [self._next() for _ in range(n)]

    def _next(self) -> int:
        if self.generator.is_done():
            raise ModelError(f"onnxruntime-genai stopped at max_length {self.max_length}; pass a larger context")
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def generate(self, ids: list[int], n: int, eos_ids=None, *, timings: dict | None = None) -> list[int]:
        """Up to ``n`` greedy tokens after ``ids``: ``eos_ids`` None stops at genai_config's eos ids (genai's own
        stopping), a sequence stops after one of those ids only.

        ``timings`` (if given) receives ``prefill_s`` (prompt + first token), ``decode_s`` and ``new_tokens``.
        """
        length = len(ids) + n
        self._start(ids, length, 0 if eos_ids is None else length)
        stop = set() if eos_ids is None else {int(i) for i in eos_ids}
        out: list[int] = []
        t = time.perf_counter()
        prefill_s = decode_start = None
        while not self.generator.is_done() and len(out) < n:
            self.generator.generate_next_token()
            out.append(int(self.generator.get_next_tokens()[0]))
            if prefill_s is None:
                decode_start = time.perf_counter()
                prefill_s = decode_start - t
            if out[-1] in stop:
                break
        if timings is not None:
            timings.update({"prefill_s": prefill_s or 0.0, "new_tokens": len(out),
                            "decode_s": time.perf_counter() - decode_start if decode_start else 0.0})
        return out

    def close(self) -> None:
        self.generator = None
        self.model = None


def genai_generate(folder: Path, ids: list[int], max_new_tokens: int, *, timings: dict | None = None) -> list[int]:
    """Greedy new token ids after ``ids`` through onnxruntime-genai (stops at genai_config's eos ids).

    If ``timings`` is given it receives ``load_s``, ``prefill_s`` (prompt + first token) and ``decode_s``.
    """
    t = time.perf_counter()
    session = GenaiSession(folder)
    load_s = time.perf_counter() - t
    try:
        out = session.generate(ids, max_new_tokens, timings=timings)
    finally:
        session.close()
    if timings is not None:
        timings["load_s"] = load_s
    return out


def _gpu() -> str | None:
    import onnxruntime_genai as og

    if og.is_cuda_available():
        return None
    return f"{NO_GPU}: this onnxruntime-genai build has no CUDA (install onnxruntime-genai-cuda)"


RUNTIME = Runtime("onnxruntime-genai", ("onnx",), "onnxruntime_genai", "onnxruntime-genai", GenaiSession, _gpu,
                  description="onnxruntime-genai's generator", min_version="0.16", full_logits=False,
                  loader=Loader(LOADERS / "run_genai.py", files=("model.onnx*", "genai_config.json")))


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    reg.add(registry.RUNTIME, RUNTIME.name, RUNTIME)
