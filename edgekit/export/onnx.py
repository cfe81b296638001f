"""Export a Llama-family Hugging Face folder to ONNX for onnxruntime and onnxruntime-genai.

What does each step:

1. The graph: :mod:`edgekit.export.onnx_graph` builds the fused decoder from the safetensors (fp32; fp16 for
   ``fp16``) at opset 18 with onnxruntime's contrib ops: GroupQueryAttention (rotary inside, the K/V cache
   updated in place when onnxruntime-genai shares its buffer), SkipSimplifiedLayerNormalization, one packed
   q/k/v MatMul per layer (families without q/k norms). Inputs: ``input_ids``, ``attention_mask``,
   ``past_key_values.{i}.key/value``; outputs: ``logits``, ``present.{i}.key/value``. A tied LM head
   multiplies by ``Transpose(embed_tokens)``. Every supported family gets this graph; the earlier path
   (optimum's TorchScript trace, 3,000+ nodes per decode step) is gone, as no family needs it.
2. The weights (int8 and int4 quants), with ``onnxruntime.quantization``:

   - ``int8``: weight-only int8 MatMulNBits (block 32, asymmetric, accuracy_level 4).
   - ``int8-dynamic``: ``quantize_dynamic``, int8 weights with one scale per output channel, MatMul
     with constant weights only (MatMulInteger; onnxruntime fuses it into
     DynamicQuantizeMatMul when it loads the model). The token embedding stays fp32. Its
     activations are quantized per tensor, which the activation outliers of small LLMs
     (SmolLM2's down_proj inputs) punish hard (KL 0.56 on the teacher, worse than int4).
   - ``int4`` / ``int4-b128``: ``MatMulNBitsQuantizer``'s default algorithm: round to
     nearest, asymmetric, an fp32 scale and a 4-bit zero point per block of 32 (128) weights,
     accuracy_level 4 (int8 dot products on CPU). Like llama.cpp's ``_M`` mixes, the most
     sensitive matrices get more bits: the LM head (here also the tied embedding), and v_proj
     and down_proj in the layers llama.cpp's ``use_more_bits`` picks, are 8-bit blocks.
   - ``int4-awq``: the same MatMulNBits format after activation-aware scaling of the PyTorch
     weights on calibration text (``edgekit.quantize.awq``, which says why it is hand-written:
     onnxruntime 1.32's GPTQ runs without extra packages but returns round-to-nearest weights); the
     scaled 4-bit matrices are then rounded by GPTQ against their calibration inputs' Hessians
     (``edgekit.quantize.gptq``: error compensation plus a per-block range search), and their codes are
     written into MatMulNBits as they are. On the teacher (README text, KL to fp32): RTN 0.167, AWQ
     0.087, AWQ + GPTQ 0.076, at the same size.

   The quantized exports give the LM head its own quantized copy of a tied embedding. In the
   MatMulNBits ones the token embedding then reads that same copy through GatherBlockQuantized
   (the layout onnxruntime-genai's model builder uses for tied embeddings), so the vocabulary
   matrix is stored once, quantized; an untied embedding is quantized the same way on its own.
3. ``genai_config.json`` for onnxruntime-genai, written here from config.json,
   generation_config.json and the tokenizer's special tokens; the tokenizer files and
   generation_config.json are copied next to it.

``onnxruntime.quantization.matmul_nbits_quantizer`` imports ``onnx_ir`` without declaring it
(onnxruntime 1.32), and calls ``logging.basicConfig`` on import; both are handled below.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from edgekit import __version__, artifact, registry
from edgekit.arch import Architecture
from edgekit.errors import ModelError, RecipeError, one_line
from edgekit.export.calibration import default_texts
from edgekit.export.exporter import Exporter
from edgekit.export.onnx_graph import build_decoder
from edgekit.export.onnx_quant import QUANT_OPS, OnnxQuant, quantize, save
from edgekit.hf import copy_hf_files, read_json, special_token_ids
from edgekit.progress import steps
from edgekit.quantize import auto
from edgekit.quantize.awq import awq_scaled_copy
from edgekit.quantize.gptq import hessians
from edgekit.quantize.schemes import Scheme, SchemeTable, get_scheme, matmul_nbits_bytes
from edgekit.runtimes.onnxruntime import GENAI_CONFIG, MODEL_FILE, OrtSession, op_counts

log = logging.getLogger(__name__)

FUSED_TOOL = ("edgekit.export.onnx_graph: onnxruntime contrib ops (GroupQueryAttention with rotary, "
              "SkipSimplifiedLayerNormalization), built with onnx.helper from the safetensors")
DATA_FILE = "model.onnx.data"  # external tensor data, only when the model passes protobuf's 2 GB limit
OPSET = 18
GPTQ_TOKENS = 8192  # calibration tokens whose input Hessians GPTQ uses



def _quants(schemes: list[Scheme]) -> dict[str, OnnxQuant]:
    """The exporter's table: every registered ONNX scheme, then the activation-aware variant (``<name>-awq``,
    what ``calibrate`` makes) of each scheme that can be calibrated."""
    out = {}
    for s in schemes:
        o = s.options
        out[s.name] = OnnxQuant(s.name, o["kind"], o.get("block_size", 0), o.get("algorithm", ""),
                                o.get("description", ""), bool(o.get("auto")))
    for s in schemes:
        if s.calibrate:
            spec = out[s.name]
            out[f"{s.name}-awq"] = OnnxQuant(
                f"{s.name}-awq", spec.kind, spec.block_size, "awq",
                f"{spec.kind} MatMulNBits, block {spec.block_size}, activation-aware (AWQ) scaling then GPTQ "
                "rounding on calibration text; LM head int8"
                + ("; 8-bit matrices chosen by measured sensitivity" if spec.auto else ""), spec.auto)
    return out


# Quant name -> OnnxQuant, from the registered ONNX schemes (edgekit.quantize.schemes is the one table).
QUANTS: Mapping[str, OnnxQuant] = SchemeTable("onnx", _quants)

# --------------------------------------------------------------------------- public API


def export_onnx(model_dir: Path, out_dir: Path, quant: str = "fp32", *, calibration_texts: list[str] | None = None,
                block_size: int | None = None, progress: bool = True, target: str | None = None,
                calibration_tokens: int = 30_000) -> dict:
    """Export the HF folder ``model_dir`` to an onnxruntime / onnxruntime-genai folder ``out_dir``.

    ``out_dir`` is built in a temporary sibling and renamed into place when complete; it holds
    ``model.onnx`` (plus ``model.onnx.data`` past 2 GB), ``genai_config.json``, the tokenizer
    files, config.json and generation_config.json. Returns a summary: files and sizes, the tool
    behind each step, op counts and timings. ``target`` is the size of an ``auto`` export (its 8-bit matrices
    chosen by :mod:`edgekit.quantize.auto`; default int4's size).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = resolve_quant(quant, block_size)
    cfg = _read_json(model_dir / "config.json")
    arch = Architecture.from_hf_config(cfg, str(model_dir / "config.json"))
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir} has no .safetensors weights to export; pass a float HF folder "
                         "(edgekit resolves teachers and students to one)")
    if spec.algorithm == "awq" and not calibration_texts:
        calibration_texts = default_texts(model_dir)
        log.info("no calibration text given for %s: using edgekit's %d built-in samples", spec.name,
                 len(calibration_texts))

    timings: dict[str, float] = {}
    tools, mix = {"graph": FUSED_TOOL}, None
    start = time.perf_counter()
    n_steps = 5 if spec.algorithm == "awq" else 4
    with steps(progress, n_steps, f"export onnx {spec.name}") as step_bar, artifact.atomic_dir(out_dir) as tmp:
        work = tmp / ".work"
        work.mkdir()
        source, awq = model_dir, None
        if spec.algorithm == "awq":
            t = time.perf_counter()
            source, awq = awq_scaled_copy(model_dir, calibration_texts, spec.block_size, work / "awq")
            timings["awq_s"] = time.perf_counter() - t
            step_bar.update(1)
            artifact.fault_point("onnx.step")
        t = time.perf_counter()
        model = build_decoder(source, "fp16" if spec.kind == "fp16" else "fp32")
        graph_inputs = {i.name for i in model.graph.input}
        timings["export_s"] = time.perf_counter() - t
        step_bar.update(1)
        artifact.fault_point("onnx.step")
        t = time.perf_counter()
        if spec.kind in ("int8", "int4"):
            more = None
            if spec.auto:  # measured on the float model, before any scaling
                more, mix = _auto_more_bits(model_dir, model, calibration_texts, target, arch, calibration_tokens)
            # calibrated: GPTQ rounds the AWQ-scaled 4-bit matrices against their calibration inputs
            hessians = _hessians(source, calibration_texts) if spec.algorithm == "awq" else None
            model, how = quantize(model, spec, work, hessians, more)
            tools.update(how)
        timings["quantize_s"] = time.perf_counter() - t
        step_bar.update(1)
        artifact.fault_point("onnx.step")
        t = time.perf_counter()
        _set_metadata(model, spec)
        ops = op_counts(model)
        save(model, tmp / MODEL_FILE)
        del model
        shutil.rmtree(work)
        copied = copy_hf_files(model_dir, tmp)
        config = genai_config(model_dir, graph_inputs=graph_inputs)
        artifact.atomic_write_text(tmp / GENAI_CONFIG, json.dumps(config, indent=2) + "\n")
        tools["genai_config"] = "edgekit (from config.json, generation_config.json and the tokenizer)"
        timings["write_s"] = time.perf_counter() - t
        step_bar.update(1)
        artifact.fault_point("onnx.step")
        t = time.perf_counter()
        _smoke_run(tmp / MODEL_FILE, arch)  # check_onnx, then a prefill
        timings["check_s"] = time.perf_counter() - t
        step_bar.update(1)
        artifact.fault_point("onnx.step")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    timings["total_s"] = time.perf_counter() - start
    log.info("exported %s to %s (%s, %.1f MB) in %.1f s", model_dir, out_dir, spec.name,
             sum(files.values()) / 1e6, timings["total_s"])
    return {
        "format": "onnx",
        "quant": spec.name,
        "description": spec.description,
        "block_size": spec.block_size or None,
        "folder": str(out_dir),
        "files": files,
        "size_bytes": sum(files.values()),
        "model_bytes": files[MODEL_FILE] + files.get(DATA_FILE, 0),
        "copied_from_model_dir": copied,
        "opset": OPSET,
        "graph": "fused",
        "tools": tools,
        "ops": ops,
        "quantized_ops": {k: v for k, v in ops.items() if k in QUANT_OPS},
        "calibration_samples": len(calibration_texts) if awq else 0,
        "awq": awq,
        **({"auto": mix} if spec.auto else {}),
        "eos_token_id": config["model"]["eos_token_id"],
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def resolve_quant(name: str, block_size: int | None = None) -> OnnxQuant:
    """The :class:`OnnxQuant` for ``name`` (with ``block_size`` overriding an int4 block); RecipeError if unknown."""
    key = str(name).lower()
    if key not in QUANTS:
        raise RecipeError(f"unknown ONNX quant {name!r}; choose one of {', '.join(QUANTS)}")
    spec = QUANTS[key]
    if block_size is None:
        return spec
    if not spec.block_size:
        raise RecipeError(f"block_size applies to the block-wise ONNX quants only, not {spec.name!r}; drop block_size")
    if block_size < 16 or block_size & (block_size - 1):
        raise RecipeError(f"block_size {block_size} is invalid for MatMulNBits: use a power of two >= 16 (32 or 128)")
    return OnnxQuant(spec.name, spec.kind, block_size, spec.algorithm, spec.description.replace(
        f"block {spec.block_size}", f"block {block_size}"))


# family -> onnxruntime-genai's model type (it picks the decoder-only runner by this name)
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
               "phi3": "phi3"}


