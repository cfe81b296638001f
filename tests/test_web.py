"""The web bundle layout, in a real browser: the bundle's own page, served by its own serve.py on 127.0.0.1, loads
the GGUF into llama.cpp's WebAssembly build (wllama, the version the page pins, served from web/node_modules in place
of the CDN) in headless Chromium, and its greedy completion equals llama.cpp's (llama-cpp-python) for the same prompt;
an ONNX bundle's page loads the model with transformers.js on onnxruntime-web and its greedy tokens equal onnxruntime's.

Needs Node.js, `make web` (npm ci in web/) and Chromium (Debian's `chromium`; .ci/run installs it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgekit.chat import QUESTIONS
from edgekit.package import package, verify
from edgekit.package.web import WLLAMA_VERSION
from edgekit.runtimes import onnxruntime_web
from edgekit.runtimes.onnxruntime import OrtSession
from tests.families import FAMILIES
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
    """Two of the five fixed questions, rendered with the teacher's chat template, 24 greedy tokens each: the same
    tokens as llama.cpp's up to a near-tie, and at least 8 of them."""
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


# --------------------------------------------------------------------------- ONNX: transformers.js on onnxruntime-web


def test_the_onnx_page_pins_the_transformers_js_version_that_web_package_json_installs():
    pinned = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]["@huggingface/transformers"]
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())["packages"]
    locked = lock["node_modules/@huggingface/transformers"]["version"]
    assert pinned == locked == onnxruntime_web.TRANSFORMERS_JS_VERSION


