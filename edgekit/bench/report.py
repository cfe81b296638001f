"""The benchmark report: results.json, report.md and one self-contained report.html.

``join_quality`` adds each run's fidelity (perplexity, KL, top-1 against the PyTorch
reference) by export artifact; ``to_markdown`` and ``to_html`` show the measured runs,
then the per-device predictions, clearly labelled ``predicted``, then the host.
The HTML has no script, stylesheet, font or image from anywhere else: its charts
are inline SVG drawn by :mod:`edgekit.bench.charts`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
from collections.abc import Iterable
from html import escape
from pathlib import Path

from edgekit import artifact, registry
from edgekit.arch import Architecture
from edgekit.bench import charts
from edgekit.bench.project import DECODE_PROMPT_TOKENS, project
from edgekit.devices import DeviceProfile
from edgekit.units import format_bandwidth, format_bytes, format_flops

log = logging.getLogger(__name__)

QUALITY_KEYS = ("perplexity", "kl_mean", "kl_p99", "top1_agreement")
TEACHER_KEYS = ("kl_to_teacher", "top1_vs_teacher")  # in a fidelity report made with the teacher
DASH = "–"


# --------------------------------------------------------------------------- quality


def join_quality(results: dict, fidelity_reports: Iterable[dict]) -> dict:
    """A copy of ``results`` whose runs carry ``quality`` {perplexity, kl_mean, kl_p99, top1_agreement} (and
    kl_to_teacher, top1_vs_teacher when the report scored against the teacher).

    A run matches the fidelity row whose ``artifact`` is its export folder's name; runs of the
    ``pytorch`` runtime get the reference row. Unmatched runs get ``quality: None``; a later report
    overrides an earlier one for the same artifact.
    """
    by_artifact: dict[str, dict] = {}
    reference = None
    for report in fidelity_reports:
        for row in report.get("rows", []):
            quality = {k: row.get(k) for k in QUALITY_KEYS} | {k: row[k] for k in TEACHER_KEYS if k in row}
            if row.get("format") == "pytorch":
                reference = quality
            elif row.get("artifact"):
                by_artifact[row["artifact"]] = quality
    out = copy.deepcopy(results)
    for run in out["runs"]:
        if run.get("runtime") == "pytorch":
            match = reference
        elif run.get("artifact"):
            match = by_artifact.get(Path(run["artifact"]).name)
        else:
            match = None
        run["quality"] = dict(match) if match else None
    return out


# --------------------------------------------------------------------------- shared facts


def _median(stat: dict | None) -> float | None:
    return stat.get("median") if stat else None


def _num(v: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return DASH if v is None else format(v * scale, spec)


def _prompts(results: dict) -> list[str]:
    lengths = results.get("settings", {}).get("prompt_lengths") or []
    return [str(n) for n in sorted(lengths)]


def _title(results: dict, title: str | None = None) -> str:
    """``title``, else ``Benchmark: <results["model"]>`` when the results name a model, else a plain title."""
    model = results.get("model")
    if isinstance(model, dict):
        model = model.get("name")
    return title or (f"Benchmark: {model}" if model else "edgekit benchmark")


def _when(created: str | None) -> str:
    """``2026-11-26T10:12:00Z`` -> ``2026-11-26 10:12 UTC``."""
    if not created or "T" not in created:
        return str(created)
    day, time = created.split("T", 1)
    return f"{day} {time[:5]} UTC"


def _against_teacher(runs: list[dict]) -> bool:
    """True when a fidelity report scored these runs against the teacher (their tables gain two columns)."""
    return any((r.get("quality") or {}).get("kl_to_teacher") is not None for r in runs)


def _cells(run: dict, prompts: list[str], teacher: bool = False) -> dict[str, str]:
    """One run's table cells as text (shared by Markdown and HTML); ``teacher``: with the columns against it."""
    m = run.get("metrics") or {}
    q = run.get("quality") or {}
    decode = m.get("decode_tok_s")
    longest = prompts[-1] if prompts else None
    cells = {
        "run": run["label"], "runtime": run["runtime"],
        "size": format_bytes(run["file_bytes"]) if run.get("file_bytes") else DASH,
        "load s": _num(_median(m.get("load_s")), ".2f"),
    }
    for p in prompts:
        cells[f"TTFT @{p} ms"] = _num(_median((m.get("ttft_s") or {}).get(p)), ".0f", 1000)
    cells[f"prefill tok/s @{longest}"] = _num(_median((m.get("prefill_tok_s") or {}).get(longest)), ".0f")
    cells["decode tok/s"] = (f"{decode['median']:.1f} ({decode['min']:.1f}{DASH}{decode['max']:.1f})"
                             if decode else DASH)
    cells["peak RSS"] = format_bytes(m["peak_rss_bytes"]) if m.get("peak_rss_bytes") else DASH
    cells["ppl"] = _num(q.get("perplexity"), ".3f")
    cells["mean KL"] = _num(q.get("kl_mean"), ".3g")
    cells["top-1"] = _num(q.get("top1_agreement"), ".1%")
    if teacher:
        cells["KL to teacher"] = _num(q.get("kl_to_teacher"), ".3g")
        cells["top-1 vs teacher"] = _num(q.get("top1_vs_teacher"), ".1%")
    status = run.get("status", "?")
    cells["status"] = status if status == "ok" else f"{status}: {run.get('reason') or 'no reason given'}"
    return cells


