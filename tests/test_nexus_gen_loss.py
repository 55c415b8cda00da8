"""Nexus-Gen's image loss (``embedding_regression``) against the golden fixtures of their
reference code (``tests/fixtures/nexus-gen``, copied from ``../shared/fixtures/nexus-gen``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diva_lightning.backbones.flows import embedding_regression

FIXTURES = Path(__file__).parent / "fixtures" / "nexus-gen"


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "fixtures.safetensors")


def test_image_loss_equals_their_terms(golden):
    pred, target = golden["gen_image_pred_embeds"], golden["gen_target_image_embeds"]  # (81, D)
    loss = embedding_regression(pred, target)
    assert float(loss) == pytest.approx(float(golden["gen_loss_img"]), abs=1e-5)
    mse = torch.nn.functional.mse_loss(pred, target)
    assert float(mse) == pytest.approx(float(golden["gen_loss_img_mse"]), abs=1e-5)
    # their total: 3.0 x CE + 3.0 x image loss (the V2 recipe's weights)
    total = 3.0 * golden["gen_loss_ce"] + 3.0 * loss
    assert float(total) == pytest.approx(float(golden["gen_loss_total"]), abs=1e-4)


def test_valid_mask_selects_slots_and_an_empty_one_gives_zero_with_a_graph(golden):
    pred = golden["gen_image_pred_embeds"][None].repeat(2, 1, 1).requires_grad_(True)
    target = golden["gen_target_image_embeds"][None].repeat(2, 1, 1)
    valid = torch.zeros(2, 81, dtype=torch.bool)
    valid[0, :40] = True
    masked = embedding_regression(pred, target, valid)
    direct = embedding_regression(pred[0, :40], target[0, :40])
    torch.testing.assert_close(masked, direct)
    masked.backward()
    assert pred.grad[1].abs().sum() == 0 and pred.grad[0, 40:].abs().sum() == 0
    assert pred.grad[0, :40].abs().sum() > 0
    empty = embedding_regression(pred, target, torch.zeros_like(valid))
    assert float(empty) == 0.0 and empty.requires_grad
