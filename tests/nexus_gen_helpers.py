"""Shared pieces of the Nexus-Gen tests: the golden fixtures (``tests/fixtures/nexus-gen``), their
id table as ``ChatTokens``, and the tiny Qwen2.5-VL loaded with their state dict."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diva_lightning.backbones.nexus_gen.checkpoint import load_into
from diva_lightning.backbones.nexus_gen.layout import ChatTokens

FIXTURES = Path(__file__).parent / "fixtures" / "nexus-gen"
HARNESS = json.loads((FIXTURES / "harness.json").read_text())
SPECIAL, PIECES = HARNESS["special_token_ids"], HARNESS["piece_ids"]
TOKENS = ChatTokens(
    im_start=SPECIAL["<|im_start|>"], im_end=SPECIAL["<|im_end|>"],
    vision_start=SPECIAL["<|vision_start|>"], vision_end=SPECIAL["<|vision_end|>"],
    image_pad=SPECIAL["<|image_pad|>"], newline=PIECES["\n"], system=PIECES["system"],
    user=PIECES["user"], assistant=PIECES["assistant"],
)  # fmt: skip


def tiny_config() -> Qwen2_5_VLConfig:
    config = Qwen2_5_VLConfig(**json.loads((FIXTURES / "config.json").read_text()))
    config._attn_implementation = "sdpa"
    return config


def loaded_model():
    """-> (the stock model with their weights, eval mode; {vision_head, image_prefill_embeds})."""
    model = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    extra = load_into(model, load_file(FIXTURES / "nexus_gen_state_dict.safetensors"))
    return model, extra