def _groups(runs: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(run.get(key) or "host", []).append(run)
    return out


def _by_device(projections: list[dict]) -> dict[str, list[dict]]:
    return _groups(projections, "device")


def _assumptions(projections: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for p in projections:
        for a in p["assumptions"]:
            seen.setdefault(a)
    return list(seen)


FORMULAS = [
    "efficiency (decode) = measured decode tok/s ÷ (host bandwidth ÷ bytes read per token)",
    "efficiency (prefill) = measured prefill tok/s ÷ (host FP32 FLOP/s ÷ (2 × parameters))",
    "predicted decode tok/s = efficiency (decode) × device bandwidth ÷ bytes read per token",
    "predicted prefill tok/s = efficiency (prefill) × device FP32 FLOP/s ÷ (2 × parameters)",
]


def _host_lines(results: dict) -> list[str]:
    h, s = results["host"], results.get("settings", {})
    bw, fl = h.get("memory_bandwidth_bytes_s"), h.get("fp32_flops")
    versions = ", ".join(f"{k} {v}" for k, v in (h.get("versions") or {}).items() if v) or "none recorded"
    return [
        f"CPU: {h.get('cpu')} ({h.get('cores_physical')} physical cores, {h.get('threads_used')} threads used)",
        f"RAM: {format_bytes(h['ram_bytes']) if h.get('ram_bytes') else DASH}; platform {h.get('platform')}; "
        f"Python {h.get('python')}",
        f"measured memory bandwidth {format_bandwidth(bw) if bw else DASH}, "
        f"FP32 matmul {format_flops(fl) if fl else DASH}",
        f"versions: {versions}; edgekit {results.get('edgekit_version')}",
        f"settings: {s.get('repeats')} repeats after {s.get('warmup')} warm-up, {s.get('threads')} threads, prompts of "
        f"{', '.join(_prompts(results))} tokens, {s.get('decode_tokens')} decoded tokens; created "
        f"{_when(results.get('created'))}",
    ]


# --------------------------------------------------------------------------- Markdown


def _md_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in esc[1:]]


def to_markdown(results: dict, projections: list[dict], title: str | None = None) -> str:
    """Measured tables (one per host), then one ``predicted`` table per device, then host facts."""
    prompts = _prompts(results)
    s = results.get("settings", {})
    lines = [f"# {_title(results, title)}", "",
             f"Medians of {s.get('repeats')} repeats (range min{DASH}max), {s.get('threads')} threads. "
             "Quality is measured against the PyTorch fp32 reference.", ""]
    for host, runs in _groups(results["runs"], "measured_on").items():
        lines += [f"## Measured on {host}: {results['host'].get('cpu')}", ""]
        cells = [_cells(r, prompts, _against_teacher(runs)) for r in runs]
        header = list(cells[0])
        lines += _md_table(header, [list(c.values()) for c in cells], set(range(2, len(header) - 1)))
        lines.append("")
        lines += [f"- {r['id']}: {r['environment']}" for r in runs if r.get("environment")]
        lines += [""] if any(r.get("environment") for r in runs) else []
    if projections:
        lines += ["## Predicted on devices (not measured)", "",
                  "Each run's efficiency on this host, scaled to the device's bandwidth and FLOP/s. "
                  "**These numbers are predictions.**", ""]
        for name, rows in _by_device(projections).items():
            lines += [f"### {rows[0]['device_name']} (`{name}`): predicted", ""]
            here = [p for p in rows if p["runtime_on_device"]]
            absent = [p for p in rows if not p["runtime_on_device"]]
            if here:
                lines += _md_table(
                    ["run", "runtime", "decode tok/s (predicted)", "prefill tok/s (predicted)",
                     "efficiency here (decode / prefill)", "fits memory (peak RSS vs budget)"],
                    [[p["run_label"], p["runtime"], _speed(p["predicted_decode_tok_s"]),
                      _speed(p["predicted_prefill_tok_s"]),
                      f"{p['efficiency_decode']:.0%} / {p['efficiency_prefill']:.0%}",
                      f"{ {True: 'yes', False: '**no**', None: DASH}[p['fits_memory']] } ({_rss_vs_budget(p)})"]
                     for p in here], {2, 3, 4})
                lines.append("")
            if absent and here:
                runs = ", ".join(f"{p['run_label']} ({p['runtime']})" for p in absent)
                lines += [f"Not projected, runtime not on this device: {runs}.", ""]
            elif absent:
                runtimes = ", ".join(sorted({p["runtime"] for p in absent}))
                lines += [f"Nothing measured runs here: the device lists none of {runtimes}.", ""]
        lines += ["How the predictions are made:", ""] + [f"- {f}" for f in FORMULAS] + ["", "Assumptions:", ""]
        lines += [f"{i}. {a}" for i, a in enumerate(_assumptions(projections), 1)] + [""]
    lines += ["## Host", ""] + [f"- {line}" for line in _host_lines(results)]
    return "\n".join(lines) + "\n"


def _speed(v: float) -> str:
    """Tokens/s to three significant figures (236, 37.2, 0.104)."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _rss_vs_budget(p: dict) -> str:
    rss = format_bytes(p["peak_rss_bytes"]) if p.get("peak_rss_bytes") else DASH
    return f"{rss} of {format_bytes(p['memory_budget_bytes'])}"


# --------------------------------------------------------------------------- HTML

CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; --soft:#f8fafc; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 32px 28px 56px; }
h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 40px 0 6px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 4px; }
p.sub, .muted { color: var(--muted); }
p.sub { margin: 0 0 18px; }
.facts { display:grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 10px; margin: 0; }
.facts div { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.facts dt { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.facts dd { margin: 2px 0 0; font-weight: 600; font-variant-numeric: tabular-nums; }
.chips { margin: 12px 0 0; display:flex; flex-wrap: wrap; gap: 6px; }
.chip { font-size: 12px; border: 1px solid var(--line); border-radius: 999px; padding: 2px 10px; color: #374151; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 7px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { font-size: 12px; color: #374151; background: var(--soft); white-space: normal; vertical-align: bottom;
  line-height: 1.25; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
td.status, th.status { text-align: left; white-space: normal; }
tbody tr:nth-child(even) { background: #fcfcfd; }
.range { color: var(--muted); font-size: 12px; }
.dot { display:inline-block; width:9px; height:9px; border-radius:50%; margin-right:6px; vertical-align: 0; }
.badge { display:inline-block; font-size: 12px; font-weight:600; border-radius: 4px; padding: 1px 7px; }
.badge.ok { background:#dcfce7; color:#166534; } .badge.failed { background:#fee2e2; color:#991b1b; }
.badge.unavailable { background:#f3f4f6; color:#4b5563; }
.tag { font-size: 11px; font-weight: 700; letter-spacing: .08em; text-transform: uppercase; color: #92400e;
  background: #fef3c7; border: 1px solid #fcd34d; border-radius: 4px; padding: 1px 6px; vertical-align: 3px; }
.grid2 { display:grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 22px; margin-top: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px 10px; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 6px; }
.legend { display:flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; margin: 4px 0 6px; }
.legend-title { color: var(--muted); }
.key { white-space: nowrap; } .swatch { display:inline-block; width: 11px; height: 11px; border-radius: 3px;
  margin-right: 5px; vertical-align: -1px; }
.device-meta { font-size: 12.5px; color: var(--muted); margin: 0 0 4px; }
.absent { font-size: 12.5px; color: var(--muted); margin: 2px 0 0; }
h3.problems { margin: 18px 0 4px; }
ul.problems { margin: 0; padding-left: 20px; font-size: 14px; }
ul.problems li { margin: 4px 0; }
footer ol, footer ul { padding-left: 22px; font-size: 14px; color: #374151; }
footer li { margin: 3px 0; }
footer h3 { margin: 16px 0 4px; }
code { font-size: 13px; background: var(--soft); padding: 0 4px; border-radius: 4px; }
"""


def _e(v) -> str:
    return escape(str(v))


def _header(results: dict, title: str | None) -> str:
    h, s = results["host"], results.get("settings", {})
    bw, fl = h.get("memory_bandwidth_bytes_s"), h.get("fp32_flops")
    facts = [("Host CPU", h.get("cpu")),
             ("Threads used", f"{h.get('threads_used')} of {h.get('cores_physical')} cores"),
             ("RAM", format_bytes(h["ram_bytes"]) if h.get("ram_bytes") else DASH),
             ("Memory bandwidth (measured)", format_bandwidth(bw) if bw else DASH),
             ("FP32 matmul (measured)", format_flops(fl) if fl else DASH),
             ("Repeats", f"{s.get('repeats')} (+{s.get('warmup')} warm-up)")]
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts)
    versions = [f"{k} {v}" for k, v in (h.get("versions") or {}).items() if v]
    chips = "".join(f'<span class="chip">{_e(v)}</span>' for v in
                    [f"edgekit {results.get('edgekit_version')}", f"Python {h.get('python')}", h.get("platform"),
                     *versions])
    return (f"<header><h1>{_e(_title(results, title))}</h1><p class=\"sub\">Measured on this machine on "
            f"{_e(_when(results.get('created')))}; medians of {_e(s.get('repeats'))} repeats, "
            f"min{DASH}max in grey.</p>"
            f'<dl class="facts">{dl}</dl><div class="chips">{chips}</div></header>')


