"""Runtimes in a browser tab: ``wllama`` (a GGUF in llama.cpp compiled to WebAssembly) and ``onnxruntime-web`` (an
ONNX export as a transformers.js model on onnxruntime-web's WebAssembly backend), in headless Chromium.

Both run the page the ``web`` bundle layout ships (``edgekit/resources/web/``, written by :func:`write_page`), so
`edgekit bench` measures what a bundle's user gets. They are *opt-in* runtimes: benchmarked only when named
(``edgekit bench ... --runtimes wllama,onnxruntime-web`` or a recipe's ``bench.runtimes``), never chosen to run a
format, listed in an app bundle or counted among a host's runtimes. They have no token-level session: the page runs
whole completions, so :func:`measure` replaces the bench worker's session loop and takes the figures from the page
(wllama: llama.cpp's own timings inside it; transformers.js: the page's clock), and the peak RSS from the browser's
processes.

What they need here: Node.js, Chromium (Debian's ``chromium``, or ``$CHROMIUM``) and a folder with the driver
(``drive.mjs``) and its npm packages: ``$EDGEKIT_WEB``, or the ``web/`` folder of an edgekit checkout after
``make web``. The page loads its runtime from a CDN at a pinned version; the driver answers those requests from the
folder's ``node_modules``, so a measurement runs offline.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from edgekit import artifact, registry
from edgekit.errors import ConfigError, ModelError
from edgekit.runtimes import Runtime, describe, hf_tokenizer, onnxruntime_web

PAGES = Path(__file__).resolve().parent.parent / "resources" / "web"  # the pages and serve.py of the web layout
WEB_ENV = "EDGEKIT_WEB"
CHECKOUT_WEB = Path(__file__).resolve().parents[2] / "web"  # an edgekit checkout's driver folder
# The runtime the GGUF page loads, pinned; web/package.json pins the same version for the driver, which serves
# node_modules in place of the CDN.
WLLAMA_VERSION = "3.13.0"
WLLAMA_URL = f"https://cdn.jsdelivr.net/npm/@wllama/wllama@{WLLAMA_VERSION}"
MAX_WASM_FILE = onnxruntime_web.MAX_BUFFER  # one ArrayBuffer: wllama loads a GGUF file at most this large
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")  # transformers.js reads both beside the tokenizer
# ... and these of the tokenizer (the `tokenizers` format; no slow-tokenizer sources)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# --------------------------------------------------------------------------- the page


def write_page(folder: Path, *, fmt: str, model_dir: Path, model_file: str, source: Path, tokenizer: Path | None,
               name: str, context: int, max_new_tokens: int, temperature: float) -> dict:
    """Make ``folder`` a page that runs the export: ``index.html`` and ``serve.py``, and for ONNX the transformers.js
    model layout (``model_dir`` is ``folder/onnx`` holding the exporter's graph, which is rewritten there).
    Returns what a bundle manifest records: the runtime, the page, notes (and the ONNX model file and dtype)."""
    values = {"NAME": name, "CONTEXT": str(int(context)), "MAX_NEW_TOKENS": str(int(max_new_tokens)),
              "TEMPERATURE": str(float(temperature))}
    notes: list[str] = []
    if fmt == "onnx":
        web = _transformers_js_model(folder, model_dir, model_file, source, tokenizer)
        notes = web["notes"]
        values.update({"TRANSFORMERS_URL": onnxruntime_web.TRANSFORMERS_JS_URL, "DTYPE": web["dtype"],
                       "MODEL_FILE": web["file"]})
        page, runtime = "onnx.html", f"@huggingface/transformers@{onnxruntime_web.TRANSFORMERS_JS_VERSION}"
    elif fmt == "gguf":
        size = (model_dir / model_file).stat().st_size
        if size > MAX_WASM_FILE:
            raise ConfigError(f"{model_file} is {size / 2**30:.2f} GiB and a browser loads a file of at most 2 GiB "
                              "into WebAssembly memory; export a smaller quant (e.g. --quant q4_k_m or a smaller "
                              "student)")
        values.update({"WLLAMA_URL": WLLAMA_URL, "MODEL_FILE": model_file})
        page, runtime = "index.html", f"@wllama/wllama@{WLLAMA_VERSION}"
    else:
        raise ConfigError(f"no browser page runs {fmt} exports; the web layout takes gguf or onnx")
    text = (PAGES / page).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value.replace("<", "").replace('"', "") if key == "NAME" else value)
    artifact.atomic_write_text(folder / "index.html", text)
    shutil.copyfile(PAGES / "serve.py", folder / "serve.py")
    return {"runtime": runtime, "page": "index.html", "notes": notes,
            **({"model_file": values["MODEL_FILE"], "dtype": values["DTYPE"]} if fmt == "onnx" else {})}


def _transformers_js_model(folder: Path, onnx_dir: Path, model_file: str, src: Path, tokenizer: Path | None) -> dict:
    """The graph rewritten for onnxruntime-web as ``onnx/model<suffix>.onnx`` (the exporter's own files dropped
    from ``onnx_dir``), the config and tokenizer files at the top of ``folder``."""
    staged = onnx_dir / ".web"
    staged.mkdir()
    web = onnxruntime_web.write_model(onnx_dir / model_file, staged)
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
    tok = tokenizer or src
    for n in TOKENIZER_FILES:
        if (tok / n).is_file():
            shutil.copyfile(tok / n, folder / n)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"transformers.js needs tokenizer.json and {tok} has none; export from a model folder with "
                          "a fast tokenizer")
    return web


# --------------------------------------------------------------------------- the browser


def web_folder() -> Path | None:
    """The folder with drive.mjs and its node_modules: $EDGEKIT_WEB, else an edgekit checkout's web/."""
    env = os.environ.get(WEB_ENV)
    for folder in ([Path(env)] if env else [CHECKOUT_WEB]):
        if (folder / "drive.mjs").is_file() and (folder / "node_modules").is_dir():
            return folder
    return None


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """None when a page can run here, else what is missing and how to get it."""
    lacks = [what for what, ok in (
        ("Node.js (node)", shutil.which("node")),
        (f"the page driver: ${WEB_ENV} naming a folder with drive.mjs and node_modules (in an edgekit checkout: "
         "make web)", web_folder()),
        ("Chromium (apt install chromium, or $CHROMIUM)", chromium())) if not ok]
    return f"the browser runtimes need {'; '.join(lacks)}" if lacks else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_page(folder: Path, prompt: str, max_tokens: int, *, threads: int | None = None, ignore_eos: bool = False,
              timeout: int = 300) -> dict:
    """Serve ``folder`` with its serve.py and run its page once on ``prompt`` in headless Chromium; what the page
    measured (text, ids, timings, load time, time to first token, threads, SIMD, cross-origin isolation, browser
    version) plus ``peak_rss_bytes``, the most the browser's processes held together."""
    reason = missing()
    if reason:
        raise ConfigError(reason)
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(Path(folder) / "serve.py"), str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        headers = None
        for _ in range(100):
            try:
                headers = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).headers
                break
            except OSError:
                time.sleep(0.1)
        if headers is None or headers["Cross-Origin-Opener-Policy"] != "same-origin":
            raise ModelError(f"{folder}/serve.py did not serve the page with its COOP header on port {port}")
        query = {"prompt": prompt, "max_tokens": max_tokens, **({"threads": threads} if threads else {}),
                 **({"ignore_eos": 1} if ignore_eos else {})}
        url = f"http://127.0.0.1:{port}/index.html?" + urllib.parse.urlencode(query)
        driver = subprocess.Popen(["node", str(web_folder() / "drive.mjs"), url, "--timeout", str(timeout),
                                   "--chromium", chromium()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        peak, deadline = 0, time.monotonic() + timeout + 60
        while driver.poll() is None:  # the browser's processes are the driver's descendants
            try:
                tree = psutil.Process(driver.pid).children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            if time.monotonic() > deadline:
                driver.kill()
                raise ModelError(f"the page in {folder} did not finish within {timeout} s")
            time.sleep(0.2)
        out, err = driver.communicate()
        if driver.returncode != 0:
            raise ModelError(f"the page failed in Chromium: {err.strip()[-1500:]}")
        result = json.loads(out.strip().splitlines()[-1])
        if "error" in result:
            raise ModelError(f"the page failed: {result['error']} ({result.get('logs')})")
        return {**result, "peak_rss_bytes": peak}
    finally:
        server.terminate()
        server.wait(10)


# --------------------------------------------------------------------------- the bench worker's measurement


def _prompt(tokenize, length: int, prompt_text: str) -> str:
    """``prompt_text`` repeated and cut to the most words that stay within ``length`` tokens of the model's
    tokenizer (the page takes text: wllama has no token-level prompt)."""
    words = (prompt_text * (length // 20 + 2)).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose tokens fit in length
        mid = (lo + hi + 1) // 2
        if len(tokenize(" ".join(words[:mid]))) <= length:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _tokenizer_dir(src) -> Path | None:
    """Where an export's tokenizer.json is: beside the export, or else in the model it was made from."""
    return src.path if (src.path / "tokenizer.json").is_file() else src.source_model


def _page_folder(src, fmt: str, context: int, work: Path) -> Path:
    """A page for the export ``src`` (``describe``d) in ``work`` (what the web layout would bundle, unhashed)."""
    manifest = artifact.read_manifest(src.path)
    model_file = manifest.get("model_file") or src.model.name
    folder = work / "page"
    model_dir = folder / ("onnx" if fmt == "onnx" else "")
    model_dir.mkdir(parents=True)
    if fmt == "gguf":
        os.symlink(src.model, model_dir / model_file)
    else:
        for p in src.path.iterdir():
            if p.is_file() and p.name.startswith("model"):
                os.symlink(p, model_dir / p.name)
    write_page(folder, fmt=fmt, model_dir=model_dir, model_file=model_file, source=src.path,
               tokenizer=_tokenizer_dir(src),
               name=src.label, context=context, max_new_tokens=64, temperature=0.0)
    return folder


def measure(spec, prompt_text: str, fmt: str, name: str) -> dict:
    """The bench worker's measurement for a browser runtime (see :mod:`edgekit.bench.worker`): per run the page is
    opened afresh (load = download into the tab plus model load), one completion of 1 token per prompt length gives
    the time to first token, one of ``decode_tokens`` tokens after a ``decode_prompt_tokens`` prompt gives decode."""
    src = describe(Path(spec.artifact))
    tok_dir = _tokenizer_dir(src)
    if tok_dir is None or not (Path(tok_dir) / "tokenizer.json").is_file():
        raise ConfigError(f"{src.path}: the browser benchmark sizes its prompts with the source model's "
                          "tokenizer.json, and neither the export nor its source model folder has one")
    tokenize = hf_tokenizer(Path(tok_dir))
    runs = spec.warmup + spec.repeats
    load_s, ttft, prefill, decode, decoded, peak, info = [], {}, {}, [], [], 0, {}
    with tempfile.TemporaryDirectory(prefix="edgekit-browser-") as work:
        folder = _page_folder(src, fmt, spec.context, Path(work))
        for length in spec.prompt_lengths:
            text, times, rates = _prompt(tokenize, length, prompt_text), [], []
            for _ in range(runs):
                r = open_page(folder, text, 1, threads=spec.threads)
                peak, info = max(peak, r["peak_rss_bytes"]), r
                load_s.append(r["load_ms"] / 1000)
                n = r["timings"].get("prompt_n") or length
                times.append(r["ttft_ms"] / 1000 if r.get("ttft_ms") else r["total_ms"] / 1000)
                rates.append(n / times[-1])
            ttft[str(length)], prefill[str(length)] = times[spec.warmup:], rates[spec.warmup:]
        text = _prompt(tokenize, spec.decode_prompt_tokens, prompt_text)
        tokens = None
        for _ in range(runs):
            r = open_page(folder, text, spec.decode_tokens, threads=spec.threads, ignore_eos=True)
            peak = max(peak, r["peak_rss_bytes"])
            decode.append(r["timings"]["predicted_per_second"])
            decoded.append(r["timings"]["predicted_n"])
            tokens = tokens or r.get("ids")
    return {"status": "ok", "runtime": name, "version": _version(name), "threads": spec.threads,
            "gpu": f"not available on this host: edgekit runs {name} on WebAssembly (CPU) only",
            "load_s": load_s[spec.warmup:], "ttft_s": ttft, "prefill_tok_s": prefill,
            "decode_tok_s": decode[spec.warmup:], "decoded": decoded[spec.warmup:], "tokens": tokens or [],
            "rss_after_load_bytes": info.get("peak_rss_bytes", peak), "peak_rss_bytes": peak,
            "host": socket.gethostname(),
            "environment": f"{info.get('browser')} headless, {name} {_version(name)}: {info.get('threads')} "
                           f"WebAssembly thread(s) ({'on' if info.get('multithread') else 'off'}; cross-origin "
                           f"isolated: {'yes' if info.get('cross_origin_isolated') else 'no'}), SIMD "
                           f"{'on' if info.get('simd') else 'off'}; RSS is the browser's processes together"}


def _version(name: str) -> str:
    return WLLAMA_VERSION if name == WLLAMA.name else onnxruntime_web.TRANSFORMERS_JS_VERSION


def _no_session(*args, **kwargs):
    raise ConfigError("the browser runtimes run whole completions in a page, not token-level sessions; they are for "
                      "`edgekit bench --runtimes wllama,onnxruntime-web`, and a `web` bundle for apps")


WLLAMA = Runtime(
    "wllama", ("gguf",), "edgekit", "@wllama/wllama (npm)", _no_session,
    description=f"llama.cpp in WebAssembly (@wllama/wllama {WLLAMA_VERSION}) in headless Chromium",
    full_logits=False, opt_in=True, check=missing, version_of=lambda: WLLAMA_VERSION,
    measure=lambda spec, text: measure(spec, text, "gguf", "wllama"))
ONNXRUNTIME_WEB = Runtime(
    "onnxruntime-web", ("onnx",), "edgekit", "@huggingface/transformers (npm)", _no_session,
    description=f"transformers.js {onnxruntime_web.TRANSFORMERS_JS_VERSION} on onnxruntime-web (WebAssembly) in "
                "headless Chromium",
    full_logits=False, opt_in=True, check=missing, version_of=lambda: onnxruntime_web.TRANSFORMERS_JS_VERSION,
    measure=lambda spec, text: measure(spec, text, "onnx", "onnxruntime-web"))


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    for rt in (WLLAMA, ONNXRUNTIME_WEB):
        reg.add(registry.RUNTIME, rt.name, rt)

