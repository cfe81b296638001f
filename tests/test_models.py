import json
import shutil

import numpy as np
import pytest

from edgekit import artifact
from edgekit.errors import ModelError
from edgekit.models import check_safetensors, embedded_gguf_path, resolve_teacher
from tests.conftest import SMOLLM2

# --------------------------------------------------------------------------- local folders (fast)


def test_local_hf_folder_resolves_with_its_architecture(tiny_llama_dir):
    t = resolve_teacher(str(tiny_llama_dir))
    assert t.source == "hf-folder" and t.path == tiny_llama_dir.resolve()
    assert (t.arch.layers, t.arch.hidden_size, t.arch.heads, t.arch.kv_heads) == (2, 64, 4, 2)
    assert t.describe()["architecture"]["params"] == t.arch.params


def test_pickle_only_folder_is_refused(tiny_copy):
    for p in tiny_copy.glob("*.safetensors"):
        p.rename(p.with_name("pytorch_model.bin"))
    with pytest.raises(ModelError, match="pytorch_model.bin: pickle files"):
        resolve_teacher(str(tiny_copy))


def test_remote_code_is_refused_unless_trusted(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        resolve_teacher(str(tiny_copy))
    assert resolve_teacher(str(tiny_copy), trust_remote_code=True).trust_remote_code


def test_truncated_safetensors_is_named(tiny_copy):
    w = next(tiny_copy.glob("*.safetensors"))
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=f"{w.name} is not a readable safetensors file"):
        resolve_teacher(str(tiny_copy))
    with pytest.raises(ModelError):
        check_safetensors(w)


def test_broken_config_is_named(tiny_copy):
    (tiny_copy / "config.json").write_text("{nope")
    with pytest.raises(ModelError, match="config.json is not valid JSON"):
        resolve_teacher(str(tiny_copy))


def test_missing_teacher_and_bad_spec(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_teacher(str(tmp_path / "nowhere"))
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_teacher(str(f))


def test_hub_id_offline_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        resolve_teacher("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_hub_id_without_network_fails_at_once_not_after_retries(tmp_path, monkeypatch):
    """Offline without HF_HUB_OFFLINE, huggingface_hub retries a failed connection five times with back-off (~23 s)
    before it gives up; edgekit probes the hub's host once and reads the local cache only."""
    import errno
    import socket
    import time

    from edgekit import models

    def no_network(*a, **k):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "create_connection", no_network)
    models._hub_unreachable.cache_clear()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelError, match=r"hub is unreachable \(huggingface.co:443: Network is unreachable\)"):
            models.teacher_architecture("acme/not-cached")
        with pytest.raises(ModelError, match="unreachable"):
            resolve_teacher("acme/not-cached")
    finally:
        models._hub_unreachable.cache_clear()
    assert time.perf_counter() - t0 < 5


def test_hub_id_resolves_from_a_populated_cache_offline(tiny_llama_dir, tmp_path, monkeypatch):
    # Lay the tiny model out the way huggingface_hub stores a download, then resolve it by id.
    cache = tmp_path / "hf"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    t = resolve_teacher("acme/tiny-llama")
    assert t.source == "hub" and t.arch.hidden_size == 64


# --------------------------------------------------------------------------- the embedded teacher (slow)


@pytest.mark.slow
def test_embedded_teacher_converts_once_and_is_verified(teacher, teacher_home):
    assert teacher.source == "embedded" and teacher.name == "SmolLM2-135M-Instruct"
    assert teacher.arch == SMOLLM2
    assert teacher.license == "apache-2.0"
    assert teacher.path.parent.parent == teacher_home
    assert (teacher.path / "chat_template.jinja").is_file() and (teacher.path / "tokenizer.json").is_file()
    manifest = artifact.read_manifest(teacher.path)
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert "tokenizer.model" not in manifest["files"]  # transformers' copy of the 98 MB GGUF is not kept
    assert artifact.verify_manifest(teacher.path) == []
    # transformers 5 refuses a null add_prefix_space ("'None' is not an instance of 'bool'"); 4.57 saves one
    tok_cfg = json.loads((teacher.path / "tokenizer_config.json").read_text())
    assert tok_cfg.get("add_prefix_space", False) is not None
    import os

    os.environ["EDGEKIT_HOME"] = str(teacher_home)
    try:
        again = resolve_teacher("default")
    finally:
        os.environ.pop("EDGEKIT_HOME")
    assert not again.converted and again.path == teacher.path


@pytest.mark.slow
def test_local_gguf_of_the_same_file_reuses_the_cache(teacher, teacher_home, monkeypatch):
    monkeypatch.setenv("EDGEKIT_HOME", str(teacher_home))
    t = resolve_teacher(str(embedded_gguf_path()))
    assert t.source == "gguf" and not t.converted and t.path == teacher.path


