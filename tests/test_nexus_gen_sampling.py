"""Nexus-Gen's greedy loop against their three reference runs (golden fixtures): greedy ids
exact, the 81 image embeddings within 1e-5, step positions and input kinds exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diva_lightning.backbones.nexus_gen.embeds import understanding_embeds
from diva_lightning.backbones.nexus_gen.sampling import greedy_generate
from diva_lightning.backbones.nexus_gen.vision import tower_embeds
from tests.nexus_gen_helpers import FIXTURES, SPECIAL, TOKENS, loaded_model


@pytest.fixture(scope="module")
def setup():
    model, extra = loaded_model()
    return model, extra, load_file(FIXTURES / "fixtures.safetensors")


@pytest.mark.parametrize("run", ["t2i", "edit", "und"])
def test_greedy_runs_reproduce_theirs(run, setup):
    model, extra, golden = setup
    prompt = golden[f"{run}_infer_prompt_ids"][0]
    options = {"forced": golden[f"{run}_infer_forced_ids"].tolist()} if run != "und" else {}
    if run != "t2i":  # the prompt holds the 56 x 56 user image (4 pads)
        with torch.no_grad():
            image = tower_embeds(model.model.visual, golden["und_pixel_values"],
                                 golden["und_image_grid_thw"])  # fmt: skip
            tokens = model.model.language_model.get_input_embeddings()(prompt)
            options["prompt_embeds"] = understanding_embeds(tokens[None], prompt[None],
                                                            TOKENS.image_pad, image)[0]  # fmt: skip
        options["prompt_grids"] = golden["und_image_grid_thw"].tolist()
    got = greedy_generate(
        model, extra["vision_head.weight"], extra["image_prefill_embeds.weight"],
        prompt.tolist(), TOKENS, eos={SPECIAL["<|im_end|>"]},
        max_new_tokens=len(golden[f"{run}_infer_step_input_kind"]),  # their run's length
        **options,
    )  # fmt: skip
    assert got["sequence"] == golden[f"{run}_infer_sequences"][0].tolist()
    assert torch.equal(got["kinds"], golden[f"{run}_infer_step_input_kind"])
    assert torch.equal(got["positions"], golden[f"{run}_infer_step_position_ids"])
    steps = golden[f"{run}_infer_text_steps"].tolist()
    assert sorted(got["text_logits"]) == steps
    logits = torch.stack([got["text_logits"][s] for s in steps])
    expected = golden[f"{run}_infer_text_step_logits"]
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(logits), finite)
    torch.testing.assert_close(logits[finite], expected[finite], atol=1e-5, rtol=1e-5)
    if run != "und":
        embeds = golden[f"{run}_infer_image_embeds"][0]
        torch.testing.assert_close(got["image_embeds"], embeds, atol=1e-5, rtol=1e-5)
    else:
        assert got["image_embeds"] is None


def test_a_second_image_in_one_answer_gets_its_own_positions(setup):
    """After a generated image the loop may write ``<|vision_start|>`` again: the first image's
    pads then count as an image for the 3-D positions (their code would fail there)."""
    model, extra, golden = setup
    prompt = golden["t2i_infer_prompt_ids"][0].tolist()
    forced = golden["t2i_infer_forced_ids"].tolist()
    forced = forced + [TOKENS.image_pad] * 81 + [TOKENS.vision_end] + [TOKENS.vision_start]
    got = greedy_generate(model, extra["vision_head.weight"], extra["image_prefill_embeds.weight"],
                          prompt, TOKENS, eos=set(), max_new_tokens=len(forced) + 83,
                          forced=forced)  # fmt: skip
    assert got["image_embeds"].shape == (162, 64)
    torch.testing.assert_close(got["image_embeds"][:81], golden["t2i_infer_image_embeds"][0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip
