"""`quant: auto` for GGUF: ggml's per-tensor quantizer, the sensitivity pass, the budgeted choice, the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import RecipeError
from edgekit.export.config import ExportConfig
from edgekit.quantize import auto, ggml
from edgekit.quantize.gguf import compute_imatrix, quantize_gguf

CALIBRATION = ["The quick brown fox jumps over the lazy dog. Hello world, how are you today?"] * 10 + \
              ["def add(a, b):\n    return a + b\n"] * 10 + ["1234567890 apples and 42 oranges"] * 10


def _tensors(path: Path) -> dict[str, tuple]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory) -> Path:
    """A small random Llama whose rows are multiples of 256, so the K-quant ladder applies (tied head)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import _tiny_bpe_tokenizer

    folder = tmp_path_factory.mktemp("wide-llama")
    _tiny_bpe_tokenizer(folder, 320)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- ggml's quantizer


@pytest.mark.parametrize("quant,calibrated", [("q4_k_m", False), ("q4_k_m", True), ("q3_k_m", True),
                                              ("q8_0", False)])
def test_per_tensor_quantizer_writes_the_bytes_llama_quantize_writes(wide_llama_dir, exporter_output, tmp_path, quant,
                                                                     calibrated):
    """Every matrix llama_model_quantize wrote is reproduced byte for byte by ggml.quantize at the same type, from
    the same f32 data and importance-matrix entry."""
    f32 = exporter_output(wide_llama_dir, "gguf", "f32")[0]
    imatrix = compute_imatrix(wide_llama_dir, CALIBRATION, context=64, progress=False) if calibrated else None
    out = tmp_path / f"{quant}.gguf"
    quantize_gguf(f32, out, quant, imatrix=imatrix, warn_requant=False)
    source, quantized = _tensors(f32), _tensors(out)
    types = set()
    for name, (dtype, raw) in quantized.items():
        if dtype in ("F32", "F16"):
            continue
        w = source[name][1].astype(np.float32)
        mine = ggml.quantize(w, dtype, None if imatrix is None else imatrix.get(name), threads=2)
        assert mine.tobytes() == raw.tobytes(), (name, dtype)
        types.add(dtype)
    assert len(types) >= (1 if quant == "q8_0" else 2)  # the _M mixes really had several types (Q4_K and Q6_K)


def test_roundtrip_error_falls_with_bits_and_bad_input_is_refused():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    errors = [float(((ggml.roundtrip(w, t) - w) ** 2).sum()) for t in auto.LADDER_256]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 50
    from edgekit.errors import ModelError

    with pytest.raises(ModelError, match="not a multiple"):
        ggml.quantize(w[:, :100], "Q4_K")
    with pytest.raises(ModelError, match="values for rows"):
        ggml.quantize(w, "Q4_K", np.ones(10, dtype=np.float32))


# --------------------------------------------------------------------------- the choice


def test_hull_drops_dominated_and_non_convex_options():
    o = auto.Option
    hull = auto._hull([o("a", 10, 1.0), o("b", 12, 1.2), o("c", 14, 0.95), o("d", 20, 0.1), o("e", 30, 0.05)])
    assert [x.dtype for x in hull] == ["a", "d", "e"]  # b is dearer and worse; c lies above the a-d segment


def test_choice_spends_the_budget_where_kl_falls_most():
    o, T = auto.Option, auto.TensorSensitivity
    sensitive = T("x", 256, 1, [o("Q4_K", 100, 1.0), o("Q8_0", 200, 0.01)], 1.0)
    robust = T("y", 256, 1, [o("Q4_K", 100, 0.02), o("Q8_0", 200, 0.0)], 0.02)
    pick = auto.choose([sensitive, robust], fixed_bytes=50, budget=360)
    assert (pick["x"].dtype, pick["y"].dtype) == ("Q8_0", "Q4_K")
    both = auto.choose([sensitive, robust], fixed_bytes=50, budget=450)
    assert (both["x"].dtype, both["y"].dtype) == ("Q8_0", "Q8_0")
    with pytest.raises(RecipeError, match="below the smallest auto mix"):
        auto.choose([sensitive, robust], fixed_bytes=50, budget=200)


def test_budget_a_large_tensor_cannot_use_on_its_hull_goes_to_an_option_off_it():
    o, T = auto.Option, auto.TensorSensitivity
    # the middle option lies above the hull (cheap -> dear is the hull step), so the greedy walk alone stops at
    # "cheap" when "dear" does not fit, leaving 60 bytes unused that "middle" can take
    embed = T("e", 256, 1, [o("cheap", 100, 1.0), o("middle", 150, 0.9), o("dear", 200, 0.0)], 1.0)
    pick = auto.choose([embed], fixed_bytes=0, budget=160)
    assert pick["e"].dtype == "middle"
    assert auto.choose([embed], fixed_bytes=0, budget=200)["e"].dtype == "dear"


