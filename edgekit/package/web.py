"""The ``web`` bundle layout: a static page that runs the model in the browser, with its own ``serve.py``.

- GGUF: ``model.gguf`` beside ``index.html``, which loads it into llama.cpp compiled to WebAssembly (wllama).
- ONNX: the folder is a transformers.js model (``config.json``, ``generation_config.json``, tokenizer files,
  ``onnx/model_q4.onnx`` or the file of its dtype, see :mod:`edgekit.runtimes.onnxruntime_web`) and ``index.html``
  loads it with transformers.js on onnxruntime-web's WebAssembly backend.

Both pages take ``?prompt=TEXT&max_tokens=N`` (one greedy completion of the raw prompt, stored with its timings
in ``window.edgekitResult``: what the tests and ``benchmarks/browser.py`` drive), and otherwise chat with the chat
template.
``serve.py`` sends the COOP/COEP headers that give the page WebAssembly threads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgekit import artifact
from edgekit.errors import ConfigError
from edgekit.package.layouts import Layout, _copy_tokenizer
from edgekit.runtimes import onnxruntime_web

log = logging.getLogger(__name__)
PAGES = Path(__file__).resolve().parent.parent / "resources" / "web"  # the pages and serve.py of the web layout
# The browser runtime the GGUF page loads, pinned; web/package.json pins the same version for the tests, which serve
# node_modules in place of the CDN.
WLLAMA_VERSION = "3.13.0"
WLLAMA_URL = f"https://cdn.jsdelivr.net/npm/@wllama/wllama@{WLLAMA_VERSION}"
MAX_WASM_FILE = onnxruntime_web.MAX_BUFFER  # one ArrayBuffer: wllama loads a GGUF file at most this large
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")  # transformers.js reads both beside the tokenizer


def _write_web(folder: Path, ctx: dict) -> dict:
    gen = ctx["generation"]
    values = {"NAME": ctx["name"], "CONTEXT": str(int(ctx["context"])),
              "MAX_NEW_TOKENS": str(int(gen["max_new_tokens"])),
              "TEMPERATURE": str(float(gen["temperature"]) if gen["do_sample"] else 0)}
    notes = []
    if ctx["export"]["format"] == "onnx":
        values.update(_transformers_js_model(folder, ctx))
        notes = values.pop("notes")
        page, runtime = "onnx.html", f"@huggingface/transformers@{onnxruntime_web.TRANSFORMERS_JS_VERSION}"
    else:
        size = (ctx["model_dir"] / ctx["model_file"]).stat().st_size
        if size > MAX_WASM_FILE:
            raise ConfigError(f"{ctx['model_file']} is {size / 2**30:.2f} GiB and a browser loads a file of at most "
                              "2 GiB into WebAssembly memory; export a smaller quant (e.g. --quant q4_k_m or a smaller "
                              "student)")
        values.update({"WLLAMA_URL": WLLAMA_URL, "MODEL_FILE": ctx["model_file"]})
        page, runtime = "index.html", f"@wllama/wllama@{WLLAMA_VERSION}"
    text = (PAGES / page).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value.replace("<", "").replace('"', "") if key == "NAME" else value)
    artifact.atomic_write_text(folder / "index.html", text)
    shutil.copyfile(PAGES / "serve.py", folder / "serve.py")
    return {"runtime": runtime, "page": "index.html", "notes": notes,
            **({"model_file": values["MODEL_FILE"], "dtype": values["DTYPE"]} if "DTYPE" in values else {})}


def _transformers_js_model(folder: Path, ctx: dict) -> dict:
    """Turn the bundle folder into a transformers.js model: the graph rewritten for onnxruntime-web as
    ``onnx/model<suffix>.onnx``, the exporter's own files dropped, the config and tokenizer files at the top."""
    onnx_dir, src = ctx["model_dir"], ctx["source"]
    staged = onnx_dir / ".web"
    staged.mkdir()
    web = onnxruntime_web.write_model(onnx_dir / ctx["model_file"], staged)
    for p in list(onnx_dir.iterdir()):  # the exporter's graph, its data and genai_config.json: not read here
        if p != staged:
            p.unlink()
    for p in list(staged.iterdir()):
        p.rename(onnx_dir / p.name)
    staged.rmdir()
    for n in MODEL_CONFIG_FILES:
        if not (src / n).is_file():
            raise ConfigError(f"{src} has no {n}, which transformers.js reads; re-run `edgekit export` to rebuild it")
        shutil.copyfile(src / n, folder / n)
    if web["external_data"]:  # transformers.js fetches <model>.onnx_data only when the config says so
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config.setdefault("transformers.js_config", {})["use_external_data_format"] = {web["file"]: 1}
        artifact.atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    _copy_tokenizer(ctx["tokenizer"] or src, folder)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"transformers.js needs tokenizer.json and {ctx['tokenizer'] or src} has none; export from a "
                          "model folder with a fast tokenizer")
    for note in web["notes"]:
        log.warning("%s", note)
    return {"TRANSFORMERS_URL": onnxruntime_web.TRANSFORMERS_JS_URL, "DTYPE": web["dtype"], "MODEL_FILE": web["file"],
            "notes": web["notes"]}


WEB = Layout("web", "a static web page that runs the model in the browser: GGUF through llama.cpp in WebAssembly "
             "(wllama), ONNX as a transformers.js model on onnxruntime-web", formats=("gguf", "onnx"),
             app_files=False, write=_write_web, model_dirs=(("onnx", "onnx"),),
             requires=f"a browser with WebAssembly; @wllama/wllama {WLLAMA_VERSION} from a CDN",
             requires_by_format=(("onnx", "a browser with WebAssembly; @huggingface/transformers "
                                          f"{onnxruntime_web.TRANSFORMERS_JS_VERSION} (onnxruntime-web) from a CDN"),),
             run_hint="python serve.py 8000   # then open http://127.0.0.1:8000/ (any server sending the COOP/COEP "
                      "headers of serve.py works)")
