"""``edgekit run RECIPE``: teacher → student → exports → fidelity → benchmark → bundles, resumable.

Every stage is content-addressed (its artifact id hashes the stage, its resolved config and its
input ids), so a second run with nothing changed reuses every artifact and finishes in seconds,
a changed key reruns only the stages downstream of it, and a killed run resumes: finished
artifacts are kept (each was renamed into place only when complete) and the interrupted stage
starts again from its own checkpoint where it has one (distillation, data generation, the logit
cache and benchmarks do). The store lock keeps two runs from writing the same store at once: the
second says which process it waits for, and starts when that one ends.

The run's record -- which artifact each stage produced or reused, and how long it took -- goes to
``$EDGEKIT_HOME/runs/<recipe name>.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgekit import artifact
from edgekit.errors import RecipeError

log = logging.getLogger(__name__)


def run(recipe_path: Path, *, trust_remote_code: bool = False) -> dict:
    """Run every stage of the recipe at ``recipe_path``; returns the run record."""
    from edgekit.recipe import load_recipe
    from edgekit.validate import validate_recipe

    recipe_path = Path(recipe_path)
    problems = validate_recipe(recipe_path)
    if problems:
        raise RecipeError(f"{recipe_path} cannot run: " + "; ".join(problems))
    recipe = load_recipe(recipe_path)
    record: dict = {"recipe": str(recipe_path), "name": recipe.name, "device": recipe.device, "stages": []}
    t_run = time.perf_counter()
    with artifact.locked(artifact.STORE_LOCK):
        model = _distill(recipe, record, trust_remote_code)
        exports = _exports(recipe, model, record)
        fidelity = _fidelity(recipe, model, exports, record)
        bench = _bench(recipe, exports, fidelity, record)
        _package(recipe, exports, fidelity, bench, record)
    record["seconds"] = round(time.perf_counter() - t_run, 1)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    folder = artifact.home() / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    artifact.atomic_write_text(folder / f"{recipe.name}.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


def _stage(record: dict, name: str, path: str | Path | None, reused: bool, t0: float, **extra) -> None:
    seconds = round(time.perf_counter() - t0, 1)
    record["stages"].append({"stage": name, "path": str(path) if path else None, "reused": reused,
                             "seconds": seconds, **extra})
    log.info("%-9s %s %s (%.0fs)", name, "reused" if reused else "done ", path or "", seconds)


def _distill(recipe, record: dict, trust_remote_code: bool) -> str:
    """The model later stages use: the distilled student's folder, or the teacher when distill is null."""
    t0 = time.perf_counter()
    if recipe.distill is None:
        from edgekit.models import resolve_teacher

        teacher = resolve_teacher(recipe.teacher, trust_remote_code=trust_remote_code)
        _stage(record, "teacher", teacher.path, not teacher.converted, t0)
        return str(teacher.path)
    from edgekit.distill.pipeline import run as distill

    cfg = recipe.distill_config()
    root = artifact.home() / "artifacts"
    before = {p.name for p in root.iterdir()} if root.is_dir() else set()
    summary = distill(cfg, trust_remote_code=trust_remote_code)
    student = summary["artifacts"]["student"]
    reused = Path(student).name in before  # finished by an earlier run
    ev = summary.get("evaluation", {}).get("models", {})
    quality = {k: {m: round(v[m], 4) for m in ("perplexity", "kl_to_teacher", "top1_agreement") if m in v}
               for k, v in ev.items()}
    _stage(record, "distill", student, reused, t0, student=summary.get("student"), evaluation=quality)
    return student


def _exports(recipe, model: str, record: dict) -> list[Path]:
    from edgekit.export.pipeline import run as export

    paths = []
    for cfg in recipe.export_configs(model):
        t0 = time.perf_counter()
        r = export(cfg)
        m = r["manifest"]
        _stage(record, f"export {cfg.label}", r["path"], r["reused"], t0,
               size_bytes=m["metrics"].get("size_bytes"), bits_per_weight=m["metrics"].get("bits_per_weight"))
        paths.append(Path(r["path"]))
    return paths


def _fidelity(recipe, model: str, exports: list[Path], record: dict) -> dict | None:
    if recipe.fidelity is None:
        return None
    from edgekit.quantize.report import run as fidelity

    t0 = time.perf_counter()
    rep = fidelity(Path(model), exports, texts=recipe.fidelity.texts or None, max_tokens=recipe.fidelity.max_tokens)
    rows = {r["label"]: {k: r[k] for k in ("kl_mean", "top1_agreement", "perplexity", "greedy_match")}
            for r in rep["rows"]}
    _stage(record, "fidelity", rep["path"], rep["reused"], t0, rows=rows)
    return rep


