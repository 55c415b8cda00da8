"""Chameleon adapter against the contract of ``BackboneAdapter`` (tiny random config)."""

import pytest
import torch
import torch.nn.functional as F

from diva_lightning.backbones.base import IGNORE_INDEX
from diva_lightning.backbones.chameleon import ChameleonAdapter, image_token_name

CAPTIONS = ["a red circle at the top left.", "two blue squares at the center and a star ."]
PROMPTS = ["Please describe this image in detail."] * 2


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return ChameleonAdapter.tiny().eval()


@pytest.fixture(scope="module")
def codes(adapter):
    return adapter.tokenize_images(
        torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    )


def _mask(seed=0):
    return torch.rand(2, 64, generator=torch.Generator().manual_seed(seed)) < 0.4


def _flow_batch(adapter, codes, flow):
    if flow == "U":
        return adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    return adapter.build_generation(CAPTIONS, codes, _mask())


def _full_logits(adapter, batch):
    h = adapter.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return adapter.model.lm_head(h.last_hidden_state)  # (B, T, V) without the stock image mask


def test_image_token_names_follow_the_vocabulary_map(adapter, codes):
    assert image_token_name(120) == "IMGIMGBCAZ"
    vocab = adapter.tokenizer.get_vocab()
    assert adapter.image_token_ids[120] == vocab["IMGIMGBCAZ"]
    # codebook indices mapped through the vocabulary map give the LM ids of get_image_tokens
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    lm_ids = adapter.model.model.get_image_tokens(pixels * 2 - 1)  # (B, N) int32 LM ids
    got = adapter.tokenize_images(pixels)
    assert got.min() >= 0 and got.max() < adapter.codebook_size == 256
    assert got.shape == (2, 64) and torch.equal(adapter.image_token_ids[got], lm_ids.long())


def test_understanding_labels_only_on_caption_and_loss_is_manual_ce(adapter, codes):
    batch = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    for i, caption in enumerate(CAPTIONS):
        expected = adapter.tokenizer(caption, add_special_tokens=False).input_ids + [
            adapter.tokenizer.eos_token_id
        ]
        assert batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist() == expected
    out = adapter.forward_flow(batch, "U")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    full = _full_logits(adapter, batch)
    shifted = F.cross_entropy(
        full[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, shifted)


def test_generation_hides_masked_codes_and_loss_is_finite_codebook_ce(adapter, codes):
    mask = _mask()
    batch = adapter.build_generation(CAPTIONS, codes, mask)
    for i in range(2):
        image_ids = batch.input_ids[i, batch.image_positions[i]]
        assert (image_ids[mask[i]] == adapter.special["mask"]).all()
        assert torch.equal(image_ids[~mask[i]], adapter.image_token_ids[codes[i][~mask[i]]])
        assert adapter.special["mask"] not in adapter.image_token_ids.tolist()
        visible = set(image_ids[~mask[i]].tolist())
        hidden = adapter.image_token_ids[codes[i][mask[i]]].tolist()
        assert [t for t in hidden if t in batch.input_ids[i].tolist() and t not in visible] == []
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        assert labelled.tolist() == batch.image_positions[i][mask[i]].tolist()
        assert batch.labels[i, labelled].tolist() == codes[i][mask[i]].tolist()
    out = adapter.forward_flow(batch, "G")
    assert torch.isfinite(out.loss)  # the stock forward would give inf here
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert out.logits.shape[-1] == adapter.codebook_size
    full = _full_logits(adapter, batch)
    for i in range(2):
        slots = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        expected = full[i, slots - 1][:, adapter.image_token_ids]  # image-code columns, shifted
        torch.testing.assert_close(out.logits[i, : len(slots)], expected, rtol=1e-4, atol=1e-4)
        assert (out.targets[i, len(slots) :] == IGNORE_INDEX).all()


@pytest.mark.parametrize("flow", ["U", "G"])
def test_padding_does_not_change_a_sample(adapter, codes, flow):
    def build(index):
        if flow == "U":
            return adapter.build_understanding(
                [PROMPTS[i] for i in index], [CAPTIONS[i] for i in index], codes=codes[index]
            )
        return adapter.build_generation([CAPTIONS[i] for i in index], codes[index], _mask()[index])

    batch = build([0, 1])
    assert (batch.attention_mask[0] == 0).any()  # the shorter caption is right-padded
    both = adapter.forward_flow(batch, flow, [1, 8], pool=False)
    alone = adapter.forward_flow(build([0]), flow, [1, 8], pool=False)
    slots = int((alone.targets[0] != IGNORE_INDEX).sum())
    torch.testing.assert_close(both.logits[0, :slots], alone.logits[0, :slots])
    torch.testing.assert_close(both.hidden[0], alone.hidden[0])


@pytest.mark.parametrize("flow", ["U", "G"])
def test_positions_and_hidden_states_equal_output_hidden_states(adapter, codes, flow):
    batch = _flow_batch(adapter, codes, flow)
    if flow == "U":
        at = torch.stack([batch.input_ids[i, batch.image_positions[i]] for i in range(2)])
        assert torch.equal(at, adapter.image_token_ids[codes])
    layers = [2, 3, 4]
    out = adapter.forward_flow(batch, flow, layers, pool=False)
    ref = adapter.model.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
    ).hidden_states
    index = batch.image_positions.unsqueeze(-1).expand(-1, -1, adapter.hidden_size)
    expected = torch.stack([torch.gather(ref[layer], 1, index) for layer in layers], 1)
    torch.testing.assert_close(out.hidden, expected)
    torch.testing.assert_close(adapter.forward_flow(batch, flow, layers).hidden, expected.mean(2))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        adapter.forward_flow(batch, flow, [0, 4, 9])