def genai_config(model_dir: Path, filename: str = MODEL_FILE, graph_inputs: set[str] | None = None) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for the graph :func:`export_onnx` writes from ``model_dir``.

    ``graph_inputs``: the graph's input names (default: the fused graph's, which derives positions from the
    attention mask and has no ``position_ids``). The graph attends with GroupQueryAttention, so
    onnxruntime-genai may hand it one preallocated K/V buffer that the op updates in place.
    """
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    arch = Architecture.from_hf_config(cfg, str(model_dir / "config.json"))
    graph_inputs = graph_inputs or {"input_ids", "attention_mask"}
    gen = _read_json(model_dir / "generation_config.json", required=False)
    bos, eos, pad = special_token_ids(model_dir)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": arch.max_context,
            "decoder": {
                # No intra_op_num_threads: onnxruntime picks the thread count for the device.
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": arch.head_dim,
                "hidden_size": arch.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({"position_ids": "position_ids"} if "position_ids" in graph_inputs else {}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": arch.heads,
                "num_hidden_layers": arch.layers,
                "num_key_value_heads": arch.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES[arch.family.name],
            "vocab_size": arch.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,  # greedy by default: reproducible; callers opt in to sampling
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": arch.max_context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention writes the new K/V into the preallocated cache in place
            "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "temperature": float(gen.get("temperature") or 1.0),
            "top_k": int(gen.get("top_k") or 50),
            "top_p": float(gen.get("top_p") or 1.0),
        },
    }


def _read_json(path: Path, required: bool = True) -> dict:
    return read_json(path, required, "an HF model folder needs it to export to ONNX")


# --------------------------------------------------------------------------- step 2: quantization


def _hessians(model_dir: Path, texts: list[str]) -> dict:
    """``X^T X`` of every decoder linear's input on the calibration text, keyed by the fused graph's weight
    initializer names (the packed ``qkv_proj`` reads what q_proj reads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sequences = [ids for ids in (tok(t, add_special_tokens=False)["input_ids"][:512] for t in texts) if ids]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    sums = hessians(model, sequences, modules, GPTQ_TOKENS)
    out = {}
    for name, h in sums.items():
        out[f"{name}.weight"] = h
        if name.endswith(".self_attn.q_proj"):
            out[name.replace(".q_proj", ".qkv_proj") + ".weight"] = h
    return out

def _auto_more_bits(model_dir: Path, graph, texts: list[str], target: str | None, arch: Architecture,
                    calibration_tokens: int) -> tuple[list[str], dict]:
    """``quant: auto``: the decoder MatMuls that get 8 bits, chosen by measured sensitivity so the file fits
    ``target`` (:mod:`edgekit.quantize.auto`), and the record of the choice. A packed q/k/v matrix is measured
    as one unit (its q, k and v rows together); Phi-3's gate/up halves, which the graph splits from one HF
    matrix, stay 4-bit."""
    nodes = {n.input[1]: n.name for n in graph.graph.node
             if n.op_type == "MatMul" and n.input[1].startswith("model.layers.")}
    units: dict[str, list[str]] = {}
    for weight in nodes:
        module = weight.removesuffix(".weight")
        if arch.family.fused and module.endswith(("gate_proj", "up_proj")):
            continue
        if module.endswith(".qkv_proj") and not arch.family.fused:
            units[weight] = [module.replace(".qkv_proj", f".{x}_proj") for x in "qkv"]
        else:
            units[weight] = [module]
    inits = {t.name: t for t in graph.graph.initializer}
    shapes = {w: (inits[w].dims[1], inits[w].dims[0]) for w in nodes}  # MatMul B is [in, out]: (rows, row)
    int4 = matmul_nbits_bytes(4, 32)
    layout = get_scheme("onnx", "auto").tensors(arch)
    fixed = sum(t.nbytes for t in layout if t.role in ("norm", "output", "embedding"))
    fixed += sum(int4(row, rows) for w, (rows, row) in shapes.items() if w not in units)
    budget = auto.budget_bytes(target, arch, "onnx")
    auto.check_budget([shapes[w] for w in units], fixed, budget, auto.onnx_candidates)
    mix, _ = auto.mix_for("onnx", model_dir, units, fixed, texts, budget, auto.onnx_candidates,
                          calibration_tokens=calibration_tokens)
    more = [nodes[w] for w, dtype in mix.types.items() if dtype == "int8"]
    return more, {**mix.summary(), "target": target, "tensors": mix.rows}


def prefill_inputs(ids: list[int], layers: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """The fused graph's inputs for one batch-1 prefill of ``ids`` with an empty K/V cache."""
    import numpy as np

    n = len(ids)
    feed = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64)}
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
    for i in range(layers):
        feed[f"past_key_values.{i}.key"] = empty
        feed[f"past_key_values.{i}.value"] = empty
    return feed



