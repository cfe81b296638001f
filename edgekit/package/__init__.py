"""App bundles: one export artifact made ready to ship, plus a safe way to check one received.

``package(export_dir)`` writes ``<out_dir or $EDGEKIT_HOME/bundles>/<name>-<label>-<id8>/`` and a
``.tar.gz`` of it next to it, both atomically. A bundle holds what a runtime needs and nothing else:

    model.gguf                        (gguf)  or  model.onnx [+ model.onnx.data], genai_config.json (onnx)
                                      or  model.pte, executorch_config.json (executorch)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja  (when known)
    generation.json                   generation defaults (temperature, top_p, max_new_tokens, eos ids, stop)
    run_llamacpp.py | run_genai.py | run_executorch.py
                                      a standalone example loader (needs only the runtime)
    README.md                         a model card generated from the manifest
    manifest.json                     schema "edgekit.bundle/1": every other file's sha256 and size, the
                                      runtimes and minimum versions, minimum RAM (planner), device fit,
                                      measured speed and quality when given, teacher and license note

A bundle's *layout* (a registered ``layout``; ``app`` by default) decides its files: ``app`` the files above, for
an app that embeds the runtime; ``ollama``, ``hf``, ``ort-package`` (:mod:`edgekit.package.layouts`) and ``web``
(:mod:`edgekit.package.web`) what those doors read.

``verify(path)`` (:mod:`edgekit.package.check`) checks a bundle folder or a ``.tar.gz`` received: every
archive member before anything is extracted, then every file against the manifest's sha256 and size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from edgekit import __version__, artifact, plan, registry, runtimes
from edgekit.arch import DEFAULT_CONTEXT, Architecture
from edgekit.devices import load_device
from edgekit.errors import ConfigError, EdgekitError
from edgekit.hf import NOTICE_FILE, TOKENIZER_FILES
from edgekit.models import resolve_teacher
from edgekit.package.card import model_card
from edgekit.package.check import MANIFEST, SCHEMA, verify
from edgekit.package.layouts import (
    APP,
    HF,
    OLLAMA,
    ORT_PACKAGE,
    Layout,
    _copy_tokenizer,
    _json,
    _providers,
    get_layout,
    layouts_for,
)
from edgekit.package.web import WEB
from edgekit.quantize.schemes import get_scheme

log = logging.getLogger(__name__)

LICENSE_NOTE = ("A distilled or quantized model is derived from its teacher's weights and outputs, so it inherits "
                "the teacher's license terms; check them before you ship this bundle.")
DEFAULT_MAX_NEW_TOKENS = 256


__all__ = ["SCHEMA", "LICENSE_NOTE", "Layout", "get_layout", "layouts_for", "package", "verify", "model_card",
           "register"]


def register(reg: registry.Registry) -> None:
    for layout in (APP, OLLAMA, HF, ORT_PACKAGE, WEB):
        reg.add(registry.LAYOUT, layout.name, layout)


# --------------------------------------------------------------------------- package


def package(artifact_dir: Path, *, out_dir: Path | None = None, device: str | None = None, context: int = DEFAULT_CONTEXT,
            fidelity: dict | None = None, bench: dict | None = None, recipe: str | None = None,
            layout: str = "app", providers: list[str] | None = None, also: Sequence[Path] = ()) -> dict:
    """Bundle one export artifact; returns ``{"path", "tarball", "manifest"}``.

    ``layout`` names a registered bundle layout (``app``, ``ollama``, ...; see :class:`Layout`).
    ``also``: more exports of the same float model, for a layout that holds several (``hf``: one repository, each
    export in its own folder, listed in the manifest's ``exports``); the first export's facts head the card.
    ``providers``: execution providers an ``ort-package`` declares beside the CPU (``cuda``, ``dml``, ``webgpu``;
    default: ``cuda`` when ``device`` has an NVIDIA GPU that onnxruntime can use).

    ``device`` names a device profile to check the fit against; ``context`` is the context length the
    minimum RAM is computed for (lowered to the model's maximum if larger). ``fidelity`` (an
    ``edgekit.fidelity/1`` report) and ``bench`` (``edgekit.bench/1`` results) are optional: their rows
    for this artifact become the card's quality and speed tables. ``recipe`` is recorded as given.
    """
    src = Path(artifact_dir)
    export = _read_export(src)
    fmt, label = export["format"], export["label"]
    shape = get_layout(layout, fmt)
    more = _more_exports(shape, src, export, also)
    providers = _providers(providers, device) if layout == ORT_PACKAGE.name else []
    arch = _architecture(export, src)
    if context < 1:
        raise ConfigError(f"context must be a positive number of tokens, not {context}; pass e.g. --context "
                          f"{DEFAULT_CONTEXT}")
    if context > arch.max_context:
        log.warning("context %d is beyond %s's maximum %d; sizing for %d", context, src, arch.max_context,
                    arch.max_context)
        context = arch.max_context
    able = _bundle_runtimes(fmt, src)
    fixed = (export.get("metrics") or {}).get("context") if _static_context(fmt) else None
    if fixed and context != fixed:  # e.g. an ExecuTorch program's cache size is set at export
        log.info("the %s program holds %d positions; sizing the bundle for %d, not %d", fmt, fixed, fixed, context)
        context = fixed
    chosen = ((export.get("metrics") or {}).get("auto") or {}).get("tensor_bytes")  # quant auto's real weights
    memory, device_block, runtime = _memory(arch, fmt, export["quant"], context, device, able[0].name, chosen)
    model_folder = Path(export.get("config", {}).get("model_path") or "")
    ident = _export_id(src)[:8] if not more else \
        f"plus-{len(more)}-{artifact.content_id(sorted(_export_id(p) for p, _ in [(src, export), *more]))[:8]}"
    name = f"{_slug(export.get('config', {}).get('model_name') or export['source_model'].get('name') or 'model')}" \
           f"-{label}-{ident}{'' if layout == APP.name else '-' + layout}"
    folders = _folders(shape, [(src, export), *more])
    ables = [_bundle_runtimes(e["format"], p) for p, e in more]
    final = Path(out_dir) if out_dir is not None else artifact.home() / "bundles"
    final = final / name

    manifest = {
        "schema": SCHEMA,
        "name": name,
        "format": fmt,
        "quant": export["quant"],
        "calibrated": bool(export.get("calibrated", False)),
        "label": label,
        "layout": layout,
        **({"providers": providers} if providers else {}),
        "model_file": export.get("model_file"),
        "runtimes": [_runtime_entry(rt) for rt in able],
        "loader": able[0].loader.script.name if shape.app_files else None,
        "context": context,
        "min_ram_bytes": memory.total,
        "memory": {**memory.to_dict(), "runtime": runtime},
        "size_bytes": None,  # filled in below
        "params": arch.params,
        "architecture": arch.to_dict(),
        "device": device_block,
        "speed": _bench_rows(bench, src),
        "quality": _fidelity_rows(fidelity, src),
        "teacher": _teacher(export),
        "source_artifact": {"id": src.name, "label": label, "created": export.get("created")},
        **({"exports": [_export_entry(p, e, f, a, fidelity, bench) for (p, e), f, a
                        in zip([(src, export), *more], folders, [able, *ables])]} if more else {}),
        "recipe": recipe,
        "edgekit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Re-packaging the same export with the same facts reuses the bundle (so `edgekit run` is a no-op
    # the second time); anything that changes the manifest's content makes a new one.
    inputs_id = artifact.content_id({k: v for k, v in manifest.items() if k != "created"})
    manifest["inputs_id"] = inputs_id
    tarball = final.with_name(final.name + ".tar.gz")
    if (final / MANIFEST).is_file() and tarball.is_file():
        try:
            old = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
            if old.get("inputs_id") == inputs_id and verify(final, strict=False)["ok"]:
                return {"path": str(final), "tarball": str(tarball), "manifest": old, "reused": True}
        except (OSError, ValueError, EdgekitError):
            pass  # rebuild below
    needed = 2 * sum(p.stat().st_size for s in (src, *(p for p, _ in more)) for p in s.rglob("*") if p.is_file()) \
        + (1 << 20)  # folder + tarball
    artifact.require_space(final, needed, f"the {fmt} bundle of {src.name}")
    tokenizer = src if _has_tokenizer(src) else model_folder if model_folder.is_dir() else None
    with artifact.atomic_dir(final, needed) as tmp:
        where = tmp / shape.folder(fmt)
        where.mkdir(parents=True, exist_ok=True)
        _copy_model(src, fmt, export, able[0].loader, where)
        if shape.app_files:
            _copy_tokenizer(tokenizer or model_folder, tmp)
            if fmt == "executorch" and (tmp / "tokenizer.json").is_file():
                runner_tokenizer(tmp / "tokenizer.json")
            artifact.atomic_write_text(tmp / "generation.json", _json(_generation(src, model_folder, tmp)))
            shutil.copyfile(able[0].loader.script, where / manifest["loader"])
        wheres = [where]
        for (s, e), f, a in zip(more, folders[1:], ables):  # the other exports, each in its own folder
            wheres.append(tmp / f)
            wheres[-1].mkdir(parents=True, exist_ok=True)
            _copy_model(s, e["format"], e, a[0].loader, wheres[-1])
            if shape.app_files:
                shutil.copyfile(a[0].loader.script, wheres[-1] / a[0].loader.script.name)
        for entry, w in zip(manifest.get("exports", []), wheres):
            entry["size_bytes"] = _model_bytes(w)
        if shape.write is not None:
            manifest[layout] = shape.write(tmp, {
                "source": src, "export": export, "tokenizer": tokenizer, "context": context, "name": name,
                "model_dir": where, "model_dirs": wheres, "providers": providers,
                "model_file": export.get("model_file") or f"model{registry.get(registry.FORMAT, fmt).file_suffix}",
                "generation": _generation(src, model_folder, tokenizer or tmp)})
        manifest["size_bytes"] = _model_bytes(where)
        artifact.atomic_write_text(tmp / "README.md", model_card(manifest))
        if manifest["teacher"].get("notice"):  # terms the teacher's license requires in every redistribution
            artifact.atomic_write_text(tmp / NOTICE_FILE, manifest["teacher"]["notice"])
        manifest["files"] = _hash_files(tmp)
        artifact.atomic_write_text(tmp / MANIFEST, _json(manifest))
    artifact.fault_point("package.before-tarball")
    tarball = _write_tarball(final)
    log.info("bundled %s into %s (%s)", src, final, tarball.name)
    return {"path": str(final), "tarball": str(tarball), "manifest": manifest, "reused": False}


def _more_exports(shape: Layout, src: Path, export: dict, also: Sequence[Path]) -> list[tuple[Path, dict]]:
    """The other exports a bundle of ``shape`` holds beside ``src``, read and checked before anything is written."""
    seen = {src.resolve()}
    extra = []
    for p in map(Path, also):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            extra.append(p)
    if not extra:
        return []
    if not shape.several:
        able = [n for n, x in registry.items(registry.LAYOUT).items() if x.several]
        raise ConfigError(f"the {shape.name} bundle layout holds one export, and {1 + len(extra)} were given; package "
                          f"them one at a time, or use a layout that holds several ({', '.join(able) or 'none'})")
    model = _float_model(export)
    out = []
    for p in extra:
        e = _read_export(p)
        get_layout(shape.name, e["format"])
        if _float_model(e) != model:
            raise ConfigError(f"{p} was exported from {_float_model(e) or '?'} and {src} from {model or '?'}; one "
                              f"{shape.name} bundle holds the exports of one model, so package each model's exports "
                              "in a bundle of its own")
        out.append((p, e))
    return out


def _model_bytes(folder: Path) -> int:
    """Bytes of an export's model files in its bundle folder (model.gguf, model.onnx + its data, ...)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model"))


def _float_model(export: dict) -> str:
    path = (export.get("config") or {}).get("model_path")
    return str(Path(path).resolve()) if path else ""


def _folders(shape: Layout, exports: list[tuple[Path, dict]]) -> list[str]:
    """Each export's folder in the bundle: the layout's own (``gguf/``), or its label when another export of the
    same format holds that (``gguf-q8_0/``)."""
    used, out = set(), []
    for p, e in exports:
        folder = shape.folder(e["format"])
        if folder in used:
            folder = e["label"] if e["label"] not in used else f"{e['label']}-{_export_id(p)[:8]}"
        used.add(folder)
        out.append(folder)
    return out


def _export_entry(src: Path, export: dict, folder: str, able: list, fidelity: dict | None,
                  bench: dict | None) -> dict:
    """One export of a bundle that holds several, as its manifest's ``exports`` lists it (size filled in later)."""
    return {"folder": folder, "label": export["label"], "format": export["format"], "quant": export["quant"],
            "calibrated": bool(export.get("calibrated", False)), "model_file": export.get("model_file"),
            "loader": able[0].loader.script.name, "runtimes": [_runtime_entry(rt) for rt in able],
            "size_bytes": None, "source_artifact": {"id": src.name, "label": export["label"],
                                                    "created": export.get("created")},
            "quality": _fidelity_rows(fidelity, src), "speed": _bench_rows(bench, src)}


def _read_export(src: Path) -> dict:
    if not (src / MANIFEST).is_file():
        raise ConfigError(f"{src} is not an export artifact (no {MANIFEST}); pass a folder made by `edgekit export`, "
                          "e.g. $EDGEKIT_HOME/artifacts/export-<id>")
    try:
        manifest = artifact.read_manifest(src)
    except EdgekitError as e:
        raise ConfigError(f"{src} is not a readable export artifact ({e})") from e
    formats = registry.names(registry.FORMAT)
    if manifest.get("stage") != "export" or manifest.get("format") not in formats:
        raise ConfigError(f"{src / MANIFEST} describes a {manifest.get('stage')!r} artifact of format "
                          f"{manifest.get('format')!r}, not a {'/'.join(formats)} export; pass a folder made by "
                          "`edgekit export`")
    for key in ("quant", "label", "source_model"):
        if key not in manifest:
            raise ConfigError(f"{src / MANIFEST} lacks {key!r}; re-run `edgekit export` to rebuild the artifact")
    problems = artifact.verify_manifest(src)
    if problems:
        raise ConfigError(f"export {src} is damaged ({'; '.join(problems[:3])}); re-run `edgekit export` to rebuild it")
    return manifest


def _export_id(src: Path) -> str:
    return src.name.removeprefix("export-") or artifact.content_id(src.name)


def _bundle_runtimes(fmt: str, src: Path) -> list:
    """The runtimes a bundle of ``fmt`` lists; the first one ships its example loader (see runtimes.Loader)."""
    able = runtimes.for_bundle(fmt)
    if not able or not getattr(able[0], "loader", None):
        names = ", ".join(r.name for r in able) or "none is registered"
        raise ConfigError(f"cannot bundle {src}: no runtime of the {fmt} format ships an example loader ({names}); "
                          f"the plugin that adds {fmt} must give its runtime a `loader=edgekit.runtimes.Loader(script=<"
                          "standalone run script>, files=<export files it loads>)`")
    return able


def _runtime_entry(rt) -> dict:
    """A runtime as the bundle manifest lists it: what to pip install, from which version, and its loader."""
    loader = getattr(rt, "loader", None)
    return {"name": rt.name, "package": rt.package,
            "min_version": (loader and loader.min_version) or getattr(rt, "min_version", None),
            "loader": loader.script.name if loader else None}


def _static_context(fmt: str) -> bool:
    """Whether ``fmt``'s exporter fixes the positions at export (its manifest's metrics then say how many)."""
    exporter = registry.items(registry.EXPORTER).get(fmt)
    return bool(getattr(exporter, "static_context", False))


def _architecture(export: dict, src: Path) -> Architecture:
    try:
        return Architecture.from_dict(export["source_model"].get("architecture") or {})
    except TypeError as e:
        raise ConfigError(f"{src / MANIFEST}: source_model.architecture is incomplete ({e}); re-run `edgekit export`")\
            from e


def _memory(arch, fmt: str, quant: str, context: int, device: str | None, runtime: str, weights: int | None = None):
    """(memory model, device block or None, runtime the figure is for); ``runtime``: the example loader's;
    ``weights``: the weights' real bytes when the export knows them (quant auto's chosen types)."""
    scheme = get_scheme(fmt, quant)
    if device is None:
        return plan.memory_model(arch, scheme, context, runtime, weight_bytes=weights), None, runtime
    profile = load_device(device)
    if runtime not in profile.runtimes:  # size for what the example loader uses, if the device has it
        runtime = plan.runtime_for(fmt, profile)  # RecipeError if the device cannot run this format at all
    memory = plan.memory_model(arch, scheme, context, runtime, bare_metal=plan._bare_metal(profile),
                               weight_bytes=weights)
    fits = memory.total <= profile.memory_budget
    if not fits:
        log.warning("%s needs %d bytes at context %d but %s allows %d", fmt, memory.total, context, device,
                    profile.memory_budget)
    return memory, {"name": profile.name, "display_name": profile.display_name, "runtime": runtime,
                    "memory_budget_bytes": profile.memory_budget, "ram_bytes": profile.ram, "fits": fits,
                    "headroom_bytes": profile.memory_budget - memory.total}, runtime


def _same_artifact(path: str | None, src: Path) -> bool:
    """Export folder names are content ids, so a matching name is the same export (even measured elsewhere)."""
    return bool(path) and PurePosixPath(str(path).replace("\\", "/")).name == src.name


def _bench_rows(bench: dict | None, src: Path) -> list[dict]:
    if bench is None:
        return []
    if not isinstance(bench, dict) or bench.get("schema") != "edgekit.bench/1":
        raise ConfigError("bench results are not an edgekit.bench/1 report (schema key); pass the JSON written by "
                          "`edgekit bench`")
    rows = []
    for run in bench.get("runs") or []:
        if run.get("status") == "ok" and _same_artifact(run.get("artifact"), src) and run.get("metrics"):
            m = run["metrics"]
            rows.append({"runtime": run.get("runtime"), "device": run.get("device"),
                         "decode_tok_s": (m.get("decode_tok_s") or {}).get("median"),
                         "peak_rss_bytes": m.get("peak_rss_bytes")})
    return rows


def _fidelity_rows(fidelity: dict | None, src: Path) -> list[dict]:
    if fidelity is None:
        return []
    if not isinstance(fidelity, dict) or fidelity.get("schema") != "edgekit.fidelity/1":
        raise ConfigError("fidelity report is not an edgekit.fidelity/1 report (schema key); pass the report.json "
                          "written by `edgekit quantize report`")
    teacher = fidelity.get("teacher") or {}
    against = {"teacher": teacher.get("path"), "teacher_perplexity": teacher.get("perplexity")} if teacher else {}
    return [{"reference": fidelity.get("reference"), "perplexity": r.get("perplexity"),
             "ppl_delta_pct": r.get("ppl_delta_pct"), "kl_mean": r.get("kl_mean"),
             "top1_agreement": r.get("top1_agreement"),
             **({**against, "kl_to_teacher": r.get("kl_to_teacher"), "top1_vs_teacher": r.get("top1_vs_teacher")}
                if teacher else {})}
            for r in fidelity.get("rows") or [] if r.get("artifact") == src.name]


def _teacher(export: dict) -> dict:
    """The model this one derives from: for a distilled student the teacher it learnt from, else itself."""
    source = export["source_model"]
    teacher = {"name": source.get("name"), "license": source.get("license"), "origin": source.get("origin"),
               "notice": source.get("notice"), "distilled": False}
    folder = Path(source.get("path") or "")
    with contextlib.suppress(EdgekitError, OSError, ValueError):
        student = artifact.read_manifest(folder) if (folder / MANIFEST).is_file() else {}
        if student.get("stage") == "distill":
            teacher = {"name": None, "license": source.get("license"), "origin": None, "notice": source.get("notice"),
                       "distilled": True}
            teacher_dir = (student.get("inputs") or {}).get("teacher")
            if teacher_dir and Path(teacher_dir).is_dir():
                t = resolve_teacher(teacher_dir)
                teacher.update(name=t.name, license=t.license or teacher["license"], origin=t.origin,
                               notice=t.notice or teacher["notice"])
    teacher["license_note"] = LICENSE_NOTE
    return teacher


def _copy_model(src: Path, fmt: str, export: dict, loader: runtimes.Loader, tmp: Path) -> None:
    """The model file and the other export files the loader's runtime reads (a pattern copies what matches)."""
    model_file = export.get("model_file") or f"model{registry.get(registry.FORMAT, fmt).file_suffix}"
    names = [model_file]
    for pattern in loader.files:
        names += sorted(p.name for p in src.glob(pattern) if p.is_file()) if _is_pattern(pattern) else [pattern]
    for n in dict.fromkeys(names):
        if not (src / n).is_file():
            raise ConfigError(f"{src} has no {n}; re-run `edgekit export` to rebuild the artifact")
        shutil.copyfile(src / n, tmp / n)


def runner_tokenizer(path: Path) -> bool:
    """Rewrite a tokenizer.json in place into the form ExecuTorch's C++ LLM runner reads; True if it changed.

    That runner's HF tokenizer (pytorch-labs/tokenizers) refuses an empty normalizer ``Sequence``, which
    transformers writes for a tokenizer without normalization (the embedded teacher's); ``null`` means the same
    (no normalization), and Python's tokenizers gives the same ids for both (tests check).
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    norm = data.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "Sequence" and not norm.get("normalizers"):
        data["normalizer"] = None
        artifact.atomic_write_text(path, json.dumps(data, ensure_ascii=False))
        return True
    return False


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _has_tokenizer(folder: Path) -> bool:
    """Whether an export folder carries its own tokenizer (else the bundle takes the source model's)."""
    return any((folder / n).is_file() for n in TOKENIZER_FILES)


def _generation(src: Path, model_folder: Path, bundle: Path) -> dict:
    """Generation defaults from generation_config.json (export folder first, then the source model's); the stop
    text from the tokenizer_config.json in ``bundle``."""
    cfg = {}
    for folder in (src, model_folder):
        path = folder / "generation_config.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                cfg = json.loads(path.read_text(encoding="utf-8"))
                break
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stop = []
    tok_cfg = bundle / "tokenizer_config.json"
    if tok_cfg.is_file():
        with contextlib.suppress(OSError, ValueError):
            tok = json.loads(tok_cfg.read_text(encoding="utf-8"))
            eos_tok = tok.get("eos_token")
            eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
            stop = [eos_tok] if eos_tok else []
    return {"do_sample": bool(cfg.get("do_sample", False)), "temperature": cfg.get("temperature", 1.0),
            "top_p": cfg.get("top_p", 1.0), "top_k": cfg.get("top_k", 50),
            "repetition_penalty": cfg.get("repetition_penalty", 1.0),
            "max_new_tokens": cfg.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
            "bos_token_id": cfg.get("bos_token_id"), "eos_token_ids": eos_ids, "pad_token_id": cfg.get("pad_token_id"),
            "stop": stop}


def _hash_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"sha256": artifact.sha256_file(p), "size": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def _write_tarball(folder: Path) -> Path:
    """``<folder>.tar.gz`` with the folder as its one top-level member, written to a temp name then renamed."""
    final = folder.with_name(folder.name + ".tar.gz")
    tmp = folder.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    try:
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(folder, arcname=folder.name, filter=clean)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise artifact.disk_error(e, final) from e
    return final


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
