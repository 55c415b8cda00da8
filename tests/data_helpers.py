"""Shared helpers of the data tests: image bytes of every kind, tar writing, a fake adapter."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import webdataset as wds
from PIL import Image

from diva_lightning.data.prepare import prepare


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png16_rgb(width: int, height: int, value: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    row = b"\x00" + struct.pack(">HHH", *value) * width
    raw = zlib.compress(row * height)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header claiming a huge image (a decompression bomb; no pixel data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b"")


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def rgb(size: int = 40, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def bad_shard_samples() -> tuple[list[dict], list[str], dict[str, int]]:
    """One of every kind of bad sample, and the valid-but-unusual images that must be kept.

    Returns (samples, kept keys in order, skip counts by reason) for
    ``max_image_pixels=2500, min_image_side=4`` (good images are 40x40 = 1600 pixels).
    """
    cap = {"txt": "a red square."}
    gray16 = Image.fromarray(np.full((40, 40), 32768, np.uint16))  # mode I;16
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    truncated = encode(rgb(), "JPEG")
    samples = [
        {"__key__": "good_rgb", "jpg": encode(rgb(), "JPEG"), **cap},
        {"__key__": "good_gray", "png": encode(Image.new("L", (40, 40), 100)), **cap},
        {"__key__": "good_rgba", "png": encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0))), **cap},
        {"__key__": "good_cmyk", "jpg": encode(cmyk, "JPEG"), **cap},
        {"__key__": "good_gray16", "png": encode(gray16), **cap},
        {"__key__": "good_rgb16", "png": png16_rgb(40, 40, (65535, 0, 0)), **cap},
        {"__key__": "good_palette", "png": encode(palette, transparency=0), **cap},
        {"__key__": "corrupt", "jpg": truncated[: len(truncated) // 2], **cap},
        {"__key__": "zero_bytes", "jpg": b"", **cap},
        {"__key__": "not_image", "jpg": b"<html>not an image</html>", **cap},
        {"__key__": "no_caption", "png": encode(rgb())},
        {"__key__": "empty_caption", "png": encode(rgb()), "txt": "  \n "},
        {"__key__": "latin1_caption", "png": encode(rgb()), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "one_pixel", "png": encode(rgb(1)), **cap},
        {"__key__": "large", "png": encode(rgb(60)), **cap},
        {"__key__": "bomb", "png": bomb_png(), **cap},
        {"__key__": "no_image", **cap},
    ]
    kept = [s["__key__"] for s in samples if s["__key__"].startswith("good")]
    skips = {
        "corrupt_image": 1,
        "empty_image": 1,
        "not_an_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_caption_encoding": 1,
        "too_small": 1,
        "too_large": 2,
        "missing_image": 1,
    }
    return samples, kept, skips


def fake_adapter(image_size=32, grid=(4, 4), codebook_size=256, needs_pixels=False):
    """The backbone facts a data module reads (duck-typed ``BackboneAdapter``)."""
    return SimpleNamespace(
        image_size=image_size,
        image_grid=grid,
        codebook_size=codebook_size,
        needs_pixels_for_understanding=needs_pixels,
    )


def synthetic_shards(out: Path, count: int, max_count: int, **kwargs) -> list[str]:
    """Shapes-world shards (PNG by default); returns their paths."""
    summary = prepare(out=str(out), synthetic=count, max_count=max_count, quiet=True, **kwargs)
    return [str(out / shard["name"]) for shard in summary["shards"]]
