"""Nexus-Gen's training layouts token for token, and their 3-D positions, against the golden
fixtures of their template (``tests/fixtures/nexus-gen``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diva_lightning.backbones.nexus_gen.layout import IMAGE, ChatTokens, chat_sample, positions

FIXTURES = Path(__file__).parent / "fixtures" / "nexus-gen"
HARNESS = json.loads((FIXTURES / "harness.json").read_text())
SPECIAL, PIECES = HARNESS["special_token_ids"], HARNESS["piece_ids"]
TOKENS = ChatTokens(
    im_start=SPECIAL["<|im_start|>"], im_end=SPECIAL["<|im_end|>"],
    vision_start=SPECIAL["<|vision_start|>"], vision_end=SPECIAL["<|vision_end|>"],
    image_pad=SPECIAL["<|image_pad|>"], newline=PIECES["\n"], system=PIECES["system"],
    user=PIECES["user"], assistant=PIECES["assistant"],
)  # fmt: skip


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
    config = Qwen2_5_VLConfig(**json.loads((FIXTURES / "config.json").read_text()))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    pos = positions(model.model, torch.tensor([got]), TOKENS.image_pad,
                    golden[f"{sample}_image_grid_thw"])  # fmt: skip
    assert torch.equal(pos.cpu(), golden[f"{sample}_position_ids"])
