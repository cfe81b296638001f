"""Running an ONNX export: our onnxruntime loop and onnxruntime-genai against PyTorch, on the tiny model."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from edgekit.runtimes import GenerationStats
from edgekit.runtimes.onnxruntime import OrtSession as OrtLM, default_providers
from edgekit.runtimes.onnxruntime_genai import genai_generate
from edgekit.errors import ModelError

PROMPT = [{"role": "user", "content": "Hello world, how are you today? Tell me about the quick brown fox."}]


@pytest.fixture(scope="module")
def fp32_folder(sharp_dir, tiny_export):
    """The sharp tiny model's fp32 ONNX export artifact, from the session's export store (read-only)."""
    return tiny_export(sharp_dir, "onnx", "fp32")


@pytest.fixture(scope="module")
def prompt_ids(sharp_dir) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sharp_dir))
    return tok.apply_chat_template(PROMPT, add_generation_prompt=True)


def _torch_greedy(folder, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_greedy_32_tokens_identical_in_pytorch_ortlm_and_genai(sharp_dir, fp32_folder, prompt_ids):
    expected = _torch_greedy(sharp_dir, prompt_ids, 32)
    assert len(expected) == 32 and len(set(expected)) > 16
    assert OrtLM(fp32_folder).generate(prompt_ids, 32) == expected
    eos = json.loads((fp32_folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert not set(expected) & set(eos)  # genai stops at eos; this prompt's greedy run never emits it
    assert genai_generate(fp32_folder, prompt_ids, 32) == expected


def test_generate_stops_after_an_eos_id(fp32_folder, prompt_ids):
    lm = OrtLM(fp32_folder, threads=1)
    first = lm.generate(prompt_ids, 8)
    stop = next(i for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    assert lm.generate(prompt_ids, 32, eos_ids=[first[stop]]) == first[:stop + 1]


def test_stats_time_the_prefill_and_each_decoded_token(fp32_folder, prompt_ids):
    lm = OrtLM(fp32_folder, threads=1)
    lm.generate(prompt_ids, 10)
    s = lm.stats
    assert (s.prompt_tokens, s.new_tokens, len(s.decode_s)) == (len(prompt_ids), 10, 9)
    assert s.prefill_s > 0 and all(t > 0 for t in s.decode_s) and s.decode_tok_s > 0
    assert set(s.to_dict()) >= {"prefill_s", "decode_tok_s", "prefill_tok_s"}
    lm.logits(prompt_ids)
    assert lm.stats.prompt_tokens == len(prompt_ids) and lm.stats.decode_s == []
    timings = {}
    genai_generate(fp32_folder, prompt_ids, 8, timings=timings)
    assert timings["new_tokens"] == 8 and timings["prefill_s"] > 0 and timings["decode_s"] > 0
    assert GenerationStats().decode_tok_s == 0.0


def test_sampling_is_reproducible_with_a_seed(fp32_folder, prompt_ids):
    lm = OrtLM(fp32_folder, threads=1)
    a = lm.generate(prompt_ids, 16, greedy=False, seed=1)
    assert a == lm.generate(prompt_ids, 16, greedy=False, seed=1)
    assert a != lm.generate(prompt_ids, 16, greedy=False, seed=2) and all(0 <= t < 320 for t in a)


def test_logits_are_float32_per_position(fp32_folder, prompt_ids):
    logits = OrtLM(fp32_folder).logits(prompt_ids[:7])
    assert logits.shape == (7, 320) and logits.dtype == np.float32
    with pytest.raises(ValueError):
        OrtLM(fp32_folder).logits([])


def test_cpu_provider_is_always_there_and_last():
    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert OrtLM.__init__.__defaults__ == (None, None)


def test_folder_without_genai_config_is_a_model_error(fp32_folder, tmp_path):
    with pytest.raises(ModelError, match="genai_config.json is missing"):
        OrtLM(tmp_path)
    with pytest.raises(ModelError, match="genai_config.json is missing"):
        genai_generate(tmp_path, [1, 2], 4)


def test_missing_onnxruntime_genai_names_the_pip_fix(fp32_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    with pytest.raises(ModelError, match="pip install onnxruntime-genai"):
        genai_generate(fp32_folder, [1, 2, 3], 4)