def test_a_large_step_that_misses_the_budget_is_paid_for_by_stepping_small_tensors_down():
    o, T = auto.Option, auto.TensorSensitivity
    # the small tensors' steps drop more KL per byte, so the walk tops them all up first and the embedding's one
    # step then misses the budget by 5 bytes; one small tensor one step down pays for it, at half the KL it saves
    embed = T("embed", 256, 1, [o("Q5_1", 100, 1.0), o("Q8_0", 200, 0.0)], 1.0)
    small = [T(f"s{i}", 256, 1, [o("IQ4_NL", 10, 0.5), o("Q5_0", 20, 0.0)], 0.5) for i in range(5)]
    pick = auto.choose([embed, *small], fixed_bytes=0, budget=295)
    assert pick["embed"].dtype == "Q8_0"
    assert sorted(pick[f"s{i}"].dtype for i in range(5)) == ["IQ4_NL"] + ["Q5_0"] * 4
    assert sum(x.nbytes for x in pick.values()) <= 295
    # and not when the trade loses: the small tensors would give up more KL than the embedding saves
    costly = [T(f"s{i}", 256, 1, [o("IQ4_NL", 10, 2.0), o("Q5_0", 20, 0.0)], 2.0) for i in range(5)]
    assert auto.choose([embed, *costly], fixed_bytes=0, budget=295)["embed"].dtype == "Q5_1"


def test_targets_parse_and_wrong_uses_are_refused(tiny_bpe_llama_dir):
    assert auto.parse_target("4.8bpw") == ("bpw", 4.8)
    assert auto.parse_target("90MB") == ("bytes", 90e6)
    for bad in ("fast", "1.5bpw", "-3MB"):
        with pytest.raises(RecipeError, match="target"):
            auto.parse_target(bad)
    cfg = ExportConfig(model=str(tiny_bpe_llama_dir), format="gguf", quant="auto", target="5bpw")
    assert cfg.calibrate and cfg.label == "gguf-auto-5bpw"
    assert ExportConfig(model=str(tiny_bpe_llama_dir), format="gguf", quant="auto").label == "gguf-auto"
    with pytest.raises(RecipeError, match="drop --target or use --quant auto"):
        ExportConfig(format="gguf", quant="q4_k_m", target="90MB")
    with pytest.raises(RecipeError, match="neither a size nor bits"):
        ExportConfig(format="gguf", quant="auto", target="small")


