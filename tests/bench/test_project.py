"""Roofline projection: efficiency on this host carried to a device, checked against hand-worked numbers."""

from __future__ import annotations

import pytest

from edgekit.arch import Architecture
from edgekit.bench import project as proj
from edgekit.devices import DeviceProfile, list_devices
from edgekit.errors import EdgekitError
from tests.bench.conftest import make_run, spread
from tests.conftest import SMOLLM2

TINY = Architecture(layers=2, hidden_size=64, intermediate_size=128, heads=4, kv_heads=2, head_dim=16,
                    vocab_size=256, tie_embeddings=True)


def device(name="dev", bandwidth=5e9, flops=50e9, budget=512_000_000, runtimes=("llama.cpp",)) -> DeviceProfile:
    return DeviceProfile.model_validate({
        "name": name, "display_name": f"Device {name}", "class": "sbc", "ram": 1_000_000_000, "memory_budget": budget,
        "memory_bandwidth": bandwidth, "runtimes": list(runtimes), "os": "Linux",
        "cpu": {"name": "cpu", "arch": "aarch64", "cores": 4, "threads": 4, "clock": 2e9, "peak_fp32": flops},
    })


def results_with(*runs, bandwidth=10e9, flops=100e9) -> dict:
    return {"schema": "edgekit.bench/1", "host": {"memory_bandwidth_bytes_s": bandwidth, "fp32_flops": flops},
            "settings": {"prompt_lengths": [128, 512], "decode_tokens": 128}, "runs": list(runs)}


def hand_run(decode=60.0, prefill=200.0, **kw) -> dict:
    """100 MB read per token (its file size, no architecture given) and 1e8 parameters."""
    run = make_run("gguf-q4_0", "llama.cpp", "gguf", "q4_0", file_bytes=100_000_000, decode=decode,
                   params=100_000_000, **kw)
    run["metrics"]["decode_tok_s"] = spread(decode, 0)
    run["metrics"]["prefill_tok_s"]["512"] = spread(prefill, 0)
    return run


def test_efficiency_matches_the_hand_worked_example():
    # decode roofline 10 GB/s / 100 MB = 100 tok/s, measured 60 -> 0.6;
    # prefill roofline 100 GFLOP/s / (2 x 1e8) = 500 tok/s, measured 200 -> 0.4
    eff = proj.efficiency(hand_run(), {"memory_bandwidth_bytes_s": 10e9, "fp32_flops": 100e9})
    assert eff == {"decode": pytest.approx(0.6), "prefill": pytest.approx(0.4)}


def test_projection_matches_the_hand_worked_example():
    # device 5 GB/s: 0.6 x 5e9 / 1e8 = 30 tok/s; 50 GFLOP/s: 0.4 x 50e9 / 2e8 = 100 tok/s
    [p] = proj.project(results_with(hand_run()), [device(bandwidth=5e9, flops=50e9)])
    assert p["predicted_decode_tok_s"] == pytest.approx(30.0)
    assert p["predicted_prefill_tok_s"] == pytest.approx(100.0)
    assert p["efficiency_decode"] == pytest.approx(0.6) and p["efficiency_prefill"] == pytest.approx(0.4)
    assert p["bytes_per_token"] == 100_000_000 and p["prefill_prompt_tokens"] == 512


def test_roofline_fraction_is_the_decode_efficiency():
    host = {"memory_bandwidth_bytes_s": 10e9, "fp32_flops": 100e9}
    assert proj.roofline_fraction(hand_run(decode=60.0), host) == pytest.approx(0.6)
    assert proj.roofline_fraction(hand_run(decode=45.0), host) < 0.6


def test_efficiency_accepts_a_device_profile_as_the_host():
    eff = proj.efficiency(hand_run(), device(bandwidth=10e9, flops=100e9))
    assert eff["decode"] == pytest.approx(0.6)


def test_bytes_per_token_pytorch_fp32_is_four_bytes_per_weight_read_plus_kv_cache():
    # per layer: q 64x64 + k,v 2x64x32 + o 64x64 + mlp 3x64x128 + 2 norms x 64 = 36992; 2 layers + final norm = 74048
    # weights read = non-embedding + the (tied) head 256x64 = 90432 params x 4 B = 361728
    # KV at position 10: 2 (k,v) x 2 layers x 10 x kv_dim 32 x 4 B = 5120
    run = {"format": "pytorch", "quant": "fp32"}
    assert proj.bytes_per_token(run, TINY, position=10) == 361_728 + 5_120


def test_bytes_per_token_gguf_q8_0_follows_the_tensor_layout():
    # every matrix Q8_0 (34 bytes per 32 weights): (73728 + 16384 head) x 34/32 = 95744; 5 norms x 64 x 4 B = 1280;
    # KV f16 at position 10: 2 x 2 x 10 x 32 x 2 B = 2560
    run = {"format": "gguf", "quant": "q8_0"}
    assert proj.bytes_per_token(run, TINY, position=10) == 95_744 + 1_280 + 2_560


def test_onnx_fp32_reads_as_many_weight_bytes_as_pytorch_fp32():
    onnx = proj.bytes_per_token({"format": "onnx", "quant": "fp32"}, SMOLLM2, position=0)
    torch = proj.bytes_per_token({"format": "pytorch", "quant": "fp32"}, SMOLLM2, position=0)
    assert onnx == torch  # both read every layer, the norms and a separate fp32 head, never the embedding table


