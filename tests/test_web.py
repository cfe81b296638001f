"""The web bundle layout, in a real browser: the bundle's own page, served by its own serve.py on 127.0.0.1, loads
the GGUF into llama.cpp's WebAssembly build (wllama, the version the page pins, served from web/node_modules in place
of the CDN) in headless Chromium, and its greedy completion equals llama.cpp's (llama-cpp-python) for the same prompt.

Needs Node.js, `make web` (npm ci in web/) and Chromium (Debian's `chromium`; .ci/run installs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.chat import QUESTIONS
from edgekit.package import WLLAMA_VERSION, package, verify
from web import page

ROOT = Path(__file__).resolve().parents[1]


def test_the_page_pins_the_wllama_version_that_web_package_json_installs():
    pinned = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]["@wllama/wllama"]
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())["packages"]["node_modules/@wllama/wllama"]
    assert pinned == lock["version"] == WLLAMA_VERSION


@pytest.fixture(scope="module")
def browser() -> None:
    """Skips, saying what is missing, without node, web/node_modules or Chromium."""
    if page.missing():
        pytest.skip(f"the browser tests need {', '.join(page.missing())}")


def open_page(bundle: Path, browser, prompt: str, max_tokens: int) -> dict:
    result = page.open_page(bundle, prompt, max_tokens)
    assert result["done"] and "error" not in result
    return result


NEAR_TIE = 0.1  # logits: where llama.cpp's best two tokens are closer than this, another build may pick the other


def agrees_with_llama_cpp(gguf: Path, prompt: str, text: str, max_tokens: int) -> int:
    """How many of llama.cpp's greedy tokens for ``prompt`` the browser's ``text`` reproduces; fails if they part
    anywhere but at a near-tie.

    Two builds of llama.cpp (llama-cpp-python's native one and wllama's WebAssembly one) sum in different orders, so
    where llama.cpp's top two logits are within NEAR_TIE the other build may pick the second, and the texts part
    there. Anywhere else a different token is a bug (a wrong tokenizer, template, BOS, or model file).
    """
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=True))  # add_bos: BOS only if the GGUF asks
    out, margins = [], []
    for _ in range(max_tokens):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        top2 = np.sort(logits)[-2:]
        tok = int(logits.argmax())
        if tok == llm.token_eos():
            break
        out.append(tok)
        margins.append(float(top2[1] - top2[0]))
        llm.eval([tok])
    same = 0
    while same < len(out) and text.startswith(llm.detokenize(out[:same + 1]).decode("utf-8", errors="ignore")):
        same += 1
    if same < len(out):
        whole = llm.detokenize(out).decode("utf-8", errors="replace")
        assert margins[same] < NEAR_TIE, (f"the browser parts from llama.cpp at token {same} where llama.cpp is sure "
                                          f"(margin {margins[same]:.3f}): browser {text!r}, llama.cpp {whole!r}")
    return same


@pytest.fixture(scope="module")
def tiny_web(tiny_bpe_llama_dir, tiny_export, tmp_path_factory) -> dict:
    gguf = tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")
    return package(gguf, out_dir=tmp_path_factory.mktemp("web"), context=256, layout="web")


def test_web_bundle_holds_the_gguf_its_page_and_serve_py(tiny_web):
    folder = Path(tiny_web["path"])
    assert {p.name for p in folder.iterdir()} == {"model.gguf", "index.html", "serve.py", "README.md", "manifest.json"}
    assert verify(folder)["ok"] and verify(Path(tiny_web["tarball"]))["ok"]
    page = (folder / "index.html").read_text()
    assert f"@wllama/wllama@{WLLAMA_VERSION}/esm/index.js" in page and '"model.gguf"' in page
    assert "{{" not in page and "const CONTEXT = 256;" in page
    assert "python serve.py 8000" in (folder / "README.md").read_text()


def test_the_page_answers_as_llama_cpp_does_in_headless_chromium(tiny_web, browser):
    folder = Path(tiny_web["path"])
    prompt = "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    result = open_page(folder, browser, prompt, 12)
    assert agrees_with_llama_cpp(folder / "model.gguf", prompt, result["text"], 12) >= 1
    assert result["timings"]["predicted_n"] >= 1 and result["load_ms"] > 0
    assert result["cross_origin_isolated"] and result["threads"] >= 1 and result["simd"]


@pytest.mark.slow
def test_the_real_teacher_answers_in_chromium_as_in_llama_cpp(teacher, tiny_export, tmp_path, browser):
    """Two of the five fixed questions, rendered with the teacher's chat template, 24 greedy tokens each: the same tokens
    as llama.cpp's up to a near-tie, and at least 8 of them."""
    from transformers import AutoTokenizer

    gguf = tiny_export(teacher.path, "gguf", "q8_0")
    bundle = Path(package(gguf, out_dir=tmp_path, layout="web", context=512)["path"])
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    for question in QUESTIONS[:2]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        result = open_page(bundle, browser, prompt, 24)
        same = agrees_with_llama_cpp(bundle / "model.gguf", prompt, result["text"], 24)
        print(f"{question!r}: browser {result['text']!r}: llama.cpp's first {same} tokens (of 24)")
        assert same >= 8, question
