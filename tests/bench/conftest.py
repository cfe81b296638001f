"""Hand-written benchmark results (schema edgekit.bench/1) and a fidelity report to match.

The numbers are shaped like SmolLM2-135M on a 2-core x86 host: the fidelity rows are
from benchmarks/out/quant_fidelity.json, the speeds and memory are plausible, not measured.
"""

from __future__ import annotations

import statistics

import pytest


def stat(values: list[float]) -> dict:
    """A summary as the measurement side writes it."""
    v = sorted(values)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "iqr": q3 - q1,
            "mean": statistics.fmean(v), "n": len(v), "values": list(values)}


def spread(median: float, rel: float = 0.03) -> dict:
    """Five repeats around ``median``, +-``rel``."""
    return stat([median * (1 + rel * k) for k in (-1.0, -0.4, 0.0, 0.3, 1.0)])


def make_run(label: str, runtime: str, fmt: str, quant: str, *, file_bytes: int | None, decode: float | None = None,
             prefill: float = 400.0, rss: int = 300_000_000, status: str = "ok", reason: str | None = None,
             artifact: str | None = None, params: int | None = 134_515_008) -> dict:
    metrics = None
    if status == "ok":
        metrics = {
            "load_s": spread(0.05 + file_bytes / 2e9),
            "ttft_s": {"128": spread(128 / (prefill * 1.15)), "512": spread(512 / prefill)},
            "prefill_tok_s": {"128": spread(prefill * 1.15), "512": spread(prefill)},
            "decode_tok_s": spread(decode),
            "peak_rss_bytes": rss,
            "rss_after_load_bytes": int(rss * 0.85),
        }
    return {"id": f"{label}@{runtime}", "artifact": artifact, "label": label, "format": fmt, "quant": quant,
            "runtime": runtime, "device": "host", "measured_on": "host", "status": status, "reason": reason,
            "file_bytes": file_bytes, "params": params, "metrics": metrics}


ART = {"gguf-f16": "export-1f64aa6b8a06d402", "gguf-q8_0": "export-80b2e8d97614bc97",
       "gguf-q4_1": "export-3ec7bb8573695304", "gguf-q4_0": "export-289d385ab51a7570",
       "gguf-q4_k_m": "export-ec1404b4c2d424c0", "onnx-fp32": "export-102646610e00476b",
       "onnx-int8": "export-688f3eaed76c8f99", "onnx-int4": "export-8e33d07d52207057"}


def _art(label: str) -> str:
    return f"/home/me/.cache/edgekit/artifacts/{ART[label]}"


