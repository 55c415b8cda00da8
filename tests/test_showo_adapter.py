"""Show-o adapter against the contract of ``BackboneAdapter`` (tiny random config)."""

import pytest
import torch
import torch.nn.functional as F

from diva_lightning.backbones.base import IGNORE_INDEX
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.backbones.showo.masks import MASK_VALUE, draw_cosine_mask

CAPTIONS = ["a red circle at the top left .", "two blue squares at the center and a star ."]
PROMPTS = ["Please describe this image in detail.", ""]


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return ShowoAdapter.tiny().eval()


@pytest.fixture(scope="module")
def codes(adapter):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return adapter.tokenize_images(pixels)


def _mask(seed=0):
    return torch.rand(2, 64, generator=torch.Generator().manual_seed(seed)) < 0.4


def _full_logits(adapter, batch):
    with torch.no_grad():
        return adapter.model(
            batch.input_ids, attention_mask=batch.extra["attention_mask_4d"]
        ).logits


def test_understanding_labels_only_on_caption_and_loss_is_manual_ce(adapter, codes):
    batch = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    offset, n = adapter.model.config.image_token_offset, adapter.tokens_per_image
    assert batch.input_ids.shape == (2, n + 3 + adapter.max_text_len)
    for i, caption in enumerate(CAPTIONS):
        expected = adapter._text(f" {caption}" if PROMPTS[i] else caption)
        expected = expected + [adapter.special.eos]
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        assert batch.labels[i, labelled].tolist() == expected
        assert batch.input_ids[i, labelled].tolist() == expected  # not shifted in the labels
        assert labelled.tolist() == list(range(labelled[0], labelled[0] + len(expected)))
        length = int(batch.attention_mask[i].sum())  # right padding after EOS
        assert int(labelled[-1]) == length - 1
    assert torch.equal(batch.input_ids[:, batch.image_positions[0]], codes + offset)
    out = adapter.forward_flow(batch, "U")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert out.logits.shape[-1] == adapter.text_vocab_size
    full = _full_logits(adapter, batch)
    first = torch.nonzero(batch.labels[0] != IGNORE_INDEX).flatten()
    torch.testing.assert_close(
        out.logits[0, : len(first)], full[0, first - 1], atol=1e-5, rtol=1e-5
    )


def test_generation_hides_masked_codes_and_labels_exactly_masked_positions(adapter, codes):
    mask = _mask()
    batch = adapter.build_generation(CAPTIONS, codes, mask)
    offset = adapter.model.config.image_token_offset
    assert batch.image_positions[0, 0] == adapter.max_text_len + 2
    for i in range(2):
        image_ids = batch.input_ids[i, batch.image_positions[i]]  # (N,)
        assert (image_ids[mask[i]] == adapter.mask_token_id).all()
        assert (image_ids[~mask[i]] == codes[i][~mask[i]] + offset).all()
        visible = set(image_ids[~mask[i]].tolist())
        hidden = (codes[i][mask[i]] + offset).tolist()
        assert [t for t in hidden if t in batch.input_ids[i].tolist() and t not in visible] == []
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
        assert labelled.tolist() == batch.image_positions[i][mask[i]].tolist()
        assert batch.labels[i, labelled].tolist() == codes[i][mask[i]].tolist()
    out = adapter.forward_flow(batch, "G")
    manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert out.logits.shape[-1] == adapter.codebook_size
    # prediction AT the masked position (no shift), codebook columns in codebook order
    full = _full_logits(adapter, batch)
    first = torch.nonzero(batch.labels[0] != IGNORE_INDEX).flatten()
    expected = full[0, first, offset : offset + adapter.codebook_size]
    torch.testing.assert_close(out.logits[0, : len(first)], expected, atol=1e-5, rtol=1e-5)


def test_omni_attention_masks(adapter, codes):
    g = adapter.build_generation(["red", CAPTIONS[1]], codes, _mask())
    allow = g.extra["attention_mask_4d"][:, 0] == 0  # (B, T, T)
    assert set(g.extra["attention_mask_4d"].unique().tolist()) == {0.0, MASK_VALUE}
    positions = g.image_positions[0]
    start, end = int(positions[0]) - 1, int(positions[-1]) + 1  # <|soi|> .. <|eoi|>
    real = g.attention_mask.bool()  # (B, T)
    for i in range(2):
        pads = ~real[i]
        assert pads[: int(pads.sum())].all()  # left padding
        for row in range(start, end + 1):  # the image block sees every real column, no pad
            assert torch.equal(allow[i, row], real[i])
        text = torch.nonzero(real[i, :start]).flatten()  # real text rows: causal among real
        for row in text.tolist():
            assert torch.equal(allow[i, row].nonzero().flatten(), text[text <= row])
    u = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    allow = u.extra["attention_mask_4d"][0, 0] == 0
    prefix = adapter.tokens_per_image + 3
    assert allow[:prefix, :prefix].all()  # bidirectional <|mmu|> <|soi|> image <|eoi|>
    assert torch.equal(allow[prefix:, prefix:], torch.ones_like(allow[prefix:, prefix:]).tril())


