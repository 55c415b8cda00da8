"""Janus adapter against the contract of ``BackboneAdapter`` (tiny random config)."""

import pytest
import torch
import torch.nn.functional as F

from diva_lightning.backbones.base import IGNORE_INDEX
from diva_lightning.backbones.janus import JanusAdapter

CAPTIONS = ["a red circle at the top left.", "two blue squares at the center and a star ."]
PROMPTS = ["Please describe this image in detail."] * 2


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return JanusAdapter.tiny().eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def codes(adapter, pixels):
    return adapter.tokenize_images(pixels)


def _mask(seed=0):
    return torch.rand(2, 64, generator=torch.Generator().manual_seed(seed)) < 0.4


def test_understanding_reads_pixels_labels_caption_and_matches_stock_loss(adapter, pixels):
    assert adapter.needs_pixels_for_understanding
    batch = adapter.build_understanding(PROMPTS, CAPTIONS, pixels=pixels)
    for i, caption in enumerate(CAPTIONS):
        expected = adapter.tokenizer(caption, add_special_tokens=False).input_ids + [
            adapter.tokenizer.eos_token_id
        ]
        assert batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist() == expected
        assert (
            batch.input_ids[i, batch.image_positions[i]] == adapter.special["placeholder"]
        ).all()
        assert (batch.input_ids[i] == adapter.special["placeholder"]).sum() == 64
    out = adapter.forward_flow(batch, "U")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    stock = adapter.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.extra["pixel_values"],
        labels=batch.labels,
    )
    torch.testing.assert_close(out.loss, stock.loss)
    # the pixels matter: another image changes the caption loss
    other = adapter.build_understanding(PROMPTS, CAPTIONS, pixels=pixels.flip(0))
    assert not torch.allclose(adapter.forward_flow(other, "U").loss, out.loss)


def test_generation_uses_the_mask_embedding_at_masked_positions(adapter, codes):
    mask = _mask()
    batch = adapter.build_generation(CAPTIONS, codes, mask)
    embeds = adapter.generation_inputs_embeds(batch)
    code_embeds = adapter.model.prepare_embeddings_for_image_generation(codes)
    for i in range(2):
        at = embeds[i, batch.image_positions[i]]  # (N, D)
        torch.testing.assert_close(
            at[mask[i]], adapter.mask_embedding.expand(int(mask[i].sum()), -1)
        )
        torch.testing.assert_close(at[~mask[i]], code_embeds[i][~mask[i]])
        assert not torch.isclose(at[mask[i]], code_embeds[i][mask[i]]).all(-1).any()
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        assert labelled.tolist() == batch.image_positions[i][mask[i]].tolist()
        assert batch.labels[i, labelled].tolist() == codes[i][mask[i]].tolist()
    out = adapter.forward_flow(batch, "G")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert out.logits.shape[-1] == adapter.codebook_size
    (grad,) = torch.autograd.grad(out.loss, [adapter.mask_embedding])
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("flow", ["U", "G"])
def test_hidden_states_equal_output_hidden_states(adapter, pixels, codes, flow):
    layers = [2, 3, 4]
    if flow == "U":
        batch = adapter.build_understanding(PROMPTS, CAPTIONS, pixels=pixels)
        ref = adapter.model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.extra["pixel_values"],
            output_hidden_states=True,
        )
    else:
        batch = adapter.build_generation(CAPTIONS, codes, _mask())
        ref = adapter.model.model.language_model(
            inputs_embeds=adapter.generation_inputs_embeds(batch),
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )
    out = adapter.forward_flow(batch, flow, layers, pool=False)
    index = batch.image_positions.unsqueeze(-1).expand(-1, -1, adapter.hidden_size)
    expected = torch.stack(
        [torch.gather(ref.hidden_states[layer], 1, index) for layer in layers], 1
    )
    torch.testing.assert_close(out.hidden, expected)
    torch.testing.assert_close(adapter.forward_flow(batch, flow, layers).hidden, expected.mean(2))


def test_unfreeze_range_changes_only_those_layers(codes):
    torch.manual_seed(0)
    adapter = JanusAdapter.tiny()
    adapter.unfreeze_layers(4, 6)
    names = adapter.trainable_parameter_names()
    assert names and all(any(f"layers.{i}." in n for i in (3, 4, 5)) for n in names)
    assert "mask_embedding" not in names
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    adapter.train()
    adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, _mask()), "G").loss.backward()
    opt.step()
    assert {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])} == set(names)
    with pytest.raises(ValueError, match=r"7\.\.9 is outside"):
        adapter.unfreeze_layers(7, 9)


def test_save_load_exact_and_vq_frozen(adapter, pixels, codes, tmp_path):
    adapter.save_pretrained(tmp_path / "ckpt")
    loaded = JanusAdapter.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(loaded.mask_embedding, adapter.mask_embedding, rtol=0, atol=0)
    for flow, batch in (
        ("U", adapter.build_understanding(PROMPTS, CAPTIONS, pixels=pixels)),
        ("G", adapter.build_generation(CAPTIONS, codes, _mask())),
    ):
        assert torch.equal(
            adapter.forward_flow(batch, flow).logits, loaded.forward_flow(batch, flow).logits
        )
    loaded.train()
    assert not loaded.vq.training and all(not p.requires_grad for p in loaded.vq.parameters())
    assert loaded.decode_images(codes).shape == (2, 3, 32, 32)