def test_unknown_quant_falls_back_to_the_file_size_and_says_so():
    run = hand_run()
    run["quant"] = "q9_weird"
    [p] = proj.project(results_with(run), [device()], TINY)
    assert p["bytes_per_token"] == run["file_bytes"]
    assert any("file size" in a for a in p["assumptions"])


def test_decode_position_is_the_decode_prompt_plus_half_the_decoded_tokens():
    assert proj.decode_position({"prompt_lengths": [512, 1024], "decode_tokens": 128}) == 128 + 64
    assert proj.decode_position({"decode_tokens": 64, "decode_prompt_tokens": 256}) == 256 + 32
    assert proj.decode_position(None) == proj.DECODE_POSITION


def test_decode_prompt_matches_the_measurement_side():
    from edgekit.bench import measure

    assert proj.DECODE_PROMPT_TOKENS == measure.DECODE_PROMPT_TOKENS


def test_devices_without_the_runtime_are_flagged_or_left_out():
    devs = [device("has", runtimes=["llama.cpp"]), device("lacks", runtimes=["executorch"])]
    flags = {p["device"]: p["runtime_on_device"] for p in proj.project(results_with(hand_run()), devs)}
    assert flags == {"has": True, "lacks": False}
    only = proj.project(results_with(hand_run()), devs, only_supported=True)
    assert [p["device"] for p in only] == ["has"]


def test_fits_memory_compares_measured_peak_rss_with_the_device_budget():
    run = hand_run(rss=300_000_000)
    small, big = device("small", budget=256_000_000), device("big", budget=512_000_000)
    fits = {p["device"]: p for p in proj.project(results_with(run), [small, big])}
    assert fits["small"]["fits_memory"] is False and fits["big"]["fits_memory"] is True
    assert "peak RSS measured on this host (300MB)" in fits["small"]["memory_basis"]
    assert "memory_budget (256MB)" in fits["small"]["memory_basis"]


def test_projection_is_labelled_predicted_with_assumptions_in_words():
    [p] = proj.project(results_with(hand_run()), [device()])
    assert p["label"] == "predicted"
    said = " ".join(p["assumptions"])
    for words in ("same fraction", "bandwidth-bound", "compute-bound", "no GPU or NPU", "memory_budget",
                  "spec-sheet"):
        assert words in said


def test_decode_above_the_roofline_is_called_out_as_cache_resident():
    [p] = proj.project(results_with(hand_run(decode=150.0)), [device()])
    assert p["efficiency_decode"] == pytest.approx(1.5)
    assert any("cache" in a and "150%" in a for a in p["assumptions"])


def test_only_ok_runs_are_projected():
    runs = [hand_run(), make_run("x", "llama.cpp", "gguf", "q4_0", file_bytes=1, status="failed", reason="boom"),
            make_run("y", "onnxruntime", "onnx", "int4", file_bytes=1, status="unavailable", reason="absent")]
    assert [p["run_label"] for p in proj.project(results_with(*runs), [device()])] == ["gguf-q4_0"]


def test_gpu_and_remote_runs_are_not_projected_on_this_hosts_cpu_roofline():
    gpu, remote = hand_run(), hand_run()
    gpu["runtime"] = "llama.cpp-gpu"
    remote["measured_on"] = remote["device"] = "pi@raspberrypi"
    assert proj.project(results_with(gpu, remote), [device()]) == []


def test_a_host_without_measured_bandwidth_cannot_be_projected_and_says_why():
    res = results_with(hand_run())
    res["host"]["memory_bandwidth_bytes_s"] = None
    with pytest.raises(EdgekitError, match="memory_bandwidth_bytes_s"):
        proj.project(res, [device()])


def test_prediction_is_measured_speed_scaled_by_the_bandwidth_and_flops_ratios(results):
    """B and params cancel: predicted = measured x device / host, whatever the layout says."""
    host = results["host"]
    measured = {r["id"]: r["metrics"] for r in results["runs"] if r["status"] == "ok"}
    for p in proj.project(results, list_devices(), SMOLLM2):
        m = measured[p["run_id"]]
        assert p["predicted_decode_tok_s"] == pytest.approx(
            m["decode_tok_s"]["median"] * p["device_bandwidth_bytes_s"] / host["memory_bandwidth_bytes_s"])
        assert p["predicted_prefill_tok_s"] == pytest.approx(
            m["prefill_tok_s"]["512"]["median"] * p["device_fp32_flops"] / host["fp32_flops"])


def test_real_profiles_flag_pytorch_everywhere_and_fit_small_quants_on_a_pi_zero(results):
    ps = {(p["run_label"], p["runtime"], p["device"]): p for p in proj.project(results, list_devices(), SMOLLM2)}
    assert not any(p["runtime_on_device"] for k, p in ps.items() if k[1] == "pytorch")
    assert ps[("gguf-q4_1", "llama.cpp", "pi-zero-2w")]["fits_memory"] is True  # 223 MB of 300 MB
    assert ps[("onnx-fp32", "onnxruntime", "pi-zero-2w")]["fits_memory"] is False
    # SmolLM2 at q4_1 reads ~100 MB per token; 152 tok/s on a 33 GB/s host is ~46 % of the roofline
    assert 0.4 < ps[("gguf-q4_1", "llama.cpp", "pi-5-8gb")]["efficiency_decode"] < 0.5
