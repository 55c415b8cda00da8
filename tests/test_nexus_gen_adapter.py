"""``NexusGenAdapter``: the adapter contract read for regression, and parity with the golden
fixtures of Nexus-Gen's reference code (``tests/fixtures/nexus-gen``) through the adapter itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diva_lightning.backbones.nexus_gen.adapter import NexusGenAdapter
from diva_lightning.backbones.nexus_gen.tiny import tiny_tokenizer
from diva_lightning.testing import AdapterConformance
from tests.nexus_gen_helpers import FIXTURES


def generation_inputs(adapter, batch):
    """The generation flow's inputs built here from the batch: the prefill row at a masked pad,
    the target embedding at an unmasked one, the token embedding elsewhere."""
    inputs = adapter.language_model.get_input_embeddings()(batch.input_ids).clone()
    prefill, targets = adapter.image_prefill_embeds.weight, batch.extra["targets"]
    for i, row in enumerate(batch.image_positions):
        for j, position in enumerate(row.tolist()):
            masked = bool(batch.extra["gen_mask"][i, j])
            inputs[i, position] = prefill[j] if masked else targets[i, j]
    return inputs


class TestNexusGenAdapter(AdapterConformance):
    adapter_class = NexusGenAdapter

    def image_input_ids(self, adapter, codes):
        return None  # the image enters as embeddings (tower output or prefill rows)

    @torch.no_grad()
    def _stock(self, adapter, batch, flow, **kwargs):
        """The stock model (U: its own image and rotary handling; G: on ``generation_inputs``)."""
        if flow == "U":
            return adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 pixel_values=batch.extra["pixel_values"],
                                 image_grid_thw=batch.extra["image_grid_thw"],
                                 mm_token_type_ids=(batch.input_ids == adapter.tokens.image_pad).int(),
                                 **kwargs)  # fmt: skip
        ids, grid = batch.input_ids, batch.extra["image_grid_thw"]
        types = (ids == adapter.tokens.image_pad).int()
        pos, _ = adapter.model.model.get_rope_index(ids, types, grid, None, None,
                                                    batch.attention_mask)  # fmt: skip
        return adapter.language_model(inputs_embeds=generation_inputs(adapter, batch),
                                      attention_mask=batch.attention_mask, position_ids=pos,
                                      **kwargs)  # fmt: skip

    def full_logits(self, adapter, batch, flow):
        out = self._stock(adapter, batch, flow)
        return out.logits if flow == "U" else adapter.vision_head(out.last_hidden_state)

    def reference_hidden_states(self, adapter, batch, flow):
        return self._stock(adapter, batch, flow, output_hidden_states=True).hidden_states

    def test_masked_pads_receive_the_prefill_rows_and_nothing_else(self, adapter, codes):
        mask = self.mask(adapter)
        batch = adapter.build_generation(self.captions, codes, mask)
        seen = {}
        hook = adapter.language_model.register_forward_pre_hook(
            lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True
        )
        with hook:
            adapter.forward_flow(batch, "G")
        inputs = seen["inputs_embeds"]  # (B, T, D)
        torch.testing.assert_close(inputs, generation_inputs(adapter, batch), rtol=0, atol=0)
        prefill = adapter.image_prefill_embeds.weight
        at = inputs[0, batch.image_positions[0]]  # (81, D)
        assert torch.equal(at[mask[0]], prefill[mask[0]])
        assert torch.equal(at[~mask[0]], codes[0][~mask[0]])
        assert mask[0].any() and (~mask[0]).any()

    def test_a_stage_one_bias_is_an_additive_correction_of_the_embeddings(self, adapter, codes):
        from diva_lightning.objectives.readouts import injected_loss

        out = adapter.forward_flow(
            adapter.build_generation(self.captions, codes, self.mask(adapter)), "G"
        )
        bias = torch.randn(2, 3, adapter.generation_width)  # (B, L, D)
        got = injected_loss(out.logits, out.targets, bias, native=out.loss_fn())
        by_hand = [
            out.loss_fn()(out.logits + bias[:, layer, None], out.targets) for layer in range(3)
        ]
        torch.testing.assert_close(got, torch.stack(by_hand).mean())
        assert not torch.allclose(got, out.loss)

    def test_it_has_no_codebook(self, adapter):
        with pytest.raises(NotImplementedError, match="no codebook"):
            adapter.codebook_size  # noqa: B018


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "fixtures.safetensors")


def their_folder(path, drop: str | None = None):
    """A checkpoint folder in THEIR layout: their config, their state dict (4.49 keys, with
    ``vision_head`` and ``image_prefill_embeds``), the tiny tokenizer (the fixtures' id table)."""
    path.mkdir()
    shutil.copy(FIXTURES / "config.json", path / "config.json")
    state = load_file(FIXTURES / "nexus_gen_state_dict.safetensors")
    if drop:
        state.pop(drop)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    return NexusGenAdapter.from_pretrained(
        their_folder(tmp_path_factory.mktemp("ng") / "ckpt")
    ).eval()


def test_their_checkpoint_loads_with_no_missing_and_no_unexpected_keys(theirs):
    assert theirs.loading_report == {"missing": [], "unexpected": []}
    state = load_file(FIXTURES / "nexus_gen_state_dict.safetensors")
    assert torch.equal(theirs.vision_head.weight, state["vision_head.weight"])
    assert torch.equal(theirs.image_prefill_embeds.weight, state["image_prefill_embeds.weight"])
    assert torch.equal(theirs.model.lm_head.weight, state["lm_head.weight"])
    assert (
        json.loads((FIXTURES / "config.json").read_text())["num_hidden_layers"] == theirs.num_layers
    )


def test_a_checkpoint_without_the_vision_head_is_refused_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="vision_head.weight"):
        NexusGenAdapter.from_pretrained(their_folder(tmp_path / "ckpt", drop="vision_head.weight"))


