"""Liquid's image tokenizer (Chameleon VQGAN) and preprocessing against the reference's golden outputs.

Fixtures: ``tests/fixtures/liquid-vqgan`` (tiny random VQGAN run through Liquid's unmodified
``vqgan.py`` / ``image_tokenizer.py``; see its README). Codes exactly, floats 1e-5 (fp32, CPU).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from diva_lightning.backbones.liquid.preprocess import (
    PAD_COLOR,
    pad_to_square,
    preprocess,
    to_rgb,
    to_uint8,
)
from diva_lightning.backbones.liquid.vqgan import ChameleonVQGAN, load_vqgan, save_vqgan, tiny_vqgan

HERE = Path(__file__).parent / "fixtures" / "liquid-vqgan"
NAMES = ["rgb_square", "rgb_wide", "rgba_half_transparent", "grey_large"]


@pytest.fixture(scope="module")
def fixtures() -> dict[str, torch.Tensor]:
    return load_file(HERE / "fixtures.safetensors")


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(HERE / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def model() -> ChameleonVQGAN:
    return load_vqgan(HERE)


def test_all_checkpoint_keys_used(model, checkpoint):
    sd = model.reference_state_dict()
    assert len(checkpoint) == 155 and set(sd) == set(checkpoint)
    for key, value in checkpoint.items():
        assert sd[key].dtype == torch.float32, key
        assert torch.equal(sd[key], value.float()), key
    assert (model.codebook_size, model.grid, model.resolution) == (64, 8, 16)
    assert not model.training


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_keys(checkpoint, change):
    sd = dict(checkpoint)
    if change == "missing":
        key = "decoder.up.1.attn.1.q.weight"
        del sd[key]
    else:
        key = "decoder.up.0.attn.0.q.weight"
        sd[key] = torch.zeros(1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny_vqgan().load_reference_state_dict(sd)


@pytest.mark.parametrize("name", NAMES)
def test_parity(model, fixtures, name):
    x = preprocess(Image.open(HERE / f"{name}.png"), 16)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, fixtures[f"{name}.input"], atol=1e-6, rtol=0)
    with torch.no_grad():
        pre_quant = model.pre_quant(x)
        codes = model.encode(x)
        decoded = model.decode(fixtures[f"{name}.codes"])
    torch.testing.assert_close(pre_quant, fixtures[f"{name}.pre_quant"], atol=1e-5, rtol=0)
    assert codes.dtype == torch.int64 and torch.equal(codes, fixtures[f"{name}.codes"])
    torch.testing.assert_close(decoded, fixtures[f"{name}.decoded"], atol=1e-5, rtol=0)
    image = to_uint8(decoded)
    assert image.shape == (1, 16, 16, 3) and image.dtype == torch.uint8
    expected = fixtures[f"{name}.decoded_uint8"]
    diff = (image[0].int() - expected.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99
    assert torch.equal(to_uint8(decoded[0]), image[0])


def test_decode_unclamped_and_square_grid(model, fixtures):
    codes = torch.cat([fixtures[f"{n}.codes"] for n in NAMES])  # (4, 64) batch
    with torch.no_grad():
        decoded = model.decode(codes)
    expected = torch.cat([fixtures[f"{n}.decoded"] for n in NAMES])
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="square"):
        model.decode(codes[:, :63])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_vqgan(codebook_size=32, ch_mult=[1, 1, 2], attn_resolutions=[])
    torch.manual_seed(0)
    again = tiny_vqgan(32, ch_mult=[1, 1, 2], attn_resolutions=[]).reference_state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.reference_state_dict().items())
    folder = save_vqgan(model, tmp_path / "vq")
    assert sorted(p.name for p in folder.iterdir()) == ["vqgan.ckpt", "vqgan.yaml"]
    loaded = load_vqgan(folder)
    assert loaded.ddconfig == model.ddconfig and loaded.codebook_size == 32 and loaded.grid == 4
    a, b = model.reference_state_dict(), loaded.reference_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.shape == (2, 16) and torch.equal(loaded.encode(x), codes)
        assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert (
        load_vqgan(folder / "vqgan.yaml", dtype=torch.bfloat16).decoder.conv_in.weight.dtype
        == torch.bfloat16
    )


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vqgan.yaml"):
        load_vqgan(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="vqgan.yaml"):
        load_vqgan(tmp_path)
    (tmp_path / "vqgan.yaml").write_text((HERE / "vqgan.yaml").read_text())
    with pytest.raises(FileNotFoundError, match=r"vqgan\.ckpt"):
        load_vqgan(tmp_path)
    (tmp_path / "vqgan.ckpt").write_bytes((HERE / "vqgan.ckpt").read_bytes())
    (tmp_path / "vqgan.yaml").write_text(
        yaml.safe_dump({"model": {"params": {"n_embed": 64, "embed_dim": 8}}})
    )
    with pytest.raises(ValueError, match=r"vqgan\.yaml.*model\.params\.ddconfig"):
        load_vqgan(tmp_path)
    config = yaml.safe_load((HERE / "vqgan.yaml").read_text())
    config["model"]["params"]["ddconfig"]["double_z"] = True
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="double_z"):
        load_vqgan(tmp_path)
    config["model"]["params"]["ddconfig"]["double_z"] = False
    config["model"]["params"]["n_embed"] = 32  # codebook shape no longer fits: named file
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"vqgan\.ckpt"):
        load_vqgan(tmp_path)


def test_transparency_rule():
    rgba = np.full((2, 3, 4), 255, dtype=np.uint8)
    rgba[0, 1] = (10, 200, 101, 64)  # a = 64/255: (1 - a) * 255 + a * v, truncated
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (2, 3, 3)
    assert tuple(out[0, 1]) == (
        193,
        241,
        216,
    )  # 191 + 2.51 -> 193, 191 + 50.2 -> 241, 191 + 25.35 -> 216
    assert (np.delete(out.reshape(-1, 3), 1, axis=0) == 255).all()
    rgba[0, 1, 3] = 255  # fully opaque: a plain conversion, no blending
    opaque = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert opaque.mode == "RGB" and tuple(np.asarray(opaque)[0, 1]) == (10, 200, 101)
    grey = to_rgb(Image.new("L", (2, 2), 7))
    assert grey.mode == "RGB" and (np.asarray(grey) == 7).all()


def test_pad_to_square():
    image = Image.fromarray(np.zeros((2, 4, 3), dtype=np.uint8))  # 4 wide, 2 high
    square = np.asarray(pad_to_square(image))
    assert square.shape == (4, 4, 3)
    assert (square[0] == PAD_COLOR).all() and (square[3] == PAD_COLOR).all()
    assert (square[1:3] == 0).all()
    x = preprocess(image, 8, pad=True)
    assert x.shape == (1, 3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_to_uint8():
    decoded = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 3, 1, 2)
    assert to_uint8(decoded).reshape(-1).tolist() == [0, 127, 255, 0, 254, 255]
