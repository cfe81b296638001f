"""Build a fused ONNX decoder graph from an HF folder's safetensors: onnxruntime's contrib ops, one node per job.

The graph is the layout onnxruntime-genai's model builder writes, built here from edgekit's family table:

- ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: RMSNorm, fused with the
  residual add that precedes it (one node instead of Pow/ReduceMean/Add/Sqrt/Div/Mul/Add);
- ``GroupQueryAttention`` with rotary inside (``do_rotary``, cos/sin tables precomputed from the model's own
  rotary module, so llama3 / linear / yarn scaling come out as transformers computes them) and the K/V
  cache in BNSH; it takes ``seqlens_k`` and ``total_sequence_length`` computed once from
  ``attention_mask``, so there is no mask, position or Concat arithmetic per layer. With
  onnxruntime-genai's ``past_present_share_buffer`` the cache is one preallocated buffer updated in place;
  edgekit's own loop feeds a growing cache, which the same op accepts;
- plain ``MatMul`` with initializer weights, which the quantization step turns into ``MatMulNBits``
  (and the tied embedding into ``GatherBlockQuantized``) exactly as for any other graph.

Family differences come from :class:`edgekit.arch.Family`: q/k/v biases (Qwen2), per-head q/k RMSNorm
before rotary (Qwen3, Gemma 3), four norms per layer, GeGLU (``FastGelu``, the tanh approximation),
embedding scale and sliding-window layers with their own rotary base (Gemma 3), fused qkv / gate_up
projections (Phi-3, split here).

Why hand-written: optimum's export traces the PyTorch graph op by op (3,000+ nodes per decode step for a
30-layer model, most of them mask, rotary and cache arithmetic) and onnxruntime's transformer optimizer
does not fuse that trace into GroupQueryAttention; onnxruntime-genai's builder does, but it is an
application (it writes its own folder, its own quantization and needs transformers 5), not a library
edgekit can call per step. The graph is small, so it is built directly with ``onnx.helper``.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

from edgekit.arch import Architecture
from edgekit.errors import ModelError

OPSET = 18
MS = "com.microsoft"
EPS_DEFAULT = 1e-6


class _Graph:
    """Nodes and initializers in the order they are added (a topological order)."""

    def __init__(self, dtype):
        import numpy as np
        import onnx

        self.onnx, self.dtype = onnx, dtype
        self.elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.nodes, self.inits = [], []

    def init(self, name: str, array) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, array) -> str:
        """A float initializer in the graph's dtype."""
        return self.init(name, array.astype(self.dtype, copy=False))

    def const_i64(self, name: str, values) -> str:
        import numpy as np

        return self.init(name, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", *,
             outputs: list[str] | None = None, **attrs) -> list[str]:
        outputs = outputs or [f"{name}_output_{i}" for i in range(n_out)]  # optimum's naming
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", *, output: str | None = None,
            **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, outputs=[output] if output else None, **attrs)[0]


