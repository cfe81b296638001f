"""Export a Llama-family Hugging Face folder to ONNX for onnxruntime and onnxruntime-genai.

What does each step:

1. The graph: optimum-onnx's ``main_export`` (task ``text-generation-with-past``) traces the
   PyTorch model (fp32; fp16 for ``fp16``) with torch's TorchScript ONNX exporter at opset 18.
   Inputs: ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``;
   outputs: ``logits``, ``present.{i}.key/value`` (the K/V cache grows by concatenation).
   Optimum stores a tied embedding once: the LM head multiplies by ``Transpose(embed_tokens)``.
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
     onnxruntime 1.32's GPTQ runs without extra packages but returns round-to-nearest weights).

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

import contextlib
import json
import logging
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgekit import artifact, registry
from edgekit.arch import Architecture
from edgekit.errors import ModelError, RecipeError, one_line
from edgekit.export.exporter import Exporter
from edgekit.models import HF_FILES, read_json, worth_copying
from edgekit.runtimes.onnxruntime import GENAI_CONFIG, MODEL_FILE, OrtSession, op_counts
from edgekit.quantize.schemes import Scheme, SchemeTable

log = logging.getLogger(__name__)

DATA_FILE = "model.onnx.data"  # external tensor data, only when the model passes protobuf's 2 GB limit
OPSET = 18
_EXTERNAL_ABOVE = 1_800_000_000  # bytes of weights above which tensors go to DATA_FILE
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


@dataclass(frozen=True)
class OnnxQuant:
    name: str
    kind: str  # fp32 | fp16 | int8 | int4
    block_size: int = 0
    algorithm: str = ""  # int8: dynamic | rtn; int4: rtn | awq
    description: str = ""


HEAD_BITS, HEAD_BLOCK = 8, 32  # the LM head (and a tied embedding) of the 4-bit exports, as llama.cpp keeps it



def _quants(schemes: list[Scheme]) -> dict[str, OnnxQuant]:
    """The exporter's table: every registered ONNX scheme, then the activation-aware variant (``<name>-awq``,
    what ``calibrate`` makes) of each scheme that can be calibrated."""
    out = {}
    for s in schemes:
        o = s.options
        out[s.name] = OnnxQuant(s.name, o["kind"], o.get("block_size", 0), o.get("algorithm", ""),
                                o.get("description", ""))
    for s in schemes:
        if s.calibrate:
            spec = out[s.name]
            out[f"{s.name}-awq"] = OnnxQuant(
                f"{s.name}-awq", spec.kind, spec.block_size, "awq",
                f"{spec.kind} MatMulNBits, block {spec.block_size}, after activation-aware (AWQ) scaling on "
                "calibration text; LM head int8")
    return out


# Quant name -> OnnxQuant, from the registered ONNX schemes (edgekit.quantize.schemes is the one table).
QUANTS: Mapping[str, OnnxQuant] = SchemeTable("onnx", _quants)

# Calibration text used when the caller passes none: varied registers, code, numbers and a ChatML turn.
DEFAULT_CALIBRATION = [
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France "
    "built wooden machines that riders pushed along with their feet. Pedals, chains and pneumatic tyres came later.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "<|im_start|>user\nWhat is the capital of Australia, and why was it chosen?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of Australia is Canberra. It was chosen as a compromise between Sydney and Melbourne.<|im_end|>\n",
    "Photosynthesis converts light energy into chemical energy. Plants absorb carbon dioxide and water and, "
    "using sunlight, produce glucose and oxygen. Chlorophyll gives leaves their green colour.",
    "Quarterly revenue rose 12% to $4.3 billion, while operating costs fell 3%. The board approved a dividend of "
    "$0.45 per share, payable on 15 March 2024 to shareholders of record on 1 March.",
    "Dear Maria,\nThank you for your letter. I am sorry I could not come to the meeting on Tuesday; my train was "
    "cancelled. Could we meet next week instead? Best wishes, Tom",
    "To make a simple tomato sauce, warm olive oil in a pan, add chopped garlic, then crushed tomatoes, salt and "
    "basil. Simmer for twenty minutes, stirring from time to time.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "The theorem states that for any right triangle, the square of the hypotenuse equals the sum of the squares "
    "of the other two sides: a^2 + b^2 = c^2. For example, 3, 4 and 5 satisfy it since 9 + 16 = 25.",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\nGrey waves fold and break,\n"
    "salt wind carries gulls inland,\nthe tide keeps its time.<|im_end|>\n",
    "Machine learning models learn patterns from data. A model that fits its training data too closely may fail "
    "on new examples; this is called overfitting, and regularisation helps prevent it.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin spent about two and a half hours "
    "outside the lunar module, while Michael Collins orbited above in the command module.",
]


# --------------------------------------------------------------------------- public API


def export_onnx(model_dir: Path, out_dir: Path, quant: str = "fp32", *, calibration_texts: list[str] | None = None,
                block_size: int | None = None, progress: bool = True) -> dict:
    """Export the HF folder ``model_dir`` to an onnxruntime / onnxruntime-genai folder ``out_dir``.

    ``out_dir`` is built in a temporary sibling and renamed into place when complete; it holds
    ``model.onnx`` (plus ``model.onnx.data`` past 2 GB), ``genai_config.json``, the tokenizer
    files, config.json and generation_config.json. Returns a summary: files and sizes, the tool
    behind each step, op counts and timings.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = resolve_quant(quant, block_size)
    cfg = _read_json(model_dir / "config.json")
    arch = Architecture.from_hf_config(cfg, str(model_dir / "config.json"))
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir} has no .safetensors weights to export; pass a float HF folder "
                         "(edgekit resolves teachers and students to one)")
    if spec.algorithm == "awq" and not calibration_texts:
        log.info("no calibration text given for %s: using edgekit's %d built-in samples", spec.name,
                 len(DEFAULT_CALIBRATION))
        calibration_texts = DEFAULT_CALIBRATION

    import onnx

    timings: dict[str, float] = {}
    tools = {"graph": _optimum_tool()}
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
        _optimum_export(source, work, "fp16" if spec.kind == "fp16" else "fp32")
        model = onnx.load(str(work / MODEL_FILE))
        timings["export_s"] = time.perf_counter() - t
        step_bar.update(1)
        artifact.fault_point("onnx.step")
        t = time.perf_counter()
        if spec.kind in ("int8", "int4"):
            model, how = _quantize(model, spec, work)
            tools.update(how)
        timings["quantize_s"] = time.perf_counter() - t
        step_bar.update(1)
        artifact.fault_point("onnx.step")
        t = time.perf_counter()
        _set_metadata(model, spec)
        ops = op_counts(model)
        _save(model, tmp / MODEL_FILE)
        del model
        shutil.rmtree(work)
        copied = copy_hf_files(model_dir, tmp)
        config = genai_config(model_dir)
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
        "tools": tools,
        "ops": ops,
        "quantized_ops": {k: v for k, v in ops.items() if k in _QUANT_OPS},
        "calibration_samples": len(calibration_texts) if awq else 0,
        "awq": awq,
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