@pytest.mark.parametrize("family", FAMILIES)
def test_the_browser_graph_computes_the_exported_graphs_logits(family, family_dir, exporter_output, tmp_path):
    """The copy written for onnxruntime-web (embedding gathered in standard ops, IR <= 13) gives the exporter's
    logits in onnxruntime: a tied 8-bit and an untied 4-bit embedding, Gemma's scaled one, every family."""
    import numpy as np
    import onnx

    folder, _ = exporter_output(family_dir(family), "onnx", "int4")
    web = onnxruntime_web.write_model(folder / "model.onnx", tmp_path)
    assert web["file"] == "model_q4.onnx" and web["dtype"] == "q4" and web["rewritten"] == ["GatherBlockQuantized"]
    graph = onnx.load(str(tmp_path / web["file"]))
    assert graph.ir_version <= onnxruntime_web.MAX_IR
    assert not {n.op_type for n in graph.graph.node if n.domain == "com.microsoft"} & set(onnxruntime_web.MISSING_OPS)
    ids = list(range(3, 40, 3))
    ref = OrtSession(folder, threads=1).logits(ids)
    shutil.copyfile(folder / "genai_config.json", tmp_path / "genai_config.json")
    config = json.loads((tmp_path / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = web["file"]
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    got = OrtSession(tmp_path, threads=1).logits(ids)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_dtype_follows_the_graph():
    from onnx import TensorProto, helper

    def graph(node=None, elem=TensorProto.FLOAT):
        return helper.make_model(helper.make_graph([node] if node else [], "g",
                                                   [helper.make_tensor_value_info("x", elem, [1])], []))

    nbits = lambda bits: helper.make_node("MatMulNBits", ["x"], ["y"], bits=bits, domain="com.microsoft")  # noqa: E731
    assert onnxruntime_web.dtype_of(graph(nbits(4))) == "q4"
    assert onnxruntime_web.dtype_of(graph(nbits(8))) == "q8"
    assert onnxruntime_web.dtype_of(graph(helper.make_node("MatMulInteger", ["x", "x"], ["y"]))) == "q8"
    assert onnxruntime_web.dtype_of(graph(elem=TensorProto.FLOAT16)) == "fp16"
    assert onnxruntime_web.dtype_of(graph()) == "fp32"


@pytest.fixture(scope="module")
def tiny_onnx_web(tiny_bpe_llama_dir, tiny_export, tmp_path_factory) -> dict:
    onnx_export = tiny_export(tiny_bpe_llama_dir, "onnx", "int4")
    return package(onnx_export, out_dir=tmp_path_factory.mktemp("web-onnx"), context=256, layout="web")


def test_onnx_web_bundle_is_a_transformers_js_model_with_its_page(tiny_onnx_web):
    folder = Path(tiny_onnx_web["path"])
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == {"index.html", "serve.py", "README.md", "manifest.json", "config.json", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "onnx/model_q4.onnx"}
    assert verify(folder)["ok"] and verify(Path(tiny_onnx_web["tarball"]))["ok"]
    manifest = tiny_onnx_web["manifest"]
    assert manifest["web"]["dtype"] == "q4" and manifest["size_bytes"] == (folder / "onnx/model_q4.onnx").stat().st_size
    page = (folder / "index.html").read_text()
    assert f"@huggingface/transformers@{onnxruntime_web.TRANSFORMERS_JS_VERSION}/dist/transformers.min.js" in page
    assert 'const DTYPE = "q4";' in page and "{{" not in page
    card = (folder / "README.md").read_text()
    assert "python serve.py 8000" in card and "@huggingface/transformers" in card
    assert "--quant int8-dynamic" in " ".join(manifest["web"]["notes"]) and "--quant int8-dynamic" in card


def test_an_int8_dynamic_onnx_page_is_transformers_js_q8_and_answers_as_onnxruntime(tiny_bpe_llama_dir, tiny_export,
                                                                                    tmp_path, browser):
    export = tiny_export(tiny_bpe_llama_dir, "onnx", "int8-dynamic")
    bundle = package(export, out_dir=tmp_path, context=256, layout="web")
    folder = Path(bundle["path"])
    assert (folder / "onnx" / "model_quantized.onnx").is_file() and not (folder / "onnx" / "model.onnx").exists()
    assert bundle["manifest"]["web"]["dtype"] == "q8" and bundle["manifest"]["web"]["notes"] == []
    prompt = "<|im_start|>user\nTell me about 7 apples<|im_end|>\n<|im_start|>assistant\n"
    result = open_page(folder, browser, prompt, 8)
    session = OrtSession(export, threads=2)
    ids = session.tokenize(prompt)
    assert result["prompt_ids"] == ids and result["ids"] == session.generate(ids, 8, eos_ids=[])


def test_the_onnx_page_answers_as_onnxruntime_does_in_headless_chromium(tiny_onnx_web, tiny_bpe_llama_dir,
                                                                        tiny_export, browser):
    folder = Path(tiny_onnx_web["path"])
    prompt = "<|im_start|>user\nHello world, 42 apples<|im_end|>\n<|im_start|>assistant\n"
    result = open_page(folder, browser, prompt, 12)
    session = OrtSession(tiny_export(tiny_bpe_llama_dir, "onnx", "int4"), threads=2)
    ids = session.tokenize(prompt)
    assert result["prompt_ids"] == ids
    assert result["ids"] == session.generate(ids, 12, eos_ids=[])
    assert result["load_ms"] > 0 and result["cross_origin_isolated"] and result["simd"] and result["threads"] >= 1


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])  # llama: the tests above
def test_every_familys_onnx_page_answers_as_onnxruntime_does(family, family_dir, tiny_export, tmp_path, browser):
    """transformers.js knows each family's config (model_type, head_dim, Gemma 3's sliding layers) and feeds the
    fused graph as onnxruntime does: the same prompt ids and 8 greedy tokens."""
    export = tiny_export(family_dir(family), "onnx", "int4")
    folder = Path(package(export, out_dir=tmp_path, context=256, layout="web")["path"])
    prompt = "Hello world, 42 apples and more text here"
    result = open_page(folder, browser, prompt, 8)
    session = OrtSession(export, threads=1)
    ids = session.tokenize(prompt)
    assert result["prompt_ids"] == ids
    assert result["ids"] == session.generate(ids, 8, eos_ids=[])


def fp32_activations(export: Path, out: Path) -> Path:
    """A copy of an ONNX export whose MatMulNBits compute with fp32 activations (accuracy_level 0), as
    onnxruntime-web's WebAssembly kernels do whatever the graph asks: native onnxruntime's int8-activation path
    (accuracy_level 4) is a different computation, whose greedy tokens part from the browser's where the top two
    logits are a few tenths apart."""
    import onnx

    shutil.copytree(export, out)
    model = onnx.load(str(out / "model.onnx"))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.mark.slow