# --------------------------------------------------------------------------- step 3: files


def _set_metadata(model, spec: OnnxQuant) -> None:
    meta = {"edgekit.version": __version__, "edgekit.quant": spec.name}
    if spec.block_size:
        meta["edgekit.block_size"] = str(spec.block_size)
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def _smoke_run(path: Path, arch: Architecture) -> None:
    """Load the written folder in onnxruntime (after :func:`check_onnx`) and run a 3-token prefill: a broken graph
    fails here, not later."""
    import numpy as np

    try:
        session = OrtSession(path.parent, threads=1, gpu=False)
        logits = session.logits([1, 2, 3])
        session.close()
    except ModelError:
        raise
    except Exception as e:  # onnxruntime raises Fail / InvalidGraph / RuntimeException
        raise ModelError(f"onnxruntime cannot run the exported {path}: {one_line(e, with_type=True)}") from e
    if logits.shape != (3, arch.vocab_size) or not np.isfinite(logits).all():
        raise ModelError(f"the exported {path} gives logits of shape {logits.shape} with non-finite values; "
                         "the export is broken, please report it")



# --------------------------------------------------------------------------- the export stage's exporter


def export_artifact(cfg, model, tmp: Path, texts: list[str] | None) -> dict:
    """The export stage's ONNX step: :func:`export_onnx` into ``tmp`` (the artifact folder is the ONNX folder)."""
    work = tmp / "onnx"
    summary = export_onnx(model.path, work, cfg.exporter_quant, calibration_texts=texts, target=cfg.target,
                          calibration_tokens=cfg.calibration_tokens)
    for p in work.iterdir():  # flatten: the artifact folder is the ONNX folder
        shutil.move(str(p), tmp / p.name)
    work.rmdir()
    size = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(MODEL_FILE))
    out = {"model_file": MODEL_FILE, "size_bytes": size, "bits_per_weight": 8 * size / model.arch.params,
           "export": summary}
    if "auto" in summary:  # the choice at the top, as the GGUF exporter records it; per-matrix rows in the report
        report = {"quant": "auto", **summary["auto"]}
        artifact.atomic_write_text(tmp / "quant_report.json", json.dumps(report, indent=2) + "\n")
        out["auto"] = {k: v for k, v in summary["auto"].items() if k != "tensors"}
        summary["auto"] = out["auto"]
    return out


EXPORTER = Exporter("onnx", export_artifact, version=4, default_quant="fp32",
                    calibrated_names=SchemeTable("onnx", lambda ss: {f"{s.name}-awq": s.name
                                                                     for s in ss if s.calibrate}),
                    description="the fused decoder graph, onnxruntime's quantizers, genai_config.json")


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``): the ONNX exporter."""
    reg.add(registry.EXPORTER, EXPORTER.format, EXPORTER)