# --------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "phi3"])
def test_restarting_at_any_layer_reproduces_the_float_logits(family_dir, family):
    """The sensitivity pass re-runs only the layers after a changed tensor from the kept inputs; with nothing
    changed that must equal the model's own forward pass, from every layer (a family's extra steps included)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dir(family), dtype=torch.float32).eval()
    seqs = [[5, 9, 17, 33, 2, 8, 40, 41], [3, 4, 5]]
    tail = auto._Tail(model, seqs)
    for start in range(len(tail.layers) + 1):
        for s in range(len(seqs)):
            got = torch.log_softmax(tail.logits(start, s), -1)
            assert torch.allclose(got, tail.ref[s], atol=1e-5), (family, start, s)
    assert tail.kl(0) < 1e-9 and tail.kl(0, embed=True) < 1e-9


def test_sensitivity_measures_every_matrix_and_prices_the_ladder(wide_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wide_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(wide_llama_dir, dtype=torch.float32).eval()
    names = {f"model.layers.{i}.{m}": f"blk.{i}.{g}.weight" for i in range(3) for m, g in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"))}
    names["model.embed_tokens"] = "token_embd.weight"
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in CALIBRATION[::5]]
    imatrix = compute_imatrix(wide_llama_dir, CALIBRATION, context=64, progress=False, names=names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = auto.sensitivity(model, {g: [m] for m, g in names.items()}, seqs, imatrix, auto.gguf_candidates,
                             tokens=128, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    assert {t.name for t in found} == set(names.values())
    for t in found:
        assert [o.dtype for o in t.options] == list(auto.LADDER_256)
        kls = [o.kl for o in t.options]
        assert t.measured_kl > 0 and kls[0] == pytest.approx(t.measured_kl)
        assert kls == sorted(kls, reverse=True) and kls[-1] < kls[0] / 20
    # the measured cost differs between tensors by more than noise: that is what the choice uses
    measured = sorted(t.measured_kl for t in found)
    assert measured[-1] > 3 * measured[0]


# --------------------------------------------------------------------------- the export


def test_auto_export_fits_the_target_records_its_types_and_runs_in_llama_cpp(wide_llama_dir, home, tmp_path):
    from edgekit.export import pipeline
    from edgekit.runtimes.llamacpp import last_logits, open_llama

    small = pipeline.run(ExportConfig(model=str(wide_llama_dir), format="gguf", quant="auto", target="5bpw",
                                      calibration_tokens=2000))
    large = pipeline.run(ExportConfig(model=str(wide_llama_dir), format="gguf", quant="auto", target="7bpw",
                                      calibration_tokens=2000))
    for a, bpw in ((small, 5.0), (large, 7.0)):
        folder = Path(a["path"])
        metrics = a["manifest"]["metrics"]
        report = json.loads((folder / "quant_report.json").read_text())
        assert metrics["bits_per_weight"] <= bpw and metrics["auto"]["target"] == f"{bpw:g}bpw"
        written = {n: t for n, (t, _) in _tensors(folder / "model.gguf").items()}
        assert {r["name"]: r["type"] for r in report["tensors"]} == {n: t for n, t in written.items() if t != "F32"}
        assert sum(metrics["auto"]["types"].values()) == len(report["tensors"])
        llm = open_llama(folder / "model.gguf", n_ctx=64)
        llm.eval([1, 5, 9, 17])
        assert np.isfinite(last_logits(llm)).all()
    assert small["manifest"]["metrics"]["auto"]["predicted_kl"] > large["manifest"]["metrics"]["auto"]["predicted_kl"]
    # a bundle sizes its RAM by the chosen types, not by q4_k_m's layout
    from edgekit.package import package

    for a in (small, large):
        memory = package(Path(a["path"]), out_dir=tmp_path, context=64)["manifest"]["memory"]
        assert memory["weights_bytes"] == a["manifest"]["metrics"]["auto"]["tensor_bytes"]
    # the measurement does not depend on the target: the second export reused the first one's
    assert len(list((home / "cache").glob("sensitivity-*.json"))) == 1
    # the fidelity report carries the chosen types
    from edgekit.quantize import report

    rep = report.run(wide_llama_dir, [Path(small["path"])], max_tokens=64)
    assert rep["rows"][1]["types"] == small["manifest"]["metrics"]["auto"]["types"]
    assert "Per-tensor types chosen by quant auto" in report.to_markdown(rep)
    with pytest.raises(RecipeError, match="below the smallest auto mix"):
        pipeline.run(ExportConfig(model=str(wide_llama_dir), format="gguf", quant="auto", target="2.5bpw"))


def test_target_device_is_what_fits_beside_the_kv_cache(tiny_bpe_llama_dir, tmp_path):
    import dataclasses

    import yaml

    from edgekit.devices import load_device
    from edgekit.models import resolve_teacher
    from edgekit.plan import memory_model, runtime_for, weight_budget
    from edgekit.quantize.schemes import get_scheme
    from edgekit.recipe import load_recipe

    def recipe(device: str, context: int):
        path = tmp_path / f"{device}-{context}.yaml"
        path.write_text(yaml.safe_dump({"device": device, "context": context, "distill": None,
                                        "exports": [{"format": "gguf", "quant": "auto", "target": "device"}]}))
        return load_recipe(path)

    arch, device = resolve_teacher(str(tiny_bpe_llama_dir)).arch, load_device("pi-zero-2w")
    (cfg,) = recipe("pi-zero-2w", 256).export_configs(str(tiny_bpe_llama_dir))
    budget = weight_budget(arch, device, "gguf", 256)
    mem = memory_model(arch, get_scheme("gguf", "q4_k_m"), 256, runtime_for("gguf", device))
    # the planner's total (safety margin included) just fits with that many bytes of weights, not with 1 kB more
    assert dataclasses.replace(mem, weights=budget).total <= device.memory_budget
    assert dataclasses.replace(mem, weights=budget + 1000).total > device.memory_budget
    assert cfg.target.endswith("MB") and budget - 100_000 < float(cfg.target[:-2]) * 1e6 <= budget
    assert cfg.label == f"gguf-auto-{cfg.target}"
    with pytest.raises(RecipeError, match="only a recipe knows"):
        ExportConfig(format="gguf", quant="auto", target="device")


def test_onnx_auto_chooses_its_8_bit_matrices_for_the_target_and_runs(wide_llama_dir, home):
    import onnx

    from edgekit.export import pipeline
    from edgekit.runtimes.onnxruntime import OrtSession

    runs = {t: pipeline.run(ExportConfig(model=str(wide_llama_dir), format="onnx", quant="auto", target=t,
                                         calibration_tokens=2000)) for t in (None, "7bpw")}
    eights = {}
    for t, a in runs.items():
        folder, metrics = Path(a["path"]), a["manifest"]["metrics"]
        assert a["manifest"]["label"] == "onnx-auto" + (f"-{t}" if t else "")
        mix = metrics["auto"]
        assert mix["tensor_bytes"] <= mix["budget_bytes"]
        graph = onnx.load(folder / "model.onnx", load_external_data=False)
        bits = [next(x.i for x in n.attribute if x.name == "bits") for n in graph.graph.node
                if n.op_type == "MatMulNBits"]
        # every decoder matrix is MatMulNBits at the chosen width, plus the 8-bit head
        assert len(bits) == sum(mix["types"].values()) + 1
        assert bits.count(8) == mix["types"].get("int8", 0) + 1
        eights[t] = bits.count(8)
        report = json.loads((folder / "quant_report.json").read_text())
        assert {r["type"] for r in report["tensors"]} <= {"int4", "int8"}
        session = OrtSession(folder)
        assert len(session.generate([1, 5, 9, 17], 4)) == 4
    assert eights["7bpw"] > eights[None]  # a larger target buys more 8-bit matrices
    with pytest.raises(RecipeError, match="below the smallest auto mix"):
        pipeline.run(ExportConfig(model=str(wide_llama_dir), format="onnx", quant="auto", target="2.5bpw"))


def test_executorch_auto_chooses_its_8da8w_linears_for_the_target(wide_llama_dir, home):
    from tests.conftest import skip_without_executorch

    skip_without_executorch()
    from edgekit.export import pipeline
    from edgekit.export.executorch import _auto_more_bits
    from edgekit.models import resolve_teacher
    from edgekit.runtimes.executorch import EtSession

    a = pipeline.run(ExportConfig(model=str(wide_llama_dir), format="executorch", quant="auto", target="7bpw",
                                  context=64, calibration_tokens=2000))
    metrics = a["manifest"]["metrics"]
    mix, summary = metrics["auto"], metrics["export"]
    assert mix["tensor_bytes"] <= mix["budget_bytes"] and set(mix["types"]) <= {"8da4w", "8da8w"}
    report = json.loads((Path(a["path"]) / "quant_report.json").read_text())
    assert sorted(summary["more_bits"]) == sorted(r["name"] for r in report["tensors"] if r["type"] == "8da8w")
    assert len(EtSession(Path(a["path"])).generate([1, 5, 9, 17], 4)) == 4
    # 8da4w's own size (the default target) buys fewer 8da8w linears; the measurement is reused from the export
    texts = [json.loads(line)["text"] if line.startswith("{") else line for line in CALIBRATION]
    fewer, _ = _auto_more_bits(wide_llama_dir, texts, None, resolve_teacher(str(wide_llama_dir)).arch, 2000)
    assert len(fewer) < mix["types"]["8da8w"]


def test_cli_quantize_auto_prints_the_mix_and_refuses_a_target_without_auto(wide_llama_dir, home, capsys):
    from edgekit.cli import main

    assert main(["quantize", str(wide_llama_dir), "--format", "gguf", "--quant", "auto", "--target", "6bpw",
                 "--calibration-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "gguf-auto-6bpw" in out and "predicted KL" in out and "budget" in out
    assert main(["quantize", str(wide_llama_dir), "--format", "gguf", "--quant", "q4_k_m", "--target", "6bpw"]) == 2
    err = capsys.readouterr().err
    assert "drop --target or use --quant auto" in err and "Traceback" not in err


def test_the_planner_counts_what_an_auto_target_allows_not_the_reference_layout(tiny_bpe_llama_dir, tmp_path):
    """A device that fits q4_k_m's layout but not 8 bits per weight refuses `quant: auto, target: 8bpw` at
    validation (and takes the default target), and a bundle of an auto export sizes its RAM by the chosen types."""
    import yaml

    from edgekit.devices import load_device
    from edgekit.models import resolve_teacher
    from edgekit.plan import memory_model, runtime_for
    from edgekit.quantize.schemes import get_scheme
    from edgekit.validate import validate_recipe

    arch = resolve_teacher(str(tiny_bpe_llama_dir)).arch
    rt = runtime_for("gguf", load_device("pi-5-8gb"))
    q4 = memory_model(arch, get_scheme("gguf", "q4_k_m"), 256, rt).total
    eight = memory_model(arch, get_scheme("gguf", "auto"), 256, rt,
                         weight_bytes=auto.budget_bytes("8bpw", arch, "gguf")).total
    assert eight > q4
    device = yaml.safe_load((Path(__file__).resolve().parents[2] / "devices" / "pi-5-8gb.yaml").read_text())
    device.update(name="tight", memory_budget=f"{(q4 + eight) // 2}B")
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(device))

    def problems(export: dict) -> list[str]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"device": str(tmp_path / "tight.yaml"), "teacher": str(tiny_bpe_llama_dir),
                                        "context": 256, "distill": None, "exports": [export]}))
        return validate_recipe(path)

    assert problems({"format": "gguf", "quant": "auto"}) == []
    (msg,) = problems({"format": "gguf", "quant": "auto", "target": "8bpw"})
    assert "needs" in msg and "exports.0" in msg
