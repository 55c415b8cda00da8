"""Emu3 adapter: the conformance suite plus its own layout (tiny random config)."""

import torch

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.testing import AdapterConformance


class TestEmu3(AdapterConformance):
    adapter_class = Emu3Adapter
    layers = (3, 4, 5, 6)

    def test_understanding_loss_equals_the_stock_loss(self, adapter, codes):
        batch = adapter.build_understanding(self.prompts, self.captions, codes=codes)
        for i in range(2):  # the labelled tokens are the last real tokens (caption + </s>)
            labelled = torch.nonzero(batch.labels[i] != -100).flatten()
            assert int(labelled[-1]) == int(batch.attention_mask[i].sum()) - 1
        stock = adapter.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        torch.testing.assert_close(adapter.forward_flow(batch, "U").loss, stock.loss)
        # codebook logits == image-code columns of the stock forward's full-vocabulary logits
        g = adapter.build_generation(self.captions, codes, self.mask(adapter))
        full = adapter.model(input_ids=g.input_ids, attention_mask=g.attention_mask).logits
        first = torch.nonzero(g.labels[0] != -100).flatten()
        expected = full[0, first - 1][:, adapter.image_token_ids]
        out = adapter.forward_flow(g, "G").logits[0, : len(first)]
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    def test_image_positions_skip_end_of_row_tokens(self, adapter, codes):
        batch = adapter.build_understanding(self.prompts, self.captions, codes=codes)
        rows, _ = adapter.image_grid
        for i in range(2):
            at_positions = batch.input_ids[i, batch.image_positions[i]]
            assert at_positions.tolist() == adapter.image_token_ids[codes[i]].tolist()
            eol = torch.nonzero(batch.input_ids[i] == adapter.special["eol"]).flatten()
            assert len(eol) == rows and not set(eol.tolist()) & set(
                batch.image_positions[i].tolist()
            )
            assert batch.input_ids[i, :2].tolist() == [
                adapter.tokenizer.bos_token_id,
                adapter.special["boi"],
            ]

    def test_the_image_size_and_mask_token_are_saved(self, tmp_path):
        adapter = Emu3Adapter(config_overrides={"image_size": 16}, mask_token="<image>")
        adapter.save_pretrained(tmp_path / "ckpt")
        loaded = Emu3Adapter.from_pretrained(tmp_path / "ckpt")
        assert (loaded.image_size, loaded.image_grid, loaded.mask_token) == (16, (4, 4), "<image>")
