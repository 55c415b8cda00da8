"""Known-answer tests of the Section 2 diagnostics."""

import pytest
import torch

from diva_lightning.analysis.metrics import (
    effective_rank,
    effective_rank_increment,
    gradient_cosine,
    high_frequency_share,
    reconstruction_residual,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_identical_flows_give_zero_residual_and_zero_rank_increment():
    u = torch.randn(64, 16)
    assert reconstruction_residual(u, u, variance_threshold=0.999999) == pytest.approx(0, abs=1e-9)
    # the stacked spectrum is U's scaled by sqrt(2): the increment is exactly zero
    assert effective_rank_increment(u.clone(), u) == pytest.approx(0, abs=1e-9)


def test_orthogonal_subspaces_give_residual_one_and_rank_increment():
    basis, _ = torch.linalg.qr(torch.randn(16, 16))
    u = torch.randn(64, 4) @ basis[:, :4].T
    g = torch.randn(64, 4) @ basis[:, 4:8].T
    assert reconstruction_residual(g, u, variance_threshold=0.999) == pytest.approx(1, abs=1e-9)
    assert effective_rank_increment(g, u) > 2.5  # about 4 new directions


def test_effective_rank_of_isotropic_and_rank_one_states():
    torch.manual_seed(0)
    assert effective_rank(torch.randn(4000, 8)) == pytest.approx(8, rel=0.05)
    assert effective_rank(torch.randn(100, 1) @ torch.randn(1, 8)) == pytest.approx(1, abs=1e-4)


def test_smooth_grid_has_less_high_frequency_energy_than_noise():
    torch.manual_seed(0)
    noise = torch.randn(8, 16, 16, 4)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = torch.stack(
        [
            torch.sin(2 * torch.pi * (yy + k) / 16) + torch.cos(2 * torch.pi * xx / 16)
            for k in range(4)
        ],
        -1,
    )
    smooth = smooth.expand(8, -1, -1, -1)
    assert high_frequency_share(smooth) < 0.01
    assert high_frequency_share(noise) > 0.3
    assert high_frequency_share(smooth) < high_frequency_share(noise)


def test_gradient_cosine_of_a_loss_with_itself_and_its_negative():
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5)
    loss = (w * x).sum() ** 2
    assert gradient_cosine(loss, loss, [w]) == pytest.approx(1.0)
    assert gradient_cosine(loss, -loss, [w]) == pytest.approx(-1.0)
    other = (w * torch.tensor([0.0, 0, 0, 0, 1])).sum()
    loss_a = (w * torch.tensor([1.0, 0, 0, 0, 0])).sum()
    assert gradient_cosine(loss_a, other, [w]) == pytest.approx(0.0)


def test_suggested_range_is_longest_positive_middle_run():
    from diva_lightning.analysis.divergence import suggest_range

    cos = [-1.0, -0.5, 0.5, 0.6, 0.7, -0.2, 0.4, -1.0]
    res = [0.0, 0.1, 0.6, 0.7, 0.8, 0.1, 0.5, 0.0]
    assert suggest_range(cos, res) == (3, 5)
    # the first and last block are never suggested, even when they score highest
    assert suggest_range([1, -1, -1, 1, 1, -1, 1], [1, 0, 0, 1, 1, 0, 1]) == (4, 5)
