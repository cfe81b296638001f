"""From what a run measured on this host to what it should do on a device: roofline projection.

Each measured run is placed against this host's roofline, and the fraction it
reaches (its efficiency) is carried over to the device unchanged:

  bytes/token      B = weights decode reads once per token (quantize.schemes layout; the embedding
                       table only when it is also the head) + the KV cache at the measured position
  decode roofline  host bandwidth / B                       tok/s
  prefill roofline host FP32 peak / (2 x params)            tok/s  (one multiply-add per weight per token)
  efficiency       e_decode  = measured decode tok/s  / decode roofline
                   e_prefill = measured prefill tok/s / prefill roofline
  on a device      decode  = e_decode  x device bandwidth / B
                   prefill = e_prefill x device FP32 peak / (2 x params)

Example: host 10 GB/s, B = 100 MB, 60 tok/s measured -> roofline 100 tok/s, e = 0.6;
a 5 GB/s device -> 0.6 x 5e9 / 1e8 = 30 tok/s predicted.

B and params cancel out of the prediction (decode = measured x device bandwidth / host
bandwidth), so they only decide how the efficiency reads, not the predicted speed.
Every projection is labelled ``"predicted"`` and carries its assumptions in words.
"""

from __future__ import annotations

import logging

from edgekit.arch import Architecture
from edgekit.devices import DeviceProfile
from edgekit.errors import EdgekitError
from edgekit.plan import DECODE_POSITION, bytes_read_per_token
from edgekit.quantize.schemes import get_format, get_scheme
from edgekit.units import format_bytes

log = logging.getLogger(__name__)

TORCH_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per weight and per cached K/V value in PyTorch
DECODE_PROMPT_TOKENS = 128  # the prompt decode follows in edgekit.bench.measure (a test keeps the two equal)


