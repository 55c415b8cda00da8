"""Nexus-Gen's training layouts token for token, and their 3-D positions, against the golden
fixtures of their template (``tests/fixtures/nexus-gen``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from diva_lightning.backbones.nexus_gen.layout import IMAGE, chat_sample, positions
from tests.nexus_gen_helpers import FIXTURES, HARNESS, PIECES, TOKENS, tiny_config


def ids(name: str) -> list:
    return [p if p == IMAGE else PIECES[p] for p in HARNESS["texts_as_pieces"][name]]


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "fixtures.safetensors")


@pytest.mark.parametrize("sample", ["gen", "und"])
def test_training_sample_ids_labels_and_positions_are_theirs(sample, golden):
    if sample == "gen":  # the image is the assistant's: 81 pads, every one labelled
        got, labels = chat_sample(ids("system"), ids("gen_user"), ids("gen_assistant"), TOKENS,
                                  assistant_pads=[81])  # fmt: skip
    else:  # the user's 56 x 56 image: 4 pads, unlabelled
        got, labels = chat_sample(ids("system"), ids("und_user_train"), ids("und_answer"), TOKENS,
                                  user_pads=[4])  # fmt: skip
    assert got == golden[f"{sample}_input_ids"][0].tolist()
    assert labels == golden[f"{sample}_labels"][0].tolist()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(tiny_config())
    pos = positions(model.model, torch.tensor([got]), TOKENS.image_pad,
                    golden[f"{sample}_image_grid_thw"])  # fmt: skip
    assert torch.equal(pos.cpu(), golden[f"{sample}_position_ids"])
