"""``edgekit devices``, ``edgekit teacher`` and ``edgekit plan``: what there is, and what fits where."""

from __future__ import annotations

from edgekit import models
from edgekit.cli.options import default
from edgekit.cli.output import emit_json, params, table
from edgekit.devices import list_devices, load_device
from edgekit.distill.config import StudentSpec
from edgekit.errors import EdgekitError
from edgekit.plan import plan
from edgekit.quantize.schemes import get_scheme
from edgekit.units import format_bandwidth, format_bytes, format_flops


def add_commands(sub, common) -> None:
    d = sub.add_parser("devices", parents=[common], help="list device profiles (and this host)")
    d.add_argument("--json", action="store_true")
    d.add_argument("--no-host", action="store_true", help="skip detecting/measuring this machine")
    d.set_defaults(func=cmd_devices)

    def teacher_args(sp):
        sp.add_argument("--teacher", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), an HF folder, a .gguf file or a hub id")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="DANGEROUS: allow a model folder's own Python code to run")

    t = sub.add_parser("teacher", parents=[common], help="resolve (convert if needed) and describe the teacher")
    teacher_args(t)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_teacher)

    pl = sub.add_parser("plan", parents=[common], help="size a student for each device's memory budget")
    teacher_args(pl)
    pl.add_argument("--device", action="append", help="device name, YAML path or 'host' (repeatable; default: all)")
    pl.add_argument("--format", default=default(StudentSpec, "format"),
                    help="a registered format: gguf, onnx, executorch or a plugin's (`edgekit doctor` lists them; "
                         f"default {default(StudentSpec, 'format')})")
    pl.add_argument("--quant", default=default(StudentSpec, "quant"),
                    help=f"quant scheme of the format (default {default(StudentSpec, 'quant')})")
    pl.add_argument("--context", type=int, default=default(StudentSpec, "context"),
                    help=f"tokens of context to budget for (default {default(StudentSpec, 'context')})")
    pl.add_argument("--target-decode-tok-s", type=float, default=None, help="minimum predicted decode speed")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)


def cmd_devices(args) -> int:
    profiles = list_devices(include_host=not args.no_host)
    if args.json:
        emit_json([p.summary() for p in profiles])
        return 0
    rows = []
    for p in profiles:
        accel = ", ".join(f"{a.kind}: {a.name.split(' (')[0].split(',')[0][:24]}" for a in p.accelerators) or "-"
        bw = format_bandwidth(p.memory_bandwidth) + (" (measured)" if p.measured else "")
        rows.append([p.name, p.display_name.split(" (")[0], format_bytes(p.ram), format_bytes(p.memory_budget), bw,
                     f"{p.cpu.cores}c {p.cpu.arch}", format_flops(p.cpu.peak_fp32), accel, ", ".join(p.runtimes) or "-"])
    print(table(rows, ["name", "device", "ram", "budget", "bandwidth", "cpu", "fp32 peak", "accelerators",
                       "runtimes"], right={2, 3, 4, 6}))
    return 0


def cmd_teacher(args) -> int:
    teacher = models.resolve_teacher(args.teacher, trust_remote_code=args.trust_remote_code)
    info = teacher.describe()
    if args.json:
        emit_json(info)
        return 0
    a = teacher.arch
    print(f"teacher     {teacher.name}  ({teacher.source}{', converted now' if teacher.converted else ', cache verified'})")
    print(f"origin      {teacher.origin}")
    print(f"license     {teacher.license or 'unknown (check the model card)'}")
    print(f"folder      {teacher.path}")
    if teacher.gguf:
        print(f"from GGUF   {teacher.gguf}")
    print(f"params      {params(a.params)} ({params(a.params_non_embedding)} outside the embedding)")
    print(f"shape       {a.layers} layers, hidden {a.hidden_size}, MLP {a.intermediate_size}, "
          f"{a.heads} heads / {a.kv_heads} kv heads of {a.head_dim}, vocab {a.vocab_size}, "
          f"{'tied' if a.tie_embeddings else 'separate'} output head, context {a.max_context}")
    print(f"chat        {'chat template present' if info['has_chat_template'] else 'no chat template'}")
    return 0


