"""Chameleon adapter: the conformance suite plus its own facts (tiny random config)."""

import pytest
import torch

from diva_lightning.backbones.chameleon import ChameleonAdapter, image_token_name
from diva_lightning.testing import AdapterConformance


class TestChameleon(AdapterConformance):
    adapter_class = ChameleonAdapter

    def test_image_token_names_follow_the_vocabulary_map(self, adapter):
        assert image_token_name(120) == "IMGIMGBCAZ"
        assert adapter.image_token_ids[120] == adapter.tokenizer.get_vocab()["IMGIMGBCAZ"]
        # codebook indices mapped through the vocabulary map give the LM ids of get_image_tokens
        pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        lm_ids = adapter.model.model.get_image_tokens(pixels * 2 - 1)  # (B, N) int32 LM ids
        got = adapter.tokenize_images(pixels)
        assert adapter.codebook_size == 256
        assert got.shape == (2, 64) and torch.equal(adapter.image_token_ids[got], lm_ids.long())

    def test_generation_loss_is_finite_unlike_the_stock_forward(self, adapter, codes):
        batch = adapter.build_generation(self.captions, codes, self.mask(adapter))
        assert torch.isfinite(adapter.forward_flow(batch, "G").loss)

    def test_a_saved_mask_token_is_restored_and_there_is_no_decoder(self, codes, tmp_path):
        torch.manual_seed(3)
        adapter = ChameleonAdapter(mask_token="<reserved00007>").eval()  # a non-default mask
        adapter.save_pretrained(tmp_path / "ckpt")
        loaded = ChameleonAdapter.from_pretrained(tmp_path / "ckpt").eval()
        assert loaded.mask_token == "<reserved00007>"
        batch = loaded.build_generation(self.captions, codes, self.mask(loaded))
        at = batch.input_ids[0, batch.image_positions[0]][self.mask(loaded)[0]]
        assert (at == loaded.tokenizer.get_vocab()["<reserved00007>"]).all()
        assert not ChameleonAdapter.can_decode_images()
        with pytest.raises(NotImplementedError, match="no decoder"):
            adapter.decode_images(codes)
        with pytest.raises(ValueError, match="is a layout token"):
            ChameleonAdapter(mask_token="<eoss>")

    def test_config_overrides_apply_and_vocabulary_map_matches_tokenizer(self):
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