def test_the_real_teachers_int4_onnx_answers_in_chromium_as_in_onnxruntime(teacher, tiny_export, tmp_path, browser):
    """Two of the five fixed questions with the teacher's chat template, 24 greedy tokens: the same tokens as
    onnxruntime's (Python, fp32 activations as in the browser) up to a near-tie, and at least 8 of them."""
    import numpy as np
    from transformers import AutoTokenizer

    export = tiny_export(teacher.path, "onnx", "int4")
    bundle = Path(package(export, out_dir=tmp_path / "bundle", layout="web", context=512)["path"])
    session = OrtSession(fp32_activations(export, tmp_path / "fp32-activations"), threads=2)
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    for question in QUESTIONS[:2]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        result = open_page(bundle, browser, prompt, 24)
        ids = session.tokenize(prompt)
        assert result["prompt_ids"] == ids
        same = 0
        for got in result["ids"]:
            logits = session.logits(ids)[-1]
            want = int(logits.argmax())
            if got != want:
                top2 = np.sort(logits)[-2:]
                assert top2[1] - top2[0] < NEAR_TIE, (f"the browser parts from onnxruntime at token {same} where it is "
                                                      f"sure (margin {top2[1] - top2[0]:.3f}): {result['ids']}")
                break
            ids, same = [*ids, want], same + 1
        print(f"{question!r}: browser {result['text']!r}: onnxruntime's first {same} tokens (of {len(result['ids'])})")
        assert same >= min(8, len(result["ids"])), question


@pytest.mark.parametrize("bits,zero_points", [(4, True), (4, False), (8, True), (8, False)])
def test_the_standard_op_gather_equals_onnxruntimes_gatherblockquantized(bits, zero_points):
    """Against onnxruntime's own kernel, on random packed rows: 4-bit (two per byte, low nibble first, packed zero
    points) and 8-bit, with and without zero points (the kernel's default then)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    vocab, hidden, block = 10, 96, 32
    blocks = hidden // block
    per_byte = 8 // bits
    inits = [numpy_helper.from_array(rng.integers(0, 256, (vocab, hidden // per_byte), dtype=np.uint8), "data"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, (vocab, blocks)).astype(np.float32), "scales")]
    if zero_points:
        zeros = rng.integers(0, 256, (vocab, -(-blocks // per_byte)), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zeros, "zeros"))
    inputs = ["data", "input_ids", "scales", *(["zeros"] if zero_points else [])]
    node = helper.make_node("GatherBlockQuantized", inputs, ["y"], "/model/embed_tokens/GatherBlockQuantized",
                            domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    ids = np.array([[3, 0, 9, 3], [1, 2, 5, 8]], dtype=np.int64)
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"input_ids": ids})[0]  # noqa: E731
    want = run(model)
    onnxruntime_web.for_web(model)
    assert "GatherBlockQuantized" not in {n.op_type for n in model.graph.node}
    assert np.array_equal(run(model), want)


# --------------------------------------------------------------------------- the browser runtimes in edgekit bench


def test_the_browser_runtimes_are_opt_in():
    from edgekit.devices import device_runtimes
    from edgekit.quantize.schemes import runtimes as format_runtimes
    from edgekit.runtimes import for_bundle, for_format, runtimes

    assert {"wllama", "onnxruntime-web"} <= set(runtimes()) and not {"wllama", "onnxruntime-web"} & set(
        runtimes(opt_in=False))
    assert "wllama" not in [r.name for r in for_bundle("gguf")] and for_format("gguf").name != "wllama"
    assert "onnxruntime-web" not in format_runtimes("onnx") and "wllama" not in device_runtimes()


def test_edgekit_bench_measures_the_browser_runtimes_through_the_page(tiny_bpe_llama_dir, tiny_export, browser,
                                                                      tmp_path):
    """`edgekit bench --runtimes wllama,onnxruntime-web`: a row per export on its browser runtime, with load, first
    token, prefill and decode from the page, the browser's RSS, and the WebAssembly features it ran with; the
    results validate and the report shows them."""
    from edgekit.bench.measure import run_benchmark, validate_results
    from edgekit.bench.report import to_html, to_markdown

    gguf = tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")
    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "int8-dynamic")
    results = run_benchmark([gguf, onnx], ["wllama", "onnxruntime-web"], repeats=1, warmup=0, threads=2,
                            prompt_lengths=(16,), decode_tokens=8, progress=False)
    validate_results(results)
    rows = {r["runtime"]: r for r in results["runs"]}
    assert set(rows) == {"wllama", "onnxruntime-web"} and all(r["status"] == "ok" for r in rows.values()), rows
    for r in rows.values():
        m = r["metrics"]
        assert m["decode_tok_s"]["median"] > 0 and m["prefill_tok_s"]["16"]["median"] > 0 and m["load_s"]["median"] > 0
        assert m["peak_rss_bytes"] > 50e6  # Chromium's processes, not the worker's
        assert "SIMD on" in r["environment"] and "cross-origin isolated: yes" in r["environment"]
    assert rows["wllama"]["artifact"] == str(gguf) and rows["onnxruntime-web"]["artifact"] == str(onnx)
    md = to_markdown(results, [])
    assert "WebAssembly thread" in md and "wllama" in md
    assert "WebAssembly thread" in to_html(results, [])
