"""Chat templates are rendered in Jinja's sandbox: a template that reaches for Python internals is refused, never run.

A model folder whose ``chat_template.jinja`` (or ``tokenizer_config.json``'s ``chat_template``) tries
to escape (``cycler.__init__.__globals__.os.popen``, ``''.__class__.__mro__``, mutating the
messages ...) is refused by every edgekit command that renders it with one ``edgekit: error:`` line
naming the template file and the sandbox, exit 2, before any model runs and with nothing written;
the marker file the template tries to create never appears. The bundle loaders render in a sandbox
too and say so in one line.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.robust.clean import assert_clean_failure
from tests.robust.loaders import gguf_bundle, run_loader

# Each tries to create MARKER (a path filled in per test); the sandbox must stop it before it runs.
HOSTILE = {
    "cycler-globals-popen": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "lipsum-globals-popen": "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "str-subclasses": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                      "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "template-context": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch MARKER') }}",
    "mutate-messages": "{% set _ = messages.append({'role': 'system', 'content': 'MARKER'}) %}{{ messages }}",
}


def hostile_model(src: Path, dst: Path, template: str, where: str) -> Path:
    """A copy of ``src`` whose chat template is ``template``, in chat_template.jinja or tokenizer_config.json."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    if where == "chat_template.jinja":
        (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return dst


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER-created-by-the-template"
    yield path
    assert not path.exists(), "the template ran code"


def chat_data(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "What is the capital of France?"}\n'
                    '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n',
                    encoding="utf-8")
    return path


def test_transformers_renders_chat_templates_in_the_immutable_sandbox():
    """The guarantee everything below rests on (a transformers upgrade must not silently drop it)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    assert isinstance(_compile_jinja_template("{{ messages }}").environment, ImmutableSandboxedEnvironment)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_eval_refuses_a_hostile_template_naming_its_file(capsys, home, tmp_path, tiny_bpe_llama_dir, marker, name,
                                                         where):
    model = hostile_model(tiny_bpe_llama_dir, tmp_path / "model", HOSTILE[name].replace("MARKER", str(marker)), where)
    assert_clean_failure(capsys, ["eval", model, "--against", model, "--data", chat_data(tmp_path), "-q"],
                         [f"the chat template in {model / where}", "sandbox", "nothing ran", "replace that template"],
                         watch=[model], home=home)


def test_distill_refuses_a_hostile_template_before_the_teacher_runs(capsys, home, tmp_path, tiny_bpe_llama_dir,
                                                                     marker, monkeypatch):
    model = hostile_model(tiny_bpe_llama_dir, tmp_path / "model",
                          HOSTILE["cycler-globals-popen"].replace("MARKER", str(marker)), "chat_template.jinja")
    monkeypatch.setattr("edgekit.distill.data._load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    assert_clean_failure(capsys, ["distill", "--teacher", model, "--data", chat_data(tmp_path), "--steps", "1",
                                  "--cache", "none", "--context", "256", "-q"],
                         [str(model / "chat_template.jinja"), "sandbox"], watch=[model], home=home)
    root = home / "artifacts"
    assert not root.exists() or not any(root.iterdir())  # not even an in-progress folder


def test_a_template_that_only_fails_to_render_is_a_model_error_naming_it(tmp_path, tiny_bpe_llama_dir):
    from transformers import AutoTokenizer

    from edgekit.chat import apply_chat_template
    from edgekit.errors import ModelError

    model = hostile_model(tiny_bpe_llama_dir, tmp_path / "model",
                          "{{ raise_exception('roles must alternate user/assistant') }}", "chat_template.jinja")
    tok = AutoTokenizer.from_pretrained(model)
    with pytest.raises(ModelError, match=r"chat_template.jinja failed to render \(TemplateError: roles must") as e:
        apply_chat_template(tok, [{"role": "user", "content": "hi"}], tokenize=False)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the bundle loaders


def load_loader(name: str, here: Path):
    """Import a loader script as a module, with its bundle folder (HERE) pointed at ``here``."""
    from edgekit.runtimes import LOADERS as LOADERS_DIR

    spec = importlib.util.spec_from_file_location(f"loader_{name}", LOADERS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HERE = here
    return module


@pytest.mark.parametrize("name", list(HOSTILE))
def test_executorch_loader_renders_in_the_sandbox(tmp_path, marker, name):
    from jinja2.exceptions import SecurityError

    (tmp_path / "chat_template.jinja").write_text(HOSTILE[name].replace("MARKER", str(marker)), encoding="utf-8")
    loader = load_loader("run_executorch", tmp_path)
    with pytest.raises(SecurityError):
        loader._prompt("hello")


def test_executorch_loader_renders_an_ordinary_template(tmp_path, tiny_bpe_llama_dir):
    shutil.copy(tiny_bpe_llama_dir / "chat_template.jinja", tmp_path / "chat_template.jinja")
    text = load_loader("run_executorch", tmp_path)._prompt("hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("where", ["chat_template.jinja", "model.gguf"])
def test_llamacpp_loader_refuses_a_hostile_template_in_one_line(tmp_path, tiny_bpe_llama_dir, marker, where):
    template = HOSTILE["cycler-globals-popen"].replace("MARKER", str(marker))
    if where == "chat_template.jinja":  # the bundle's own file wins over the GGUF's
        bundle = gguf_bundle(tiny_bpe_llama_dir, tmp_path / "bundle")
        (bundle / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:  # the template travelled inside the GGUF (tokenizer.chat_template)
        model = hostile_model(tiny_bpe_llama_dir, tmp_path / "model", template, "chat_template.jinja")
        bundle = gguf_bundle(model, tmp_path / "bundle")
        (bundle / "chat_template.jinja").unlink()
    r = run_loader(bundle / "run_llamacpp.py", "--context", "128", "--max-tokens", "2", "hello")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    source = "chat_template.jinja" if where == "chat_template.jinja" else "the chat template in model.gguf"
    assert last.startswith(f"run_llamacpp.py: error: {source} tried something the Jinja sandbox forbids"), last
