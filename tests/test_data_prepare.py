"""``diva-cli prepare``: folders with sidecar txt / JSONL / CSV captions, bad inputs counted, the
synthetic world through the CLI, and pre-tokenised shards equal to the adapter's own VQ codes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.cli import main
from diva_lightning.data import DualFlowDataModule
from diva_lightning.data.prepare import prepare
from tests.data_helpers import encode, rgb


def read_shards(out) -> list[dict]:
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


@pytest.fixture
def images(tmp_path):
    """Good images of several modes and bad ones, with sidecar captions where stated."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    jpeg = encode(rgb(48), "JPEG")
    files = {
        "a.jpg": jpeg,
        "b.png": encode(Image.new("RGBA", (40, 30), (0, 0, 255, 128))),
        "sub/c.png": encode(Image.new("L", (40, 40), 7)),
        "bad.jpg": b"GIF89a? no, just text",
        "trunc.jpg": jpeg[: len(jpeg) // 2],
        "zero.jpg": b"",
        "nocap.png": encode(rgb()),
        "empty.png": encode(rgb()),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for name in ("a", "b", "sub/c", "bad", "trunc", "zero"):
        (folder / f"{name}.txt").write_text(f"a red square. ({name})")
    (folder / "empty.txt").write_text("  ")
    (folder / "notes.md").write_text("not an image, ignored")
    return folder


def test_prepare_sidecar_folder(images, tmp_path):
    out = tmp_path / "shards"
    summary = prepare(out=str(out), images=str(images), max_count=2, quiet=True)
    assert summary["written"] == 3
    assert summary["skipped"] == {
        "not_an_image": 1,
        "corrupt_image": 1,
        "empty_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
    }
    assert summary["shards"] == [
        {"name": "shard-000000.tar", "count": 2},
        {"name": "shard-000001.tar", "count": 1},
    ]
    assert json.loads((out / "summary.json").read_text()) == summary
    samples = read_shards(out)
    sources = [json.loads(s["json"])["source"] for s in samples]
    assert sources == ["a.jpg", "b.png", "sub/c.png"]
    assert [s["txt"].decode() for s in samples] == [f"a red square. ({n})" for n in "ab"] + [
        "a red square. (sub/c)"
    ]
    assert "jpg" in samples[0] and "png" in samples[1]  # bytes kept as they were
    with pytest.raises(FileExistsError, match="already holds 2"):
        prepare(out=str(out), images=str(images), quiet=True)


def test_prepare_jsonl_and_csv(images, tmp_path):
    lines = [
        json.dumps({"image": "a.jpg", "caption": "a red square."}),
        json.dumps({"path": "bad.jpg", "text": "a blue circle."}),
        json.dumps({"image": "ghost.png", "caption": "a green star."}),
        "{not json",
        json.dumps({"image": "sub/c.png"}),
        "",
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes("\n".join(lines).encode() + b'\n{"image": "a.jpg", "caption": "caf\xe9"}\n')
    summary = prepare(out=str(tmp_path / "j"), images=str(images), captions=str(jsonl), quiet=True)
    assert summary["written"] == 1
    assert summary["skipped"] == {
        "not_an_image": 1,
        "missing_image": 1,
        "bad_json": 1,
        "missing_caption": 1,
        "bad_caption_encoding": 1,
    }
    csv_file = images / "pairs.csv"  # relative paths resolve next to the csv by default
    csv_file.write_text(
        'path,caption\na.jpg,"a red square, big."\nb.png,a blue square.\n'
        "trunc.jpg,a yellow star.\nsub/c.png,\nghost.png,a cyan ring.\n"
    )
    summary = prepare(out=str(tmp_path / "c"), captions=str(csv_file), quiet=True)
    assert summary["written"] == 2
    assert summary["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1}
    captions = [s["txt"].decode() for s in read_shards(tmp_path / "c")]
    assert captions == ["a red square, big.", "a blue square."]


def test_cli_prepare_synthetic(tmp_path):
    out = tmp_path / "syn"
    main(["prepare", str(out), "--synthetic", "12", "--max_count", "5", "--quiet", "true"])
    summary = json.loads((out / "summary.json").read_text())
    assert [s["count"] for s in summary["shards"]] == [5, 5, 2] and summary["codes"] is None
    samples = read_shards(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(12)]
    assert all("png" in s and json.loads(s["json"])["objects"] for s in samples)


def test_cli_prepare_with_backbone_class_path(tmp_path):
    out = tmp_path / "coded"
    args = ["prepare", str(out), "--synthetic", "4", "--quiet", "true"]
    main([*args, "--backbone", "diva_lightning.backbones.emu3.Emu3Adapter"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codes"]["image_grid"] == [8, 8] and summary["codes"]["codebook_size"] == 256
    for sample in read_shards(out):
        codes = np.load(io.BytesIO(sample["codes.npy"]))
        assert codes.shape == (8, 8) and codes.dtype == np.int32
        assert codes.min() >= 0 and codes.max() < 256


def test_pretokenised_codes_equal_the_adapters_vq(tmp_path):
    """JPEG shards of 64 px images (resized to the adapter's 32 px): codes written by prepare ==
    adapter.tokenize_images(pixels the data module decodes from the same shards)."""
    torch.manual_seed(0)
    adapter = Emu3Adapter.tiny()
    out = tmp_path / "coded"
    prepare(
        out=str(out),
        synthetic=12,
        backbone=adapter,
        image_format="jpg",
        synthetic_image_size=64,
        max_count=6,
        batch_size=5,
        quiet=True,
    )

    def batches(**kwargs) -> dict[str, tuple]:
        dm = DualFlowDataModule(val_shards=str(out), num_workers=0, batch_size=4, **kwargs)
        dm.bind_backbone(adapter)
        dm.setup("validate")
        rows = {}
        for b in dm.make_loader("val"):
            for i, key in enumerate(b.keys):
                pixels = b.pixels[i] if b.pixels is not None else None
                rows[key] = (b.codes[i] if b.codes is not None else None, pixels)
        return rows

    coded, decoded, both = batches(), batches(use_codes=False), batches(keep_pixels=True)
    assert len(coded) == 12 and coded.keys() == decoded.keys() == both.keys()
    keys = sorted(coded)
    assert all(coded[k][1] is None for k in keys)  # codes suffice: pixels not decoded
    pixels = torch.stack([decoded[k][1] for k in keys])  # (12, 3, 32, 32)
    expected = adapter.tokenize_images(pixels)  # (12, 64)
    assert torch.equal(torch.stack([coded[k][0] for k in keys]), expected)
    assert torch.equal(torch.stack([both[k][1] for k in keys]), pixels)
    assert torch.equal(torch.stack([both[k][0] for k in keys]), expected)
    assert len(set(expected.flatten().tolist())) > 1