def genai_config(model_dir: Path, filename: str = MODEL_FILE) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for the graph :func:`export_onnx` writes from ``model_dir``."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    arch = Architecture.from_hf_config(cfg, str(model_dir / "config.json"))
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
                    "position_ids": "position_ids",
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
            "type": "llama",  # the Llama-family graph layout; GenAI's decoder-only runner for it
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
            # optimum's graph concatenates past and new K/V (no GroupQueryAttention), so GenAI must not
            # hand it one preallocated shared buffer.
            "past_present_share_buffer": False,
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "temperature": float(gen.get("temperature") or 1.0),
            "top_k": int(gen.get("top_k") or 50),
            "top_p": float(gen.get("top_p") or 1.0),
        },
    }


def special_token_ids(model_dir: Path) -> tuple[int, list[int], int]:
    """(bos, eos ids, pad) for generation: config and generation_config eos plus the chat end-of-turn token.

    A chat model ends each assistant turn with a token such as ``<|im_end|>`` that config.json
    does not always list as eos; without it generation runs on into invented next turns.
    """
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    gen = _read_json(model_dir / "generation_config.json", required=False)
    vocab = _special_vocab(model_dir)
    eos: list[int] = []
    for value in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    template = _chat_template(model_dir)
    for token in _END_OF_TURN:
        if token in template and token in vocab and vocab[token] not in eos:
            eos.append(vocab[token])
    if not eos:
        raise ModelError(
            f"{model_dir / 'config.json'} names no eos_token_id and the chat template has no known end-of-turn "
            "token; set eos_token_id in config.json or generation_config.json"
        )
    bos = next((v for v in (cfg.get("bos_token_id"), gen.get("bos_token_id")) if isinstance(v, int)), eos[0])
    pad = next((v for v in (cfg.get("pad_token_id"), gen.get("pad_token_id")) if isinstance(v, int)), eos[0])
    return bos, eos, pad