def test_the_generation_sample_matches_their_training_forward(theirs, golden):
    pixels = (
        golden["gen_target_pixels_uint8"].permute(2, 0, 1)[None].float() / 255
    )  # (1, 3, 252, 252)
    targets = theirs.tokenize_images(pixels)  # (1, 81, D)
    torch.testing.assert_close(targets[0], golden["gen_target_image_embeds"], rtol=0, atol=1e-5)
    caption = "A red cat sitting on a mat."
    batch = theirs.build_generation([caption], targets, torch.ones(1, 81, dtype=torch.bool))
    assert torch.equal(batch.input_ids, golden["gen_input_ids"])
    assert torch.equal(batch.labels != -100, golden["gen_labels"] == theirs.tokens.image_pad)
    assert torch.equal(theirs.rope_positions(batch), golden["gen_position_ids"])
    out = theirs.forward_flow(batch, "G", [1], pool=False)  # block 1's output at the pads
    layer0 = golden["gen_layer0_output"][0, batch.image_positions[0]]  # (81, D)
    torch.testing.assert_close(out.hidden[0, 0], layer0, rtol=0, atol=1e-5)
    assert out.valid.all() and out.logits.shape == (1, 81, 64)
    torch.testing.assert_close(out.logits[0], golden["gen_image_pred_embeds"], rtol=0, atol=1e-5)
    assert float(out.loss) == pytest.approx(float(golden["gen_loss_img"]), abs=1e-5)


def test_the_understanding_sample_matches_their_training_forward(theirs, golden):
    pixels = golden["und_pixels_uint8"].permute(2, 0, 1)[None].float() / 255  # (1, 3, 56, 56)
    batch = theirs.build_understanding(
        ["What is in the image?"], ["A red cat on a mat."], pixels=pixels
    )
    assert torch.equal(batch.input_ids, golden["und_input_ids"])
    assert torch.equal(batch.labels, golden["und_labels"])
    torch.testing.assert_close(
        batch.extra["pixel_values"], golden["und_pixel_values"], rtol=0, atol=0
    )
    assert torch.equal(theirs.rope_positions(batch), golden["und_position_ids"])
    out = theirs.forward_flow(batch, "U")
    torch.testing.assert_close(
        out.logits[0], golden["und_logits_at_answer_positions"], rtol=0, atol=1e-5
    )
    assert float(out.loss) == pytest.approx(float(golden["und_loss_ce"]), abs=1e-5)


def test_text_to_image_inference_reproduces_their_greedy_run(theirs, golden):
    embeds = theirs.generate_image_embeddings(["A red cat sitting on a mat."])  # (1, 81, D)
    torch.testing.assert_close(embeds, golden["t2i_infer_image_embeds"], rtol=0, atol=1e-5)


def test_pixels_need_the_decoder_and_a_decoder_gets_the_embeddings(theirs, golden):
    with pytest.raises(ValueError, match="FLUX.1-dev decoder"):
        theirs.generate_images(["A red cat sitting on a mat."])
    seen = []

    def decoder(embeds):
        seen.append(embeds)
        return torch.full((len(embeds), 3, 8, 8), 2.0)

    pixels = theirs.generate_images(["A red cat sitting on a mat."], decoder=decoder)
    torch.testing.assert_close(seen[0], golden["t2i_infer_image_embeds"], rtol=0, atol=1e-5)
    assert pixels.shape == (1, 3, 8, 8) and float(pixels.max()) == 1.0