def build_decoder(model_dir: Path, dtype: str = "fp32"):
    """The fused decoder graph (an ``onnx.ModelProto``) of the HF folder ``model_dir``.

    Inputs ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value`` (BNSH); outputs ``logits``
    and ``present.{i}.key/value``: the names edgekit's genai_config.json declares.
    """
    import numpy as np

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = Architecture.from_hf_config(cfg, str(model_dir / "config.json"))
    fam = arch.family
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    w = _Weights(model_dir)
    g = _Graph(np_dtype)
    eps = float(cfg.get("rms_norm_eps") or EPS_DEFAULT)
    gemma = fam.name == "gemma3"
    hd, heads, kv = arch.head_dim, arch.heads, arch.kv_heads

    def norm_weight(name: str) -> str:
        t = w.get(name)
        return g.weight(name, t + 1.0 if gemma else t)  # Gemma's RMSNorm scales by (1 + weight)

    def linear(x: str, name: str, weight, bias=None) -> str:
        y = g.one("MatMul", [x, g.weight(f"{name}.weight", np.ascontiguousarray(weight.T))], f"/{_path(name)}/MatMul")
        if bias is not None:
            y = g.one("Add", [y, g.weight(f"{name}.bias", bias)], f"/{_path(name)}/Add")
        return y

    # --- embedding and the attention bookkeeping every layer shares
    embed = g.weight("model.embed_tokens.weight", w.get("model.embed_tokens.weight"))
    x = g.one("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    if fam.embed_scale:  # Gemma: the normalizer is cast to the weights' dtype before the multiply, as in transformers
        scale = np.asarray(math.sqrt(arch.hidden_size), dtype=np_dtype)
        x = g.one("Mul", [x, g.init("model.embed_scale", scale)], "/model/embed_tokens/Mul")
    one = g.const_i64("/model/constants/one", [1])
    total = g.one("ReduceSum", ["attention_mask", one], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = g.one("Cast", [g.one("Sub", [total, one], "/model/attn_mask/Sub")], "/model/attn_mask/Cast",
                    to=g.onnx.TensorProto.INT32)
    width = g.one("Gather", [g.one("Shape", ["attention_mask"], "/model/attn_mask/Shape"),
                             g.const_i64("/model/constants/axis1", 1)], "/model/attn_mask/Gather", axis=0)
    total_len = g.one("Cast", [width], "/model/attn_mask/total_length", to=g.onnx.TensorProto.INT32)
    rope = _rotary_tables(model_dir, cfg, arch)
    tables = {kind: (g.weight(f"cos_cache_{kind}", cos), g.weight(f"sin_cache_{kind}", sin))
              for kind, (cos, sin) in rope.items()}
    windows = _layer_windows(cfg, arch)
    scale = float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma else hd ** -0.5
    softcap = float(cfg.get("attn_logit_softcapping") or 0.0)

    residual, pending = x, None  # pending: the sublayer output still to be added to the residual stream
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        h, residual = _add_norm(g, pending, residual, norm_weight(f"{p}.input_layernorm.weight"), eps,
                                f"/model/layers.{i}/input_layernorm")
        if fam.fused:
            qkv = w.get(f"{p}.self_attn.qkv_proj.weight")
            wq, wk, wv = np.split(qkv, [arch.q_dim, arch.q_dim + arch.kv_dim])
        else:
            wq, wk, wv = (w.get(f"{p}.self_attn.{n}_proj.weight") for n in "qkv")
        bias = (lambda n: w.get(f"{p}.self_attn.{n}_proj.bias")) if fam.attn_bias else (lambda n: None)
        # One matmul for q, k and v (GroupQueryAttention splits the packed result itself): on the teacher's int4
        # export decode is ~6 % faster than three. Families with q/k norms keep three (the norms sit between).
        if not fam.qk_norm:
            b = np.concatenate([bias("q"), bias("k"), bias("v")]) if fam.attn_bias else None
            q = linear(h, f"{p}.self_attn.qkv_proj", np.concatenate([wq, wk, wv]), b)
            k = v = ""
        else:
            q = linear(h, f"{p}.self_attn.q_proj", wq, bias("q"))
            k = linear(h, f"{p}.self_attn.k_proj", wk, bias("k"))
            v = linear(h, f"{p}.self_attn.v_proj", wv, bias("v"))
        if fam.qk_norm:
            q = _head_norm(g, q, norm_weight(f"{p}.self_attn.q_norm.weight"), eps, hd, f"/model/layers.{i}/q_norm")
            k = _head_norm(g, k, norm_weight(f"{p}.self_attn.k_norm.weight"), eps, hd, f"/model/layers.{i}/k_norm")
        window = windows[i]
        cos, sin = tables["local" if window and "local" in tables else "global"]
        attn, present_k, present_v = _gqa(
            g, [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len, cos, sin],
            f"/model/layers.{i}/attn/GroupQueryAttention", i, num_heads=heads, kv_num_heads=kv, scale=scale,
            do_rotary=1, rotary_interleaved=0, local_window_size=window or -1, softcap=softcap)
        o = linear(attn, f"{p}.self_attn.o_proj", w.get(f"{p}.self_attn.o_proj.weight"))
        if gemma:
            o = _norm(g, o, norm_weight(f"{p}.post_attention_layernorm.weight"), eps,
                      f"/model/layers.{i}/post_attention_layernorm")
            mlp_norm = f"{p}.pre_feedforward_layernorm.weight"
        else:
            mlp_norm = f"{p}.post_attention_layernorm.weight"
        h, residual = _add_norm(g, o, residual, norm_weight(mlp_norm), eps, f"/model/layers.{i}/post_attention_norm")
        if fam.fused:
            wg, wu = np.split(w.get(f"{p}.mlp.gate_up_proj.weight"), 2)
        else:
            wg, wu = w.get(f"{p}.mlp.gate_proj.weight"), w.get(f"{p}.mlp.up_proj.weight")
        gate = linear(h, f"{p}.mlp.gate_proj", wg)
        up = linear(h, f"{p}.mlp.up_proj", wu)
        if fam.activation == "silu":
            act = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"/model/layers.{i}/mlp/act_fn/Sigmoid")],
                        f"/model/layers.{i}/mlp/act_fn/Mul")
        elif fam.activation == "gelu_pytorch_tanh":
            act = g.one("FastGelu", [gate], f"/model/layers.{i}/mlp/act_fn/FastGelu", domain=MS)
        else:
            raise ModelError(f"the fused ONNX graph has no activation {fam.activation!r}")
        d = linear(g.one("Mul", [act, up], f"/model/layers.{i}/mlp/Mul"), f"{p}.mlp.down_proj",
                   w.get(f"{p}.mlp.down_proj.weight"))
        if gemma:
            d = _norm(g, d, norm_weight(f"{p}.post_feedforward_layernorm.weight"), eps,
                      f"/model/layers.{i}/post_feedforward_layernorm")
        pending = d
    out, _ = _add_norm(g, pending, residual, norm_weight("model.norm.weight"), eps, "/model/norm")
    if arch.tie_embeddings:  # the quantization step gives the head its own (quantized) copy
        head = g.one("Transpose", [embed], "/lm_head/Transpose", perm=[1, 0])
    else:
        head = g.weight("lm_head.weight", np.ascontiguousarray(w.get("lm_head.weight").T))
    final_cap = float(cfg.get("final_logit_softcapping") or 0.0)
    if final_cap:  # logits = cap * tanh(logits / cap)
        logits = g.one("MatMul", [out, head], "/lm_head/MatMul")
        c = g.init("/lm_head/softcap", np.asarray(final_cap, dtype=np_dtype))
        g.one("Mul", [g.one("Tanh", [g.one("Div", [logits, c], "/lm_head/Div")], "/lm_head/Tanh"), c],
              "/lm_head/Mul", output="logits")
    else:
        g.one("MatMul", [out, head], "/lm_head/MatMul", output="logits")
    return _model(g, arch)