def _html_cell(key: str, text: str, run: dict) -> str:
    """One measured-table cell: the escaped text, except run (bold), runtime (colour dot), decode (median with
    its range) and status (a badge, the reason in its tooltip and in the list below the table)."""
    if key == "run":
        return f"<b>{_e(text)}</b>"
    if key == "runtime":
        return f'<span class="dot" style="background:{charts.colour(run["runtime"])}"></span>{_e(text)}'
    if key == "decode tok/s" and (run.get("metrics") or {}).get("decode_tok_s"):
        d = run["metrics"]["decode_tok_s"]
        return f'<b>{d["median"]:.1f}</b> <span class="range">{d["min"]:.1f}{DASH}{d["max"]:.1f}</span>'
    if key == "status":
        status = run.get("status", "?")
        tip = f' title="{_e(run["reason"])}"' if status != "ok" and run.get("reason") else ""
        return f'<span class="badge {_e(status)}"{tip}>{_e(status)}</span>'
    return _e(text)


def _runs_table(results: dict) -> str:
    prompts = _prompts(results)
    out = []
    for host, runs in _groups(results["runs"], "measured_on").items():
        cells = [_cells(r, prompts, _against_teacher(runs)) for r in runs]
        head = "".join(f'<th{" class=status" if k == "status" else ""}>{_e(k)}</th>' for k in cells[0])
        body = "".join("<tr>" + "".join(f'<td{" class=status" if k == "status" else ""}>{_html_cell(k, v, run)}</td>'
                                        for k, v in c.items()) + "</tr>" for run, c in zip(runs, cells))
        env = "".join(f"<li>{_e(r['id'])}: {_e(r['environment'])}</li>" for r in runs if r.get("environment"))
        out.append(f'<h2>Measured on {_e(host)}</h2><div style="overflow-x:auto"><table><thead><tr>{head}</tr>'
                   f"</thead><tbody>{body}</tbody></table></div>" + (f"<ul class=env>{env}</ul>" if env else ""))
    return "".join(out)