def _optimum_tool() -> str:
    from importlib.metadata import version

    import torch

    return (f"optimum-onnx {version('optimum-onnx')} main_export (optimum {version('optimum')}), "
            f"torch {torch.__version__} TorchScript exporter, opset {OPSET}")


def _optimum_export(model_dir: Path, work: Path, dtype: str) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise ModelError(f"ONNX export needs optimum-onnx ({e}); pip install optimum-onnx==0.1.0") from e
    # The trace warns about Python-bool conversions it records as constants (shape checks that hold
    # for every batch 1 decode); optimum warns that it found the tied weight twice and dedups it.
    with warnings.catch_warnings(), _quiet("optimum", "transformers", "torch.onnx"):
        warnings.simplefilter("ignore")
        try:
            main_export(str(model_dir), output=str(work), task="text-generation-with-past", opset=OPSET,
                        device="cpu", dtype=dtype, do_validation=False, local_files_only=True,
                        library_name="transformers")
        except OSError as e:
            if e.errno in artifact.DISK_FULL:
                raise artifact.disk_error(e, work) from e
            raise ModelError(f"optimum could not export {model_dir} to ONNX: {one_line(e, with_type=True)}") from e
        except (ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"optimum could not export {model_dir} to ONNX: {one_line(e, with_type=True)}") from e
    if not (work / MODEL_FILE).is_file():
        written = sorted(p.name for p in work.iterdir())
        raise ModelError(f"optimum wrote no {MODEL_FILE} for {model_dir} (it wrote {written}); "
                         "optimum-onnx's layout changed: use the pinned optimum-onnx==0.1.0")


# --------------------------------------------------------------------------- step 2: quantization

_QUANT_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits",
              "GatherBlockQuantized")


def _quantize(model, spec: OnnxQuant, work: Path):
    import onnxruntime

    tied = _materialize_tied_head(model)
    ort = f"onnxruntime {onnxruntime.__version__}"
    if spec.algorithm == "dynamic":
        return _quantize_int8(model, work), {
            "weights": f"{ort} quantize_dynamic: int8 weights (7-bit range) per output channel, MatMul with "
                       "constant weights",
            "embedding": "kept fp32 (Gather)",
        }
    head_node = _lm_head(model)
    head = head_node.output[0]
    bits = 8 if spec.kind == "int8" else 4
    # accuracy_level 4 (int8 dot products): at the default level onnxruntime 1.32's CPU kernel dequantizes
    # 8-bit blocks on every call (~15x slower than fp32) and 4-bit decode is ~38 % slower, for the same KL.
    more = _more_bits_nodes(model) if bits == 4 else []
    model = _quantize_rtn(model, spec.block_size, bits, 4, exclude=[head_node.name, *more] if bits == 4 else None)
    weights = (f"{ort} MatMulNBitsQuantizer default algorithm (round to nearest), {bits}-bit, block {spec.block_size}, "
               "asymmetric, accuracy_level 4")
    if bits == 4:
        model = _quantize_rtn(model, HEAD_BLOCK, HEAD_BITS, 4, include=[head_node.name, *more])
        weights += (f"; LM head and {len(more)} v_proj/down_proj of the use_more_bits layers {HEAD_BITS}-bit, "
                    f"block {HEAD_BLOCK} (llama.cpp's _M mix)")
    if spec.algorithm == "awq":
        weights = "edgekit.quantize.awq activation-aware scaling (PyTorch), then " + weights
    head_bits, head_block = (HEAD_BITS, HEAD_BLOCK) if bits == 4 else (bits, spec.block_size)
    if tied:
        _embedding_from_head(model, tied, head, head_block)
        embedding = f"int{head_bits}, shares the LM head's MatMulNBits weights through GatherBlockQuantized"
    else:
        _quantize_embedding(model, head_block, head_bits)
        embedding = f"int{head_bits} GatherBlockQuantized, block {head_block}, asymmetric"
    return model, {"weights": weights, "embedding": embedding}


