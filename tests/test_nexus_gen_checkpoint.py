"""Nexus-Gen's state dict (their 4.49 key layout, golden fixtures) loads into transformers 5.x's
Qwen2.5-VL with 0 missing and 0 unexpected keys, and reproduces their hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diva_lightning.backbones.nexus_gen.checkpoint import EXTRA, load_into, to_transformers5

FIXTURES = Path(__file__).parent / "fixtures" / "nexus-gen"


@pytest.fixture(scope="module")
def loaded():
    config = Qwen2_5_VLConfig(**json.loads((FIXTURES / "config.json").read_text()))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    state = load_file(FIXTURES / "nexus_gen_state_dict.safetensors")
    extra = load_into(model, state)
    return model, state, extra


def test_their_keys_map_with_none_missing_or_unexpected(loaded):
    model, state, extra = loaded
    mapped, _ = to_transformers5(state)
    assert set(mapped) == set(model.state_dict()) and set(extra) == set(EXTRA)
    assert extra["image_prefill_embeds.weight"].shape == (81, 64)
    torch.testing.assert_close(model.lm_head.weight, state["lm_head.weight"])
    assert (
        model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    )


def test_a_foreign_key_is_refused_by_name(loaded):
    model, state, _ = loaded
    broken = {**state, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="layers.9.mlp.up_proj"):
        load_into(model, broken)
    missing = {k: v for k, v in state.items() if k != "vision_head.weight"}
    with pytest.raises(ValueError, match="vision_head"):
        load_into(model, missing)


@torch.no_grad()
def test_hidden_states_vision_head_and_losses_match_their_forward(loaded):
    model, _, extra = loaded
    golden = load_file(FIXTURES / "fixtures.safetensors")
    lm = model.model.language_model
    out = lm(inputs_embeds=golden["gen_inputs_embeds"], position_ids=golden["gen_position_ids"],
             attention_mask=golden["gen_attention_mask"])  # fmt: skip
    hidden = out.last_hidden_state  # (1, 130, 64)
    torch.testing.assert_close(hidden, golden["gen_last_hidden_state"], atol=1e-5, rtol=1e-5)
    pred = hidden[0, 46:127] @ extra["vision_head.weight"].T  # positions whose next label is a pad
    torch.testing.assert_close(pred, golden["gen_image_pred_embeds"], atol=1e-5, rtol=1e-5)
    logits = model.lm_head(hidden[0, golden["gen_ce_positions"]])
    torch.testing.assert_close(logits, golden["gen_logits_at_ce_positions"], atol=1e-5, rtol=1e-5)
