"""The ONNX exporter's quantization step: graph surgery on the fp32 graph edgekit.export.onnx_graph built.

``int8-dynamic`` goes through onnxruntime's ``quantize_dynamic``; the MatMulNBits quants through its
``MatMulNBitsQuantizer`` (round to nearest), with llama.cpp's ``_M`` mix of more bits for the LM head and
the sensitive v_proj/down_proj matrices; the token embedding becomes a ``GatherBlockQuantized`` (of the
LM head's own quantized weights when the two are tied, as onnxruntime-genai's model builder lays it out).
What each quant means is described in :mod:`edgekit.export.onnx`.

``onnxruntime.quantization.matmul_nbits_quantizer`` imports ``onnx_ir`` without declaring it
(onnxruntime 1.32), and calls ``logging.basicConfig`` on import; both are handled here.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgekit import artifact
from edgekit.errors import ModelError
from edgekit.progress import quiet
from edgekit.quantize.gptq import gptq
from edgekit.quantize.schemes import use_more_bits

EXTERNAL_ABOVE = 1_800_000_000  # bytes of weights above which tensors go to one external data file


@dataclass(frozen=True)
class OnnxQuant:
    name: str
    kind: str  # fp32 | fp16 | int8 | int4
    block_size: int = 0
    algorithm: str = ""  # int8: dynamic | rtn; int4: rtn | awq
    description: str = ""
    auto: bool = False  # int4: which matrices get 8 bits is measured per model (edgekit.quantize.auto)


HEAD_BITS, HEAD_BLOCK = 8, 32  # the LM head (and a tied embedding) of the 4-bit exports, as llama.cpp keeps it


QUANT_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits",
              "GatherBlockQuantized")


def quantize(model, spec: OnnxQuant, work: Path, hessians: dict | None = None, more: list[str] | None = None):
    """Quantize ``model``'s MatMuls (and embedding) as ``spec`` says; with ``hessians`` (weight initializer name ->
    ``X^T X`` of its input) the 4-bit matrices are GPTQ-rounded (:mod:`edgekit.quantize.gptq`) instead of rounded
    to nearest. ``more``: the MatMul nodes a 4-bit export keeps at 8 bits besides the head (default: llama.cpp's
    ``_M`` rule, :func:`_more_bits_nodes`)."""
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
    chosen = more is not None
    more = (more if chosen else _more_bits_nodes(model)) if bits == 4 else []
    if hessians and bits == 4:
        n = _gptq_nodes(model, hessians, spec.block_size, skip={head_node.name, *more})
        weights = (f"edgekit.quantize.gptq (error-compensating rounding on calibration text) for {n} matrices, "
                   f"{bits}-bit, block {spec.block_size}, asymmetric, accuracy_level 4; the rest {ort} "
                   "MatMulNBitsQuantizer")
    else:
        model = _quantize_rtn(model, spec.block_size, bits, 4, exclude=[head_node.name, *more] if bits == 4 else None)
        weights = (f"{ort} MatMulNBitsQuantizer default algorithm (round to nearest), {bits}-bit, block "
                   f"{spec.block_size}, asymmetric, accuracy_level 4")
    if bits == 4:
        model = _quantize_rtn(model, HEAD_BLOCK, HEAD_BITS, 4, include=[head_node.name, *more])
        which = ("matrices chosen by measured sensitivity for the size target (edgekit.quantize.auto)" if chosen
                 else "qkv or v_proj / down_proj of the use_more_bits layers")
        weights += (f"; LM head and {len(more)} {which} {HEAD_BITS}-bit, block {HEAD_BLOCK}"
                    + ("" if chosen else " (llama.cpp's _M mix)"))
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


def _gptq_nodes(model, hessians: dict, block: int, skip: set[str]) -> int:
    """Replace every 4-bit MatMul whose weight has a Hessian by a MatMulNBits of its GPTQ codes; returns how many."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for index, node in enumerate(list(model.graph.node)):
        if node.op_type != "MatMul" or node.name in skip or node.input[1] not in hessians:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).T.copy())  # [out, in]
        q = gptq(weight, hessians[node.input[1]], 4, block)
        rows, blocks = q.scales.shape
        codes = q.codes.numpy().reshape(rows, blocks, block)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
        zeros = q.zeros.numpy().astype(np.uint8)
        if blocks % 2:
            zeros = np.concatenate([zeros, np.zeros((rows, 1), np.uint8)], axis=1)
        zeros = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        base = node.input[1].removesuffix(".weight") + ".weight"
        names = [f"{base}_Q4", f"{base}_scales", f"{base}_zp"]
        for name, array in zip(names, (packed, q.scales.numpy().astype(np.float32).reshape(-1), zeros)):
            model.graph.initializer.append(numpy_helper.from_array(array, name))
        new = _make_node("MatMulNBits", [node.input[0], *names], list(node.output), node.name + "_Q4",
                         domain="com.microsoft", K=q.k, N=rows, bits=4, block_size=block, accuracy_level=4)
        model.graph.node.remove(node)
        model.graph.node.insert(index, new)
        if not any(node.input[1] in n.input for n in model.graph.node):
            model.graph.initializer.remove(inits[node.input[1]])
        done += 1
    return done


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
    """The v_proj (or the packed qkv holding it) and down_proj MatMuls that llama.cpp's ``_M`` mixes give more bits
    (``use_more_bits`` layers).

    llama.cpp keeps attn_v and ffn_down at Q6_K in the first and last eighth of the layers and every
    third layer between; the 4-bit ONNX exports do the same with 8-bit blocks, the most sensitive
    matrices of a small model getting the bits (on the teacher: KL to fp32 roughly halves for +7 % size).
    """
    pattern = re.compile(r"/model/layers\.(\d+)/(self_attn/v_proj|self_attn/qkv_proj|mlp/down_proj)/MatMul$")
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
    large = save(model, src)
    with quiet("onnxruntime", "root"):
        # reduce_range: weights in [-64, 64]. On x86 CPUs without VNNI onnxruntime multiplies uint8 activations by
        # int8 weights with VPMADDUBSW, which saturates a pair of products at 32767 (255*127*2 overflows); 7-bit
        # weights cannot (255*64*2 = 32640), so the result is the same on every CPU. On the tiny test model full
        # 8-bit weights gave KL 3e-6 to fp32 with exact (VNNI, NEON) kernels but 1.5e-4 where pairs saturate.
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, use_external_data_format=large,
                         # onnx's shape inference cannot type the outputs of contrib ops (the fused graph's
                         # GroupQueryAttention): their activations are the graph's float type
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
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
    with quiet("onnxruntime"):
        yield mod