def awq_scaled_copy(model_dir: Path, texts: list[str], block: int, folder: Path,
                    symmetric: bool = False) -> tuple[Path, dict]:
    """An HF folder with the AWQ-scaled float weights of ``model_dir`` (same fp32 function)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.quantize.awq import MAX_TOKENS, awq_scale

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sequences = [ids for ids in (tok(t, add_special_tokens=False)["input_ids"][:512] for t in texts) if ids]
    if not sequences:
        raise RecipeError("calibration_texts tokenized to nothing; pass a few paragraphs of representative text")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    results = awq_scale(model, sequences, block, symmetric=symmetric)
    model.save_pretrained(folder, safe_serialization=True)
    copy_hf_files(model_dir, folder, keep=("config.json",))
    rtn, awq = sum(r.error_rtn for r in results), sum(r.error_awq for r in results)
    return folder, {"calibration_tokens": min(sum(map(len, sequences)), MAX_TOKENS), "groups": len(results),
                    "groups_scaled": sum(1 for r in results if r.alpha),
                    "calibration_error_vs_rtn": round(awq / rtn, 4) if rtn else 1.0,
                    "alphas": [r.alpha for r in results]}


def _materialize_tied_head(model) -> str | None:
    """Replace ``Transpose(embedding)`` feeding the LM head by a real initializer; return the embedding's name.

    Quantizers only touch MatMuls whose weight is an initializer, so the LM head needs its own.
    """
    from onnx import numpy_helper

    head = _lm_head(model)
    inits = {t.name: t for t in model.graph.initializer}
    for node in list(model.graph.node):
        if (node.op_type == "Transpose" and node.output[0] == head.input[1] and node.input[0] in inits
                and len(inits[node.input[0]].dims) == 2):
            src = inits[node.input[0]]
            weight = numpy_helper.to_array(src).T.copy()
            model.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
            model.graph.node.remove(node)
            return src.name
    return None


def _more_bits_nodes(model) -> list[str]:
    """The v_proj and down_proj MatMuls that llama.cpp's ``_M`` mixes give more bits (``use_more_bits`` layers).

    llama.cpp keeps attn_v and ffn_down at Q6_K in the first and last eighth of the layers and every
    third layer between; the 4-bit ONNX exports do the same with 8-bit blocks, the most sensitive
    matrices of a small model getting the bits (on the teacher: KL to fp32 roughly halves for +7 % size).
    """
    import re

    from edgekit.quantize.schemes import use_more_bits

    pattern = re.compile(r"/model/layers\.(\d+)/(self_attn/v_proj|mlp/down_proj)/MatMul$")
    found = [(int(m.group(1)), n.name) for n in model.graph.node if n.op_type == "MatMul"
             and (m := pattern.search(n.name))]
    layers = 1 + max((i for i, _ in found), default=-1)
    return [name for i, name in found if use_more_bits(i, layers)]


def _lm_head(model):
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get("logits")
    while node is not None and node.op_type not in ("MatMul", "MatMulNBits", "MatMulInteger"):
        node = producers.get(node.input[0])  # walk back through a possible Add/Cast/Mul chain
    if node is None:
        raise ModelError("the exported graph has no MatMul producing 'logits'; optimum's graph layout changed")
    return node


def _quantize_int8(model, work: Path):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = work / "fp32.onnx", work / "int8.onnx"
    large = _save(model, src)
    with _quiet("onnxruntime", "root"):
        # reduce_range: weights in [-64, 64]. On x86 CPUs without VNNI onnxruntime multiplies uint8 activations by
        # int8 weights with VPMADDUBSW, which saturates a pair of products at 32767 (255*127*2 overflows); 7-bit
        # weights cannot (255*64*2 = 32640), so the result is the same on every CPU. On the tiny test model full
        # 8-bit weights gave KL 3e-6 to fp32 with exact (VNNI, NEON) kernels but 1.5e-4 where pairs saturate.
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})
    return onnx.load(str(dst))


@contextlib.contextmanager
def _nbits_module():
    """Import onnxruntime's MatMulNBits quantizer without its side effects (logging.basicConfig on import)."""
    root = logging.getLogger()
    guard = logging.NullHandler()  # basicConfig only configures a root logger without handlers
    root.addHandler(guard)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mod
    except ImportError as e:
        raise ModelError(
            f"onnxruntime's int4 quantizer cannot be imported ({e}); it needs the onnx-ir package, which "
            "onnxruntime does not declare: pip install onnx-ir"
        ) from e
    finally:
        root.removeHandler(guard)
    with _quiet("onnxruntime"):
        yield mod


