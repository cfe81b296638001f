"""The planner: memory model, roofline speed model and student sizing.

``plan(teacher_arch, device, fmt, quant, context)`` answers: what student fits
this device's memory budget (and speed target), how much memory each part
takes, and how fast it should decode there. Every figure is a prediction and is
labelled so; ``benchmarks/plan_accuracy.py`` measures how close it comes.

Memory (per runtime):
  weights          exact bytes of every tensor as the format stores it (quantize.schemes)
  kv_cache         2 x layers x context x kv_heads x head_dim x bytes per value
  compute_buffer   activations of one prompt micro-batch at full context plus one row of logits
  runtime_overhead process + runtime library + tokenizer tables (fixed + per vocab entry)
  safety_margin    10 % on top, so a plan that "just fits" still leaves room

Speed (roofline): decode streams every weight it uses once per token plus the
KV cache so far, so time/token = max(bytes / (bandwidth x eff), flops /
(compute x eff)) + a per-layer fixed cost; prefill is compute-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit import registry
from edgekit.arch import DEFAULT_CONTEXT, Architecture
from edgekit.devices import DeviceProfile
from edgekit.errors import BudgetError, RecipeError
from edgekit.quantize.schemes import Scheme, formats, get_format, get_scheme, runtimes, schemes
from edgekit.units import format_bytes

SAFETY_MARGIN = 0.10
DECODE_POSITION = 256  # decode speed is predicted with this many tokens already in the KV cache


@dataclass(frozen=True)
class RuntimeModel:
    """Constants of one runtime's memory and speed behaviour, with where they come from."""

    name: str
    micro_batch: int  # prompt tokens processed per step (llama.cpp n_ubatch)
    overhead_bytes: int  # process + library, before any model is loaded
    vocab_table_bytes: int  # tokenizer tables per vocabulary entry
    decode_bandwidth_eff: float  # fraction of the device's bandwidth that decode achieves
    prefill_compute_eff: float  # fraction of the CPU's FP32 peak that prefill achieves
    per_layer_overhead_s: float  # fixed cost per layer per decoded token (graph, thread sync)
    all_logits: bool  # whether prefill materialises logits for every prompt token
    source: str
    embedded_overhead_bytes: int = 512_000  # bare-metal build (microcontrollers): no OS process, no Python
    kv_cells_multiple: int = 1  # the KV cache is allocated in multiples of this many positions
    # Whether sliding-window layers cache only their window (plus one micro-batch, as llama.cpp's
    # iSWA cache does with swa_full off) or the whole context like a global layer.
    window_kv: bool = False


RUNTIME_MODELS = {
    # Calibrated on the embedded teacher with llama-cpp-python 0.3.36, 2 threads, x86-64
    # (benchmarks/plan_accuracy.py re-measures them): import baseline 48 MiB, tokenizer
    # and context structures ~22 MiB for a 49k vocabulary, decode at ~46 % of the
    # measured read bandwidth, prefill at ~35 % of the measured FP32 matmul peak. A native
    # app without Python is ~12 MiB smaller.
    "llama.cpp": RuntimeModel("llama.cpp", 512, 50_000_000, 450, 0.5, 0.35, 25e-6, False,
                              "calibrated: llama-cpp-python 0.3.36 on x86-64 (benchmarks/plan_accuracy.py)",
                              kv_cells_multiple=256, window_kv=True),  # llama.cpp pads the cache to 256 cells
    # Estimates until the ONNX and ExecuTorch exporters exist to measure them against.
    "onnxruntime": RuntimeModel("onnxruntime", 512, 80_000_000, 300, 0.4, 0.4, 40e-6, True,
                                "estimate (not yet measured)"),
    "onnxruntime-genai": RuntimeModel("onnxruntime-genai", 512, 90_000_000, 300, 0.4, 0.4, 30e-6, False,
                                      "estimate (not yet measured)"),
    "executorch": RuntimeModel("executorch", 128, 30_000_000, 200, 0.4, 0.4, 30e-6, False,
                               "estimate (not yet measured)"),
}




def runtime_model(runtime: str) -> RuntimeModel:
    """The planning constants of ``runtime``: its descriptor's ``plan_model`` when it brings one (a plugin
    runtime), else edgekit's table above, else a generic estimate for a registered runtime."""
    desc = registry.get(registry.RUNTIME, runtime, error=RecipeError, what="runtime")
    own = getattr(desc, "plan_model", None)
    if own is not None:
        return own
    if runtime in RUNTIME_MODELS:
        return RUNTIME_MODELS[runtime]
    return RuntimeModel(runtime, 512, 80_000_000, 300, 0.4, 0.4, 40e-6, True,
                        f"generic estimate: runtime {runtime} brings no plan_model")


