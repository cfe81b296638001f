"""Bundle layouts: what a bundle holds beside the model file, one registered ``layout`` per way of shipping it.

- ``app``: the model, tokenizer files, generation defaults and a standalone Python example loader, for an app that
  embeds the runtime;
- ``ollama`` (GGUF): ``model.gguf`` and a ``Modelfile`` (FROM the GGUF, the chat template translated into Ollama's Go
  TEMPLATE by :mod:`edgekit.ollama`, SYSTEM when the template has a default system prompt, PARAMETER stop / num_ctx /
  sampling), for ``ollama create NAME -f Modelfile``;
- ``hf``: a Hugging Face model repository (the float model at the top, the export in its subfolder);
- ``ort-package`` (ONNX): an ONNX Runtime model package with one variant folder per execution provider;
- ``web`` (GGUF, ONNX): a static page that runs the model in the browser (:mod:`edgekit.package.web`).

:func:`edgekit.package.package` writes the bundle and calls the layout's ``write``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit import __version__, artifact, chat, ollama, registry
from edgekit.devices import load_device
from edgekit.errors import ConfigError, ModelError
from edgekit.hf import copy_tokenizer

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Layout:
    """What a bundle holds beside the model file, for one way of shipping it (registered as kind ``layout``).

    ``formats``: the export formats it takes (empty: any). ``app_files``: the example loader, the
    tokenizer files and generation.json. ``write(folder, context)`` adds the layout's own files to the
    bundle being written and returns what the manifest records of them; ``context`` holds ``source``
    (the export folder), ``export`` (its manifest), ``tokenizer`` (the folder with its tokenizer files
    or None), ``generation`` (the defaults of generation.json), ``context`` (tokens) and ``name``.
    """

    name: str
    help: str
    formats: tuple[str, ...] = ()
    app_files: bool = True
    write: Callable[[Path, dict], dict] | None = None
    run_hint: str = ""  # the card's "Run it" block; {name} (lower case) and {model_file} are filled in
    requires: str = ""  # what runs the bundle, for the card (default: the format's runtimes and versions)
    model_dir: str = ""  # where the export's files go ("{format}": a folder named after it; "": the top)
    model_dirs: tuple[tuple[str, str], ...] = ()  # (format, folder): model_dir for that format
    requires_by_format: tuple[tuple[str, str], ...] = ()  # (format, text): requires for that format
    several: bool = False  # holds several exports of one model, each in its own folder (``model_dir`` per format)

    def folder(self, fmt: str) -> str:
        """Where an export of ``fmt``'s files go in the bundle (relative; "" for the top)."""
        return dict(self.model_dirs).get(fmt, self.model_dir).format(format=fmt)

    def requirement(self, fmt: str) -> str:
        return dict(self.requires_by_format).get(fmt, self.requires)


def get_layout(name: str, fmt: str | None = None) -> Layout:
    """The registered layout ``name``; a ConfigError if unknown or if it does not take ``fmt`` exports."""
    layout = registry.get(registry.LAYOUT, name, what="bundle layout")
    if fmt is not None and layout.formats and fmt not in layout.formats:
        raise ConfigError(f"the {name} bundle layout takes {' or '.join(layout.formats)} exports, and this one is "
                          f"{fmt}; export {' or '.join(layout.formats)} (edgekit export MODEL --format "
                          f"{layout.formats[0]}) or choose another layout ({', '.join(registry.names(registry.LAYOUT))})")
    return layout


def layouts_for(fmt: str, wanted: list[str] | None) -> list[str]:
    """The layouts a recipe's ``package.formats`` asks of an export of ``fmt``: an entry naming the format (or
    ``app``) its app bundle, an entry naming another layout that layout's bundle if it takes ``fmt``."""
    if wanted is None:
        return [APP.name]
    layouts = registry.items(registry.LAYOUT)
    out = []
    for w in wanted:
        if w in (fmt, APP.name):
            out.append(APP.name)
        elif w in layouts and (not layouts[w].formats or fmt in layouts[w].formats):
            out.append(w)
    return list(dict.fromkeys(out))


