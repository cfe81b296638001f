"""Bad data files and over-long prompts fail cleanly, before any model is loaded or anything is written.

Every bad data file given to distillation (``--data``), evaluation (``--data``) or calibration
(``--calibration``) ends in one ``edgekit: error:`` line that names the file (and the line, for a
broken JSONL record) and the fix, exit 2, no traceback, the file unchanged, and nothing in the
artifact store; the teacher is never even resolved. Prompts longer than a model's context are
refused the same way (``eval --max-seq-len``, ``bench --prompt-lengths``, ``data.max_seq_len``),
and the bundle loader for llama.cpp prints one line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.robust.clean import assert_clean_failure
from tests.robust.loaders import gguf_bundle, run_loader

LATIN1 = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1")

# name, contents (bytes, or None for a folder holding only a .csv), fragments the error line must hold
CASES = [
    ("empty.jsonl", b"\n   \n\n", ["empty.jsonl is empty", "put examples in it or remove it from"]),
    ("broken-line.jsonl", b'{"prompt": "What is the capital of France?"}\n\n{"prompt": "unclosed"\n',
     ["broken-line.jsonl:3: not valid JSON", "each line of a .jsonl file must be one JSON object"]),
    ("no-text-key.jsonl", b'{"question": "Why is the sky blue?", "answer": "Rayleigh scattering."}\n',
     ["no-text-key.jsonl:1: unknown record shape", "rename answer to response, question to prompt"]),
    ("not-an-object.jsonl", b'{"text": "fine"}\n["a", "list"]\n', ["not-an-object.jsonl:2: expected a JSON object"]),
    ("empty-text.jsonl", b'{"text": "   "}\n', ["empty-text.jsonl:1: 'text' must be a non-empty string"]),
    ("latin1.txt", b"first paragraph\n\n" + LATIN1 + b"\n", ["latin1.txt is not UTF-8 text (line 3", "iconv"]),
    ("latin1.jsonl", b'{"text": "' + LATIN1 + b'"}\n', ["latin1.jsonl is not UTF-8 text (line 1", "re-save it"]),
    ("binary.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256)) * 4,
     ["binary.jsonl is a binary file", "point"]),
    ("notes.csv", b"prompt,response\nhi,hello\n", ["notes.csv has an unsupported type .csv", "use .jsonl"]),
    ("no-usable-files", None, ["no-usable-files is a folder with no .jsonl, .txt, .md files", "point"]),
    ("missing.jsonl", "missing", ["missing.jsonl does not exist", "fix the path in"]),
]


@pytest.fixture
def no_teacher(monkeypatch):
    """Fail the test if any command gets as far as resolving a model: bad data must be refused first."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was resolved ({args[:1]}) before the bad data was refused")

    monkeypatch.setattr("edgekit.models.resolve_teacher", refuse)


def make(folder: Path, name: str, contents) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    if contents is None:
        path.mkdir()
        (path / "readme.csv").write_text("not data\n")
    elif isinstance(contents, bytes):
        path.write_bytes(contents)
    return path


def assert_store_empty(home: Path) -> None:
    root = home / "artifacts"
    assert not root.exists() or not any(root.iterdir()), sorted(p.name for p in root.iterdir())


COMMANDS = {
    "distill": lambda f, model: ["distill", "--teacher", model, "--data", f, "--steps", "1", "--cache", "none",
                                 "--context", "256", "-q"],
    "eval": lambda f, model: ["eval", model, "--against", model, "--data", f, "-q"],
    "calibrate": lambda f, model: ["export", model, "--format", "gguf", "--quant", "q4_k_m", "--calibrate",
                                   "--calibration", f, "-q"],
}
KEYS = {"distill": "data.sources (--data)", "eval": "--data", "calibrate": "--calibration"}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name, contents, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_refused_naming_the_file_before_any_model_is_loaded(capsys, home, tmp_path, tiny_llama_dir,
                                                                        no_teacher, command, name, contents,
                                                                        fragments):
    data = tmp_path / "data"
    path = make(data, name, contents)
    line = assert_clean_failure(capsys, COMMANDS[command](path, tiny_llama_dir), fragments, watch=[data], home=home)
    assert str(path) in line
    if any(f.endswith(("remove it from", "fix the path in", "point")) for f in fragments):
        assert KEYS[command] in line  # the option the file came from
    assert_store_empty(home)


# --------------------------------------------------------------------------- prompts longer than the context


def text_data(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text('{"text": "w5 w6 w7 w8 w9 w10 w11"}\n{"text": "w12 w13 w14 w15"}\n', encoding="utf-8")
    return path


def test_eval_max_seq_len_beyond_the_model_context_is_refused(capsys, home, tmp_path, tiny_llama_dir):
    assert_clean_failure(capsys, ["eval", tiny_llama_dir, "--against", tiny_llama_dir, "--data", text_data(tmp_path),
                                  "--max-seq-len", "1024", "-q"],
                         ["--max-seq-len 1024 is longer than", "512 positions", str(tiny_llama_dir / "config.json"),
                          "pass --max-seq-len 512 or less"], watch=[tmp_path / "heldout.jsonl"], home=home)
    assert_store_empty(home)


@pytest.mark.parametrize("flags, need", [(["--prompt-lengths", "128", "1024"], 1024),
                                         (["--prompt-lengths", "64", "--decode-tokens", "500"], 628)])
def test_bench_prompts_beyond_the_model_context_are_refused_before_measuring(capsys, home, tiny_llama_dir, flags,
                                                                            need, monkeypatch):
    monkeypatch.setattr("edgekit.devices.detect_host", lambda *a, **k: pytest.fail("the host was measured"))
    assert_clean_failure(capsys, ["bench", tiny_llama_dir, "--runtimes", "pytorch", *flags, "-q"],
                         [f"needs {need} positions", f"{tiny_llama_dir} was trained for 512",
                          "max_position_embeddings", "--prompt-lengths) at most 512", "--decode-tokens) at most 384"],
                         watch=[tiny_llama_dir], home=home)
    assert_store_empty(home)


def test_distill_max_seq_len_beyond_the_teacher_context_is_refused(capsys, home, tmp_path, tiny_llama_dir):
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(f"data: {{sources: [{text_data(tmp_path)}], max_seq_len: 4096}}\n", encoding="utf-8")
    assert_clean_failure(capsys, ["distill", cfg, "--teacher", tiny_llama_dir, "--context", "256", "--steps", "1",
                                  "-q"],
                         ["data.max_seq_len 4096 is longer than", "(512 positions)", "set data.max_seq_len to 512"],
                         watch=[cfg, tmp_path / "heldout.jsonl"], home=home)
    assert_store_empty(home)


@pytest.fixture(scope="module")
def bundle(tiny_bpe_llama_dir, tmp_path_factory) -> Path:
    return gguf_bundle(tiny_bpe_llama_dir, tmp_path_factory.mktemp("bundle"))


def test_llamacpp_loader_refuses_a_prompt_longer_than_the_context_in_one_line(bundle):
    r = run_loader(bundle / "run_llamacpp.py", "--context", "64", "--max-tokens", "4", "hello world " * 200)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("run_llamacpp.py: error: the prompt does not fit")
    assert "shorten it, or pass a larger --context (at most 512" in last
