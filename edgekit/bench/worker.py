"""One benchmark measurement in its own process: ``python -m edgekit.bench.worker --spec spec.json``.

The spec names one artifact and one runtime (see :class:`WorkerSpec`; ``--spec -`` reads it
from stdin, which is how ``edgekit.bench.measure`` drives a remote host over ssh). The worker
prints ONE JSON object on stdout -- raw per-repeat values, summarised by the caller -- or
``{"status": "failed" | "unavailable", "reason": "<one line>"}``. Anything a runtime writes
to stdout while measuring is sent to stderr, so stdout holds the JSON alone.

Thread counts are fixed before any runtime is imported: OMP/MKL/OpenBLAS variables here,
then each runner applies ``threads`` its own way (torch.set_num_threads, onnxruntime's
intra-op threads, onnxruntime-genai's decoder session options through a config overlay,
llama.cpp's n_threads and n_threads_batch).

What is measured, each with ``warmup`` discarded runs before ``repeats`` kept ones:

- ``load_s``: opening a session (the runtime module is imported first, untimed);
- per prompt length L, ``ttft_s``: prefill of L tokens plus the first greedy token, and
  ``prefill_tok_s`` = L / ttft;
- ``decode_tok_s``: after a ``decode_prompt_tokens`` prompt, ``decode_tokens`` more tokens,
  one forward pass each, divided by their wall time (the first token is prefill's);
- ``rss_after_load_bytes``: the process RSS right after the first load (interpreter and
  runtime libraries included), ``peak_rss_bytes``: the process's RSS high-water mark at the
  end, over all loads and runs (see :func:`peak_rss_bytes` for why not ru_maxrss on Linux).

Prompts are the model's own tokenization of :data:`PROMPT_TEXT`, repeated and cut to length,
so every runtime of one model sees the same ids.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil

from edgekit.errors import ConfigError, ModelError, one_line
from edgekit.runtimes import get_runtime

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
PROMPT_TEXT = (
    "Edge devices run language models under tight limits: a few hundred megabytes of memory, a handful of "
    "slow cores and a battery. Quantization stores each weight in four or eight bits instead of thirty-two, "
    "which shrinks the file and speeds up decoding, because generating a token streams every weight through "
    "the processor once. Prefill is different: the whole prompt is processed at once, so it is limited by "
    "arithmetic rather than memory. The quick brown fox jumps over the lazy dog; 1234567890 apples and 42 "
    "oranges; def add(a, b): return a + b. "
)


@dataclass(frozen=True)
class WorkerSpec:
    artifact: str  # an export-<id>/ folder, or an HF folder for pytorch
    runtime: str  # a registered runner name
    threads: int
    module: str = "edgekit.runtimes"  # imported first: registers the runtime (a plugin's own module)
    gpu: bool = False
    repeats: int = 5
    warmup: int = 1
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_tokens: int = 128
    decode_prompt_tokens: int = 128

    @classmethod
    def from_dict(cls, raw: dict) -> WorkerSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown spec keys {unknown}; known keys are {sorted(known)}")
        spec = cls(**{**raw, "prompt_lengths": tuple(int(n) for n in raw.get("prompt_lengths", cls.prompt_lengths))})
        if spec.threads < 1 or spec.repeats < 1 or spec.warmup < 0 or spec.decode_tokens < 1 \
                or spec.decode_prompt_tokens < 1 or not spec.prompt_lengths or min(spec.prompt_lengths) < 1:
            raise ConfigError(f"spec needs threads, repeats, decode_tokens, decode_prompt_tokens and prompt_lengths "
                             f">= 1 and warmup >= 0, got {asdict(spec)}")
        return spec

    @property
    def context(self) -> int:
        """Positions one sequence needs: the longest prompt, or the decode prompt plus its tokens (+1 sampled)."""
        return max(max(self.prompt_lengths), self.decode_prompt_tokens + self.decode_tokens) + 1


def limit_threads(threads: int) -> None:
    """Set the OpenMP/BLAS thread variables; only effective before the runtimes are imported."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


