"""Deep checks of a recipe: everything that can be known without running it.

``validate_recipe(path)`` goes past the schema (:mod:`edgekit.recipe`) without running anything
heavy: the device, registered quant schemes and exporters, runtimes, the memory budget
(through the planner, from the teacher's config or GGUF header: nothing is converted or
downloaded) and the data files, and reports every problem at once, each naming the file and
key and saying the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import ValidationError

from edgekit import models, registry
from edgekit.arch import student_family
from edgekit.bench.config import BenchConfig
from edgekit.devices import load_device
from edgekit.errors import EdgekitError, RecipeError
from edgekit.export.config import ExportConfig, exporter
from edgekit.plan import _bare_metal, memory_model, plan, runtime_for
from edgekit.quantize.auto import budget_bytes
from edgekit.quantize.fakequant import TARGETS as QAT_TARGETS
from edgekit.quantize.schemes import formats, get_format, get_scheme
from edgekit.recipe import ExportSpec, Recipe, exporter_formats, format_errors, no_exporter, parse_recipe
from edgekit.runtimes import runtimes as runners
from edgekit.units import format_bytes


def validate_recipe(path: str | Path) -> list[str]:
    """Every problem with a recipe, each naming the file and key and saying the fix; [] when it can run.

    Checks the schema, the device, each export's format/quant/runtime, the memory budget (the
    planner for ``student: auto``, the memory model otherwise), data files, bench runtimes and
    package formats. Nothing is converted, downloaded, trained or exported.
    """
    path = Path(path)
    try:
        recipe, merged, problems = parse_recipe(path)
    except RecipeError as e:
        return [str(e)]
    where = str(path.resolve())
    if recipe is None:  # still check the parts that parsed, so one run shows everything
        problems += _partial_checks(merged, where)
        return problems
    return problems + _checks(recipe, where)


def _partial_checks(merged: dict, where: str) -> list[str]:
    problems = []
    if isinstance(merged.get("device"), str):
        _, err = _device(merged["device"])
        if err:
            problems.append(f"{where}: device: {err}")
    for i, e in enumerate(merged.get("exports") or [] if isinstance(merged.get("exports"), list) else []):
        try:
            spec = ExportSpec.model_validate(e)
        except ValidationError:
            continue
        problems += [f"{where}: exports.{i}.{k}: {m}" for k, m in _export_problems(spec)]
    bench = merged.get("bench")
    if isinstance(bench, dict):
        try:
            b = BenchConfig.model_validate(bench)
        except ValidationError:
            b = None
        if b and b.runtimes:
            problems += [f"{where}: bench.runtimes: {m}" for m in _runtime_problems(b.runtimes, None)]
    return problems


def _device(name: str):
    try:
        return load_device(name), None
    except EdgekitError as e:
        return None, str(e)


def _export_problems(e: ExportSpec) -> list[tuple[str, str]]:
    try:
        get_format(e.format)
    except RecipeError as err:
        return [("format", str(err))]
    if e.format not in exporter_formats():
        out = [("format", no_exporter(e.format))]
        try:
            get_scheme(e.format, e.quant)
        except RecipeError as err:
            out.append(("quant", str(err)))
        return out
    try:
        ExportConfig(format=e.format, quant=e.quant, calibrate=e.calibrate)
    except (RecipeError, ValidationError) as err:
        key = "calibrate" if e.calibrate and "calibrate" in str(err) else "quant"
        return [(key, str(err) if isinstance(err, RecipeError) else format_errors(err, None, {}))]
    return []


def _qat_problems(target: str, exports: list[ExportSpec]) -> list[tuple[str, str]]:
    """A QAT target must be one of the recipe's exports, and that export must not calibrate.

    Calibration (llama.cpp's imatrix, AWQ for onnx/executorch) changes the scales the exporter picks, so the
    exported weights would no longer be the grid the student was trained through. It is refused rather than
    switched off quietly: the recipe then says what runs, and QAT already does what calibration is for.
    """
    fmt, quant = QAT_TARGETS[target]
    named = [_plain_quant(e) for e in exports]  # (format, scheme, calibrated): onnx int4-awq is int4, calibrated
    same = [i for i, (f, q, _) in enumerate(named) if (f, q) == (fmt, quant)]
    if not same:
        others = [t for t, fq in QAT_TARGETS.items() if any((f, q) == fq for f, q, _ in named)]
        hint = f"or use the target of one ({', '.join(others)})" if others else "or drop distill.qat"
        return [("distill.qat.target", f"{target} trains through the {fmt} {quant} quantizer but this recipe "
                                       f"exports no {fmt} {quant}; add that export {hint}")]
    return [(f"exports.{i}.calibrate", f"calibrate rescales the weights, so this {fmt} {quant} export would not "
                                       f"hold the grid distill.qat trained through; set calibrate: false "
                                       "(QAT replaces it) or drop distill.qat")
            for i in same if named[i][2]]


def _plain_quant(e: ExportSpec) -> tuple[str, str, bool]:
    quant = e.quant.lower()
    try:
        calibrated = exporter(e.format).calibrated_names
    except RecipeError:  # an unknown format is reported by the export checks
        return e.format, quant, e.calibrate
    if quant in calibrated:
        return e.format, calibrated[quant], True
    return e.format, quant, e.calibrate


def _runtime_problems(names: list[str], exported: set[str] | None) -> list[str]:
    registry = runners()
    out = []
    for rt in names:
        runner = registry.get(rt)
        if runner is None:
            close = difflib.get_close_matches(rt, list(registry), n=1, cutoff=0.5)
            out.append(f"unknown runtime {rt!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                       + f"{' R' if close else '; r'}egistered runtimes: {', '.join(registry)}; use one of them, or "
                       "set bench.runtimes: null for every installed runtime that runs the exports")
            continue
        missing = runner.available()
        if missing:
            out.append(f"{missing}, or remove it from bench.runtimes")
        elif exported is not None and "pytorch" not in runner.formats and not set(runner.formats) & exported:
            out.append(f"runtime {rt} runs {', '.join(runner.formats)} but this recipe exports only "
                       f"{', '.join(sorted(exported))}; remove it or add an export it can run")
    return out


def _checks(r: Recipe, where: str) -> list[str]:
    problems: list[str] = []

    def add(key: str, msg: str) -> None:
        problems.append(f"{where}: {key}: {msg}")

    device, err = _device(r.device)
    if err:
        add("device", err)
    usable = []  # (index, spec, scheme, runtime) of exports the budget can be checked for
    for i, e in enumerate(r.exports):
        bad = _export_problems(e)
        for key, msg in bad:
            add(f"exports.{i}.{key}", msg)
        if device is None or e.format not in formats():
            continue
        try:
            rt = runtime_for(e.format, device)
        except RecipeError as rerr:
            add(f"exports.{i}.format", str(rerr))
            continue
        try:
            usable.append((i, e, get_scheme(e.format, e.quant), rt))
        except RecipeError:
            pass

    arch = None
    try:
        arch, teacher_name = models.teacher_architecture(r.teacher, fetch=False)
    except EdgekitError as terr:
        add("teacher", str(terr))
    if arch is not None and r.distill is not None and r.distill.student_family:
        try:
            arch = student_family(arch, r.distill.student_family)
        except EdgekitError as ferr:
            add("distill.student_family", str(ferr))

    if device is not None and arch is not None:
        d = r.distill
        student, what = None, "the student"
        if d is None:
            student, what = arch, f"the teacher {teacher_name} (exported as is, distill: null)"
            if r.context > arch.max_context:
                add("context", f"{r.context} exceeds what {teacher_name} was trained for ({arch.max_context}); "
                               f"use context <= {arch.max_context}")
        elif d.student == "auto":
            first = r.exports[0]
            if usable and usable[0][0] == 0:
                try:
                    p = plan(arch, device, first.format, first.quant, r.context, d.target_decode_tok_s, teacher_name)
                    s = p["student"]
                    student = arch.with_shape(layers=s["layers"], hidden_size=s["hidden_size"],
                                              intermediate_size=s["intermediate_size"], heads=s["heads"],
                                              kv_heads=s["kv_heads"])
                    what = "the planned student"
                except EdgekitError as berr:
                    add("distill.student", f"auto: {berr}")
        else:
            shape = d.student
            student = arch.with_shape(layers=shape.layers, hidden_size=shape.hidden_size,
                                      intermediate_size=shape.intermediate_size, heads=shape.heads,
                                      kv_heads=shape.kv_heads, head_dim=arch.head_dim)
            what = (f"the explicit student ({shape.layers} layers, hidden {shape.hidden_size}, "
                    f"{student.params / 1e6:.0f}M params)")
            if r.context > arch.max_context:
                add("context", f"{r.context} exceeds what {teacher_name} was trained for ({arch.max_context}); "
                               f"use context <= {arch.max_context}")
        if student is not None:
            for i, e, scheme, rt in usable:
                need = memory_model(student, scheme, r.context, rt, _bare_metal(device),
                                    weight_bytes=_auto_weight_bytes(e, scheme, student)).total
                if need > device.memory_budget:
                    if d is None:
                        fix = "add a distill section (student: auto)"
                    elif d.student != "auto":
                        fix = "use student: auto, or shrink it"
                    else:
                        fix = "export it at a smaller quant"
                    add(f"exports.{i}" if d is None or d.student == "auto" else "distill.student",
                        f"{what} needs {format_bytes(need)} at {e.format} {e.quant} with context {r.context} "
                        f"(runtime {rt}) but device {device.name!r} allows {format_bytes(device.memory_budget)}; "
                        f"{fix}, lower context, or choose a larger device")

    if r.distill is not None:
        for j, src in enumerate(r.distill.data.sources):
            if not Path(src).exists():
                add(f"distill.data.sources.{j}", f"{src} does not exist; paths are relative to the recipe file")

    if r.distill is not None and r.distill.qat is not None:
        problems += [f"{where}: {key}: {msg}" for key, msg in _qat_problems(r.distill.qat.target, r.exports)]

    exported = {e.format for e in r.exports}
    if r.bench is not None:
        if r.bench.runtimes:
            for m in _runtime_problems(r.bench.runtimes, exported):
                add("bench.runtimes", m)
        longest = max(r.bench.prompt_lengths) + r.bench.decode_tokens
        if longest > r.context:
            add("bench.prompt_lengths", f"the longest prompt plus decode_tokens is {longest} tokens but context is "
                                        f"{r.context}; shorten the prompts or raise context")
    if r.package is not None and r.package.formats is not None:
        layouts = registry.items(registry.LAYOUT)
        for fmt in r.package.formats:
            if fmt in layouts:
                if layouts[fmt].formats and not exported & set(layouts[fmt].formats):
                    add("package.formats", f"the {fmt} bundle layout takes {' or '.join(layouts[fmt].formats)} "
                                           f"exports and this recipe exports {', '.join(sorted(exported))}; add an "
                                           f"export in {layouts[fmt].formats[0]} or drop {fmt} from package.formats")
            elif fmt not in exported:
                add("package.formats", f"{fmt!r} is neither exported by this recipe (exports: "
                                       f"{', '.join(sorted(exported))}) nor a bundle layout ({', '.join(layouts)}); "
                                       f"add an export in {fmt} or drop it from package.formats")
    return problems


def _auto_weight_bytes(e: ExportSpec, scheme, arch) -> int | None:
    """``quant: auto`` with a size or bits-per-weight target: the most its chosen types may take (the file is at
    most that), where the scheme's own layout is only the default target's. None for anything else (``target:
    device`` fits by construction)."""
    if not scheme.options.get("auto") or e.target in (None, "device"):
        return None
    try:
        return budget_bytes(e.target, arch, e.format)
    except EdgekitError:  # a malformed target is reported by the export checks
        return None