def cmd_plan(args) -> int:
    # Fail fast on bad names before resolving (and maybe converting) the teacher.
    get_scheme(args.format, args.quant)
    devices = [load_device(d) for d in args.device] if args.device else list_devices(include_host=True)
    # The architecture from the config or GGUF header only: no conversion, no weights downloaded.
    arch, name = models.teacher_architecture(args.teacher, fetch=True)
    single = len(devices) == 1
    results = []
    for dev in devices:
        try:
            results.append(plan(arch, dev, args.format, args.quant, args.context, args.target_decode_tok_s, name))
        except EdgekitError as e:
            if single:
                raise
            results.append({"device": {"name": dev.name, "display_name": dev.display_name}, "error": str(e),
                            "error_type": type(e).__name__})
    if args.json:
        emit_json(results[0] if single else results)
        return 0
    a = arch
    print(f"teacher  {name}: {a.family.name} family, {params(a.params)} params ({a.embedding_share:.0%} in the "
          f"embedding{'' if a.tie_embeddings else ' and head'}), {a.layers} layers, hidden {a.hidden_size}"
          + (f", {a.sliding_layers} sliding-window layers ({a.sliding_window})" if a.sliding_layers else "")
          + "\n        "
          f" {args.format} {args.quant}  |  context {args.context}"
          + (f"  |  target {args.target_decode_tok_s:g} tok/s" if args.target_decode_tok_s else ""))
    print()
    if single:
        _print_plan_detail(results[0])
    else:
        _print_plan_table(results)
    return 0


def _student_label(r: dict) -> str:
    s = r["student"]
    if r["teacher_fits"]:
        return f"teacher as is ({s['layers']}L x {s['hidden_size']})"
    return f"{s['layers']}L x {s['hidden_size']}, mlp {s['intermediate_size']}, {s['heads']}/{s['kv_heads']} heads"


def _print_plan_table(results: list[dict]) -> None:
    rows, problems = [], []
    for r in results:
        if "error" in r:
            rows.append([r["device"]["name"], "-", "does not fit (see below)", "-", "-", "-", "-", "-"])
            problems.append(f"  {r['device']['name']}: {r['error']}")
            continue
        m = r["memory"]
        rows.append([
            r["device"]["name"], format_bytes(r["budget_bytes"]), _student_label(r), params(r["student"]["params"]),
            format_bytes(m["total_bytes"]), f"{100 * m['total_bytes'] / r['budget_bytes']:.0f}%",
            f"{r['predicted_decode_tok_s']:.1f}", f"{r['predicted_prefill_tok_s']:.0f}",
        ])
    print(table(rows, ["device", "budget", "student", "params", "memory", "of budget", "decode tok/s*",
                       "prefill tok/s*"], right={1, 3, 4, 5, 6, 7}))
    if problems:
        print("\nno plan:")
        print("\n".join(problems))
    ok = [r for r in results if "error" not in r]
    if ok:
        print("\n* predicted, not measured. Assumptions:")
        for line in ok[0]["prediction"]["assumptions"]:
            print(f"  - {line}")
        print("  memory = weights + KV cache + compute buffer + runtime overhead + 10% margin "
              "(`edgekit plan --device NAME` shows each term)")


def _print_plan_detail(r: dict) -> None:
    s, m = r["student"], r["memory"]
    print(f"device   {r['device']['display_name']} ({r['device']['name']}), runtime {r['runtime']}, "
          f"budget {format_bytes(r['budget_bytes'])}")
    verdict = "the teacher fits as is" if r["teacher_fits"] else f"student at {s['fraction_of_teacher']:.0%} of the teacher"
    print(f"student  {_student_label(r)} -> {params(s['params'])} params ({verdict}); {s['family']} family, "
          f"{s['embedding_share']:.0%} of it in the embedding")
    print(f"         {r['bits_per_weight']:.2f} bits per weight at {r['quant']}")
    print()
    terms = [
        ["weights", format_bytes(m["weights_bytes"]), "every tensor at the scheme's stored size (scales included)"],
        ["KV cache", format_bytes(m["kv_cache_bytes"]), f"K and V for {r['context']} tokens" + (
            f"; {s['sliding_layers']} of {s['layers']} layers attend to a {s['sliding_window']}-token window"
            + (" and cache only that (+ one micro-batch)" if r["runtime"] == "llama.cpp" else "")
            if s.get("sliding_layers") else "")],
        ["compute buffer", format_bytes(m["compute_buffer_bytes"]), "activations of one prompt micro-batch"],
        ["runtime overhead", format_bytes(m["runtime_overhead_bytes"]), "process, library, tokenizer tables"],
        ["= predicted RSS", format_bytes(m["predicted_rss_bytes"]), ""],
        ["safety margin", format_bytes(m["safety_margin_bytes"]), "10%"],
        ["= total", format_bytes(m["total_bytes"]),
         f"{100 * m['total_bytes'] / r['budget_bytes']:.0f}% of budget, {format_bytes(r['headroom_bytes'])} left"],
    ]
    print(table(terms, ["memory", "bytes", "what"], right={1}))
    print()
    print(f"decode   {r['predicted_decode_tok_s']:.1f} tok/s (predicted; {r['decode_bound']}-bound, "
          f"{format_bytes(r['bytes_read_per_token'])} read per token)")
    print(f"prefill  {r['predicted_prefill_tok_s']:.0f} tok/s (predicted; compute-bound)")
    for line in r["prediction"]["assumptions"]:
        print(f"         - {line}")
    for w in r["warnings"]:
        print(f"note     {w}")