def prompt_ids(session, length: int) -> list[int]:
    base = session.tokenize(PROMPT_TEXT)
    if not base:
        raise ModelError("the model's tokenizer turned the benchmark prompt into no tokens; check its tokenizer files")
    return (base * (length // len(base) + 1))[:length]


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM from /proc/self/status on Linux, else getrusage's ru_maxrss.

    Not ru_maxrss on Linux: it survives exec, so a worker started by a big parent (the
    benchmark driver has torch loaded) would report at least the parent's RSS at fork time.
    VmHWM is the high-water mark of this process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   65432 kB"
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux and BSDs KiB


def measure(spec: WorkerSpec) -> dict:
    """Run the measurements of the module docstring; raises on any problem."""
    if spec.module != "__main__":
        importlib.import_module(spec.module)
    runner = get_runtime(spec.runtime)
    missing = runner.available()
    if missing:
        return {"status": "unavailable", "reason": missing}
    importlib.import_module(runner.module)  # import cost stays out of load_s
    if getattr(runner, "measure", None) is not None:  # no token-level sessions (the browser runtimes): it measures
        return runner.measure(spec, PROMPT_TEXT)

    runs = spec.warmup + spec.repeats
    load_s, rss_after_load, session = [], None, None
    for _ in range(runs):
        if session is not None:
            session.close()
            session = None
            gc.collect()
        t = time.perf_counter()
        session = runner.session(spec.artifact, spec.threads, gpu=spec.gpu, context=spec.context)
        load_s.append(time.perf_counter() - t)
        if rss_after_load is None:
            rss_after_load = rss_bytes()
            need = spec.context - 1
            if session.context and need > session.context:
                raise ConfigError(f"the benchmark needs {need} positions but {spec.artifact} handles "
                                  f"{session.context}; lower prompt_lengths or decode_tokens")

    ttft, prefill_tok_s = {}, {}
    for length in spec.prompt_lengths:
        ids = prompt_ids(session, length)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            session.prefill(ids)
            times.append(time.perf_counter() - t)
        ttft[str(length)] = times[spec.warmup:]
        prefill_tok_s[str(length)] = [length / s for s in times[spec.warmup:]]

    ids = prompt_ids(session, spec.decode_prompt_tokens)
    decode_tok_s, decoded, tokens = [], [], None
    for _ in range(runs):
        session.prefill(ids)
        t = time.perf_counter()
        out = session.decode(spec.decode_tokens)
        seconds = time.perf_counter() - t
        decoded.append(len(out))
        decode_tok_s.append(len(out) / seconds)
        tokens = tokens or list(out)
    session.close()
    return {
        "status": "ok", "runtime": runner.name, "version": runner.version(), "threads": spec.threads,
        "gpu": runner.gpu_available(), "load_s": load_s[spec.warmup:], "ttft_s": ttft, "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s[spec.warmup:], "decoded": decoded[spec.warmup:], "tokens": tokens,
        "rss_after_load_bytes": rss_after_load, "peak_rss_bytes": peak_rss_bytes(), "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgekit.bench.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="a JSON spec file, or - for stdin")
    args = parser.parse_args(argv)
    out = os.dup(1)  # the JSON goes here; anything else written to stdout lands on stderr
    os.dup2(2, 1)
    try:
        raw = json.load(sys.stdin) if args.spec == "-" else json.loads(Path(args.spec).read_text(encoding="utf-8"))
        spec = WorkerSpec.from_dict(raw)
        limit_threads(spec.threads)
        result = measure(spec)
    except Exception as e:  # the contract: any failure is one JSON line, never a traceback on stdout
        result = {"status": "failed", "reason": one_line(e, with_type=True, limit=500)}
    sys.stdout.flush()
    os.write(out, (json.dumps(result) + "\n").encode("utf-8"))
    os.close(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
