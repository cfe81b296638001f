"""Activation-aware scaling: the fp32 function is kept, and the search never loses to plain RTN."""

from __future__ import annotations

import pytest
import torch

from edgekit.quantize.awq import awq_scale, fake_quant


@pytest.fixture
def tiny(tiny_bpe_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_bpe_llama_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bpe_llama_dir))
    return model, tok


def _sequences(tok) -> list[list[int]]:
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
             "1234567890 apples and 42 oranges; hello world, how are you today?"]
    return [tok(t)["input_ids"] for t in texts]


def test_scaling_keeps_the_fp32_function(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("Quantization trades bits for accuracy, hello world!")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    results = awq_scale(model, _sequences(tok), block_size=32, alphas=(0.5,))  # force a real rescale everywhere
    assert len(results) == 2 * 4 and all(r.alpha == 0.5 for r in results)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert any("input_layernorm" in k for k in changed) and any("v_proj" in k for k in changed)
    assert any("up_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "lm_head" in k for k in changed)  # tied: left alone
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-4)


def test_search_is_never_worse_than_rtn_on_its_calibration_data(tiny):
    model, tok = tiny
    results = awq_scale(model, _sequences(tok), block_size=32, grid=5)
    assert all(r.error_awq <= r.error_rtn for r in results)
    assert all(0.0 <= r.alpha < 1.0 for r in results)


def test_fake_quant_error_is_within_one_step_and_exact_on_the_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 96)
    q = fake_quant(w, 32)
    blocks = w.reshape(8, 3, 32)
    step = (blocks.amax(-1).clamp(min=0) - blocks.amin(-1).clamp(max=0)) / 15
    assert ((q - w).abs().reshape(8, 3, 32) <= step[..., None] * 1.0001).all()
    assert len(torch.unique(q.reshape(8, 3, 32)[0, 0])) <= 16
    assert torch.allclose(fake_quant(q, 32), q, atol=1e-6)  # quantizing twice changes nothing
    assert fake_quant(torch.randn(4, 40), 32).shape == (4, 40)  # rows padded to whole blocks


def test_empty_calibration_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="calibration"):
        awq_scale(model, [[]])
