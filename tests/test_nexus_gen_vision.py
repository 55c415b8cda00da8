"""Nexus-Gen's vision side against the golden fixtures: patches bit-exact, the frozen tower's
understanding embeddings and generation targets within 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diva_lightning.backbones.nexus_gen.vision import generation_targets, patches, tower_embeds
from tests.nexus_gen_helpers import FIXTURES, loaded_model


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "fixtures.safetensors")


@pytest.fixture(scope="module")
def visual():
    return loaded_model()[0].model.visual


def test_patches_are_bit_exact(golden):
    values, grid = patches([golden["und_pixels_uint8"].numpy()], target=False)
    assert torch.equal(values, golden["und_pixel_values"]) and grid.tolist() == [[1, 4, 4]]
    values, grid = patches([golden["gen_target_pixels_uint8"].numpy()], target=True)
    assert torch.equal(values[:8], golden["gen_target_pixel_values_head"])
    assert grid.tolist() == [[1, 18, 18]]
    stats = json.loads((FIXTURES / "harness.json").read_text())[
        "gen_target_pixel_values_full_stats_float64"]  # fmt: skip
    assert float(values.double().sum()) == pytest.approx(stats["sum"], rel=1e-12)


@torch.no_grad()
def test_tower_embeddings_and_generation_targets(golden, visual):
    und = tower_embeds(visual, golden["und_pixel_values"], golden["und_image_grid_thw"])
    torch.testing.assert_close(und, golden["und_image_embeds"], atol=1e-5, rtol=1e-5)
    image = golden["gen_target_pixels_uint8"].permute(2, 0, 1).float() / 255  # (3, H, W)
    targets = generation_targets(visual, [image])
    assert targets.shape == (1, 81, 64) and not targets.requires_grad
    torch.testing.assert_close(targets[0], golden["gen_target_image_embeds"], atol=1e-5, rtol=1e-5)