def _add_norm(g: _Graph, sub: str | None, residual: str, weight: str, eps: float, name: str) -> tuple[str, str]:
    """(normed, new residual): RMSNorm of ``residual + sub`` in one SkipSimplifiedLayerNormalization
    (the first layer has nothing to add yet: a plain SimplifiedLayerNormalization)."""
    if sub is None:
        return _norm(g, residual, weight, eps, name), residual
    normed, _, _, total = g.node("SkipSimplifiedLayerNormalization", [sub, residual, weight], name, 4, MS,
                                 epsilon=eps)
    return normed, total


def _norm(g: _Graph, x: str, weight: str, eps: float, name: str) -> str:
    return g.one("SimplifiedLayerNormalization", [x, weight], name, axis=-1, epsilon=eps, stash_type=1)


def _head_norm(g: _Graph, x: str, weight: str, eps: float, head_dim: int, name: str) -> str:
    """RMSNorm over each head of ``x`` ``[batch, seq, heads * head_dim]`` (Qwen3's and Gemma 3's q/k norms)."""
    split = g.one("Reshape", [x, g.const_i64(f"{name}/shape_in", [0, 0, -1, head_dim])], f"{name}/Reshape_in")
    normed = _norm(g, split, weight, eps, f"{name}/SimplifiedLayerNormalization")
    return g.one("Reshape", [normed, g.const_i64(f"{name}/shape_out", [0, 0, -1])], f"{name}/Reshape_out")