@pytest.mark.parametrize("flow", ["U", "G"])
def test_hidden_states_equal_output_hidden_states(adapter, codes, flow):
    if flow == "U":
        batch = adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes)
    else:
        batch = adapter.build_generation(CAPTIONS, codes, _mask())
    layers = [3, 4, 5, 6]
    out = adapter.forward_flow(batch, flow, layers, pool=False)
    with torch.no_grad():
        ref = adapter.model(
            batch.input_ids,
            attention_mask=batch.extra["attention_mask_4d"],
            output_hidden_states=True,
        ).hidden_states
    index = batch.image_positions.unsqueeze(-1).expand(-1, -1, adapter.hidden_size)
    expected = torch.stack([torch.gather(ref[layer], 1, index) for layer in layers], 1)
    assert out.hidden.shape == (2, 4, 64, adapter.hidden_size)
    torch.testing.assert_close(out.hidden, expected)
    pooled = adapter.forward_flow(batch, flow, layers, pool=True).hidden
    torch.testing.assert_close(pooled, expected.mean(2))


def test_unfreeze_range_changes_only_those_layers():
    torch.manual_seed(0)
    adapter = ShowoAdapter.tiny()
    adapter.unfreeze_layers(3, 5)
    names = adapter.trainable_parameter_names()
    assert names and all(any(f"layers.{i}." in n for i in (2, 3, 4)) for n in names)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    adapter.train()
    codes = adapter.tokenize_images(torch.rand(2, 3, 32, 32))
    mask = draw_cosine_mask(2, 64, torch.Generator().manual_seed(0))  # official training masks
    g = adapter.forward_flow(adapter.build_generation(CAPTIONS, codes, mask), "G")
    u = adapter.forward_flow(adapter.build_understanding(PROMPTS, CAPTIONS, codes=codes), "U")
    (g.loss + u.loss).backward()
    opt.step()
    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    with pytest.raises(ValueError, match=r"6\.\.9 is outside .* 1\.\.8"):
        adapter.unfreeze_layers(6, 9)


def test_save_and_load_reproduce_logits(adapter, codes, tmp_path):
    adapter.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"showo", "magvitv2", "phi"}
    loaded = ShowoAdapter.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.max_text_len == adapter.max_text_len
    assert loaded.prompt_template == adapter.prompt_template
    for build in (
        lambda a: a.build_generation(CAPTIONS, codes, _mask()),
        lambda a: a.build_understanding(PROMPTS, CAPTIONS, codes=codes),
    ):
        batch, again = build(adapter), build(loaded)
        assert torch.equal(batch.input_ids, again.input_ids)
        assert torch.equal(batch.labels, again.labels)
        flow = "G" if batch.input_ids[0, 0] != adapter.special.mmu else "U"
        assert torch.equal(
            adapter.forward_flow(batch, flow).logits, loaded.forward_flow(batch, flow).logits
        )
    pixels = adapter.decode_images(codes)
    assert torch.equal(loaded.decode_images(codes), pixels)
    assert torch.equal(loaded.tokenize_images(pixels), adapter.tokenize_images(pixels))


def test_vq_stays_frozen_in_eval_after_train(adapter):
    adapter.train()
    try:
        assert not adapter.vq.training and all(not m.training for m in adapter.vq.modules())
        assert all(not p.requires_grad for p in adapter.vq.parameters())
        assert adapter.model.training
    finally:
        adapter.eval()


def test_maskgit_sampling_gives_valid_codes_and_keeps_known_ones(adapter, codes):
    def sample(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return adapter.generate_images(CAPTIONS, timesteps=4, generator=generator, **kwargs)

    sampled = sample()
    assert sampled.shape == (2, adapter.tokens_per_image) and sampled.dtype == torch.long
    assert sampled.min() >= 0 and sampled.max() < adapter.codebook_size
    assert torch.equal(sampled, sample())  # fixed seed -> same codes
    keep = ~_mask()
    inpainted = sample(codes=codes, mask=~keep)
    assert torch.equal(inpainted[keep], codes[keep])
    assert adapter.decode_images(sampled).shape == (2, 3, 32, 32)
    answer = adapter.generate_text(codes[:1], "describe", max_new_tokens=3)
    assert isinstance(answer[0], str)


def test_decode_round_trip_and_code_checks(adapter, codes):
    pixels = adapter.decode_images(codes)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        adapter.decode_images(codes[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        adapter.build_generation(CAPTIONS, codes + 300, _mask())
    with pytest.raises(ValueError, match="unknown Show-o preset"):
        ShowoAdapter(preset="show-o")


def test_activation_checkpointing_gives_identical_loss(codes):
    torch.manual_seed(0)
    adapter = ShowoAdapter.tiny(phi={"num_hidden_layers": 4}).train()
    assert adapter.num_layers == 4
    batch = adapter.build_generation(CAPTIONS, codes, _mask())
    plain = adapter.forward_flow(batch, "G", [2, 3])
    adapter.set_activation_checkpointing(True)
    ckpt = adapter.forward_flow(batch, "G", [2, 3])
    torch.testing.assert_close(plain.loss, ckpt.loss)
    torch.testing.assert_close(plain.hidden, ckpt.hidden)