def _write_ollama(folder: Path, ctx: dict) -> dict:
    """The Modelfile; its TEMPLATE only when the chat template translates exactly (see edgekit.ollama)."""
    gen, model_file = ctx["generation"], ctx["model_file"]
    shape, reason = None, None
    if ctx["tokenizer"] is None:
        reason = "the source model's tokenizer folder is gone, so its chat template cannot be read"
    else:
        try:
            shape = _chat_shape(ctx["tokenizer"], folder / model_file)
        except ollama.Untranslatable as e:
            reason = str(e)
    if reason:
        log.warning("Modelfile without TEMPLATE (Ollama will guess one from the GGUF's chat template): %s", reason)
    params = {"num_ctx": ctx["context"],
              "temperature": gen["temperature"] if gen["do_sample"] else 0,
              "top_p": gen["top_p"] if gen["do_sample"] else None,
              "top_k": gen["top_k"] if gen["do_sample"] else None,
              "repeat_penalty": gen["repetition_penalty"] if gen["repetition_penalty"] != 1.0 else None,
              "num_predict": gen["max_new_tokens"]}
    header = (f"{ctx['name']}: made by edgekit {__version__}.\nollama create {ctx['name'].lower()} -f Modelfile"
              + (f"\nNo TEMPLATE: {reason}" if reason else ""))
    stop = [*gen["stop"], *([shape.suffix["assistant"].strip()] if shape else [])]
    try:
        text = ollama.modelfile(shape, model_file=model_file, stop=stop, params=params, header=header)
    except ollama.Untranslatable as e:  # e.g. a template holding the Modelfile's own block quotes
        shape, reason = None, str(e)
        log.warning("Modelfile without TEMPLATE: %s", reason)
        text = ollama.modelfile(None, model_file=model_file, stop=stop, params=params, header=header + f"\n{reason}")
    artifact.atomic_write_text(folder / "Modelfile", text)
    return {"template": {"translated": shape is not None, "reason": reason,
                         "default_system": shape.default_system if shape else None,
                         "notes": list(shape.notes) if shape else []}}


def _chat_shape(tokenizer_dir: Path, gguf_file: Path) -> ollama.ChatShape:
    """The chat template of ``tokenizer_dir`` as :mod:`edgekit.ollama` reads it, for the GGUF ``gguf_file``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tok, "chat_template", None):
        raise ollama.Untranslatable(f"the tokenizer in {tokenizer_dir} has no chat template")
    return ollama.read_shape(_probe_render(tok), bos=tok.bos_token, bos_added=_gguf_adds_bos(gguf_file))


def _probe_render(tok) -> ollama.Render:
    """``render(messages, add_generation_prompt)`` with the tokenizer's own template; a template that refuses a
    probe conversation (raise_exception, a sandbox refusal) makes the template untranslatable."""
    def render(messages: list[dict], gen: bool) -> str:
        try:
            return chat.render(tok, messages, gen)
        except ModelError as e:
            raise ollama.Untranslatable(f"the template refuses a probe conversation ({e})") from e

    return render


def _gguf_adds_bos(path: Path) -> bool:
    """Whether llama.cpp (and so Ollama) puts BOS before a prompt for this GGUF (tokenizer.ggml.add_bos_token)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[field.data[0]][0]) if field is not None and field.data else False


HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _write_hf(folder: Path, ctx: dict) -> dict:
    """A Hugging Face model repository: the float model and tokenizer at the top, the export in its subfolder.

    The float model is the folder the export was made from (the distilled student, or the teacher as
    edgekit converted it); transformers' ``from_pretrained`` loads the top folder, llama.cpp /
    onnxruntime-genai / ExecuTorch the subfolder.
    """
    model_folder = Path((ctx["export"].get("config") or {}).get("model_path") or "")
    files = [n for n in (*HF_MODEL_FILES, *sorted(p.name for p in model_folder.glob("model-*.safetensors")))
             if (model_folder / n).is_file()] if model_folder.is_dir() else []
    if not any(n.endswith(".safetensors") for n in files):
        raise ConfigError(f"the hf layout ships the float model the export was made from, and {model_folder or '?'} "
                          "holds no safetensors weights (moved or deleted?); re-run the stage that made it, or use "
                          "--layout app")
    for n in files:
        shutil.copyfile(model_folder / n, folder / n)
    _copy_tokenizer(model_folder, folder)
    for where in ctx["model_dirs"]:  # each export's example loader reads it beside its model
        _copy_tokenizer(model_folder, where)
    return {"float_model": {"path": str(model_folder), "files": files}}


def _front_matter(m: dict) -> list[str]:
    """The model card's YAML front matter, as the Hugging Face Hub reads it."""
    teacher = m["teacher"]
    origin = (teacher.get("origin") or "").split(",")[0].strip()
    base = origin if _HUB_ID.match(origin) else None
    lic = (teacher.get("license") or "").strip()
    known = {"apache-2.0", "mit", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "cc-by-4.0", "openrail"}
    tags = ["edgekit", m["format"], m["quant"], "distillation" if teacher.get("distilled") else "quantized"]
    lines = ["---", "pipeline_tag: text-generation", "library_name: transformers",
             f"license: {lic if lic in known else 'other'}"]
    if lic and lic not in known:
        lines.append(f"license_name: {json.dumps(lic)}")
    if base:
        lines += [f"base_model: {base}", f"base_model_relation: {'finetune' if teacher.get('distilled') else 'quantized'}"]
    lines += ["tags:", *[f"- {json.dumps(t)}" for t in dict.fromkeys(tags)],
              f"edgekit_version: {json.dumps(m['edgekit_version'])}",
              *([f"edgekit_recipe: {json.dumps(m['recipe'])}"] if m.get("recipe") else []), "---", ""]
    return lines


# onnxruntime-genai's provider name -> (onnxruntime's execution provider, what it needs of the device)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
             "webgpu": "WebGpuExecutionProvider"}
ORT_PACKAGE_DIR = "model.ortpackage"


def _providers(asked: list[str] | None, device: str | None) -> list[str]:
    """The execution providers of an ort-package: the CPU always, then those asked for (or the device's GPU)."""
    if asked is None:
        asked = []
        if device is not None:
            gpus = [a for a in load_device(device).accelerators if a.kind == "gpu"
                    and {"onnxruntime", "onnxruntime-genai"} & set(a.usable_by)]
            asked = ["cuda"] if any("nvidia" in a.name.lower() or "cuda" in a.name.lower() for a in gpus) else []
    bad = [p for p in asked if p not in PROVIDERS]
    if bad:
        raise ConfigError(f"unknown execution provider {bad[0]!r} for an ort-package: choose from "
                          f"{', '.join(PROVIDERS)} (QNN and other NPUs need a model compiled for them, which edgekit "
                          "does not make)")
    return list(dict.fromkeys(["cpu", *asked]))