def _quantize_rtn(model, block: int, bits: int = 4, accuracy_level: int | None = None, *,
                  exclude: list[str] | None = None, include: list[str] | None = None):
    with _nbits_module() as mod:
        q = mod.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=False,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=exclude, nodes_to_include=include)
        q.process()
        return q.model.model


def prefill_inputs(ids: list[int], layers: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """The graph's inputs for one batch-1 prefill of ``ids`` with an empty K/V cache."""
    import numpy as np

    n = len(ids)
    feed = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
    for i in range(layers):
        feed[f"past_key_values.{i}.key"] = empty
        feed[f"past_key_values.{i}.value"] = empty
    return feed


def _embedding_from_head(model, embed_name: str, head_output: str, block: int) -> None:
    """Make the token embedding a GatherBlockQuantized over the LM head's int4/int8 weights (tied models)."""
    from onnx import numpy_helper

    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and head_output in n.output)
    k, n, bits = _attr(head, "K"), _attr(head, "N"), _attr(head, "bits")
    if _attr(head, "block_size") != block or len(head.input) < 4:
        raise ModelError(f"LM head {head.name} is not asymmetric with block {block}; cannot share it")
    packed = next(t for t in model.graph.initializer if t.name == head.input[1])
    row_bytes = packed.dims[1] * packed.dims[2]
    shape = numpy_helper.from_array(_np_int64([n, row_bytes]), embed_name + "_q_shape")
    model.graph.initializer.append(shape)
    reshape = _make_node("Reshape", [head.input[1], shape.name], [embed_name + "_q_rows"],
                         "/model/embed_tokens/Reshape")
    _replace_embedding(model, embed_name, [reshape], reshape.output[0], head.input[2], head.input[3], k, block, bits)


def _quantize_embedding(model, block: int, bits: int = 4) -> None:
    """Quantize an untied token embedding in blocks along the hidden axis (GatherBlockQuantized)."""
    from onnx import numpy_helper

    gather = _embedding_gather(model)
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == gather.input[0]))
    rows, k = table.shape
    with _nbits_module() as mod:
        config = mod.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits)
        quantizer = mod.DefaultWeightOnlyQuantizer(config)
        packed, scales, zeros = quantizer.qbits_block_quant(table.T.copy())  # as the MatMulNBits weight of table.T
    name = gather.input[0]
    for array, suffix in ((packed.reshape(rows, -1), "_q"), (scales, "_scales"), (zeros, "_zero_points")):
        model.graph.initializer.append(numpy_helper.from_array(array, name + suffix))
    _replace_embedding(model, name, [], name + "_q", name + "_scales", name + "_zero_points", k, block, bits)


