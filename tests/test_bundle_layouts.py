"""Bundle layouts. hf: a Hugging Face model repository that loads offline with from_pretrained in the pinned
transformers *and* in transformers 5 (the `.venv-tf5` environment `make test` builds), with Hub front matter,
and the export in its own subfolder that its runtime loads. The real teacher's converted folder loads in
transformers 5 too, with the same token ids and the same greedy answer. ort-package: an ONNX Runtime model package
that onnxruntime opens (its ModelPackage API) and whose variant folders onnxruntime-genai loads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from edgekit.package import package, verify
from edgekit.package.layouts import _front_matter

ROOT = Path(__file__).resolve().parents[1]
TF5 = ROOT / ".venv-tf5" / "bin" / "python"
TEXTS = ["Hello world, how are you today?", "  spaces   and\ttabs\n\nend", "def add(a, b):\n    return a + b\n"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# What a user of transformers 5 does with the folder: tokenizer, chat template, model, greedy answer.
LOAD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, texts, question, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
ids = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask")}
out = model.generate(**ids, max_new_tokens=n, do_sample=False)
print(json.dumps({"version": transformers.__version__, "ids": [tok(t, add_special_tokens=False).input_ids for t in texts],
                  "answer": out[0, ids["input_ids"].shape[1]:].tolist()}))
"""


