import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.distill.losses import (
    KINDS, FeatureProjector, cross_entropy, divergence, feature_loss, layer_map, sparse_forward_kl,
)
from edgekit.errors import ConfigError

V = 32


def logits(seed: int, shape=(2, 5, V), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


seeds = st.integers(min_value=0, max_value=10_000)
temps = st.sampled_from([0.5, 1.0, 2.0, 4.0])


@settings(max_examples=30, deadline=None)
@given(seed=seeds, kind=st.sampled_from(KINDS), t=temps)
def test_divergence_of_a_distribution_with_itself_is_zero(seed, kind, t):
    x = logits(seed)
    assert divergence(x, x.clone(), kind, t).item() == pytest.approx(0.0, abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(a=seeds, b=seeds, kind=st.sampled_from(KINDS), t=temps)
def test_divergences_are_non_negative_with_finite_gradients(a, b, kind, t):
    s = logits(a).requires_grad_()
    loss = divergence(s, logits(b + 1), kind, t)
    loss.backward()
    assert loss.item() >= -1e-6
    assert torch.isfinite(s.grad).all()


@settings(max_examples=30, deadline=None)
@given(a=seeds, b=seeds)
def test_jsd_is_symmetric_at_half(a, b):
    x, y = logits(a), logits(b + 1)
    assert divergence(x, y, "jsd", beta=0.5).item() == pytest.approx(divergence(y, x, "jsd", beta=0.5).item(), rel=1e-4,
                                                                    abs=1e-6)


def test_forward_and_reverse_kl_swap_arguments():
    x, y = logits(1), logits(2)
    assert divergence(x, y, "forward_kl").item() == pytest.approx(divergence(y, x, "reverse_kl").item(), rel=1e-5)


def test_kl_matches_torch_kl_div_and_t_squared_scaling():
    s, t = logits(3), logits(4)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), log_target=True,
                                     reduction="none").sum(-1).mean() * 4
    assert divergence(s, t, "forward_kl", temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_skew_kl_interpolates_between_zero_and_kl():
    s, t = logits(5), logits(6)
    assert divergence(s, t, "skew_kl", skew=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert divergence(s, t, "skew_kl", skew=0.0).item() == pytest.approx(divergence(s, t, "forward_kl").item(),
                                                                          rel=1e-5)
    mid = divergence(s, t, "skew_kl", skew=0.5).item()
    assert 0 < mid < divergence(s, t, "forward_kl").item()


def test_mask_selects_positions():
    s, t = logits(7), logits(8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = True
    expected = divergence(s[0:1, 2:3], t[0:1, 2:3], "forward_kl")
    assert divergence(s, t, "forward_kl", mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_topk_with_the_whole_vocabulary_equals_dense():
    s, t = logits(9), logits(10)
    values, indices = t.topk(V, dim=-1)
    for temp in (1.0, 2.0):
        assert sparse_forward_kl(s, indices, values, "topk", temp).item() == pytest.approx(
            divergence(s, t, "forward_kl", temp).item(), rel=1e-5)


def test_topk_truncation_changes_the_target_but_stays_close_for_peaked_teachers():
    s, t = logits(11), logits(12, scale=8.0)  # a confident teacher: most mass in a few tokens
    values, indices = t.topk(8, dim=-1)
    dense = divergence(s, t, "forward_kl").item()
    assert sparse_forward_kl(s, indices, values, "topk").item() == pytest.approx(dense, rel=0.15)


def test_sampled_targets_are_unbiased_where_topk_is_biased():
    """With a flat teacher, top-4 truncation biases the gradient; 4 sampled tokens do not (on average)."""
    torch.manual_seed(0)
    s, t = logits(13, shape=(1, 3, V)), logits(14, shape=(1, 3, V), scale=1.0)
    p = torch.softmax(t, -1)
    s_dense = s.clone().requires_grad_()
    divergence(s_dense, t, "forward_kl").backward()
    grads = []
    for _ in range(2000):
        draws = torch.multinomial(p.reshape(-1, V), 4, replacement=True).reshape(1, 3, 4)
        s_sparse = s.clone().requires_grad_()
        sparse_forward_kl(s_sparse, draws, torch.full(draws.shape, 0.25), "sampled").backward()
        grads.append(s_sparse.grad)
    sampled_err = (torch.stack(grads).mean(0) - s_dense.grad).abs().max().item()
    values, indices = t.topk(4, dim=-1)
    s_top = s.clone().requires_grad_()
    sparse_forward_kl(s_top, indices, values, "topk").backward()
    topk_err = (s_top.grad - s_dense.grad).abs().max().item()
    assert sampled_err < 3e-3  # only sampling noise
    assert topk_err > 5 * sampled_err  # a systematic bias


def test_sparse_padding_is_ignored():
    s, t = logits(15), logits(16)
    values, indices = t.topk(4, dim=-1)
    padded_v = torch.cat([values, torch.full_like(values[..., :2], float("-inf"))], -1)
    padded_i = torch.cat([indices, torch.zeros_like(indices[..., :2])], -1)
    assert sparse_forward_kl(s, padded_i, padded_v, "topk").item() == pytest.approx(
        sparse_forward_kl(s, indices, values, "topk").item(), rel=1e-6)


def test_cross_entropy_ignores_masked_labels():
    s = logits(17)
    labels = torch.randint(0, V, (2, 5))
    labels[0, 0] = -100
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(s[keep], labels[keep])
    assert cross_entropy(s, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_feature_loss_is_zero_for_identical_states_and_trains_the_projection():
    torch.manual_seed(0)
    hs = tuple(torch.randn(2, 5, 8) for _ in range(3))  # embeddings + 2 layers
    proj = FeatureProjector(8, 8, 2)
    assert feature_loss(hs, hs, proj).item() == pytest.approx(0.0, abs=1e-6)
    teacher = tuple(torch.randn(2, 5, 12) for _ in range(5))  # wider, deeper teacher
    proj = FeatureProjector(8, 12, 2)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = feature_loss(hs, teacher, proj).item()
    for _ in range(50):
        opt.zero_grad()
        loss = feature_loss(hs, teacher, proj)
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert layer_map(2, 4) == [(0, 1), (1, 3)]


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown distillation loss"):
        divergence(logits(1), logits(2), "kl_backwards")
    with pytest.raises(ConfigError, match="keep the teacher's vocabulary"):
        divergence(logits(1), logits(2, shape=(2, 5, V + 1)))
    with pytest.raises(ConfigError, match="temperature"):
        divergence(logits(1), logits(2), temperature=0)