@dataclass(frozen=True)
class Memory:
    weights: int
    kv_cache: int
    compute_buffer: int
    runtime_overhead: int

    @property
    def predicted_rss(self) -> int:
        return self.weights + self.kv_cache + self.compute_buffer + self.runtime_overhead

    @property
    def safety_margin(self) -> int:
        return int(self.predicted_rss * SAFETY_MARGIN)

    @property
    def total(self) -> int:
        return self.predicted_rss + self.safety_margin

    def to_dict(self) -> dict:
        return {
            "weights_bytes": self.weights,
            "kv_cache_bytes": self.kv_cache,
            "compute_buffer_bytes": self.compute_buffer,
            "runtime_overhead_bytes": self.runtime_overhead,
            "predicted_rss_bytes": self.predicted_rss,
            "safety_margin_bytes": self.safety_margin,
            "total_bytes": self.total,
        }


def kv_cache_bytes(arch: Architecture, context: int, bytes_per_value: int, runtime: str = "llama.cpp") -> int:
    """K and V for every cached position of every layer; sliding-window layers count at their window
    where the runtime caches only the window (llama.cpp: window + one micro-batch, padded)."""
    rt = runtime_model(runtime)
    cells = rt.kv_cells_multiple
    pad = lambda n: -(-n // cells) * cells  # noqa: E731
    window = pad(arch.sliding_window + rt.micro_batch) if rt.window_kv else context
    return 2 * arch.kv_positions(pad(context), min(pad(context), window)) * arch.kv_dim * bytes_per_value


def compute_buffer_bytes(arch: Architecture, context: int, rt: RuntimeModel) -> int:
    """Live activations while prefilling one micro-batch against a full context.

    The largest tensors are the attention scores (heads x micro-batch x context, f32), the MLP's gate/up/product
    (3 x micro-batch x intermediate) and a handful of hidden-size rows; the runtime
    reuses this memory layer to layer, so one layer's worth is live at once.
    """
    ub = min(rt.micro_batch, context)
    # ggml-alloc computes the softmax in the scores' own buffer, so the scores count once.
    per_token = arch.heads * context + 3 * arch.intermediate_size + 4 * arch.hidden_size
    logits = (ub if rt.all_logits else 1) * arch.vocab_size
    return 4 * (ub * per_token + logits)


def memory_model(arch: Architecture, scheme: Scheme, context: int, runtime: str, bare_metal: bool = False,
                 weight_bytes: int | None = None) -> Memory:
    """The memory an export of ``arch`` at ``scheme`` needs at ``context`` on ``runtime``. ``weight_bytes``: the
    weights' real size when known (a ``quant: auto`` export's chosen types, or the most its target allows) instead
    of the scheme's layout."""
    rt = runtime_model(runtime)
    fmt = get_format(scheme.format)
    overhead = rt.embedded_overhead_bytes if bare_metal else rt.overhead_bytes + rt.vocab_table_bytes * arch.vocab_size
    return Memory(
        weights=scheme.weight_bytes(arch) if weight_bytes is None else int(weight_bytes),
        kv_cache=kv_cache_bytes(arch, context, fmt.kv_dtype_bytes, runtime),
        compute_buffer=compute_buffer_bytes(arch, context, rt),
        runtime_overhead=overhead,
    )


def _bare_metal(device: DeviceProfile) -> bool:
    return device.device_class in ("mcu", "wearable") and device.ram < 64_000_000


# Decode kernels do not stream every storage type equally fast: unpacking a 5th bit (Q5_0/Q5_1) or
# K-quant super-blocks costs CPU time on top of the bytes. Relative cost per byte, measured with
# llama.cpp 0.3.36 on x86-64 AVX-512 (benchmarks/plan_accuracy.py; Q4_1 = 1). ARM kernels differ.
KERNEL_COST = {"Q4_1": 1.0, "Q8_0": 1.05, "Q4_0": 1.25, "Q5_0": 1.5, "Q5_1": 1.5, "Q4_K": 1.2, "Q5_K": 1.2,
               "Q6_K": 1.2, "Q3_K": 1.3, "Q2_K": 1.3, "IQ4_NL": 1.3}


def bytes_read_per_token(arch: Architecture, scheme: Scheme, position: int, kv_bytes: int,
                         runtime: str = "llama.cpp") -> tuple[int, float]:
    """Bytes decode reads for one token: weights touched (the embedding table only if it is also the
    head) + the KV cache so far; returned plain and weighted by KERNEL_COST. Sliding-window layers read
    only their window where the runtime caches only the window; a masked full cache is read whole."""
    read = [t for t in scheme.tensors(arch) if t.role != "embedding"]
    kv = 2 * _attended(arch, position, runtime) * arch.kv_dim * kv_bytes
    return (sum(t.nbytes for t in read) + kv,
            sum(t.nbytes * KERNEL_COST.get(t.dtype, 1.0) for t in read) + kv)


def _attended(arch: Architecture, position: int, runtime: str) -> int:
    """Cached positions one token's attention reads, summed over layers."""
    return arch.kv_positions(position) if runtime_model(runtime).window_kv else arch.layers * position


def predict_speed(arch: Architecture, scheme: Scheme, device: DeviceProfile, runtime: str, context: int) -> dict:
    rt = runtime_model(runtime)
    fmt = get_format(scheme.format)
    position = min(context, DECODE_POSITION)
    nbytes, weighted = bytes_read_per_token(arch, scheme, position, fmt.kv_dtype_bytes, runtime)
    flops_token = 2 * (arch.params_non_embedding + arch.params_embedding) + \
        4 * _attended(arch, position, runtime) * arch.q_dim
    t_mem = weighted / (device.memory_bandwidth * rt.decode_bandwidth_eff)
    t_cmp = flops_token / (device.cpu.peak_fp32 * rt.prefill_compute_eff)
    t_decode = max(t_mem, t_cmp) + rt.per_layer_overhead_s * arch.layers
    prefill_flops = 2 * arch.params_non_embedding + 4 * _attended(arch, min(context, 512) // 2, runtime) * arch.q_dim
    return {
        "predicted_decode_tok_s": 1.0 / t_decode,
        "predicted_prefill_tok_s": device.cpu.peak_fp32 * rt.prefill_compute_eff / prefill_flops,
        "decode_bound": "memory" if t_mem >= t_cmp else "compute",
        "bytes_read_per_token": int(nbytes),
        "decode_position": position,
    }


def _assumptions(runtime: str, device: DeviceProfile) -> list[str]:
    rt = runtime_model(runtime)
    bw = "measured" if "memory_bandwidth" in device.measured else "spec-sheet peak"
    return [
        f"decode reaches {rt.decode_bandwidth_eff:.0%} of the device's {bw} memory bandwidth and pays "
        f"{rt.per_layer_overhead_s * 1e6:.0f} us per layer per token, with per-type kernel costs ({rt.source})",
        f"prefill reaches {rt.prefill_compute_eff:.0%} of the CPU's FP32 peak; CPU only, no GPU/NPU offload",
        f"decode predicted with {DECODE_POSITION} tokens already in the KV cache; batch size 1",
        f"{rt.name} processes prompts in micro-batches of {rt.micro_batch} tokens",
    ]


# --------------------------------------------------------------------------- student sizing


def runtime_for(fmt: str, device: DeviceProfile) -> str:
    get_format(fmt)
    able = runtimes(fmt)  # the registered runtimes that run fmt, in registration order
    for rt in able:
        if rt in device.runtimes:
            return rt
    others = sorted({name for name in formats() if set(runtimes(name)) & set(device.runtimes)})
    raise RecipeError(
        f"device {device.name!r} has no runtime for format {fmt!r} (needs {' or '.join(able) or 'a runtime plugin'}; "
        f"the device lists {', '.join(device.runtimes) or 'none'}); choose --format {' or '.join(others) or '(none)'}"
    )


def attention_heads_for(hidden: int, teacher: Architecture) -> tuple[int, int]:
    """(heads, kv_heads) for a student of width ``hidden`` that pruning can carve out of the teacher.

    Heads are selected, never invented: whole kv groups are kept (kv_heads <= the teacher's) and
    each keeps at most the teacher's number of query heads per group; the most heads that fit win,
    with the most kv heads they allow. Heads are not given up to make the query width (heads x
    head_dim) a multiple of the quant block: on the embedded teacher a 22 x 512 student keeping 6
    of 9 heads agreed with the teacher on 47.5 % of held-out answer tokens after 4 minutes of
    distillation, against 39.2 % for the 4 heads whose width is a K-quant multiple
    (benchmarks/RESULTS.md); the price is one small matrix per layer (the attention output) in a
    5- or 8-bit fallback type.
    """
    group_max = max(1, teacher.heads // teacher.kv_heads)
    for heads in range(max(1, min(teacher.heads, hidden // teacher.head_dim)), 0, -1):
        for kv in range(min(teacher.kv_heads, heads), 0, -1):
            if heads % kv == 0 and heads // kv <= group_max:
                return heads, kv
    return 1, 1


def candidate_shapes(teacher: Architecture, align: int) -> list[Architecture]:
    """Widths the student may take: multiples of the quant block (and of 64), no wider than the teacher."""
    step = max(align, 64)
    while step % 64 or step % align:
        step += 1
    shapes = []
    for h in range(teacher.hidden_size - teacher.hidden_size % step, 0, -step):
        heads, kv = attention_heads_for(h, teacher)
        inter = max(align, int(teacher.intermediate_size * h / teacher.hidden_size) // align * align)
        inter = min(inter, teacher.intermediate_size)
        shapes.append(teacher.with_shape(hidden_size=h, heads=heads, kv_heads=kv, intermediate_size=inter))
    # A teacher narrower than one quant block can only shrink in depth (its rows fall back to another type).
    return shapes or [teacher]


def _fits(arch, scheme, device, runtime, context, target):
    mem = memory_model(arch, scheme, context, runtime, _bare_metal(device))
    if mem.total > device.memory_budget:
        return False, mem, None
    speed = predict_speed(arch, scheme, device, runtime, context)
    if target and speed["predicted_decode_tok_s"] < target:
        return False, mem, speed
    return True, mem, speed


def fit_student(teacher: Architecture, device: DeviceProfile, scheme: Scheme, context: int, runtime: str,
                target_decode_tok_s: float | None = None) -> tuple[Architecture, bool]:
    """The largest student (most non-embedding parameters, then most layers) that fits; (shape, teacher_fits)."""
    ok, _, _ = _fits(teacher, scheme, device, runtime, context, target_decode_tok_s)
    if ok:
        return teacher, True
    best = None
    for shape in candidate_shapes(teacher, scheme.row_multiple):
        lo, hi = 0, teacher.layers  # largest layer count that fits, by bisection (memory grows with layers)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(shape.with_shape(layers=mid), scheme, device, runtime, context, target_decode_tok_s)[0]:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            continue
        cand = shape.with_shape(layers=lo)
        key = (cand.params_non_embedding, cand.layers)
        if best is None or key > (best.params_non_embedding, best.layers):
            best = cand
    if best is None:
        _raise_infeasible(teacher, device, scheme, context, runtime, target_decode_tok_s)
    return best, False


def _smallest(teacher: Architecture, scheme: Scheme) -> Architecture:
    return candidate_shapes(teacher, scheme.row_multiple)[-1].with_shape(layers=1)


def _raise_infeasible(teacher, device, scheme, context, runtime, target):
    tiny = _smallest(teacher, scheme)
    bare = _bare_metal(device)
    mem = memory_model(tiny, scheme, context, runtime, bare)
    budget = format_bytes(device.memory_budget)
    if mem.total <= device.memory_budget and target:
        speed = predict_speed(tiny, scheme, device, runtime, context)["predicted_decode_tok_s"]
        raise BudgetError(
            f"no student reaches target_decode_tok_s={target:g} on {device.name}: even a 1-layer, "
            f"{tiny.hidden_size}-wide student is predicted at {speed:.1f} tok/s; lower the target or pick a faster device"
        )
    emb = sum(t.nbytes for t in scheme.tensors(tiny) if t.role in ("embedding", "output"))
    hints = []
    for ctx in (c for c in (4096, 2048, 1024, 512, 256, 128) if c < context):
        if memory_model(tiny, scheme, ctx, runtime, bare).total <= device.memory_budget:
            hints.append(f"lower context to {ctx}")
            break
    smaller = sorted(schemes(scheme.format), key=lambda s: s.weight_bytes(tiny))
    for s in smaller:
        if s.name != scheme.name and memory_model(tiny, s, context, runtime, bare).total <= device.memory_budget:
            hints.append(f"pick quant {s.name}")
            break
    why = ""
    if emb > device.memory_budget:
        why = (f" The {tiny.vocab_size}-token vocabulary alone outgrows the budget, and a distilled student keeps "
               "its teacher's tokenizer, so only a teacher with a smaller vocabulary can fit.")
    hints.append(f"choose a device with at least {format_bytes(mem.total)} of memory_budget")
    raise BudgetError(
        f"nothing fits: the smallest student (1 layer, hidden {tiny.hidden_size}) needs {format_bytes(mem.total)} "
        f"at {scheme.name} with context {context} (embeddings alone {format_bytes(emb)}, KV cache "
        f"{format_bytes(mem.kv_cache)}, runtime {format_bytes(mem.runtime_overhead)}) but device {device.name!r} allows "
        f"{budget}.{why} Fix: " + "; or ".join(hints)
    )


def weight_budget(arch: Architecture, device: DeviceProfile, fmt: str, context: int) -> int:
    """The weight bytes that fit ``device``'s memory budget beside what else the runtime holds for ``arch`` at
    ``context`` (KV cache, compute buffer, overhead; this module's memory model): the size ``quant: auto`` aims
    at with ``target: device``."""
    runtime = runtime_for(fmt, device)
    mem = memory_model(arch, get_scheme(fmt, "q4_k_m" if fmt == "gguf" else schemes(fmt)[0].name), context, runtime,
                       _bare_metal(device))
    # total = (weights + the rest) * (1 + SAFETY_MARGIN) must stay within the budget
    return int(device.memory_budget / (1 + SAFETY_MARGIN)) - (mem.predicted_rss - mem.weights)


# --------------------------------------------------------------------------- the plan


def plan(teacher: Architecture, device: DeviceProfile, fmt: str = "gguf", quant: str = "q4_k_m", context: int = DEFAULT_CONTEXT,
         target_decode_tok_s: float | None = None, teacher_name: str = "teacher") -> dict:
    """Size a student for ``device`` and describe its memory and predicted speed. Raises BudgetError/RecipeError."""
    if context < 16:
        raise RecipeError(f"context {context} is too small to be useful; use at least 16 tokens "
                          f"(typical: {DEFAULT_CONTEXT})")
    if context > teacher.max_context:
        raise RecipeError(
            f"context {context} exceeds what {teacher_name} was trained for ({teacher.max_context}); "
            f"use context <= {teacher.max_context}"
        )
    if target_decode_tok_s is not None and target_decode_tok_s <= 0:
        raise RecipeError(f"target_decode_tok_s must be positive, got {target_decode_tok_s}")
    scheme = get_scheme(fmt, quant)
    runtime = runtime_for(fmt, device)
    student, teacher_fits = fit_student(teacher, device, scheme, context, runtime, target_decode_tok_s)
    bare = _bare_metal(device)
    mem = memory_model(student, scheme, context, runtime, bare)
    teacher_mem = memory_model(teacher, scheme, context, runtime, bare)
    speed = predict_speed(student, scheme, device, runtime, context)
    fallbacks = scheme.fallbacks(student)
    warnings = []
    if fallbacks:
        kinds = sorted({f"{t.requested}->{t.dtype}" for t in fallbacks})
        warnings.append(
            f"{len(fallbacks)} tensors have rows that are not a multiple of {scheme.row_multiple}, so llama.cpp "
            f"stores them as {', '.join(kinds)} instead"
        )
    if teacher_fits:
        warnings.append(
            f"the teacher itself fits {device.name} at {quant} (needs {format_bytes(teacher_mem.total)} of "
            f"{format_bytes(device.memory_budget)}); distillation is optional"
        )
    student_d = {
        "layers": student.layers, "hidden_size": student.hidden_size, "intermediate_size": student.intermediate_size,
        "heads": student.heads, "kv_heads": student.kv_heads, "head_dim": student.head_dim,
        "vocab_size": student.vocab_size, "tie_embeddings": student.tie_embeddings,
        "params": student.params, "params_non_embedding": student.params_non_embedding,
        "fraction_of_teacher": student.params / teacher.params,
        "family": student.family.name, "embedding_share": student.embedding_share,
        "sliding_window": student.sliding_window, "sliding_layers": student.sliding_layers,
    }
    return {
        "teacher": {"name": teacher_name, "params": teacher.params, "architecture": teacher.to_dict(),
                    "memory_total_bytes": teacher_mem.total},
        "device": {"name": device.name, "display_name": device.display_name},
        "format": fmt,
        "quant": quant,
        "runtime": runtime,
        "context": context,
        "target_decode_tok_s": target_decode_tok_s,
        "teacher_fits": teacher_fits,
        "student": student_d,
        "memory": mem.to_dict(),
        "budget_bytes": device.memory_budget,
        "headroom_bytes": device.memory_budget - mem.total,
        "bits_per_weight": scheme.bits_per_weight(student),
        "fallback_tensors": len(fallbacks),
        **speed,
        "prediction": {"label": "predicted", "assumptions": _assumptions(runtime, device)},
        "warnings": warnings,
    }
