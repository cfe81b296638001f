"""Export a Llama-family Hugging Face folder to an ExecuTorch program (``model.pte``) for XNNPACK.

What does each step:

1. The model: :class:`edgekit.export.et_model.StaticDecoder` wraps the HF model's own layers
   with a static K/V cache of ``context`` positions and ExecuTorch's LLM kernels
   (``llama::update_cache``, ``llama::custom_sdpa``); et_model.py says why it is not
   transformers' or optimum-executorch's wrapper.
2. The weights, with torchao's ``quantize_`` (the configs ExecuTorch's LLM exporter uses):

   - ``fp32``: float weights (a tied embedding is stored twice: once for the embedding
     kernel, once packed inside the XNNPACK delegate);
   - ``8da8w``: int8 weights, one scale per output channel, activations quantized to int8
     per token at run time (``Int8DynamicActivationIntxWeightConfig``);
   - ``8da4w``: int4 weights in groups of ``group_size`` (32), symmetric, int8 dynamic
     activations. Like llama.cpp's ``_M`` mixes (and edgekit's ONNX int4) the most sensitive
     matrices get more bits: the LM head, and v_proj / down_proj in the layers llama.cpp's
     ``use_more_bits`` picks, are 8da8w. The token embedding is int8 per row in both
     quantized schemes (ExecuTorch's ``embedding_byte`` kernel).
     Weights are symmetric on purpose: ExecuTorch 1.5.1's XNNPACK lowering accepts torchao's
     asymmetric int4 weights but drops their zero points (measured: logits off by more than
     their own magnitude), so edgekit never asks for them.
   - ``calibrate`` (8da4w only): activation-aware scaling (``edgekit.quantize.awq``, scored
     against this symmetric quantizer) of the float weights on calibration text first.
3. ``torch.export`` (strict) with a dynamic sequence length 1..context-1, then
   ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` and ``to_executorch``
   with quant fusion and constant propagation: linears, norms, RoPE and the MLP run inside
   XNNPACK; the cache ops, the embedding and the position lookup run as ExecuTorch kernels.
   Metadata methods (``get_max_seq_len``, ``get_eos_ids``, ``get_vocab_size``, ...) are
   stored in the program so ExecuTorch's C++ LLM runner can drive it as it is.
4. ``executorch_config.json`` (context, inputs, special tokens, the kernels a runtime must
   link) and the tokenizer / config / generation files are written next to ``model.pte``.
5. A check: the program is loaded by ExecuTorch's runtime and run on a short prompt; the
   last-position logits are compared with the PyTorch model's (and must agree on the argmax
   for the float export).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgekit import artifact, registry
from edgekit.arch import DEFAULT_CONTEXT, Architecture
from edgekit.errors import ModelError, RecipeError
from edgekit.export.calibration import default_texts
from edgekit.export.et_families import check_supported
from edgekit.export.exporter import Exporter
from edgekit.hf import copy_hf_files, special_token_ids
from edgekit.progress import steps
from edgekit.quantize import auto
from edgekit.quantize.awq import awq_scaled_copy
from edgekit.quantize.schemes import SchemeTable, get_scheme, use_more_bits
from edgekit.runtimes import package_version
from edgekit.runtimes.executorch import ET_CONFIG, MODEL_FILE, EtSession

log = logging.getLogger(__name__)

# What a runtime needs beyond ExecuTorch's portable kernels to load the program.
KERNELS = ["XnnpackBackend", "llama::custom_sdpa", "llama::update_cache"]


@dataclass(frozen=True)
class EtQuant:
    name: str
    weight_bits: int  # 32 = float
    group_size: int = 0  # 0 = one scale per output channel
    description: str = ""
    auto: bool = False  # 8da4w with its 8da8w linears chosen by measured sensitivity (edgekit.quantize.auto)


# Quant name -> EtQuant, from the registered ExecuTorch schemes (edgekit.quantize.schemes is the one table).
QUANTS: Mapping[str, EtQuant] = SchemeTable("executorch", lambda ss: {s.name: EtQuant(
    s.name, s.options["weight_bits"], s.options.get("group_size", 0), s.options.get("description", ""),
    bool(s.options.get("auto"))) for s in ss})


def runtime_available() -> str | None:
    """None when ExecuTorch can export here, else the reason and the fix."""
    try:
        if importlib.util.find_spec("executorch") is None or importlib.util.find_spec("torchao") is None:
            raise ImportError
    except (ImportError, ValueError):
        return ("ExecuTorch is not installed: pip install 'edgekit[executorch]' "
                "(executorch 1.5.x, which works with the pinned torch 2.13)")
    return None


def resolve_quant(name: str) -> EtQuant:
    if name not in QUANTS:
        raise RecipeError(f"unknown executorch quant {name!r}: choose one of {', '.join(QUANTS)}")
    return QUANTS[name]


def export_executorch(model_dir: Path, out_dir: Path, quant: str = "fp32", *, context: int = DEFAULT_CONTEXT,
                      calibration_texts: list[str] | None = None, progress: bool = True, target: str | None = None,
                      calibration_tokens: int = 30_000) -> dict:
    """Export the HF folder ``model_dir`` to ``out_dir`` (``model.pte`` + ``executorch_config.json`` + tokenizer).

    ``calibration_texts`` (8da4w only) turn on activation-aware scaling before quantization. ``auto`` chooses
    which linears are 8da8w by measured sensitivity so the weights fit ``target`` (default: 8da4w's size).

    ``out_dir`` is built in a temporary sibling and renamed into place when complete. Returns a
    summary: files and sizes, the tools used, the delegate count, the check and timings.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = resolve_quant(quant)
    missing = runtime_available()
    if missing:
        raise ModelError(missing)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8")) \
        if (model_dir / "config.json").is_file() else None
    if cfg is None:
        raise ModelError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
    arch = Architecture.from_hf_config(cfg, str(model_dir / "config.json"))  # refuses an unknown family
    check_supported(cfg)  # what this exporter cannot express, before anything is loaded
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir} has no .safetensors weights to export; pass a float HF folder "
                         "(edgekit resolves teachers and students to one)")
    context = min(int(context), arch.max_context)
    if context < 8:
        raise RecipeError(f"executorch context {context} is too small; give at least 8 positions")
    check_supported(cfg, context)  # length-dependent RoPE
    bos, eos, _ = special_token_ids(model_dir)
    if calibration_texts and spec.weight_bits != 4:
        raise RecipeError(f"calibration is for 8da4w only, not {spec.name}; drop it or use --quant 8da4w")

    import torch

    timings: dict[str, float] = {}
    start = time.perf_counter()
    awq = None
    with steps(progress, 5, f"export executorch {spec.name}") as bar, artifact.atomic_dir(out_dir) as tmp:
        t = time.perf_counter()
        source, more, mix = model_dir, None, None
        if spec.auto:  # measured on the float model, before any scaling
            more, mix = _auto_more_bits(model_dir, calibration_texts or default_texts(model_dir), target, arch,
                                        calibration_tokens)
        if calibration_texts:
            source, awq = awq_scaled_copy(model_dir, calibration_texts, spec.group_size, tmp / ".awq", symmetric=True)
        module, reference = _build(source, spec, context, model_dir, more)
        # Sliding-window layers keep a full-context cache too (masked to the window): their K/V cost is the context's.
        attention = {"model_type": module.model_type, "sliding_window": module.window or None,
                     "sliding_layers": sum(module.sliding), "kv_cache_positions": context}
        if awq is not None:
            shutil.rmtree(tmp / ".awq")
        timings["load_quantize_s"] = time.perf_counter() - t
        bar.update(1)

        t = time.perf_counter()
        sample = torch.tensor([[bos, 2, 3, 4]], dtype=torch.long) % arch.vocab_size
        seq = torch.export.Dim("seq", min=1, max=context - 1)
        with torch.no_grad():
            exported = torch.export.export(module, (sample, torch.tensor([0], dtype=torch.long)),
                                           dynamic_shapes=({1: seq}, None), strict=True)
        timings["export_s"] = time.perf_counter() - t
        bar.update(1)

        t = time.perf_counter()
        metadata = {"get_max_seq_len": context, "get_max_context_len": context, "get_vocab_size": arch.vocab_size,
                    "get_bos_id": bos, "get_eos_ids": eos, "use_kv_cache": True, "use_sdpa_with_kv_cache": True,
                    "enable_dynamic_shape": True, "get_n_layers": arch.layers}
        program, delegates = _lower(exported, metadata)
        del exported, module
        timings["lower_s"] = time.perf_counter() - t
        bar.update(1)

        t = time.perf_counter()
        with open(tmp / MODEL_FILE, "wb") as f:
            program.write_to_file(f)
        del program
        copied = copy_hf_files(model_dir, tmp)
        et_config = {
            "format": "executorch", "quant": spec.name, "description": spec.description,
            "context": context, "vocab_size": arch.vocab_size, "bos_token_id": bos, "eos_token_id": eos,
            "inputs": {"tokens": "int64 [1, S], 1 <= S < context", "input_pos": "int64 [1]: position of tokens[0]"},
            "output": "float32 [1, vocab]: logits of the last position",
            "attention": attention,
            "kernels": KERNELS + (["quantized_decomposed::embedding_byte"] if spec.weight_bits < 32 else []),
            "executorch_version": package_version("executorch"), "torchao_version": package_version("torchao"),
        }
        artifact.atomic_write_text(tmp / ET_CONFIG, json.dumps(et_config, indent=2) + "\n")
        timings["write_s"] = time.perf_counter() - t
        bar.update(1)

        t = time.perf_counter()
        check = check_pte(tmp / MODEL_FILE, reference, bos, arch.vocab_size)
        if spec.weight_bits == 32 and not check["argmax_agrees"]:
            raise ModelError(f"the fp32 ExecuTorch program disagrees with PyTorch (max |logit diff| "
                             f"{check['max_abs_logit_diff']:.3g}); this is an exporter bug, please report it")
        timings["check_s"] = time.perf_counter() - t
        bar.update(1)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    timings["total_s"] = time.perf_counter() - start
    log.info("exported %s to %s (%s, %.1f MB) in %.1f s", model_dir, out_dir, spec.name, files[MODEL_FILE] / 1e6,
             timings["total_s"])
    return {
        "format": "executorch", "quant": spec.name, "description": spec.description,
        "group_size": spec.group_size or None, "context": context, "folder": str(out_dir), "files": files,
        "size_bytes": sum(files.values()), "model_bytes": files[MODEL_FILE], "copied_from_model_dir": copied,
        "tools": {"graph": f"torch.export {package_version('torch')} + executorch "
                           f"{package_version('executorch')} (XNNPACK)",
                  "quantization": f"torchao {package_version('torchao')}" if spec.weight_bits < 32 else None},
        "delegates": delegates, "attention": attention, "check": check, "eos_token_id": eos, "awq": awq,
        "more_bits": (more if more is not None else more_bits_layers(arch.layers)) if spec.weight_bits == 4 else [],
        **({"auto": mix} if mix is not None else {}),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _build(model_dir: Path, spec: EtQuant, context: int, reference_dir: Path, more: list[str] | None = None):
    """The export module (quantized as ``spec`` says) and the reference for the check (``reference_dir``'s logits).
    ``more``: the linears (``layers.3.v_proj``) an 8da4w export keeps at 8da8w (default: llama.cpp's ``_M`` rule)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.export.et_model import Int8Embedding, StaticDecoder

    probe = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    ref = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32, use_safetensors=True).eval()
    probe = probe % ref.config.vocab_size
    with torch.no_grad():
        ref_logits = ref(probe).logits[0, -1].clone()
    hf = ref if reference_dir == model_dir else \
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    module = StaticDecoder(hf, context).eval()
    if spec.weight_bits < 32:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        if module.lm_head.weight is module.embed_tokens.weight:  # untie: the head is quantized on its own
            module.lm_head.weight = torch.nn.Parameter(module.lm_head.weight.detach().clone(), requires_grad=False)
        module.embed_tokens = Int8Embedding(module.embed_tokens.weight)
        per_channel = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        more = (set(more) if more is not None else set(more_bits_layers(len(module.layers)))) \
            if spec.weight_bits == 4 else set()
        quantize_(module, per_channel, filter_fn=lambda m, fqn: fqn == "lm_head" or fqn in more)
        if spec.weight_bits == 8:
            body = per_channel
        else:
            bad = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
                   and m.in_features % spec.group_size]
            if bad:
                raise ModelError(f"{spec.name} needs input widths divisible by {spec.group_size}; {bad[0]} has "
                                 f"{dict(module.named_modules())[bad[0]].in_features}: use 8da8w for this model")
            body = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                         weight_granularity=PerGroup(spec.group_size))
        quantize_(module, body, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head"
                  and fqn not in more)
    return module, (probe[0].tolist(), ref_logits.numpy())


def _auto_more_bits(model_dir: Path, texts: list[str], target: str | None, arch: Architecture,
                    calibration_tokens: int) -> tuple[list[str], dict]:
    """``quant: auto``: the linears that get 8da8w, chosen by measured sensitivity so the weights fit ``target``
    (:mod:`edgekit.quantize.auto`; the candidates are torchao's 8da4w and 8da8w weight grids), and the record of
    the choice. Phi-3's fused q/k/v and gate/up, which the program splits from one HF matrix, stay 8da4w."""
    units: dict[str, list[str]] = {}
    if not arch.family.fused:
        for i in range(arch.layers):
            for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                units.update({f"layers.{i}.{n}": [f"model.layers.{i}.{part}.{n}"] for n in names})
    layout = get_scheme("executorch", "auto").tensors(arch)
    linears = {f"layers.{t.name.split('.')[1]}.{t.name.split('.')[2]}": t for t in layout
               if t.role in ("attention", "mlp") and t.name.startswith("layers.")}
    int4 = auto.executorch_candidates(32)[0]
    fixed = sum(t.nbytes for t in layout if t.role in ("norm", "output", "embedding"))
    fixed += sum(int4.nbytes(t.rows, t.row) for name, t in linears.items() if name not in units)
    budget = auto.budget_bytes(target, arch, "executorch")
    auto.check_budget([(linears[u].rows, linears[u].row) for u in units], fixed, budget,
                      lambda row: auto.executorch_candidates(32))
    mix, _ = auto.mix_for("executorch", model_dir, units, fixed, texts, budget,
                          lambda row: auto.executorch_candidates(32), calibration_tokens=calibration_tokens)
    more = [u for u, dtype in mix.types.items() if dtype == "8da8w"]
    return more, {**mix.summary(), "target": target, "tensors": mix.rows}


def more_bits_layers(n: int) -> list[str]:
    """v_proj and down_proj of the layers (of ``n``) that llama.cpp's ``use_more_bits`` gives more bits in ``_M``."""
    return [f"layers.{i}.{name}" for i in range(n) if use_more_bits(i, n) for name in ("v_proj", "down_proj")]


def _lower(exported, metadata: dict):
    """``to_edge_transform_and_lower`` with XNNPACK, then ``to_executorch``; returns the program and delegate count."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    edge = to_edge_transform_and_lower(
        exported, partitioner=[XnnpackPartitioner()], constant_methods=metadata,
        # the custom cache ops mutate their inputs, which the edge IR validator does not model
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    delegates = sum(1 for n in edge.exported_program().graph.nodes
                    if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    edge = edge.transform([ConvertToLinearPass()])
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))
    return program, delegates


def check_pte(path: Path, reference: tuple[list[int], object] | None = None, bos: int = 0,
              vocab_size: int | None = None) -> dict:
    """Load ``path`` in ExecuTorch's runtime and run a short prompt; with ``reference``, compare logits.

    Raises ModelError (one line naming the file) if the program does not load or run.
    """
    import numpy as np

    lm = EtSession(Path(path).parent if Path(path).is_file() else Path(path), threads=None, check_config=False,
              pte=Path(path))
    ids = reference[0] if reference else [bos, 1, 2, 3]
    logits = lm.prefill_logits(ids)
    out = {"loads": True, "prompt_tokens": len(ids), "vocab": int(logits.shape[-1])}
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ModelError(f"{path} returns {logits.shape[-1]} logits, the model has {vocab_size}; export again")
    if reference is not None:
        ref = np.asarray(reference[1], dtype=np.float32)
        out["max_abs_logit_diff"] = float(np.abs(logits - ref).max())
        out["argmax_agrees"] = bool(int(logits.argmax()) == int(ref.argmax()))
    lm.close()
    return out


# --------------------------------------------------------------------------- the export stage's exporter


def export_artifact(cfg, model, tmp: Path, texts: list[str] | None) -> dict:
    """The export stage's ExecuTorch step: :func:`export_executorch` into ``tmp`` for ``cfg.context`` positions."""
    work = tmp / "executorch"
    summary = export_executorch(model.path, work, cfg.quant, context=cfg.context or DEFAULT_CONTEXT,
                                calibration_texts=texts, target=cfg.target, calibration_tokens=cfg.calibration_tokens)
    for p in work.iterdir():  # flatten: the artifact folder is the ExecuTorch folder
        shutil.move(str(p), tmp / p.name)
    work.rmdir()
    size = (tmp / MODEL_FILE).stat().st_size
    out = {"model_file": MODEL_FILE, "size_bytes": size, "bits_per_weight": 8 * size / model.arch.params,
           "context": summary["context"], "export": summary}
    if "auto" in summary:  # the choice at the top, as the other exporters record it; per-linear rows in the report
        artifact.atomic_write_text(tmp / "quant_report.json", json.dumps({"quant": "auto", **summary["auto"]},
                                                                         indent=2) + "\n")
        out["auto"] = summary["auto"] = {k: v for k, v in summary["auto"].items() if k != "tensors"}
    return out


EXPORTER = Exporter("executorch", export_artifact, version=2, default_quant="fp32", static_context=True,
                    description="torch.export of a static-KV-cache decoder, torchao quantization, XNNPACK lowering")


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``): the ExecuTorch exporter."""
    reg.add(registry.EXPORTER, EXPORTER.format, EXPORTER)