def _replace_embedding(model, embed_name: str, pre_nodes: list, data: str, scales: str, zeros: str, hidden: int,
                       block: int, bits: int = 4) -> None:
    from onnx import numpy_helper

    gather = _embedding_gather(model)
    padded = -(-hidden // block) * block
    out = gather.output[0]
    gathered = out if padded == hidden else out + "_padded"
    nodes = [*pre_nodes, _make_node("GatherBlockQuantized", [data, gather.input[1], scales, zeros], [gathered],
                                    "/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", bits=bits,
                                    block_size=block, gather_axis=0, quantize_axis=1)]
    if padded != hidden:  # rows are padded to whole blocks: cut the padding off
        consts = {"_starts": [0], "_ends": [hidden], "_axes": [-1]}
        for suffix, value in consts.items():
            model.graph.initializer.append(numpy_helper.from_array(_np_int64(value), embed_name + suffix))
        nodes.append(_make_node("Slice", [gathered, *(embed_name + s for s in consts)], [out],
                                "/model/embed_tokens/Slice"))
    index = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(index + offset, node)
    if not any(embed_name in n.input for n in model.graph.node):
        keep = [t for t in model.graph.initializer if t.name != embed_name]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _embedding_gather(model):
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and node.input[1] == "input_ids":
            return node
    raise ModelError("the exported graph has no Gather of the token embedding on input_ids; optimum's layout changed")


# --------------------------------------------------------------------------- step 3: files


def copy_hf_files(model_dir: Path, out: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Copy the tokenizer, config and generation files; files named in ``keep`` that ``out`` has stay."""
    copied = []
    for name in HF_FILES:
        src = model_dir / name
        if src.is_file() and worth_copying(src) and not (name in keep and (out / name).is_file()):
            shutil.copy2(src, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        log.warning("%s has no tokenizer.json: onnxruntime-genai will not be able to tokenize text", model_dir)
    return copied


def _set_metadata(model, spec: OnnxQuant) -> None:
    from edgekit import __version__

    meta = {"edgekit.version": __version__, "edgekit.quant": spec.name}
    if spec.block_size:
        meta["edgekit.block_size"] = str(spec.block_size)
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def _save(model, path: Path) -> bool:
    """Write ``model``; tensors go to one external ``<name>.data`` file past protobuf's limit. Returns that choice."""
    import onnx

    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weights > _EXTERNAL_ABOVE
    try:
        if external:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    except OSError as e:
        raise artifact.disk_error(e, path, weights) from e
    return external


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


# --------------------------------------------------------------------------- helpers


def _attr(node, name: str):
    import onnx

    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _make_node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs):
    import onnx

    return onnx.helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs)


def _np_int64(values):
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def _read_json(path: Path, required: bool = True) -> dict:
    return read_json(path, required, "an HF model folder needs it to export to ONNX")


def _special_vocab(model_dir: Path) -> dict[str, int]:
    tokens = _read_json(model_dir / "tokenizer.json", required=False).get("added_tokens", [])
    return {t["content"]: t["id"] for t in tokens if "content" in t and "id" in t}


def _chat_template(model_dir: Path) -> str:
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    template = _read_json(model_dir / "tokenizer_config.json", required=False).get("chat_template") or ""
    return template if isinstance(template, str) else json.dumps(template)


@contextlib.contextmanager
def _quiet(*names: str):
    """Raise the given loggers to ERROR for the duration (third-party INFO/WARNING chatter)."""
    loggers = [logging.getLogger() if n == "root" else logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _NoBar:
    def update(self, n: float = 1) -> None:
        pass


@contextlib.contextmanager
def steps(progress: bool, total: int, desc: str):
    if not progress:
        yield _NoBar()
        return
    from edgekit.progress import bar

    with bar(total=total, desc=desc, unit="step") as b:
        yield b


# --------------------------------------------------------------------------- the export stage's exporter


def export_artifact(cfg, model, tmp: Path, texts: list[str] | None) -> dict:
    """The export stage's ONNX step: :func:`export_onnx` into ``tmp`` (the artifact folder is the ONNX folder)."""
    work = tmp / "onnx"
    summary = export_onnx(model.path, work, cfg.exporter_quant, calibration_texts=texts)
    for p in work.iterdir():  # flatten: the artifact folder is the ONNX folder
        shutil.move(str(p), tmp / p.name)
    work.rmdir()
    size = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(MODEL_FILE))
    return {"model_file": MODEL_FILE, "size_bytes": size, "bits_per_weight": 8 * size / model.arch.params,
            "export": summary}


EXPORTER = Exporter("onnx", export_artifact, version=3, default_quant="fp32",
                    calibrated_names=SchemeTable("onnx", lambda ss: {f"{s.name}-awq": s.name
                                                                     for s in ss if s.calibrate}),
                    description="optimum's ONNX export, onnxruntime's quantizers, genai_config.json")


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``): the ONNX exporter."""
    reg.add(registry.EXPORTER, EXPORTER.format, EXPORTER)
