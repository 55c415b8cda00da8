"""Nexus-Gen's generation flow on embeddings against their reference forward (golden fixtures):
prefill inputs, the next-token slots of the vision head, the image loss; and DIVA's mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diva_lightning.backbones.flows import (
    embedding_regression,
    shifted_slot_states,
    supervised_cross_entropy,
)
from diva_lightning.backbones.nexus_gen.embeds import (
    generation_embeds,
    image_positions,
    prediction_slots,
    text_labels,
    understanding_embeds,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nexus-gen"
IMAGE_PAD = 508


@pytest.fixture(scope="module")
def golden():
    return {**load_file(FIXTURES / "fixtures.safetensors"),
            **load_file(FIXTURES / "nexus_gen_state_dict.safetensors")}  # fmt: skip


def test_all_masked_is_their_prefilled_input_and_loss(golden):
    ids = golden["gen_input_ids"]  # (1, 130)
    pos = image_positions(ids, IMAGE_PAD, 81)
    assert pos[0].tolist() == list(range(47, 128))
    tokens = golden["model.embed_tokens.weight"][ids]  # (1, 130, 64)
    prefill = golden["image_prefill_embeds.weight"]
    targets = golden["gen_target_image_embeds"][None]
    masked = torch.ones(1, 81, dtype=torch.bool)
    embeds = generation_embeds(tokens, pos, prefill, targets, masked)
    assert torch.equal(embeds, golden["gen_inputs_embeds"])
    slots = prediction_slots(pos)
    assert slots[0].tolist() == list(range(46, 127))
    hidden = golden["gen_last_hidden_state"][0, slots[0]]  # (81, 64)
    pred = hidden @ golden["vision_head.weight"].T
    torch.testing.assert_close(pred, golden["gen_image_pred_embeds"], atol=1e-5, rtol=1e-5)
    loss = embedding_regression(pred[None], targets, masked)
    assert float(loss) == pytest.approx(float(golden["gen_loss_img"]), abs=1e-5)


def test_masked_positions_get_the_prefill_and_nothing_else(golden):
    ids = golden["gen_input_ids"].repeat(2, 1)
    pos = image_positions(ids, IMAGE_PAD, 81)
    tokens = torch.randn(2, 130, 64)
    prefill, targets = torch.randn(81, 64), torch.randn(2, 81, 64)
    masked = torch.rand(2, 81, generator=torch.Generator().manual_seed(0)) < 0.5
    embeds = generation_embeds(tokens, pos, prefill, targets, masked)
    image = embeds[torch.arange(2)[:, None], pos]  # (2, 81, 64)
    for b in range(2):
        assert torch.equal(image[b][masked[b]], prefill[masked[b]])  # row j of the prefill at j
        assert torch.equal(image[b][~masked[b]], targets[b][~masked[b]])
    outside = torch.ones(2, 130, dtype=torch.bool)
    outside[torch.arange(2)[:, None], pos] = False
    assert torch.equal(embeds[outside], tokens[outside])  # text positions untouched


def test_a_sample_without_the_image_is_refused():
    with pytest.raises(ValueError, match="needs 81 image pads"):
        image_positions(torch.full((1, 20), 3), IMAGE_PAD, 81)


@pytest.mark.parametrize("sample", ["gen", "und"])
def test_cross_entropy_is_theirs(sample, golden):
    """Shifted CE over the labels with the image pads ignored: their plain-CE forward."""
    labels = text_labels(golden[f"{sample}_labels"], IMAGE_PAD)
    hidden = golden[f"{sample}_last_hidden_state"]
    states, targets = shifted_slot_states(hidden, labels)  # (1, S, D) at the supervised slots
    logits = states @ golden["lm_head.weight"].T
    loss = supervised_cross_entropy(logits, targets)
    assert float(loss) == pytest.approx(float(golden[f"{sample}_loss_ce"]), abs=1e-5)
    expected = "gen_ce_targets" if sample == "gen" else "und_answer_targets"
    assert targets[targets != -100].tolist() == golden[expected].tolist()


def test_understanding_pads_hold_the_towers_output(golden):
    ids = golden["und_input_ids"]
    tokens = golden["model.embed_tokens.weight"][ids]
    embeds = understanding_embeds(tokens, ids, IMAGE_PAD, golden["und_image_embeds"])
    assert torch.equal(embeds, golden["und_inputs_embeds"])
    with pytest.raises(ValueError, match="4 image pads but 3"):
        understanding_embeds(tokens, ids, IMAGE_PAD, golden["und_image_embeds"][:3])