def _bench(recipe, exports: list[Path], fidelity: dict | None, record: dict) -> dict | None:
    """Benchmark every export; the folder id hashes the exports and the settings, so a re-run reuses it."""
    if recipe.bench is None:
        return None
    from edgekit.bench.measure import run_benchmark
    from edgekit.bench.report import write_report
    from edgekit.devices import load_device

    t0 = time.perf_counter()
    b = recipe.bench
    settings = b.model_dump(mode="json")
    ids = [artifact.content_id(artifact.read_manifest(p)["files"]) for p in exports]
    out = artifact.home() / "artifacts" / f"bench-{artifact.content_id('bench', ids, settings)}"
    if (out / "results.json").is_file() and not artifact.verify_manifest(out):
        _stage(record, "bench", out, True, t0)
        return json.loads((out / "results.json").read_text())
    journal = out.with_name(f".{out.name}.journal.jsonl")  # rows measured before an interruption
    results = run_benchmark(exports, b.runtimes, repeats=b.repeats, warmup=b.warmup, threads=b.threads,
                            prompt_lengths=tuple(b.prompt_lengths), decode_tokens=b.decode_tokens, journal=journal)
    arch = None
    source = artifact.read_manifest(exports[0]).get("source_model", {})
    if source.get("architecture"):
        from edgekit.arch import Architecture

        arch = Architecture.from_dict(source["architecture"])
    with artifact.atomic_dir(out) as tmp:
        write_report(results, tmp, [fidelity] if fidelity else [], devices=[load_device(recipe.device)], arch=arch,
                     title=f"{recipe.name}: {source.get('name', '')} for {recipe.device}")
        artifact.write_manifest(tmp, "bench", settings, {"exports": ",".join(ids)})
    journal.unlink(missing_ok=True)
    decode = {f"{r['label']} / {r['runtime']}": r["metrics"]["decode_tok_s"]["median"]
              for r in results["runs"] if r["status"] == "ok"}
    _stage(record, "bench", out, False, t0, decode_tok_s=decode, report=str(out / "report.html"))
    return json.loads((out / "results.json").read_text())


def _package(recipe, exports: list[Path], fidelity: dict | None, bench: dict | None, record: dict) -> None:
    if recipe.package is None:
        return
    from edgekit.package import package

    formats = recipe.package.formats
    for path in exports:
        fmt = artifact.read_manifest(path)["format"]
        if formats is not None and fmt not in formats:
            continue
        t0 = time.perf_counter()
        b = package(path, device=recipe.device, context=recipe.context, fidelity=fidelity, bench=bench,
                    recipe=recipe.name)
        _stage(record, f"package {fmt}", b.get("path"), bool(b.get("reused")), t0, tarball=str(b.get("tarball") or ""))


def list_artifacts() -> list[dict]:
    """Every finished artifact in the store, newest first: id, stage, created, size, label."""
    root = artifact.home() / "artifacts"
    rows = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / artifact.MANIFEST).is_file():
            continue
        try:
            m = artifact.read_manifest(folder)
        except Exception:  # noqa: BLE001 - a damaged manifest is listed as such
            rows.append({"id": folder.name, "stage": "?", "created": "", "bytes": 0, "label": "damaged manifest"})
            continue
        rows.append({"id": folder.name, "stage": m.get("stage", "?"), "created": m.get("created", ""),
                     "bytes": sum(f.get("size", 0) for f in m["files"].values()),
                     "label": m.get("label") or m.get("config", {}).get("name") or ""})
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def find_artifact(ident: str) -> Path:
    """An artifact folder by id (``export-1a2b…``), unique id prefix, or path."""
    p = Path(ident)
    if (p / artifact.MANIFEST).is_file():
        return p
    root = artifact.home() / "artifacts"
    matches = [f for f in root.glob(f"{ident}*") if (f / artifact.MANIFEST).is_file()] if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RecipeError(f"no artifact {ident!r} in {root}; `edgekit runs` lists them")
    raise RecipeError(f"{ident!r} matches {len(matches)} artifacts ({', '.join(m.name for m in matches[:4])}…); "
                      "give more of the id")