def _gqa(g: _Graph, inputs: list[str], name: str, layer: int, **attrs) -> list[str]:
    outputs = [f"{name}_output_0", f"present.{layer}.key", f"present.{layer}.value"]
    g.nodes.append(g.onnx.helper.make_node("GroupQueryAttention", inputs, outputs, name=name, domain=MS, **attrs))
    return outputs


def _model(g: _Graph, arch: Architecture):
    onnx = g.onnx
    helper = onnx.helper
    kv_shape = ["batch_size", arch.kv_heads, "past_sequence_length", arch.head_dim]
    present_shape = ["batch_size", arch.kv_heads, "total_sequence_length", arch.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", g.elem, ["batch_size", "sequence_length", arch.vocab_size])]
    for i in range(arch.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", g.elem, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", g.elem, present_shape))
    graph = helper.make_graph(g.nodes, "edgekit_decoder", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                             producer_name="edgekit")


def _path(name: str) -> str:
    """``model.layers.3.self_attn.v_proj`` -> ``model/layers.3/self_attn/v_proj`` (the node names the
    quantization step matches, as in optimum's graphs)."""
    parts = name.split(".")
    out = []
    for part in parts:
        if part.isdigit() and out:
            out[-1] += "." + part
        else:
            out.append(part)
    return "/".join(out)


class _Weights:
    """The folder's safetensors tensors by name, as float32 numpy arrays (bf16 / fp16 upcast on read)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.files = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self.files[key] = path
        self.model_dir = model_dir

    def get(self, name: str):
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise ModelError(f"{self.model_dir} has no tensor {name!r}, which its config.json's family needs; "
                             "the checkpoint is incomplete or of another layout")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name).float().numpy()


def _layer_windows(cfg: dict, arch: Architecture) -> list[int]:
    """Each layer's sliding window in positions (0: global attention), as transformers decides it."""
    if not arch.sliding_window or not arch.sliding_layers:
        return [0] * arch.layers
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == arch.layers:
        return [arch.sliding_window if t == "sliding_attention" else 0 for t in types]
    if arch.sliding_layers == arch.layers:
        return [arch.sliding_window] * arch.layers
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return [arch.sliding_window if (i + 1) % pattern else 0 for i in range(arch.layers)]


def _rotary_tables(model_dir: Path, cfg: dict, arch: Architecture) -> dict:
    """``{"global": (cos, sin)[, "local": ...]}``, each ``[max_positions, rotary_dim / 2]`` float32, from the
    family's own transformers rotary module (so every rope scaling type is computed as transformers does)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    rotary_cls = _rotary_class(config)
    positions = arch.max_context
    out = {"global": _tables(rotary_cls(config=config), positions, arch.head_dim)}
    local_base = getattr(config, "rope_local_base_freq", None)
    if local_base and arch.sliding_layers:  # Gemma 3: sliding layers use their own rope base, unscaled
        local = copy.deepcopy(config)
        local.rope_theta = local_base
        local.rope_scaling = {"rope_type": "default"}
        out["local"] = _tables(rotary_cls(config=local), positions, arch.head_dim)
    return out


def _rotary_class(config):
    module = importlib.import_module(f"transformers.models.{_module_name(config.model_type)}.modeling_"
                                     f"{_module_name(config.model_type)}")
    names = [n for n in dir(module) if n.endswith("RotaryEmbedding") and not n.startswith("_")]
    prefix = {"gemma3_text": "Gemma3"}.get(config.model_type)
    for n in names:
        if prefix is None or n.startswith(prefix):
            return getattr(module, n)
    raise ModelError(f"transformers has no rotary embedding module for model_type {config.model_type!r}")


def _module_name(model_type: str) -> str:
    return {"gemma3_text": "gemma3"}.get(model_type, model_type)


def _tables(rotary, positions: int, head_dim: int):
    import torch

    with torch.no_grad():
        pos = torch.arange(positions, dtype=torch.long)[None]
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2  # transformers repeats the half-table twice along the last axis
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()