def sample_results() -> dict:
    runs = [
        make_run("pytorch-fp32", "pytorch", "pytorch", "fp32", file_bytes=538_090_408, decode=24.0, prefill=180.0,
                 rss=1_150_000_000),
        make_run("gguf-f16", "llama.cpp", "gguf", "f16", file_bytes=270_886_016, decode=78.0, prefill=520.0,
                 rss=410_000_000, artifact=_art("gguf-f16")),
        make_run("gguf-q8_0", "llama.cpp", "gguf", "q8_0", file_bytes=144_811_168, decode=128.0, prefill=610.0,
                 rss=280_000_000, artifact=_art("gguf-q8_0")),
        make_run("gguf-q4_1", "llama.cpp", "gguf", "q4_1", file_bytes=98_362_528, decode=152.0, prefill=380.0,
                 rss=223_000_000, artifact=_art("gguf-q4_1")),
        make_run("gguf-q4_0", "llama.cpp", "gguf", "q4_0", file_bytes=91_727_008, decode=139.0, prefill=450.0,
                 rss=216_000_000, artifact=_art("gguf-q4_0")),
        make_run("gguf-q4_k_m", "llama.cpp", "gguf", "q4_k_m", file_bytes=105_454_240, decode=131.0, prefill=410.0,
                 rss=229_000_000, artifact=_art("gguf-q4_k_m")),
        make_run("onnx-fp32", "onnxruntime", "onnx", "fp32", file_bytes=539_285_882, decode=36.0, prefill=260.0,
                 rss=1_240_000_000, artifact=_art("onnx-fp32")),
        make_run("onnx-int8", "onnxruntime", "onnx", "int8", file_bytes=156_911_640, decode=66.0, prefill=150.0,
                 rss=520_000_000, artifact=_art("onnx-int8")),
        make_run("onnx-int4", "onnxruntime", "onnx", "int4", file_bytes=102_168_420, decode=81.0, prefill=170.0,
                 rss=410_000_000, artifact=_art("onnx-int4")),
        make_run("onnx-int4", "onnxruntime-genai", "onnx", "int4", file_bytes=102_168_420, decode=109.0,
                 prefill=330.0, rss=330_000_000, artifact=_art("onnx-int4")),
        make_run("onnx-int8", "onnxruntime-genai", "onnx", "int8", file_bytes=156_911_640, status="unavailable",
                 reason="onnxruntime-genai is not installed; pip install onnxruntime-genai",
                 artifact=_art("onnx-int8")),
        make_run("gguf-q2_k", "llama.cpp", "gguf", "q2_k", file_bytes=69_000_000, status="failed",
                 reason="worker exited with signal 11 (segmentation fault) while loading; see runs/gguf-q2_k.log",
                 artifact="/home/me/.cache/edgekit/artifacts/export-0123456789abcdef"),
    ]
    return {
        "schema": "edgekit.bench/1", "created": "2026-11-26T10:12:00Z", "edgekit_version": "0.1.0",
        "host": {"cpu": "Intel(R) Xeon(R) Processor", "cores_physical": 2, "threads_used": 2,
                 "ram_bytes": 8_320_000_000,
                 "platform": "Linux-6.1.0-x86_64-with-glibc2.36", "python": "3.11.7",
                 "versions": {"llama_cpp_python": "0.3.36", "onnxruntime": "1.23.2", "onnxruntime_genai": "0.11.2",
                              "torch": "2.9.1", "transformers": "4.57.3"},
                 "memory_bandwidth_bytes_s": 33.0e9, "fp32_flops": 417.0e9},
        "settings": {"repeats": 5, "warmup": 1, "threads": 2, "prompt_lengths": [128, 512], "decode_tokens": 128},
        "runs": runs,
    }


def _row(label, fmt, quant, size, ppl, kl, p99, top1, artifact=True) -> dict:
    row = {"label": label, "format": fmt, "quant": quant, "size_bytes": size, "perplexity": ppl, "kl_mean": kl,
           "kl_p99": p99, "top1_agreement": top1, "greedy_match": 64}
    if artifact:
        row.update(artifact=ART[label], path=_art(label))
    return row


def sample_fidelity() -> dict:
    return {"schema": "edgekit.fidelity/1", "reference": "/home/me/teacher", "tokens": 16302, "rows": [
        _row("pytorch-fp32 (reference)", "pytorch", "fp32", 538_090_408, 6.697, 0.0, 0.0, 1.0, artifact=False),
        _row("gguf-f16", "gguf", "f16", 270_886_016, 6.701, 5.69e-06, 7.33e-05, 0.9988),
        _row("gguf-q8_0", "gguf", "q8_0", 144_811_168, 6.687, 0.00487, 0.0263, 0.965),
        _row("gguf-q4_0", "gguf", "q4_0", 91_727_008, 8.813, 0.396, 2.12, 0.6885),
        _row("gguf-q4_1", "gguf", "q4_1", 98_362_528, 6.73, 0.00334, 0.022, 0.9733),
        _row("gguf-q4_k_m", "gguf", "q4_k_m", 105_454_240, 7.149, 0.0693, 0.425, 0.8879),
        _row("onnx-fp32", "onnx", "fp32", 539_285_882, 6.697, 4.07e-08, 2.68e-07, 1.0),
        _row("onnx-int8", "onnx", "int8", 156_911_640, 6.696, 0.00468, 0.0357, 0.9632),
        _row("onnx-int4", "onnx", "int4", 102_168_420, 8.501, 0.395, 2.79, 0.7053),
    ]}


@pytest.fixture
def results() -> dict:
    return sample_results()


@pytest.fixture
def fidelity_report() -> dict:
    return sample_fidelity()


@pytest.fixture(scope="session")
def sharp_dir(tiny_bpe_llama_dir, tmp_path_factory):
    """The tiny BPE Llama re-initialised with 10x larger weights (initializer_range 0.2).

    With the default 0.02 its logits are nearly flat and greedy decoding repeats one token, so
    "identical generations" would prove little; these weights give a different token at most steps.
    """
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("sharp-tiny")
    for p in tiny_bpe_llama_dir.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy2(p, folder / p.name)
    cfg = LlamaConfig.from_pretrained(str(tiny_bpe_llama_dir))
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder
