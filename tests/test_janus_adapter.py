"""Janus adapter: the conformance suite plus its two image encoders (tiny random config)."""

import json

import torch

from diva_lightning.backbones.janus import JanusAdapter
from diva_lightning.testing import AdapterConformance


class TestJanus(AdapterConformance):
    adapter_class = JanusAdapter
    layers = (2, 3, 4, 5, 6, 7)

    def image_input_ids(self, adapter, codes):
        return None  # the image enters as SigLIP features (U) or code embeddings (G)

    def code_columns(self, adapter):
        return torch.arange(adapter.codebook_size)  # generation_head is codebook-sized

    @torch.no_grad()
    def full_logits(self, adapter, batch, flow):
        if flow == "U":
            return adapter.model.lm_head(self._model_out(adapter, batch, flow).last_hidden_state)
        hidden = self._model_out(adapter, batch, flow).last_hidden_state
        return adapter.model.model.generation_head(hidden)

    @torch.no_grad()
    def reference_hidden_states(self, adapter, batch, flow):
        return self._model_out(adapter, batch, flow, output_hidden_states=True).hidden_states

    @staticmethod
    def _model_out(adapter, batch, flow, **kwargs):
        if flow == "U":
            return adapter.model.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.extra["pixel_values"],
                **kwargs,
            )
        return adapter.model.model.language_model(
            inputs_embeds=adapter.generation_inputs_embeds(batch),
            attention_mask=batch.attention_mask,
            **kwargs,
        )

    def test_understanding_reads_siglip_pixels_and_matches_the_stock_loss(self, adapter, pixels):
        assert adapter.needs_pixels_for_understanding
        batch = adapter.build_understanding(self.prompts, self.captions, pixels=pixels)
        torch.testing.assert_close(batch.extra["pixel_values"], (pixels - 0.5) / 0.5)  # SigLIP
        for i in range(2):  # image positions are the placeholders, after <s> <begin_of_image>
            assert batch.image_positions[i].tolist() == list(range(2, 66))
            placeholders = batch.input_ids[i] == adapter.special["placeholder"]
            assert torch.nonzero(placeholders).flatten().tolist() == list(range(2, 66))
        out = adapter.forward_flow(batch, "U")
        stock = adapter.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.extra["pixel_values"],
            labels=batch.labels,
        )
        torch.testing.assert_close(out.loss, stock.loss)
        # the pixels matter: another image changes the caption loss
        other = adapter.build_understanding(self.prompts, self.captions, pixels=pixels.flip(0))
        assert not torch.allclose(adapter.forward_flow(other, "U").loss, out.loss)

    def test_generation_uses_the_mask_embedding_at_masked_positions(self, adapter, codes):
        mask = self.mask(adapter)
        assert adapter.mask_embedding.shape == (1, adapter.hidden_size)  # not 0-dim (DeepSpeed)
        batch = adapter.build_generation(self.captions, codes, mask)
        embeds = adapter.generation_inputs_embeds(batch)  # (B, T, D)
        code_embeds = adapter.model.prepare_embeddings_for_image_generation(codes)  # (B, N, D)
        for i in range(2):
            positions = batch.image_positions[i]
            head = len(adapter.caption_ids(self.captions[i])) + 2
            assert positions.tolist() == list(range(head, head + 64))
            assert batch.input_ids[i, head - 1] == adapter.special["boi"]
            assert batch.input_ids[i, head + 64] == adapter.special["eoi"]
            at = embeds[i, positions]  # (N, D)
            masked = at[mask[i]]
            torch.testing.assert_close(masked, adapter.mask_embedding.expand(len(masked), -1))
            torch.testing.assert_close(at[~mask[i]], code_embeds[i][~mask[i]])
            assert not torch.isclose(masked, code_embeds[i][mask[i]]).all(-1).any()
        out = adapter.forward_flow(batch, "G")
        (grad,) = torch.autograd.grad(out.loss, [adapter.mask_embedding])
        assert grad.abs().sum() > 0

    def test_a_trained_mask_embedding_and_the_processor_statistics_are_saved(
        self, pixels, codes, tmp_path
    ):
        adapter = self.make_adapter(seed=1).eval()
        with torch.no_grad():  # a trained mask embedding (not its deterministic init) must survive
            adapter.mask_embedding.add_(0.1)
        adapter.save_pretrained(tmp_path / "ckpt")
        loaded = JanusAdapter.from_pretrained(tmp_path / "ckpt").eval()
        assert torch.equal(loaded.mask_embedding, adapter.mask_embedding)
        batch = adapter.build_generation(self.captions, codes, self.mask(adapter))
        assert torch.equal(
            adapter.forward_flow(batch, "G").logits, loaded.forward_flow(batch, "G").logits
        )
        config_file = tmp_path / "ckpt" / "preprocessor_config.json"
        config = json.loads(config_file.read_text())
        config.update(image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
        config_file.write_text(json.dumps(config))
        clip = JanusAdapter.from_pretrained(tmp_path / "ckpt")
        mean, std = torch.tensor([0.4, 0.45, 0.5]), torch.tensor([0.2, 0.25, 0.3])
        torch.testing.assert_close(
            clip.siglip_pixels(pixels), (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        )

    def test_tokenize_and_decode_through_the_generation_vq(self, adapter, pixels, codes):
        stock = adapter.vq.encode(pixels * 2 - 1).image_tokens.view(2, -1)
        assert torch.equal(codes, stock)
        images = adapter.decode_images(codes)  # (B, 3, H, W) in [0, 1]
        channels_last = adapter.model.decode_image_tokens(codes)  # (B, H, W, 3) in [-1, 1]
        expected = ((channels_last.permute(0, 3, 1, 2) + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(images, expected)