# Short names in chart labels for the built-in runtimes; any runtime descriptor may bring its own
# ``short_name``, and a runtime with neither is shown by its name.
SHORT_RUNTIME = {"onnxruntime": "ORT", "onnxruntime-genai": "ORT-GenAI", "pytorch": "PyTorch",
                 "executorch": "ExecuTorch"}


def short_runtime(runtime: str) -> str:
    desc = registry.items(registry.RUNTIME).get(runtime)
    return getattr(desc, "short_name", None) or SHORT_RUNTIME.get(runtime, runtime)


def _namer(pairs: Iterable[tuple[str, str]]):
    """A function naming a (label, runtime) pair: the label, plus the runtime where one label runs in several."""
    runtimes: dict[str, set[str]] = {}
    for label, runtime in pairs:
        runtimes.setdefault(label, set()).add(runtime)

    def name(label: str, runtime: str) -> str:
        return f"{label} ({short_runtime(runtime)})" if len(runtimes.get(label, ())) > 1 else label

    return name


def _speed_chart(results: dict) -> str:
    name = _namer((r["label"], r["runtime"]) for r in results["runs"] if r.get("status") == "ok")
    points = []
    for r in results["runs"]:
        d = (r.get("metrics") or {}).get("decode_tok_s")
        if r.get("status") == "ok" and d and r.get("file_bytes"):
            points.append(charts.Point(r["file_bytes"] / 1e6, d["median"], name(r["label"], r["runtime"]),
                                       r["runtime"], d["min"], d["max"]))
    runtimes = sorted({p.group for p in points})
    return ("<figure><h3>Decode speed vs file size</h3>" + charts.legend_html(runtimes, "runtime:")
            + charts.scatter(points, "file size (MB, log scale)", "decode (tokens/s)", log_x=True,
                             empty="no run completed")
            + "<figcaption>Median decode speed on this host; vertical bars span min to max over the repeats. "
            "Up and to the left is better.</figcaption></figure>")