def _here(folder: Path, n: int) -> dict:
    """The same, in this process's pinned transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask")}
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return {"ids": [tok(t, add_special_tokens=False).input_ids for t in TEXTS],
            "answer": out[0, ids["input_ids"].shape[1]:].tolist()}


def _in_tf5(folder: Path, n: int) -> dict:
    if not TF5.is_file():
        pytest.skip("no .venv-tf5 (transformers 5 over .venv): `make tf5` builds it, and `make test` does first")
    proc = subprocess.run([str(TF5), "-c", LOAD, str(folder), json.dumps(TEXTS), json.dumps(QUESTION), str(n)],
                          capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("version").startswith("5.")
    return out


@pytest.fixture(scope="module")
def hf_bundle(tiny_bpe_llama_dir, tiny_export, tmp_path_factory) -> dict:
    gguf = tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")
    return package(gguf, out_dir=tmp_path_factory.mktemp("hf"), context=256, layout="hf", recipe="quick")


def test_hf_bundle_is_a_model_repo_with_the_export_in_its_subfolder(hf_bundle):
    folder = Path(hf_bundle["path"])
    top = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "manifest.json", "gguf"} <= top
    assert {p.name for p in (folder / "gguf").iterdir()} >= {"model.gguf", "run_llamacpp.py", "tokenizer.json"}
    assert not (folder / "model.gguf").exists() and folder.name.endswith("-hf")
    assert verify(folder)["ok"] and verify(Path(hf_bundle["tarball"]))["ok"]
    m = hf_bundle["manifest"]
    assert m["layout"] == "hf" and "gguf/model.gguf" in m["files"] and "model.safetensors" in m["files"]
    assert m["size_bytes"] == (folder / "gguf" / "model.gguf").stat().st_size
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "text-generation" and front["library_name"] == "transformers"
    assert {"edgekit", "gguf", "q8_0"} <= set(front["tags"]) and front["edgekit_recipe"] == "quick"
    assert "base_model" not in front  # a local folder is no Hub id
    assert "python gguf/run_llamacpp.py" in card and "hf upload" in card


def test_front_matter_names_the_hub_teacher_and_its_license():
    m = {"format": "onnx", "quant": "int4", "edgekit_version": "0.1.0", "recipe": None,
         "teacher": {"origin": "google/gemma-3-270m, as the Q4_K_M GGUF of a PyPI package", "license": "gemma",
                     "distilled": True}}
    front = yaml.safe_load("".join(line + "\n" for line in _front_matter(m)).split("---\n")[1])
    assert front["base_model"] == "google/gemma-3-270m" and front["base_model_relation"] == "finetune"
    assert front["license"] == "gemma" and "distillation" in front["tags"]
    m["teacher"] = {"origin": "/home/me/model", "license": "my-terms", "distilled": False}
    front = yaml.safe_load("".join(line + "\n" for line in _front_matter(m)).split("---\n")[1])
    assert front["license"] == "other" and front["license_name"] == "my-terms" and "base_model" not in front


def test_hf_bundle_loads_in_pinned_transformers_and_transformers_5_alike(hf_bundle, tiny_bpe_llama_dir):
    folder = Path(hf_bundle["path"])
    here = _here(folder, 8)
    assert here == _here(tiny_bpe_llama_dir, 8)  # the bundle is the model it was exported from
    assert _in_tf5(folder, 8) == here


def test_the_gguf_in_the_hf_bundle_runs_in_llama_cpp(hf_bundle):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(Path(hf_bundle["path"]) / "gguf" / "model.gguf"), n_ctx=64, verbose=False)
    out = llm.create_completion("Hello", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def hf_repo(tiny_bpe_llama_dir, tiny_export, tmp_path_factory) -> dict:
    """One repository of three exports of the same model: two GGUFs and an ONNX."""
    exports = [tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0"), tiny_export(tiny_bpe_llama_dir, "onnx", "fp32"),
               tiny_export(tiny_bpe_llama_dir, "gguf", "q4_0")]
    return package(exports[0], also=exports[1:], out_dir=tmp_path_factory.mktemp("hfrepo"), context=256,
                   layout="hf")


def test_an_hf_repo_holds_several_exports_each_in_its_own_folder_that_its_runtime_loads(hf_repo):
    import llama_cpp
    import onnxruntime as ort

    folder = Path(hf_repo["path"])
    m = hf_repo["manifest"]
    assert [(e["folder"], e["quant"]) for e in m["exports"]] == [("gguf", "q8_0"), ("onnx", "fp32"),
                                                                  ("gguf-q4_0", "q4_0")]
    assert "-plus-2-" in folder.name and folder.name.endswith("-hf")
    for e in m["exports"]:
        files = {p.name for p in (folder / e["folder"]).iterdir()}
        assert {e["model_file"], e["loader"], "tokenizer.json"} <= files, e["folder"]
        assert e["size_bytes"] == sum((folder / e["folder"] / n).stat().st_size for n in files if n.startswith("model"))
    assert (folder / "gguf" / "model.gguf").read_bytes() != (folder / "gguf-q4_0" / "model.gguf").read_bytes()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert verify(folder)["ok"] and verify(Path(hf_repo["tarball"]))["ok"]
    card = (folder / "README.md").read_text()
    for e in m["exports"]:
        assert f"`{e['folder']}/`" in card and f"python {e['folder']}/{e['loader']}" in card
    llm = llama_cpp.Llama(model_path=str(folder / "gguf-q4_0" / "model.gguf"), n_ctx=64, verbose=False)
    assert llm.create_completion("Hello", max_tokens=2, temperature=0)["usage"]["completion_tokens"] >= 1
    sess = ort.InferenceSession(str(folder / "onnx" / m["exports"][1]["model_file"]))
    assert any(i.name == "input_ids" for i in sess.get_inputs())


def test_several_exports_are_refused_by_one_export_layouts_and_across_models(tiny_bpe_llama_dir, family_dir,
                                                                             tiny_export, tmp_path):
    from edgekit.errors import ConfigError

    gguf = tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")
    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "fp32")
    with pytest.raises(ConfigError, match="the app bundle layout holds one export, and 2 were given.*hf"):
        package(gguf, also=[onnx], out_dir=tmp_path, layout="app")
    other = tiny_export(family_dir("qwen2"), "onnx", "int4")  # another model (the web tests build it too)
    with pytest.raises(ConfigError, match="one hf bundle holds the exports of one model"):
        package(gguf, also=[other], out_dir=tmp_path, layout="hf")
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_the_real_teachers_folder_loads_in_transformers_5_with_the_same_tokens_and_answer(teacher):
    here = _here(teacher.path, 12)
    assert _in_tf5(teacher.path, 12) == here


# --------------------------------------------------------------------------- ort-package (ONNX Runtime model package)


@pytest.fixture(scope="module")
def ort_bundle(tiny_bpe_llama_dir, tiny_export, tmp_path_factory) -> dict:
    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "fp32")
    return package(onnx, out_dir=tmp_path_factory.mktemp("ortpkg"), context=256, layout="ort-package",
                   providers=["cuda"])


def test_ort_package_opens_in_onnxruntime_and_each_variant_in_onnxruntime_genai(ort_bundle, tiny_bpe_llama_dir):
    import numpy as np
    import onnxruntime as ort
    import onnxruntime_genai as og

    folder = Path(ort_bundle["path"])
    assert verify(folder)["ok"] and verify(Path(ort_bundle["tarball"]))["ok"]
    root = folder / "model.ortpackage"
    ctx = ort.ModelPackageContext(str(root))
    assert ctx.get_component_names() == ["decoder"] and set(ctx.get_variant_names("decoder")) == {"cpu", "cuda"}
    assert ctx.get_variant_ep_name("decoder", "cuda") == "CUDAExecutionProvider"
    chosen = ctx.select_component("decoder", ort.ModelPackageOptions(ort.SessionOptions()))
    assert chosen.get_selected_variant_name() == "cpu"  # no CUDA here: onnxruntime picks the CPU variant
    session = chosen.create_session()
    assert session.get_inputs()[0].name == "input_ids"
    for variant in ("cpu", "cuda"):
        cfg = json.loads((root / "decoder" / variant / "genai_config.json").read_text())
        assert cfg["model"]["decoder"]["session_options"]["provider_options"] == ([] if variant == "cpu"
                                                                                  else [{"cuda": {}}])
    # the CPU variant generates in onnxruntime-genai what the app bundle's loader would
    model = og.Model(str(root / "decoder" / "cpu"))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(tok.encode("Hello world"), dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) > len(tok.encode("Hello world"))
    assert ort_bundle["manifest"]["providers"] == ["cpu", "cuda"]


def test_ort_package_refuses_an_unknown_provider_and_a_gguf(tiny_bpe_llama_dir, tiny_export, tmp_path):
    from edgekit.errors import ConfigError

    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "fp32")
    with pytest.raises(ConfigError, match="unknown execution provider 'qnn'.*need a model compiled for them"):
        package(onnx, out_dir=tmp_path, layout="ort-package", providers=["qnn"])
    with pytest.raises(ConfigError, match="ort-package bundle layout takes onnx exports"):
        package(tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0"), out_dir=tmp_path, layout="ort-package")


def test_ort_package_declares_cuda_for_a_device_with_an_nvidia_gpu():
    from edgekit.package import _providers

    assert _providers(None, "jetson-orin-nano-8gb") == ["cpu", "cuda"]
    assert _providers(None, "pi-5-8gb") == ["cpu"] and _providers(None, None) == ["cpu"]
    assert _providers(["webgpu", "cpu"], "pi-5-8gb") == ["cpu", "webgpu"]
