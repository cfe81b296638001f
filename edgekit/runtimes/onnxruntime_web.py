"""onnxruntime-web through transformers.js: what a browser needs of an edgekit ONNX export.

A web bundle of an ONNX export is a folder in transformers.js's model layout — ``config.json``,
``generation_config.json``, the tokenizer files and ``onnx/model{suffix}.onnx`` (the suffix names the dtype:
``_q4`` for 4-bit, ``_quantized`` for 8-bit, ``_fp16``, none for fp32) — that a page loads with
``AutoModelForCausalLM.from_pretrained`` on onnxruntime-web's WebAssembly backend. The fused graph's inputs and
outputs (``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.*``) are the
names transformers.js feeds, so the graph runs as exported but for two things this module fixes in the copy:

- onnxruntime-web's WebAssembly build has no ``GatherBlockQuantized`` kernel (1.31: "Could not find an
  implementation"), so the quantized token embedding is gathered with standard ops instead (Gather of the packed
  rows, nibble unpacking, (q - zero point) * scale): the same numbers from the same bytes, no larger file;
- it reads IR versions up to 13.

No library does this rewrite (onnxruntime's own transformers optimizer fuses, it does not unfuse contrib ops), so it
is written here with onnx's helper functions.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import ConfigError

# The transformers.js release the web page loads (pinned; web/package.json pins the same one for the tests, which serve
# web/node_modules in place of the CDN). It loads onnxruntime-web from the CDN at the version it was built with.
TRANSFORMERS_JS_VERSION = "4.3.2"
TRANSFORMERS_JS_URL = f"https://cdn.jsdelivr.net/npm/@huggingface/transformers@{TRANSFORMERS_JS_VERSION}"
MAX_IR = 13  # the newest ONNX IR version onnxruntime-web 1.31 loads
MAX_BUFFER = 2**31 - 1  # bytes: one ArrayBuffer, so one model or external data file, at most this large
# transformers.js dtype -> the file name suffix it reads for it
SUFFIXES = {"q4": "_q4", "q8": "_quantized", "fp16": "_fp16", "fp32": ""}
MISSING_OPS = ("GatherBlockQuantized",)  # contrib ops the WebAssembly build lacks, rewritten by for_web
# Ops the WebAssembly build runs, but slowly enough that the bundle says so (measured: benchmarks/browser.py,
# benchmarks/RESULTS.md). Its MatMulNBits has no fast 1-row path: each decode step costs about as much as
# dequantizing every weight.
SLOW_OPS = {"MatMulNBits": (
    "onnxruntime-web's WebAssembly MatMulNBits (4- and 8-bit block weights) decodes the embedded teacher at "
    "3.6-3.8 tok/s on 2 threads where the int8-dynamic export (MatMulInteger) does 21 and fp32 26 (2-core AMD EPYC, "
    "Chromium 150); for a browser, export --quant int8-dynamic (transformers.js's own WebAssembly default, q8)")}


def dtype_of(model) -> str:
    """transformers.js's dtype for ``model`` (an ``onnx.ModelProto``), read from the graph: 4-bit MatMulNBits
    ``q4``, other quantized MatMuls ``q8``, float16 inputs ``fp16``, else ``fp32``."""
    from onnx import TensorProto, helper

    bits = {helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    if 4 in bits:
        return "q4"
    if bits or any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node):
        return "q8"
    if any(i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in model.graph.input):
        return "fp16"
    return "fp32"


def write_model(src: Path, dest_dir: Path) -> dict:
    """Write the ONNX graph at ``src`` (with its external data, if any) into ``dest_dir`` for onnxruntime-web, named
    as transformers.js looks for its dtype (``model_q4.onnx``, ...): the rewrite above, and one external data file
    ``<name>_data`` (transformers.js's name) when the weights do not fit in one protobuf.

    Returns ``{"file", "dtype", "external_data": bool, "rewritten": [op types replaced], "notes": [what the
    browser runs slowly, and what to export instead]}``."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    dtype = dtype_of(model)
    dest = Path(dest_dir) / f"model{SUFFIXES[dtype]}.onnx"
    rewritten = sorted({n.op_type for n in model.graph.node if n.op_type in MISSING_OPS})
    for_web(model)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weights > 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
    if (weights if external else weights + 64 * 2**20) > MAX_BUFFER:
        raise ConfigError(f"{src.name} holds {weights / 2**30:.2f} GiB of weights and a browser loads at most 2 GiB "
                          "per file into WebAssembly memory; export a smaller quant (int4) or a smaller student")
    if external:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dest))
    slow = [SLOW_OPS[op] for op in sorted({n.op_type for n in model.graph.node} & set(SLOW_OPS))]
    return {"file": dest.name, "dtype": dtype, "external_data": external, "rewritten": rewritten, "notes": slow}