def _quality_chart(results: dict) -> str:
    points, seen = [], set()
    for r in results["runs"]:
        q = r.get("quality")
        key = r.get("artifact") or r["runtime"]
        if q and q.get("kl_mean") is not None and r.get("file_bytes") and key not in seen:
            seen.add(key)
            points.append(charts.Point(r["file_bytes"] / 1e6, q["kl_mean"], r["label"], r["format"]))
    formats = sorted({p.group for p in points})
    return ("<figure><h3>Quality vs size</h3>" + charts.legend_html(formats, "format:")
            + charts.scatter(points, "file size (MB, log scale)", "mean KL vs PyTorch fp32 (log scale)", log_x=True,
                             log_y=True, frontier=True, zero_label="0 (exact)",
                             empty="no quality measured: no fidelity report was given")
            + "<figcaption>Lower is better. Ringed points on the dashed step line are the Pareto frontier: no other "
            "export is both smaller and closer to the reference.</figcaption></figure>")


def _device_panels(projections: list[dict]) -> str:
    name = _namer((p["run_label"], p["runtime"]) for p in projections)
    devices = _by_device(projections)
    nowhere = sorted({p["runtime"] for p in projections}
                     - {p["runtime"] for p in projections if p["runtime_on_device"]})
    panels, idle = [], []
    for i, (device, rows) in enumerate(devices.items()):
        first = rows[0]
        here = sorted((p for p in rows if p["runtime_on_device"]), key=lambda p: -p["predicted_decode_tok_s"])
        if not here:
            idle.append(f"{_e(first['device_name'])} (<code>{_e(device)}</code>)")
            continue
        absent = sorted({p["runtime"] for p in rows if not p["runtime_on_device"]} - set(nowhere))
        bars = [charts.Bar(name(p["run_label"], p["runtime"]), p["predicted_decode_tok_s"], p["runtime"],
                           "does not fit" if p["fits_memory"] is False else "", p["fits_memory"] is False)
                for p in here]
        meta = (f"{format_bandwidth(first['device_bandwidth_bytes_s'])} · {format_flops(first['device_fp32_flops'])}"
                f" FP32 · memory budget {format_bytes(first['memory_budget_bytes'])}")
        missing = f'<p class="absent">Not on this device: {_e(", ".join(absent))}</p>' if absent else ""
        panels.append(f'<figure><h3>{_e(first["device_name"])} <span class="tag">predicted</span></h3>'
                      f'<p class="device-meta"><code>{_e(device)}</code> · {_e(meta)}</p>'
                      f'{charts.hbars(bars, "predicted decode (tokens/s)", uid=f"dev{i}")}{missing}</figure>')
    notes = []
    if nowhere:
        notes.append(f"No device profile lists {_e(', '.join(nowhere))}, so those runs are not projected.")
    if idle:
        notes.append("None of the measured runtimes runs on " + ", ".join(idle) + ".")
    runtimes = sorted({p["runtime"] for p in projections if p["runtime_on_device"]})
    return ('<h2>Predicted on devices <span class="tag">predicted</span></h2>'
            "<p class=\"muted\">Not measured: each run's efficiency on this host, scaled by the device's bandwidth "
            "(decode) and FP32 peak (prefill). Hatched, pale bars do not fit the device's memory budget "
            "(measured peak RSS vs budget). Assumptions are listed at the end.</p>"
            + charts.legend_html(runtimes, "runtime:") + f'<div class="grid2">{"".join(panels)}</div>'
            + "".join(f'<p class="absent">{n}</p>' for n in notes))