def decode_position(settings: dict | None) -> int:
    """Mean KV-cache length while decode was timed: the decode prompt + half the decoded tokens.

    The benchmark decodes after a prompt of ``measure.DECODE_PROMPT_TOKENS`` (128) tokens, so
    128 decoded tokens average 128 + 64 = 192 tokens in the cache.
    """
    if not settings or "decode_tokens" not in settings:
        return DECODE_POSITION
    return int(settings.get("decode_prompt_tokens", DECODE_PROMPT_TOKENS) + settings["decode_tokens"] // 2)


def bytes_per_token(run: dict, arch: Architecture, position: int = DECODE_POSITION) -> int:
    """Bytes one decode step reads: weights touched + the KV cache at ``position``.

    GGUF / ONNX / ExecuTorch: the scheme's tensor layout for the run's format and quant (via
    :func:`edgekit.plan.bytes_read_per_token`; the token-embedding table is skipped unless it is
    also the head). PyTorch: ``bytes/weight x (non-embedding params + head params)`` + KV cache
    ``2 x layers x position x kv_dim x bytes/value``, with 4 bytes for fp32.
    """
    fmt, quant = run["format"], run["quant"]
    if fmt == "pytorch":
        if quant not in TORCH_BYTES:
            raise EdgekitError(f"run {run.get('id')!r}: no byte size for PyTorch dtype {quant!r}; "
                               f"use one of {', '.join(TORCH_BYTES)}")
        per = TORCH_BYTES[quant]
        weights = per * (arch.params_non_embedding + arch.params_embedding)
        return weights + 2 * arch.layers * position * arch.kv_dim * per
    nbytes, _ = bytes_read_per_token(arch, get_scheme(fmt, quant), position, get_format(fmt).kv_dtype_bytes,
                                     run.get("runtime") or "llama.cpp")
    return int(nbytes)


def _bytes_and_basis(run: dict, arch: Architecture | None, position: int) -> tuple[int, str]:
    """B for a run, and in words where it came from (file size when the layout is unknown)."""
    if arch is not None:
        try:
            return bytes_per_token(run, arch, position), f"from the tensor layout, KV cache at {position} tokens"
        except EdgekitError as e:
            log.warning("run %s: %s; using its file size as bytes per token", run.get("id"), e)
    if not run.get("file_bytes"):
        raise EdgekitError(f"run {run.get('id')!r} has neither a known tensor layout nor file_bytes, so its bytes "
                           "per token are unknown; pass the model's architecture (config.json)")
    return int(run["file_bytes"]), "taken as the file size, the tensor layout being unknown"


def _params(run: dict, arch: Architecture | None) -> int:
    params = arch.params if arch is not None else run.get("params")
    if not params:
        raise EdgekitError(f"run {run.get('id')!r}: parameter count unknown; pass the model's architecture")
    return int(params)


def _host_rates(host: dict | DeviceProfile) -> tuple[float, float]:
    """(bandwidth bytes/s, FP32 FLOP/s) from a results ``host`` dict or a DeviceProfile."""
    if isinstance(host, DeviceProfile):
        return float(host.memory_bandwidth), float(host.cpu.peak_fp32)
    bw, flops = host.get("memory_bandwidth_bytes_s"), host.get("fp32_flops")
    if not bw or not flops:
        raise EdgekitError("the results' host has no measured memory bandwidth or FP32 FLOP/s "
                           "(host.memory_bandwidth_bytes_s / host.fp32_flops), so runs cannot be placed on its "
                           "roofline; re-run the benchmark, which measures them")
    return float(bw), float(flops)


def _longest_prompt(run: dict) -> str:
    return max(run["metrics"]["prefill_tok_s"], key=int)


def efficiency(run: dict, host: dict | DeviceProfile, arch: Architecture | None = None,
               position: int = DECODE_POSITION) -> dict:
    """Fraction of the host roofline a run reaches, from medians.

    decode  = measured decode tok/s  / (host bandwidth / bytes_per_token)
    prefill = measured prefill tok/s / (host FP32 FLOP/s / (2 x params)), at the longest prompt measured
    """
    bw, flops = _host_rates(host)
    return _efficiency(run, bw, flops, _bytes_and_basis(run, arch, position)[0], _params(run, arch))


def _efficiency(run: dict, bw: float, flops: float, nbytes: int, params: int) -> dict:
    metrics = run["metrics"]
    prefill = metrics["prefill_tok_s"][_longest_prompt(run)]["median"]
    return {"decode": metrics["decode_tok_s"]["median"] / (bw / nbytes), "prefill": prefill / (flops / (2 * params))}


def roofline_fraction(run: dict, host: dict | DeviceProfile, arch: Architecture | None = None,
                      position: int = DECODE_POSITION) -> float:
    """Decode speed as a fraction of the host's bandwidth roofline (target: llama.cpp >= 0.6)."""
    return efficiency(run, host, arch, position)["decode"]


def _assumptions(run: dict, dev: DeviceProfile, prompt: str, basis: str, eff: dict) -> list[str]:
    """The prediction's assumptions in plain words, worded alike across runs so a report can list them once."""
    said = [
        "each runtime reaches the same fraction of a device's roofline as it reached of this host's",
        f"decode is memory-bandwidth-bound: each token reads the weights once plus the KV cache (bytes per token "
        f"{basis})",
        f"prefill is compute-bound at 2 FLOPs per parameter per token (efficiency from the {prompt}-token prompt)",
        "CPU only, all cores: no GPU or NPU is used, even where the device has one",
        "memory: peak RSS measured on this host (Python process included) against the device's memory_budget",
    ]
    if "memory_bandwidth" not in dev.measured:
        said.append("device bandwidth and FLOP/s are spec-sheet peaks while this host's were measured, "
                    "so predictions lean optimistic")
    if eff["decode"] > 1:
        said.append(f"{run['label']} ({run['runtime']}) decoded above this host's bandwidth roofline "
                    f"({eff['decode']:.0%}): its weights probably stayed in CPU cache, so scaling by bandwidth "
                    "is not reliable for it")
    return said


def _memory_basis(rss: int | None, dev: DeviceProfile) -> str:
    if rss is None:
        return "no peak RSS was measured"
    return (f"peak RSS measured on this host ({format_bytes(rss)}) vs {dev.name}'s memory_budget "
            f"({format_bytes(dev.memory_budget)})")


def project(results: dict, devices: list[DeviceProfile], arch: Architecture | None = None,
            only_supported: bool = False) -> list[dict]:
    """Predicted speed and memory fit of every ok run on every device, labelled ``"predicted"``.

    predicted decode  tok/s = e_decode  x device bandwidth / bytes_per_token
    predicted prefill tok/s = e_prefill x device FP32 peak / (2 x params)
    fits_memory             = measured peak RSS <= device memory_budget

    Devices whose profile does not list the run's runtime get ``runtime_on_device: false``
    (or are left out with ``only_supported``). Runs measured elsewhere (``measured_on`` not
    ``host``) or on a GPU (``*-gpu`` runtimes) are not projected: their roofline is not this CPU's.
    """
    host_bw, host_flops = _host_rates(results["host"])  # fails, naming the fix, when the host was not measured
    position = decode_position(results.get("settings"))
    out = []
    for run in results["runs"]:
        if run.get("status") != "ok" or not run.get("metrics"):
            continue
        if run.get("measured_on", "host") != "host" or run["runtime"].endswith("-gpu"):
            # the efficiency is against this host's CPU roofline: a remote or GPU row has another one
            log.info("not projecting %s: measured on %s with %s, not on this host's CPU", run["id"],
                     run.get("measured_on"), run["runtime"])
            continue
        nbytes, basis = _bytes_and_basis(run, arch, position)
        params = _params(run, arch)
        eff = _efficiency(run, host_bw, host_flops, nbytes, params)
        prompt = _longest_prompt(run)
        rss = run["metrics"].get("peak_rss_bytes")
        for dev in devices:
            on_device = run["runtime"] in dev.runtimes
            if only_supported and not on_device:
                continue
            out.append({
                "label": "predicted",
                "run_id": run["id"], "run_label": run["label"], "artifact": run.get("artifact"),
                "format": run["format"], "quant": run["quant"], "runtime": run["runtime"],
                "device": dev.name, "device_name": dev.display_name, "runtime_on_device": on_device,
                "device_bandwidth_bytes_s": dev.memory_bandwidth, "device_fp32_flops": dev.cpu.peak_fp32,
                "bytes_per_token": nbytes, "params": params,
                "efficiency_decode": eff["decode"], "efficiency_prefill": eff["prefill"],
                "predicted_decode_tok_s": eff["decode"] * dev.memory_bandwidth / nbytes,
                "predicted_prefill_tok_s": eff["prefill"] * dev.cpu.peak_fp32 / (2 * params),
                "prefill_prompt_tokens": int(prompt),
                "peak_rss_bytes": rss, "memory_budget_bytes": dev.memory_budget,
                "fits_memory": None if rss is None else rss <= dev.memory_budget,
                "memory_basis": _memory_basis(rss, dev),
                "assumptions": _assumptions(run, dev, prompt, basis, eff),
            })
    return out
