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

from edgekit import artifact, models
from edgekit.bench import stage as bench_stage
from edgekit.devices import load_device
from edgekit.distill import pipeline as distill_stage
from edgekit.errors import RecipeError
from edgekit.export import pipeline as export_stage
from edgekit.package import get_layout, layouts_for, package
from edgekit.quantize import report as fidelity_stage
from edgekit.recipe import load_recipe
from edgekit.validate import validate_recipe

log = logging.getLogger(__name__)


def run(recipe_path: Path, *, trust_remote_code: bool = False) -> dict:
    """Run every stage of the recipe at ``recipe_path``; returns the run record."""
    recipe_path = Path(recipe_path)
    problems = validate_recipe(recipe_path)
    if problems:
        raise RecipeError(f"{recipe_path} cannot run: " + "; ".join(problems))
    recipe = load_recipe(recipe_path)
    record: dict = {"recipe": str(recipe_path), "name": recipe.name, "device": recipe.device, "stages": []}
    t_run = time.perf_counter()
    with artifact.locked(artifact.STORE_LOCK):
        model, teacher, heldout = _distill(recipe, record, trust_remote_code)
        exports = _exports(recipe, model, record)
        fidelity = _fidelity(recipe, model, exports, record, teacher, heldout)
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


def _distill(recipe, record: dict, trust_remote_code: bool) -> tuple[str, str | None, Path | None]:
    """The model later stages use (the distilled student's folder, or the teacher when distill is null); the
    teacher it was distilled from and the data stage's held-out teacher-written chats (both None without
    distillation)."""
    t0 = time.perf_counter()
    if recipe.distill is None:
        teacher = models.resolve_teacher(recipe.teacher, trust_remote_code=trust_remote_code)
        _stage(record, "teacher", teacher.path, not teacher.converted, t0)
        return str(teacher.path), None, None
    a = distill_stage.run(recipe.distill_config(), trust_remote_code=trust_remote_code)
    ev = a.result.get("evaluation", {}).get("models", {})
    quality = {k: {m: round(v[m], 4) for m in ("perplexity", "kl_to_teacher", "top1_agreement") if m in v}
               for k, v in ev.items()}
    _stage(record, "distill", a.path, a.reused, t0, student=a.result.get("student"), evaluation=quality)
    heldout = Path(a.result["artifacts"]["data"]) / "heldout.jsonl"
    return str(a.path), a.result["teacher"]["path"], heldout if _has_text(heldout) else None


def _has_text(path: Path) -> bool:
    return path.is_file() and bool(path.read_text(encoding="utf-8").strip())


def _exports(recipe, model: str, record: dict) -> list[Path]:
    paths = []
    for cfg in recipe.export_configs(model):
        t0 = time.perf_counter()
        a = export_stage.run(cfg)
        m = a.manifest
        _stage(record, f"export {cfg.label}", a.path, a.reused, t0,
               size_bytes=m["metrics"].get("size_bytes"), bits_per_weight=m["metrics"].get("bits_per_weight"))
        paths.append(a.path)
    return paths


def _fidelity(recipe, model: str, exports: list[Path], record: dict, teacher: str | None = None,
              heldout: Path | None = None) -> dict | None:
    """The fidelity report (an ``edgekit.fidelity/1`` dict), or None when the recipe has no fidelity.

    After distillation every row is scored against the teacher too, on the recipe's ``fidelity.texts`` or else
    the data stage's held-out chats (the teacher's own answers, which the bundled set is not for another teacher).
    """
    if recipe.fidelity is None:
        return None
    t0 = time.perf_counter()
    texts = recipe.fidelity.texts or ([heldout] if heldout else None)
    a = fidelity_stage.run(Path(model), exports, texts=texts, max_tokens=recipe.fidelity.max_tokens,
                           teacher=Path(teacher) if teacher else None)
    rows = {r["label"]: {k: r[k] for k in ("kl_mean", "top1_agreement", "perplexity", "greedy_match",
                                           "kl_to_teacher", "top1_vs_teacher") if k in r}
            for r in a.result["rows"]}
    _stage(record, "fidelity", a.path, a.reused, t0, rows=rows)
    if teacher:
        record["against_teacher"] = {"teacher": teacher, "texts": a.result["texts"], "tokens": a.result["tokens"],
                                     "rows": fidelity_stage.against_teacher(a.result),
                                     "answers": a.result.get("answers") or []}
    return a.result


def _bench(recipe, exports: list[Path], fidelity: dict | None, record: dict) -> dict | None:
    """Benchmark every export (the same stage as `edgekit bench`); returns its results."""
    if recipe.bench is None:
        return None
    t0 = time.perf_counter()
    source = artifact.read_manifest(exports[0]).get("source_model", {})
    a = bench_stage.run(recipe.bench, exports, devices=[load_device(recipe.device)],
                        fidelity=[fidelity] if fidelity else [], title=f"{recipe.name}: {source.get('name', '')} for {recipe.device}")
    extra = {}
    if not a.reused:
        extra = {"decode_tok_s": {f"{r['label']} / {r['runtime']}": r["metrics"]["decode_tok_s"]["median"]
                                  for r in a.result["runs"] if r["status"] == "ok"},
                 "report": str(a.path / "report.html")}
    _stage(record, "bench", a.path, a.reused, t0, **extra)
    return a.result


def _package(recipe, exports: list[Path], fidelity: dict | None, bench: dict | None, record: dict) -> None:
    if recipe.package is None:
        return
    wanted = recipe.package.formats
    together: dict[str, list[Path]] = {}  # a layout that holds several exports gets them all in one bundle
    for path in exports:
        fmt = artifact.read_manifest(path)["format"]
        for layout in layouts_for(fmt, wanted):
            if get_layout(layout).several:
                together.setdefault(layout, []).append(path)
                continue
            t0 = time.perf_counter()
            b = package(path, device=recipe.device, context=recipe.context, fidelity=fidelity, bench=bench,
                        recipe=recipe.name, layout=layout)
            _stage(record, f"package {fmt}" + ("" if layout == "app" else f" {layout}"), b.get("path"),
                   bool(b.get("reused")), t0, tarball=str(b.get("tarball") or ""))
    for layout, paths in together.items():
        t0 = time.perf_counter()
        b = package(paths[0], also=paths[1:], device=recipe.device, context=recipe.context, fidelity=fidelity,
                    bench=bench, recipe=recipe.name, layout=layout)
        _stage(record, f"package {layout}", b.get("path"), bool(b.get("reused")), t0,
               tarball=str(b.get("tarball") or ""))


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