def _quantize_rtn(model, block: int, bits: int = 4, accuracy_level: int | None = None, *,
                  exclude: list[str] | None = None, include: list[str] | None = None):
    with _nbits_module() as mod:
        q = mod.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=False,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=exclude, nodes_to_include=include)
        q.process()
        return q.model.model


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


PORTABLE_IR = 10  # onnxruntime >= 1.17 reads it; the first IR with INT4 / UINT4 tensors


def save(model, path: Path) -> bool:
    """Write ``model``; tensors go to one external ``<name>.data`` file past protobuf's limit. Returns that choice."""
    import onnx

    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weights > EXTERNAL_ABOVE
    # The IR version the onnx package stamps is its newest (14 with onnx 1.20+), which onnxruntime releases before it
    # refuse (onnxruntime-web 1.31: at most 13; mobile apps pin older ones). The graph needs only what its opsets
    # need, and IR 10 for 4-bit tensor types: stamp that.
    model.ir_version = min(model.ir_version, max(PORTABLE_IR, onnx.helper.find_min_ir_version_for(
        list(model.opset_import), ignore_unknown=True)))
    try:
        if external:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    except OSError as e:
        raise artifact.disk_error(e, path, weights) from e
    return external


def _attr(node, name: str):
    import onnx

    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _make_node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs):
    import onnx

    return onnx.helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs)


def _np_int64(values):
    import numpy as np

    return np.asarray(values, dtype=np.int64)
