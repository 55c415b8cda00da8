"""Emu3 adapter against the contract of ``BackboneAdapter`` (tiny random config)."""

import pytest
import torch
import torch.nn.functional as F

from diva_lightning.backbones.base import IGNORE_INDEX
from diva_lightning.backbones.emu3 import Emu3Adapter

CAPTIONS = ["a red circle at the top left.", "two blue squares at the center and a star ."]
PROMPTS = ["Please describe this image in detail."] * 2


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return Emu3Adapter.tiny().eval()


@pytest.fixture(scope="module")
def codes(adapter):
    return adapter.tokenize_images(
        torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    )


def _mask(seed=0):
    return torch.rand(2, 64, generator=torch.Generator().manual_seed(seed)) < 0.4


def test_understanding_labels_only_on_caption_and_loss_is_manual_ce(adapter, codes):
    batch = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    for i, caption in enumerate(CAPTIONS):
        expected = adapter.tokenizer(caption, add_special_tokens=False).input_ids + [
            adapter.tokenizer.eos_token_id
        ]
        labelled = batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist()
        assert labelled == expected
        # the labelled tokens are the last real tokens of the sequence (the caption + eos)
        length = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, length - len(expected) : length].tolist() == expected
    out = adapter.forward_flow(batch, "U")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    stock = adapter.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
    )
    torch.testing.assert_close(out.loss, stock.loss)
    assert out.logits.shape[-1] == adapter.text_vocab_size


def test_generation_hides_masked_codes_and_labels_exactly_masked_positions(adapter, codes):
    mask = _mask()
    batch = adapter.build_generation(CAPTIONS, codes, mask)
    for i in range(2):
        image_ids = batch.input_ids[i, batch.image_positions[i]]  # (N,)
        hidden_ids = adapter.image_token_ids[codes[i][mask[i]]]
        # no original LM id of a masked code sits at a masked position ...
        assert (image_ids[mask[i]] == adapter.special["mask"]).all()
        # ... nor anywhere else in the input, unless that code is also visible elsewhere
        visible = set(image_ids[~mask[i]].tolist())
        leaked = [
            t for t in hidden_ids.tolist() if t in batch.input_ids[i].tolist() and t not in visible
        ]
        assert leaked == []
        assert (image_ids[~mask[i]] == adapter.image_token_ids[codes[i][~mask[i]]]).all()
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        assert labelled.tolist() == batch.image_positions[i][mask[i]].tolist()
        assert batch.labels[i, labelled].tolist() == codes[i][mask[i]].tolist()
    out = adapter.forward_flow(batch, "G")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    # codebook-order logits == the image-code columns of the full-vocabulary logits
    full = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    first = torch.nonzero(batch.labels[0] != IGNORE_INDEX).flatten()
    expected = full[0, first - 1][:, adapter.image_token_ids]
    torch.testing.assert_close(out.logits[0, : len(first)], expected, rtol=1e-4, atol=1e-4)


def test_image_positions_skip_end_of_row_tokens(adapter, codes):
    batch = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    rows, cols = adapter.image_grid
    for i in range(2):
        at_positions = batch.input_ids[i, batch.image_positions[i]]
        assert at_positions.tolist() == adapter.image_token_ids[codes[i]].tolist()
        eol = torch.nonzero(batch.input_ids[i] == adapter.special["eol"]).flatten()
        assert len(eol) == rows and not set(eol.tolist()) & set(batch.image_positions[i].tolist())


@pytest.mark.parametrize("flow", ["U", "G"])
def test_hidden_states_equal_output_hidden_states(adapter, codes, flow):
    if flow == "U":
        batch = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    else:
        batch = adapter.build_generation(CAPTIONS, codes, _mask())
    layers = [3, 4, 5, 6]
    out = adapter.forward_flow(batch, flow, layers, pool=False)
    ref = adapter.model.model.text_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
    ).hidden_states
    index = batch.image_positions.unsqueeze(-1).expand(-1, -1, adapter.hidden_size)
    expected = torch.stack([torch.gather(ref[layer], 1, index) for layer in layers], 1)
    assert out.hidden.shape == (2, 4, 64, adapter.hidden_size)
    torch.testing.assert_close(out.hidden, expected)
    pooled = adapter.forward_flow(batch, flow, layers, pool=True).hidden
    torch.testing.assert_close(pooled, expected.mean(2))


def test_unfreeze_range_changes_only_those_layers():
    torch.manual_seed(0)
    adapter = Emu3Adapter.tiny()
    adapter.unfreeze_layers(3, 5)
    names = adapter.trainable_parameter_names()
    assert names and all(any(f"layers.{i}." in n for i in (2, 3, 4)) for n in names)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    adapter.train()
    codes = adapter.tokenize_images(torch.rand(2, 3, 32, 32))
    out = adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, _mask()), "G")
    out.loss.backward()
    opt.step()
    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    with pytest.raises(ValueError, match=r"6\.\.9 is outside .* 1\.\.8"):
        adapter.unfreeze_layers(6, 9)
    with pytest.raises(ValueError, match=r"\[0\]"):
        adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, _mask()), "G", [0, 1])


def test_save_and_load_reproduce_logits(adapter, codes, tmp_path):
    adapter.save_pretrained(tmp_path / "ckpt")
    loaded = Emu3Adapter.from_pretrained(tmp_path / "ckpt").eval()
    batch = adapter.build_generation(CAPTIONS, codes, _mask())
    assert torch.equal(batch.input_ids, loaded.build_generation(CAPTIONS, codes, _mask()).input_ids)
    assert torch.equal(
        adapter.forward_flow(batch, "G").logits, loaded.forward_flow(batch, "G").logits
    )
    assert torch.equal(
        loaded.tokenize_images(adapter.decode_images(codes)),
        adapter.tokenize_images(adapter.decode_images(codes)),
    )


def test_vq_stays_frozen_in_eval_after_train(adapter):
    adapter.train()
    try:
        assert not adapter.vq.training and all(not m.training for m in adapter.vq.modules())
        assert all(not p.requires_grad for p in adapter.vq.parameters())
        assert adapter.model.model.text_model.training
    finally:
        adapter.eval()


def test_decode_round_trip_and_code_checks(adapter, codes):
    pixels = adapter.decode_images(codes)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        adapter.decode_images(codes[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        adapter.build_generation(CAPTIONS, codes + 300, _mask())
    with pytest.raises(ValueError, match="pixels must be"):
        adapter.tokenize_images(torch.rand(2, 3, 16, 16))


def test_activation_checkpointing_gives_identical_loss(codes):
    torch.manual_seed(0)
    adapter = Emu3Adapter.tiny().train()
    batch = adapter.build_generation(CAPTIONS, codes, _mask())
    plain = adapter.forward_flow(batch, "G", [2, 3])
    adapter.set_activation_checkpointing(True)
    ckpt = adapter.forward_flow(batch, "G", [2, 3])
    torch.testing.assert_close(plain.loss, ckpt.loss)
    torch.testing.assert_close(plain.hidden, ckpt.hidden)
