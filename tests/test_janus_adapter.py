"""Janus adapter against the contract of ``BackboneAdapter`` (tiny random config, no downloads)."""

import json

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


def _batch(adapter, flow, pixels, codes, mask=None):
    if flow == "U":
        return adapter.build_understanding(PROMPTS, CAPTIONS, pixels=pixels)
    return adapter.build_generation(CAPTIONS, codes, _mask() if mask is None else mask)


def test_understanding_labels_only_on_caption_and_matches_stock_loss(adapter, pixels):
    assert adapter.needs_pixels_for_understanding
    batch = adapter.build_understanding(PROMPTS, CAPTIONS, pixels=pixels)
    torch.testing.assert_close(batch.extra["pixel_values"], (pixels - 0.5) / 0.5)  # SigLIP
    for i, caption in enumerate(CAPTIONS):
        expected = adapter.tokenizer(caption, add_special_tokens=False).input_ids
        expected = expected + [adapter.tokenizer.eos_token_id]
        length = int(batch.attention_mask[i].sum())
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        # labels sit exactly on the last real tokens (caption + </s>), never on padding
        assert labelled.tolist() == list(range(length - len(expected), length))
        assert batch.labels[i, labelled].tolist() == expected
        assert batch.input_ids[i, labelled].tolist() == expected
        # image positions are exactly the placeholders, right after <s> <begin_of_image>
        assert batch.image_positions[i].tolist() == list(range(2, 66))
        placeholders = batch.input_ids[i] == adapter.special["placeholder"]
        assert torch.nonzero(placeholders).flatten().tolist() == list(range(2, 66))
    assert batch.attention_mask[0, -1] == 0  # the shorter caption is right-padded
    out = adapter.forward_flow(batch, "U")
    assert out.logits.shape[-1] == adapter.text_vocab_size
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
    assert adapter.mask_embedding.shape == (1, adapter.hidden_size)  # not 0-dim (DeepSpeed)
    batch = adapter.build_generation(CAPTIONS, codes, mask)
    embeds = adapter.generation_inputs_embeds(batch)  # (B, T, D)
    code_embeds = adapter.model.prepare_embeddings_for_image_generation(codes)  # (B, N, D)
    for i in range(2):
        positions = batch.image_positions[i]
        head = len(adapter.tokenizer(CAPTIONS[i], add_special_tokens=False).input_ids) + 2
        assert positions.tolist() == list(range(head, head + 64))
        assert batch.input_ids[i, head - 1] == adapter.special["boi"]
        assert batch.input_ids[i, head + 64] == adapter.special["eoi"]
        at = embeds[i, positions]  # (N, D)
        masked = at[mask[i]]
        torch.testing.assert_close(masked, adapter.mask_embedding.expand(len(masked), -1))
        torch.testing.assert_close(at[~mask[i]], code_embeds[i][~mask[i]])
        assert not torch.isclose(masked, code_embeds[i][mask[i]]).all(-1).any()
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        assert labelled.tolist() == positions[mask[i]].tolist()
        assert batch.labels[i, labelled].tolist() == codes[i][mask[i]].tolist()
    out = adapter.forward_flow(batch, "G")
    assert out.logits.shape[-1] == adapter.codebook_size
    assert out.targets[out.targets != IGNORE_INDEX].tolist() == codes[mask].tolist()
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    # next-token shift: the slot for position p is generation_head(h[p - 1])
    h = adapter.model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask
    ).last_hidden_state
    first = int(labelled[0])  # a masked position of sample 1
    torch.testing.assert_close(
        out.logits[1, 0], adapter.model.model.generation_head(h[1, first - 1])
    )
    (grad,) = torch.autograd.grad(out.loss, [adapter.mask_embedding])
    assert grad.abs().sum() > 0


def test_masked_codes_never_reach_the_model(adapter, codes):
    mask = _mask()
    swapped = torch.where(mask, (codes + 17) % adapter.codebook_size, codes)  # other hidden codes
    out = adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, mask), "G")
    other = adapter.forward_flow(adapter.build_generation(CAPTIONS, swapped, mask), "G")
    assert torch.equal(out.logits, other.logits)
    assert not torch.equal(out.targets, other.targets)