def _problems(results: dict) -> str:
    bad = [r for r in results["runs"] if r.get("status") != "ok"]
    if not bad:
        return ""
    items = "".join(f'<li><span class="badge {_e(r.get("status"))}">{_e(r.get("status"))}</span> '
                    f"<b>{_e(r['label'])}</b> ({_e(r['runtime'])}): {_e(r.get('reason') or 'no reason given')}</li>"
                    for r in bad)
    return f'<h3 class="problems">Runs that did not complete</h3><ul class="problems">{items}</ul>'


def _footer(results: dict, projections: list[dict]) -> str:
    host = "".join(f"<li>{_e(line)}</li>" for line in _host_lines(results))
    notes = ["TTFT: prefill of the prompt plus the first greedy token; prefill tok/s = prompt tokens ÷ TTFT; "
             f"decode tok/s: tokens decoded after a {DECODE_PROMPT_TOKENS}-token prompt ÷ their wall time; "
             "load s: opening a session; "
             "peak RSS: the benchmark process's high-water mark (interpreter and runtime libraries included).",
             "Quality (ppl, mean KL, top-1) comes from the fidelity report of the same export artifact, measured "
             "against the PyTorch fp32 reference on held-out text."]
    parts = ["<footer><h2>Notes and assumptions</h2><h3>Measurements</h3><ul>",
             *(f"<li>{_e(n)}</li>" for n in notes), "</ul>"]
    if projections:
        parts += ["<h3>How the predictions are made</h3><ul>", *(f"<li>{_e(f)}</li>" for f in FORMULAS),
                  "</ul><h3>What the predictions assume</h3><ol>",
                  *(f"<li>{_e(a)}</li>" for a in _assumptions(projections)), "</ol>"]
    return "".join(parts) + f"<h3>Host</h3><ul>{host}</ul></footer>"


def to_html(results: dict, projections: list[dict], title: str | None = None) -> str:
    """One self-contained HTML page: header, measured table, problems, charts, predictions, notes."""
    body = [_header(results, title), _runs_table(results), _problems(results),
            f'<div class="grid2">{_speed_chart(results)}{_quality_chart(results)}</div>']
    if projections:
        body.append(_device_panels(projections))
    body.append(_footer(results, projections))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(_title(results, title))}</title><style>{CSS}</style></head>\n<body><main>"
            + "\n".join(body) + "</main></body></html>\n")


# --------------------------------------------------------------------------- writing


def _validator():
    """``edgekit.bench.measure.validate_results`` when that module exists (it is written separately)."""
    if importlib.util.find_spec("edgekit.bench.measure") is None:
        return None
    return getattr(importlib.import_module("edgekit.bench.measure"), "validate_results", None)


def write_report(results: dict, out_dir: Path, fidelity_reports: Iterable[dict] = (),
                 devices: list[DeviceProfile] | None = None, arch: Architecture | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Write results.json, report.md and report.html into ``out_dir``, each atomically.

    results.json is the measurement validated against the bench schema, with each run's optional
    ``quality`` (ppl, KL, top-1) joined in from ``fidelity_reports``. With ``devices``, every
    ok run is also projected onto them (``arch`` gives exact bytes per token; without it the file
    size stands in). ``title`` heads the reports (default: from ``results["model"]``).
    """
    joined = join_quality(results, fidelity_reports)
    validate = _validator()
    if validate is not None:
        validate(joined)
    else:
        log.debug("edgekit.bench.measure.validate_results not available; results.json written unvalidated")
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    artifact.atomic_write_text(paths["json"], json.dumps(joined, indent=2) + "\n")
    projections = project(joined, devices, arch) if devices else []
    artifact.atomic_write_text(paths["markdown"], to_markdown(joined, projections, title))
    artifact.atomic_write_text(paths["html"], to_html(joined, projections, title))
    log.debug("benchmark report written to %s", out_dir)  # callers name the final folder
    return paths