def _write_ort_package(folder: Path, ctx: dict) -> dict:
    """An ONNX Runtime model package (``model.ortpackage/``) with one variant per execution provider.

    The package's manifest.json is written by onnxruntime's own ``ModelPackage`` API (onnxruntime >= 1.32),
    which checks the layout. Each variant folder is complete (model, genai_config.json with that provider,
    tokenizer), because onnxruntime-genai loads one variant folder and refuses paths that leave it.
    """
    import onnxruntime as ort

    if not hasattr(ort, "ModelPackage"):
        raise ConfigError(f"onnxruntime {ort.__version__} has no ModelPackage API; the ort-package layout needs "
                          "onnxruntime >= 1.32 (pip install -U onnxruntime)")
    root, cpu = folder / ORT_PACKAGE_DIR, ctx["model_dir"]
    model_file = ctx["model_file"]
    if ctx["tokenizer"] is not None:
        _copy_tokenizer(ctx["tokenizer"], cpu)
    config = json.loads((cpu / "genai_config.json").read_text(encoding="utf-8"))
    variants = {}
    for provider in ctx["providers"]:
        vdir = cpu if provider == "cpu" else root / "decoder" / provider
        if provider != "cpu":
            shutil.copytree(cpu, vdir)
        cfg = json.loads(json.dumps(config))
        cfg["model"]["decoder"].setdefault("session_options", {})["provider_options"] = (
            [] if provider == "cpu" else [{provider: {}}])
        artifact.atomic_write_text(vdir / "genai_config.json", _json(cfg))
        variants[provider] = vdir.relative_to(root).as_posix()
    with tempfile.TemporaryDirectory(prefix="edgekit-ortpkg-") as seed:  # ORT writes the manifest into an empty folder
        pkg = ort.ModelPackage()
        pkg.set_metadata(name=ctx["name"], version=__version__,
                         description=f"{ctx['export']['label']} made by edgekit {__version__}")
        pkg.set_component_inline("decoder", json.dumps({"variants": {}}))
        pkg.commit(str(Path(seed) / "p"))
        shutil.copyfile(Path(seed) / "p" / "manifest.json", root / "manifest.json")
    pkg = ort.ModelPackage.open(str(root))
    for provider, vdir in variants.items():
        pkg.set_variant("decoder", provider, json.dumps({"ep": PROVIDERS[provider], "variant_directory": vdir}))
        pkg.set_variant_executor_info_inline("decoder", provider, "ort", json.dumps({"model_file": model_file}))
    pkg.commit()
    pkg.close()
    return {"package": ORT_PACKAGE_DIR, "variants": variants}


APP = Layout("app", "the model, tokenizer, generation defaults and a standalone Python example loader")
ORT_PACKAGE = Layout("ort-package", "an ONNX Runtime model package: one variant folder per execution provider that "
                     "onnxruntime and onnxruntime-genai load", formats=("onnx",), app_files=False,
                     write=_write_ort_package, model_dir=f"{ORT_PACKAGE_DIR}/decoder/cpu",
                     requires="onnxruntime>=1.32, onnxruntime-genai",
                     run_hint="python -c \"import onnxruntime_genai as og; m = og.Model('{model_dir}'); "
                              "print(og.Tokenizer(m).encode('Hello!'))\"   # a variant folder loads as is")
HF = Layout("hf", "a Hugging Face model repository: the float model and tokenizer for transformers, the export in "
            "a subfolder (several exports: one folder each), a model card with Hub front matter", write=_write_hf,
            model_dir="{format}", several=True,
            run_hint="pip install transformers torch   # the float model, at the top of this folder\n"
                     "python -c \"from transformers import pipeline; print(pipeline('text-generation', '.')"
                     "([{{'role': 'user', 'content': 'Hello!'}}], max_new_tokens=32))\"\n"
                     "python {format}/{loader} \"Hello!\"   # the {format} export, on its runtime\n"
                     "hf upload YOUR-NAME/{name} .   # publish it, when you choose to")
OLLAMA = Layout("ollama", "model.gguf and a Modelfile for `ollama create`", formats=("gguf",), app_files=False,
                write=_write_ollama, run_hint="ollama create {name} -f Modelfile\nollama run {name}",
                requires="Ollama")


def _copy_tokenizer(folder: Path, tmp: Path) -> None:
    if not folder.is_dir():
        log.warning("source model folder %s is gone: the bundle relies on the tokenizer the model file embeds", folder)
        return
    copy_tokenizer(folder, tmp)


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"