def test_unfreeze_range_changes_only_those_layers():
    torch.manual_seed(0)
    adapter = ChameleonAdapter.tiny()
    adapter.unfreeze_layers(2, 3)
    names = adapter.trainable_parameter_names()
    assert names and all(".layers.1." in n or ".layers.2." in n for n in names)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    adapter.train()
    codes = adapter.tokenize_images(torch.rand(2, 3, 32, 32))
    adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, _mask()), "G").loss.backward()
    opt.step()
    assert {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])} == set(names)
    with pytest.raises(ValueError, match=r"0\.\.3 is outside .* 1\.\.8"):
        adapter.unfreeze_layers(0, 3)


def test_save_load_exact_vq_frozen_and_no_decoder(codes, tmp_path):
    torch.manual_seed(3)
    adapter = ChameleonAdapter(mask_token="<reserved00007>").eval()  # a non-default mask
    adapter.save_pretrained(tmp_path / "ckpt")
    loaded = ChameleonAdapter.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.mask_token == "<reserved00007>"
    assert torch.equal(loaded.image_token_ids, adapter.image_token_ids)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(adapter.tokenize_images(pixels), loaded.tokenize_images(pixels))
    for flow in ("U", "G"):
        batch, ref = (_flow_batch(a, codes, flow) for a in (loaded, adapter))
        assert torch.equal(batch.input_ids, ref.input_ids)
        assert torch.equal(
            adapter.forward_flow(ref, flow).logits, loaded.forward_flow(batch, flow).logits
        )
    loaded.train()
    assert not loaded.vq.training and all(not p.requires_grad for p in loaded.vq.parameters())
    with pytest.raises(NotImplementedError, match="no decoder"):
        adapter.decode_images(codes)


def test_config_overrides_apply_and_vocabulary_map_matches_tokenizer():
    overrides = {"vq_config": {"resolution": 64, "num_embeddings": 128}, "num_hidden_layers": 2}
    adapter = ChameleonAdapter(config_overrides=overrides)
    assert overrides["vq_config"] == {"resolution": 64, "num_embeddings": 128}  # not edited
    assert adapter.image_grid == (16, 16) and adapter.num_layers == 2
    assert adapter.codebook_size == 128 and adapter.image_token_ids.unique().numel() == 128
    vocab = adapter.tokenizer.get_vocab()
    assert adapter.model.config.vocabulary_map == vocab
    assert len(vocab) == adapter.text_vocab_size == adapter.model.config.vocab_size
    codes = adapter.tokenize_images(torch.rand(1, 3, 64, 64))
    assert codes.shape == (1, 256) and codes.min() >= 0 and codes.max() < 128
    assert ChameleonAdapter.tiny(image_size=16, num_hidden_layers=1).image_grid == (4, 4)