@pytest.mark.parametrize("flow", ["U", "G"])
def test_padding_leaves_a_sample_unchanged(adapter, pixels, codes, flow):
    batch = _batch(adapter, flow, pixels, codes)
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()  # sample 0 is padded
    alone = (
        adapter.build_understanding(PROMPTS[:1], CAPTIONS[:1], pixels=pixels[:1])
        if flow == "U"
        else adapter.build_generation(CAPTIONS[:1], codes[:1], _mask()[:1])
    )
    both, one = adapter.forward_flow(batch, flow, [3]), adapter.forward_flow(alone, flow, [3])
    slots = one.logits.shape[1]
    torch.testing.assert_close(both.logits[:1, :slots], one.logits)
    torch.testing.assert_close(both.hidden[:1], one.hidden)


@pytest.mark.parametrize("flow", ["U", "G"])
def test_hidden_states_equal_output_hidden_states(adapter, pixels, codes, flow):
    layers = list(range(2, 8))  # blocks 2..7 (hidden_states[8] is after the final norm)
    batch = _batch(adapter, flow, pixels, codes)
    if flow == "U":
        ref = adapter.model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.extra["pixel_values"],
            output_hidden_states=True,
        )
    else:
        ref = adapter.model.model.language_model(
            inputs_embeds=adapter.generation_inputs_embeds(batch),
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )
    out = adapter.forward_flow(batch, flow, layers, pool=False)
    index = batch.image_positions.unsqueeze(-1).expand(-1, -1, adapter.hidden_size)
    expected = torch.stack([torch.gather(ref.hidden_states[k], 1, index) for k in layers], 1)
    assert out.hidden.shape == (2, len(layers), 64, adapter.hidden_size)
    torch.testing.assert_close(out.hidden, expected)
    torch.testing.assert_close(adapter.forward_flow(batch, flow, layers).hidden, expected.mean(2))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        adapter.forward_flow(batch, flow, [0, 3, 9])


def test_unfreeze_range_changes_only_those_layers(codes):
    torch.manual_seed(0)
    adapter = JanusAdapter.tiny()
    adapter.unfreeze_layers(4, 6)
    names = adapter.trainable_parameter_names()
    assert names and all(any(f"layers.{i}." in n for i in (3, 4, 5)) for n in names)
    assert len(names) == 3 * len(list(adapter.decoder_layers[0].parameters()))
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    adapter.train()
    adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, _mask()), "G").loss.backward()
    opt.step()
    assert {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])} == set(names)
    with pytest.raises(ValueError, match=r"7\.\.9 is outside"):
        adapter.unfreeze_layers(7, 9)


def test_save_load_exact_and_vq_frozen(pixels, codes, tmp_path):
    torch.manual_seed(1)
    adapter = JanusAdapter.tiny().eval()
    with torch.no_grad():  # a trained mask embedding (not its deterministic init) must survive
        adapter.mask_embedding.add_(0.1)
    adapter.save_pretrained(tmp_path / "ckpt")
    loaded = JanusAdapter.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.mask_embedding, adapter.mask_embedding)
    for flow in ("U", "G"):
        batch = _batch(adapter, flow, pixels, codes)
        assert torch.equal(
            adapter.forward_flow(batch, flow).logits, loaded.forward_flow(batch, flow).logits
        )
    loaded.train()
    assert loaded.training and not loaded.vq.training
    assert all(not p.requires_grad for p in loaded.vq.parameters())
    # the checkpoint's image-processor statistics drive the SigLIP normalisation
    config_file = tmp_path / "ckpt" / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update(image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    config_file.write_text(json.dumps(config))
    clip = JanusAdapter.from_pretrained(tmp_path / "ckpt")
    mean, std = torch.tensor([0.4, 0.45, 0.5]), torch.tensor([0.2, 0.25, 0.3])
    torch.testing.assert_close(
        clip.siglip_pixels(pixels), (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    )


def test_tokenize_and_decode_through_the_generation_vq(adapter, pixels, codes):
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < adapter.codebook_size
    stock = adapter.vq.encode(pixels * 2 - 1).image_tokens.view(2, -1)
    assert torch.equal(codes, stock)
    images = adapter.decode_images(codes)  # (B, 3, H, W) in [0, 1]
    channels_last = adapter.model.decode_image_tokens(codes)  # (B, H, W, 3) in [-1, 1]
    assert channels_last.shape == (2, 32, 32, 3)
    expected = ((channels_last.permute(0, 3, 1, 2) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, expected)
