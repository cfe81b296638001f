"""GPTQ rounding: codes on the MatMulNBits grid, output error below round-to-nearest on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from edgekit.quantize import fakequant
from edgekit.quantize.gptq import gptq, hessians


def _correlated(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose channels are correlated and unevenly scaled, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    return z @ mix * torch.linspace(0.2, 3.0, k) + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("k,block", [(128, 32), (96, 32), (80, 16)])
def test_gptq_output_error_is_well_below_round_to_nearest(k, block):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=g) * 0.05
    x = _correlated(1024, k, k)
    q = gptq(w, x.T @ x, 4, block)
    ref = x @ w.T
    err_gptq = float(((x @ q.dequantize().T - ref) ** 2).mean())
    err_rtn = float(((x @ fakequant.nbits(w, 4, block).T - ref) ** 2).mean())
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_codes_scales_and_zero_points_are_a_matmulnbits_grid():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 70, generator=g)
    x = _correlated(256, 70, 2)
    q = gptq(w, x.T @ x, 4, 32)
    assert q.codes.shape == (16, 96) and q.scales.shape == q.zeros.shape == (16, 3)
    assert int(q.codes.max()) <= 15 and float(q.zeros.max()) <= 15 and float(q.zeros.min()) >= 0
    assert (q.zeros == q.zeros.round()).all() and (q.scales > 0).all()
    assert (q.codes[:, 70:] == q.zeros[:, -1:].to(torch.uint8)).all()  # K padding holds the zero point
    rebuilt = ((q.codes.float().reshape(16, 3, 32) - q.zeros[..., None]) * q.scales[..., None]).reshape(16, -1)
    assert torch.equal(rebuilt[:, :70], q.dequantize())
    # compensation moves weights, but never far: each lands within a few steps of where it started
    assert ((q.dequantize() - w).abs() <= 4 * q.scales.repeat_interleave(32, 1)[:, :70]).all()


def test_inputs_never_seen_and_a_singular_hessian_still_give_a_finite_grid():
    w = torch.randn(8, 64)
    x = _correlated(16, 64, 3)  # fewer samples than inputs: X^T X is singular
    x[:, 5] = 0  # an input never active
    q = gptq(w, x.T @ x, 4, 32)
    assert torch.isfinite(q.dequantize()).all()


def test_hessians_sum_the_inputs_of_each_hooked_module():
    lin = torch.nn.Linear(8, 4)
    model = torch.nn.Module()
    model.lin = lin
    seen = []
    model.forward = lambda input_ids: seen.append(input_ids) or lin(torch.nn.functional.one_hot(input_ids, 8).float())
    sums = hessians(model, [[1, 2, 3], [4, 4]], {"lin": lin}, max_tokens=4)
    x = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), 8).double()
    assert torch.equal(sums["lin"], x.T @ x)  # 4 tokens: the second sequence is cut to one
