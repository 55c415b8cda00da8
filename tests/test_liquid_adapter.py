"""Liquid adapter (causal LM + VQ codes appended to the vocabulary): the conformance suite on a
tiny Gemma with a tiny Chameleon VQGAN, and the layouts spelled out token by token."""

import shutil

import pytest
import torch

from diva_lightning.backbones.liquid.adapter import LiquidAdapter
from diva_lightning.testing import AdapterConformance


class TestLiquid(AdapterConformance):
    adapter_class = LiquidAdapter

    def tokens(self, adapter, ids):
        return adapter.tokenizer.convert_ids_to_tokens(list(ids))

    def test_the_understanding_layout_token_by_token(self, adapter, codes):
        batch = adapter.build_understanding(
            ["describe this image ."], ["a red circle ."], codes=codes[:1]
        )
        ids = batch.input_ids[0].tolist()
        n = adapter.tokens_per_image
        head = ["<bos>", "<start_of_turn>", "user", "\n", "<boi>"]
        tail = ["<eoi>", "\n", "describe", "this", "image", ".", "<end_of_turn>", "\n"]
        tail += ["<start_of_turn>", "model", "\n"]
        answer = ["a", "red", "circle", ".", "<end_of_turn>", "\n", "<eos>"]
        assert self.tokens(adapter, ids[:5]) == head
        assert ids[5 : 5 + n] == (adapter.code_offset + codes[0]).tolist()  # code c -> offset + c
        assert self.tokens(adapter, ids[5 + n :]) == tail + answer
        labelled = [
            t for t, label in zip(ids, batch.labels[0].tolist(), strict=True) if label != -100
        ]
        assert self.tokens(adapter, labelled) == answer
        assert adapter.code_offset == len(adapter.tokenizer)  # codes right after the text vocab

    def test_the_generation_layouts_token_by_token(self, adapter, codes):
        mask = torch.zeros(1, adapter.tokens_per_image, dtype=torch.bool)
        mask[0, 3] = True
        batch = adapter.build_generation(["a red circle ."], codes[:1], mask)
        ids = batch.input_ids[0].tolist()
        head = ["<bos>", "a", "red", "circle", ".", "generate", "an", "image", "based", "on"]
        head += ["this", "description", ".", "<boi>"]
        assert self.tokens(adapter, ids[: len(head)]) == head
        image = ids[len(head) : len(head) + adapter.tokens_per_image]
        assert self.tokens(adapter, [image[3]]) == ["<mask>"]
        assert image[4] == adapter.code_offset + int(codes[0, 4])
        assert self.tokens(adapter, ids[len(head) + adapter.tokens_per_image :]) == ["<eoi>"]
        blank = adapter.build_generation([""], codes[:1], mask).input_ids[0].tolist()
        assert self.tokens(adapter, blank[:3]) == ["<bos>", "<unconditional>", "<boi>"]

    def test_the_vqgan_and_settings_are_saved_in_the_original_format(self, adapter, tmp_path):
        adapter.save_pretrained(tmp_path / "ckpt")
        assert {"vqgan.yaml", "vqgan.ckpt", "diva_adapter.json"} <= {
            p.name for p in (tmp_path / "ckpt").iterdir()
        }
        shutil.move(tmp_path / "ckpt" / "vqgan.ckpt", tmp_path / "vqgan.ckpt")
        with pytest.raises(FileNotFoundError, match="vqgan_path: .*vqgan.ckpt"):
            LiquidAdapter.from_pretrained(tmp_path / "ckpt")
        shutil.copy(tmp_path / "ckpt" / "vqgan.yaml", tmp_path / "vqgan.yaml")
        loaded = LiquidAdapter.from_pretrained(tmp_path / "ckpt", vqgan_path=str(tmp_path))
        assert loaded.code_offset == adapter.code_offset and loaded.mask_token == "<mask>"

    def test_wrong_settings_are_refused(self):
        with pytest.raises(ValueError, match="unknown preset 'lumina'"):
            LiquidAdapter(preset="lumina")
        with pytest.raises(ValueError, match="exceeds the LM vocabulary"):
            LiquidAdapter(code_offset=10_000)
        with pytest.raises(ValueError, match="mask token '<boi>'"):
            LiquidAdapter(mask_token="<boi>")
        with pytest.raises(FileNotFoundError, match="pretrained_path"):
            LiquidAdapter(pretrained_path="/nonexistent/liquid-7b")


def test_the_reference_vqgan_through_the_adapter_matches_the_fixtures():
    """The adapter's tokenize / decode / uint8 path on the reference VQGAN (fixture README)."""
    from pathlib import Path

    from PIL import Image
    from safetensors.torch import load_file

    from diva_lightning.backbones.liquid.preprocess import preprocess

    folder = Path(__file__).parent / "fixtures" / "liquid-vqgan"
    golden = load_file(folder / "fixtures.safetensors")
    adapter = LiquidAdapter(vqgan_path=str(folder))
    assert adapter.image_size == 16 and adapter.codebook_size == 64
    for name in ("rgb_square", "rgb_wide", "rgba_half_transparent", "grey_large"):
        pixels = (preprocess(Image.open(folder / f"{name}.png"), 16) + 1) / 2  # [0, 1]
        assert torch.equal(adapter.tokenize_images(pixels), golden[f"{name}.codes"])
        images = adapter.to_uint8(adapter.decode_images(golden[f"{name}.codes"]))[0]
        difference = (images.int() - golden[f"{name}.decoded_uint8"].int()).abs()
        assert int(difference.max()) <= 1 and float((difference == 0).float().mean()) > 0.99


def test_the_data_pipeline_prepares_images_as_liquid_does():
    """Liquid's image_preprocess (transparency over white, pad to a square, LANCZOS) is what the
    loader and prepare use, not the default centre crop."""
    import io

    import numpy as np
    from PIL import Image

    from diva_lightning.backbones.liquid.preprocess import PAD_COLOR, preprocess
    from diva_lightning.data.decode import load_pixels

    rgba = np.random.default_rng(0).integers(0, 256, (24, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 128  # half transparent, 48 wide and 24 high
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    data = buffer.getvalue()
    adapter = LiquidAdapter()
    got = load_pixels(data, 32, preprocess=adapter.image_preprocess)  # uint8 (3, 32, 32)
    reference = (preprocess(Image.open(io.BytesIO(data)), 32, pad=True)[0] + 1) / 2 * 255
    assert float((got.float() - reference).abs().max()) < 1e-3
    assert got[:, 0, 16].tolist() == list(PAD_COLOR)  # the padding above the wide image
    assert not torch.equal(load_pixels(data, 32), got)  # the default crops instead
