"""The ``web`` bundle layout: a static page that runs the model in the browser, with its own ``serve.py``.

- GGUF: ``model.gguf`` beside ``index.html``, which loads it into llama.cpp compiled to WebAssembly (wllama).
- ONNX: the folder is a transformers.js model (``config.json``, ``generation_config.json``, tokenizer files,
  ``onnx/model_q4.onnx`` or the file of its dtype, see :mod:`edgekit.runtimes.onnxruntime_web`) and ``index.html``
  loads it with transformers.js on onnxruntime-web's WebAssembly backend.

The page is the browser runtimes' (:mod:`edgekit.runtimes.browser`, which `edgekit bench --runtimes
wllama,onnxruntime-web` measures through it). It takes ``?prompt=TEXT&max_tokens=N`` (one greedy completion of the
raw prompt, stored with its timings in ``window.edgekitResult``) and otherwise chats with the chat template.
``serve.py`` sends the COOP/COEP headers that give the page WebAssembly threads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgekit.package.layouts import Layout
from edgekit.runtimes import onnxruntime_web
from edgekit.runtimes.browser import WLLAMA_VERSION, write_page

log = logging.getLogger(__name__)

__all__ = ["WEB", "WLLAMA_VERSION"]


def _write_web(folder: Path, ctx: dict) -> dict:
    gen = ctx["generation"]
    web = write_page(folder, fmt=ctx["export"]["format"], model_dir=ctx["model_dir"], model_file=ctx["model_file"],
                     source=ctx["source"], tokenizer=ctx["tokenizer"], name=ctx["name"], context=ctx["context"],
                     max_new_tokens=gen["max_new_tokens"], temperature=gen["temperature"] if gen["do_sample"] else 0)
    for note in web["notes"]:
        log.warning("%s", note)
    return web


WEB = Layout("web", "a static web page that runs the model in the browser: GGUF through llama.cpp in WebAssembly "
             "(wllama), ONNX as a transformers.js model on onnxruntime-web", formats=("gguf", "onnx"),
             app_files=False, write=_write_web, model_dirs=(("onnx", "onnx"),),
             requires=f"a browser with WebAssembly; @wllama/wllama {WLLAMA_VERSION} from a CDN",
             requires_by_format=(("onnx", "a browser with WebAssembly; @huggingface/transformers "
                                          f"{onnxruntime_web.TRANSFORMERS_JS_VERSION} (onnxruntime-web) from a CDN"),),
             run_hint="python serve.py 8000   # then open http://127.0.0.1:8000/ (any server sending the COOP/COEP "
                      "headers of serve.py works)")