@pytest.mark.slow
def test_corrupt_cache_is_detected_and_rebuilt(teacher, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(teacher.path.parent.parent, home)
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    cached = home / teacher.path.relative_to(teacher.path.parent.parent)
    weights = cached / "model.safetensors"
    with open(weights, "r+b") as f:  # flip one byte in the middle of the tensor data
        f.seek(weights.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert artifact.verify_manifest(cached) == ["model.safetensors: sha256 mismatch"]
    (cached / "tokenizer.json").unlink()  # and a file gone: both found, one rebuild (a conversion costs ~30 s)
    assert sorted(artifact.verify_manifest(cached)) == ["model.safetensors: sha256 mismatch", "tokenizer.json: missing"]
    rebuilt = resolve_teacher("default")
    assert rebuilt.converted and artifact.verify_manifest(cached) == [] and (cached / "tokenizer.json").is_file()
    assert not resolve_teacher("default").converted  # intact now: reused


@pytest.mark.slow
def test_truncated_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelError, match="broken.gguf"):
        resolve_teacher(str(bad))
    assert not any((tmp_path / "home" / "teachers").glob("gguf-*"))  # nothing half-written left behind


@pytest.mark.slow
def test_converted_teacher_matches_llama_cpp_on_the_same_gguf(teacher):
    """Top-1 next-token agreement at every position between PyTorch (dequantized) and llama.cpp (Q4_1)."""
    import torch

    from edgekit.models import load_model, load_tokenizer
    from edgekit.runtimes.llamacpp import open_llama

    tok = load_tokenizer(teacher)
    messages = [{"role": "user", "content": "Name three primary colors and explain why the sky is blue."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    model = load_model(teacher)
    with torch.no_grad():
        torch_logits = model(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(embedded_gguf_path(), n_ctx=256, n_threads=2, logits_all=True)
    llm.eval(ids)
    llama_logits = np.array(llm.scores[: len(ids)])
    assert llama_logits.shape == torch_logits.shape
    agree = (torch_logits.argmax(-1) == llama_logits.argmax(-1))
    assert agree.all(), f"top-1 differs at positions {np.flatnonzero(~agree).tolist()}"
    # and the two distributions are close, not merely the same argmax
    p = torch.softmax(torch.tensor(torch_logits), -1)
    q = torch.log_softmax(torch.tensor(llama_logits), -1)
    kl = (p * (torch.log(p + 1e-12) - q)).sum(-1).mean().item()
    assert kl < 0.02, kl


@pytest.mark.slow
def test_teacher_generates_a_sensible_answer(teacher):
    import torch

    from edgekit.models import load_model, load_tokenizer

    tok, model = load_tokenizer(teacher), load_model(teacher)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_converted_tokenizer_says_what_the_gguf_says(teacher):
    """No BOS added (the GGUF's add_bos is false), EOS is <|im_end|>, digits split one by one ('smollm'),
    and llama.cpp tokenizes the original embedded GGUF exactly as the converted HF tokenizer does."""
    from transformers import AutoTokenizer

    from edgekit.runtimes.llamacpp import open_llama

    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids
    assert [tok.decode([i]) for i in tok("2024", add_special_tokens=False).input_ids] == ["2", "0", "2", "4"]
    llm = open_llama(teacher.gguf, n_ctx=256)
    for text in ["Hello world! 12345 apples, 3.14 and 2024-11-24.", "  spaces\n\ttabs\n\nlines", "émoji 😀 中文",
                 "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x**2"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert tok.decode(ids) == text


def test_a_gguf_saved_as_tokenizer_model_is_not_copied_along(tiny_bpe_llama_dir, tmp_path):
    """transformers saves a GGUF-loaded tokenizer by copying the whole GGUF to tokenizer.model; exports skip it."""
    import shutil

    from edgekit.hf import copy_hf_files, worth_copying

    src = tmp_path / "src"
    shutil.copytree(tiny_bpe_llama_dir, src)
    (src / "tokenizer.model").write_bytes(b"GGUF" + b"\0" * 100)
    assert not worth_copying(src / "tokenizer.model")
    assert worth_copying(src / "tokenizer.json")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_hf_files(src, out)
    assert "tokenizer.json" in copied and "tokenizer.model" not in copied and not (out / "tokenizer.model").exists()
    (src / "tokenizer.model").write_bytes(b"\n\x0bsentencepiece")  # a real SentencePiece model is kept
    assert "tokenizer.model" in copy_hf_files(src, out)
