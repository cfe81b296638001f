"""A bundle's model card (README.md), written from its manifest: what it is, how to run it, its facts, device fit,
quality and speed tables, and the license it inherits."""

from __future__ import annotations

from edgekit import runtimes
from edgekit.arch import FAMILIES
from edgekit.hf import NOTICE_FILE
from edgekit.package.layouts import APP, HF, _front_matter, get_layout


def model_card(m: dict) -> str:
    """The bundle's README.md, generated from its manifest (without the files table)."""
    fmt, loader = m["format"], m["loader"]
    rt = m["runtimes"][0]
    teacher = m["teacher"]
    layout = get_layout(m.get("layout") or APP.name)
    requirements = layout.requirement(fmt) or ", ".join(_requirement(r) for r in m["runtimes"])
    lines = [
        *(_front_matter(m) if layout.name == HF.name else []),
        f"# {m['name']}", "",
        f"{_family_display(m['architecture'])}-family language "
        f"model, {m['params'] / 1e6:.2f}M parameters, "
        f"exported as **{fmt.upper()}** with **{m['quant']}** quantization"
        f"{' (calibrated)' if m['calibrated'] else ''}, packaged by edgekit {m['edgekit_version']} on {m['created']}.",
        "", "## Run it", "",
    ]
    hint = layout.run_hint
    if hint:
        text = hint.format(name=m["name"].lower(), model_file=m["model_file"], format=fmt, loader=loader,
                           model_dir=layout.folder(fmt))
        lines += [f"```sh\n{text}\n```", ""]
        template = (m.get("ollama") or {}).get("template") or {}
        if template and not template.get("translated"):
            lines += [f"The Modelfile has no TEMPLATE: {template.get('reason')}. Ollama then picks a template "
                      "matching the chat template stored in the GGUF, if it knows one; check the prompts it renders.",
                      ""]
        lines += [f"Note: {n}." for n in template.get("notes") or []] + ([""] if template.get("notes") else [])
        web_notes = (m.get("web") or {}).get("notes") or []
        lines += [f"Note: {n}" for n in web_notes] + ([""] if web_notes else [])
    else:
        lines += [f"```sh\npip install \"{_requirement(rt)}\"\npython {loader} \"Hello!\"\n```", ""]
    if m.get("exports"):
        lines += _exports_table(m["exports"])
    note = _loader_note(rt["name"]) if not hint else ""
    if note:
        lines += [note.replace("{loader}", loader).replace("{context}", str(m["context"])), ""]
    lines += [
        "## Facts", "",
        "| | |", "|---|---|",
        f"| format | {fmt} ({requirements}) |",
        f"| quant | {m['quant']} |",
        f"| model size | {_mb(m['size_bytes'])} |",
        f"| context | {m['context']} tokens |",
        f"| minimum RAM | {_mb(m['min_ram_bytes'])} (planner estimate for {m['memory']['runtime']}, "
        f"incl. 10 % margin) |",
        f"| source artifact | {m['source_artifact']['id']} |", "",
    ]
    if m["device"]:
        d = m["device"]
        verdict = "fits" if d["fits"] else "does NOT fit"
        lines += ["## Device fit", "", f"Built for **{d['display_name']}** (`{d['name']}`): needs "
                  f"{_mb(m['min_ram_bytes'])} of its {_mb(d['memory_budget_bytes'])} budget on {d['runtime']} "
                  f"-- {verdict}.", ""]
    if m["quality"]:
        vs_teacher = any("kl_to_teacher" in q for q in m["quality"])  # distilled: scored against its teacher too
        lines += ["## Quality", "", "| perplexity | Δppl vs reference | mean KL | top-1 agreement |"
                  + (" KL to teacher | top-1 vs teacher | teacher perplexity |" if vs_teacher else ""),
                  "|---:|---:|---:|---:|" + ("---:|---:|---:|" if vs_teacher else "")]
        for q in m["quality"]:
            lines.append(f"| {_num(q['perplexity'], '.3f')} | {_num(q['ppl_delta_pct'], '+.2f')}% | "
                         f"{_num(q['kl_mean'], '.4f')} | {_num(q['top1_agreement'], '.1%')} |"
                         + (f" {_num(q.get('kl_to_teacher'), '.4f')} | {_num(q.get('top1_vs_teacher'), '.1%')} | "
                            f"{_num(q.get('teacher_perplexity'), '.3f')} |" if vs_teacher else ""))
        lines.append("")
    if m["speed"]:
        lines += ["## Speed", "", "| runtime | measured on | decode tok/s (median) | peak RSS |", "|---|---|---:|---:|"]
        for s in m["speed"]:
            lines.append(f"| {s['runtime']} | {s['device']} | {_num(s['decode_tok_s'], '.1f')} | "
                         f"{_mb(s['peak_rss_bytes'])} |")
        lines.append("")
    origin = teacher.get("name") or "unknown (record it before shipping)"
    lines += ["## License", "", f"{'Teacher' if teacher['distilled'] else 'Source model'}: {origin}; license: "
              f"{teacher.get('license') or 'unknown -- check the source model card'}.", "", teacher["license_note"], "",
              *([f"Notice (also in the file {NOTICE_FILE}):", "", "```", teacher["notice"].strip(), "```", ""]
                if teacher.get("notice") else []),
              "manifest.json lists every file's sha256 and size; `edgekit.package.verify(<this folder or its "
              ".tar.gz>)` checks them.", ""]
    return "\n".join(lines)


def _family_display(arch: dict) -> str:
    fam = FAMILIES.get(arch.get("family") or "")
    return (fam.display or fam.name) if fam else str(arch.get("model_type", "?")).capitalize()


def _requirement(rt: dict) -> str:
    return f"{rt['package']}>={rt['min_version']}" if rt.get("min_version") else rt["package"]


def _loader_note(runtime: str) -> str:
    """The primary runtime's paragraph for the card (none when that runtime is no longer registered)."""
    loader = getattr(runtimes.runtimes().get(runtime), "loader", None)
    return loader.note if loader else ""


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _exports_table(exports: list[dict]) -> list[str]:
    """The card's table of a bundle that holds several exports: one row per folder, with how to run it."""
    lines = ["## Exports in this repository", "",
             "| folder | format | quant | size | top-1 vs teacher | KL to teacher | run it |",
             "|---|---|---|---:|---:|---:|---|"]
    for e in exports:
        q = (e.get("quality") or [{}])[0]
        top1 = q.get("top1_vs_teacher", q.get("top1_agreement"))
        kl = q.get("kl_to_teacher", q.get("kl_mean"))
        lines.append(f"| `{e['folder']}/` | {e['format']} | {e['quant']}{' (calibrated)' if e['calibrated'] else ''} | "
                     f"{_mb(e['size_bytes'])} | {_num(top1, '.1%')} | {_num(kl, '.4f')} | "
                     f"`python {e['folder']}/{e['loader']} \"Hello!\"` |")
    return [*lines, "", "Each folder holds its runtime's files, the tokenizer and a standalone example loader; "
            "the Facts below are the first export's.", ""]
