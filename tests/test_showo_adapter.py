"""Show-o adapter: the conformance suite plus omni-attention and MaskGIT (tiny random config)."""

import pytest
import torch

from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.backbones.showo.masks import MASK_VALUE
from diva_lightning.testing import AdapterConformance


class TestShowo(AdapterConformance):
    adapter_class = ShowoAdapter
    prompts = ["Please describe this image in detail.", ""]  # "": the official caption layout
    layers = (3, 4, 5, 6)
    generation_shift = 0  # MaskGIT: the prediction for a masked code is made at its position

    def answer_ids(self, adapter, prompt, caption):
        return adapter._text(f" {caption}" if prompt else caption) + [adapter.special.eos]

    def image_input_ids(self, adapter, codes):
        return codes + adapter.model.config.image_token_offset

    def mask_input_id(self, adapter):
        return adapter.mask_token_id

    def code_columns(self, adapter):
        return adapter.model.config.image_token_offset + torch.arange(adapter.codebook_size)

    @torch.no_grad()
    def full_logits(self, adapter, batch, flow):
        return adapter.model(
            batch.input_ids, attention_mask=batch.extra["attention_mask_4d"]
        ).logits

    @torch.no_grad()
    def reference_hidden_states(self, adapter, batch, flow):
        return adapter.model(
            batch.input_ids,
            attention_mask=batch.extra["attention_mask_4d"],
            output_hidden_states=True,
        ).hidden_states

    def test_the_official_layouts(self, adapter, codes):
        u = adapter.build_understanding(self.prompts, self.captions, codes=codes)
        offset, n = adapter.model.config.image_token_offset, adapter.tokens_per_image
        assert u.input_ids.shape == (2, n + 3 + adapter.max_text_len)
        assert torch.equal(u.input_ids[:, u.image_positions[0]], codes + offset)
        for i in range(2):  # right padding after EOS
            labelled = torch.nonzero(u.labels[i] != -100).flatten()
            assert int(labelled[-1]) == int(u.attention_mask[i].sum()) - 1
        g = adapter.build_generation(self.captions, codes, self.mask(adapter))
        assert g.image_positions[0, 0] == adapter.max_text_len + 2

    def test_omni_attention_masks(self, adapter, codes):
        g = adapter.build_generation(["red", self.captions[1]], codes, self.mask(adapter))
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
        u = adapter.build_understanding(self.prompts, self.captions, codes=codes)
        allow = u.extra["attention_mask_4d"][0, 0] == 0
        prefix = adapter.tokens_per_image + 3
        assert allow[:prefix, :prefix].all()  # bidirectional <|mmu|> <|soi|> image <|eoi|>
        assert torch.equal(allow[prefix:, prefix:], torch.ones_like(allow[prefix:, prefix:]).tril())

    def test_the_prompt_settings_are_saved(self, adapter, tmp_path):
        adapter.save_pretrained(tmp_path / "ckpt")
        assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"showo", "magvitv2", "phi"}
        loaded = ShowoAdapter.from_pretrained(tmp_path / "ckpt")
        assert loaded.max_text_len == adapter.max_text_len
        assert loaded.prompt_template == adapter.prompt_template

    def test_maskgit_sampling_gives_valid_codes_and_keeps_known_ones(self, adapter, codes):
        def sample(**kwargs):
            generator = torch.Generator().manual_seed(0)
            return adapter.generate_images(
                self.captions, timesteps=4, generator=generator, **kwargs
            )

        sampled = sample()
        assert sampled.shape == (2, adapter.tokens_per_image) and sampled.dtype == torch.long
        assert sampled.min() >= 0 and sampled.max() < adapter.codebook_size
        assert torch.equal(sampled, sample())  # fixed seed -> same codes
        keep = ~self.mask(adapter)
        inpainted = sample(codes=codes, mask=~keep)
        assert torch.equal(inpainted[keep], codes[keep])
        assert adapter.decode_images(sampled).shape == (2, 3, 32, 32)
        answer = adapter.generate_text(codes[:1], "describe", max_new_tokens=3)
        assert isinstance(answer[0], str)

    def test_an_unknown_preset_is_refused(self):
        with pytest.raises(ValueError, match="unknown Show-o preset"):
            ShowoAdapter(preset="show-o")