def for_web(model) -> None:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place) into what onnxruntime-web's WebAssembly build runs."""
    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft":
            _gather_in_standard_ops(model, node)
    model.ir_version = min(model.ir_version, MAX_IR)


def _gather_in_standard_ops(model, node) -> None:
    """Replace one GatherBlockQuantized (gather_axis 0, quantize_axis 1, uint8 data) by standard ONNX ops."""
    import onnx
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, block = attrs.get("bits", 4), attrs["block_size"]
    if attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) not in (1, -1) or bits not in (4, 8):
        raise ConfigError(f"{node.name}: a GatherBlockQuantized with gather_axis {attrs.get('gather_axis')}, "
                          f"quantize_axis {attrs.get('quantize_axis')}, bits {bits} has no rewrite for the browser; "
                          "edgekit's exporter writes gather_axis 0, quantize_axis 1, 4 or 8 bits — re-export the model")
    inits = {t.name: t for t in model.graph.initializer}
    data, ids, scales = node.input[:3]
    zeros = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if scales not in inits:
        raise ConfigError(f"{node.name}: its scales are not a constant, so the browser rewrite cannot size the blocks")
    blocks = int(inits[scales].dims[-1])
    elem = inits[scales].data_type  # float or float16, as the graph computes
    p = node.name.rsplit("/", 1)[0] + "/web"
    new, consts = [], []

    def const(name: str, value, dtype) -> str:
        import numpy as np

        consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{p}/{name}"))
        return f"{p}/{name}"

    def op(kind: str, inputs: list[str], name: str, **kw) -> str:
        new.append(helper.make_node(kind, inputs, [f"{p}/{name}_output_0"], f"{p}/{name}", **kw))
        return new[-1].output[0]

    def gather_rows(table: str, name: str, width: int | None) -> str:
        """Rows of ``table`` for input_ids, nibbles unpacked when 4-bit (low nibble first), cut to ``width``."""
        rows = op("Gather", [table, ids], f"{name}/Gather", axis=0)
        if bits == 4:
            low = op("BitwiseAnd", [rows, const("fifteen", 15, "uint8")], f"{name}/Low")
            high = op("BitShift", [rows, const("four", 4, "uint8")], f"{name}/High", direction="RIGHT")
            last = const("last_axis", [-1], "int64")
            pairs = op("Concat", [op("Unsqueeze", [low, last], f"{name}/UnsqueezeLow"),
                                  op("Unsqueeze", [high, last], f"{name}/UnsqueezeHigh")], f"{name}/Pairs", axis=-1)
            rows = op("Reshape", [pairs, const("flat", [0, 0, -1], "int64")], f"{name}/Unpack")
        if width is not None:
            rows = op("Slice", [rows, const("zero", [0], "int64"), const(f"{name}_width", [width], "int64"),
                                const("last_axis", [-1], "int64")], f"{name}/Slice")
        return rows

    np_elem = onnx.helper.tensor_dtype_to_np_dtype(elem)
    q = op("Cast", [gather_rows(data, "Data", None)], "Data/Cast", to=elem)
    q = op("Reshape", [q, const("blocked", [0, 0, blocks, block], "int64")], "Data/Blocks")
    if zeros is None:  # symmetric: the kernel's default zero point
        z = const("default_zero", 8 if bits == 4 else 128, np_elem)
    else:
        z = op("Cast", [gather_rows(zeros, "Zeros", blocks if bits == 4 else None)], "Zeros/Cast", to=elem)
        z = op("Unsqueeze", [z, const("last_axis", [-1], "int64")], "Zeros/Unsqueeze")
    s = op("Unsqueeze", [op("Gather", [scales, ids], "Scales/Gather", axis=0), const("last_axis", [-1], "int64")],
           "Scales/Unsqueeze")
    y = op("Mul", [op("Sub", [q, z], "Dequantize/Sub"), s], "Dequantize/Mul")
    new.append(helper.make_node("Reshape", [y, const("rows", [0, 0, blocks * block], "int64")], list(node.output),
                                f"{p}/Rows"))
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset, n in enumerate(new):
        model.graph.node.insert(index + offset, n)
    seen = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(t for t in {t.name: t for t in consts}.values() if t.name not in seen)
