"""Robust per-sample decoding: image bytes -> RGB pixels, caption, optional VQ codes.

Every failure becomes ``SkipSample(reason, cause)`` (reasons in ``skips.REASONS``); the stream
wrapper ``decode_stream`` records it and goes on. Images that are unusual but valid are converted,
not skipped:

* grayscale / bilevel / CMYK / YCbCr / palette -> RGB with Pillow's conversions;
* alpha (RGBA, LA, palette with transparency, premultiplied) -> composited on white;
* 16-bit (``I;16*``, ``I``) -> scaled by 1/65535 (a plain ``convert("RGB")`` would clip them to
  white); ``F`` images are taken as [0, 1] and clipped;
* EXIF orientation is applied.

Size: the header is checked before decoding (``max_image_pixels``, a decompression-bomb guard;
Pillow's own bomb error maps to the same reason, ``too_large``) and ``min_image_side``. Then the
shorter side is resized to ``image_size`` (bicubic, antialiased; JPEGs use Pillow's ``draft``
to decode at a reduced DCT scale that is still >= the target) and the centre square is cropped.
Pixels leave this module as ``uint8 (3, S, S)``: a quarter of the bytes of float through the
worker queues; the main process scales them to float [0, 1].
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from diva_lightning.data.skips import SkipCounter

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
CODES_KEY = "codes.npy"
ALPHA_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class SkipSample(Exception):
    """A bad sample: ``reason`` is a key of ``skips.REASONS``."""

    def __init__(self, reason: str, cause: str):
        super().__init__(f"{reason}: {cause}")
        self.reason, self.cause = reason, cause


# ---- images ----------------------------------------------------------------------------------
def open_image(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Open lazily and check the header size; nothing is decoded yet."""
    if not data:
        raise SkipSample("empty_image", "zero-byte image member")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own guard (2 x 89 MP) would overrule ``max_pixels`` either way: it is lifted
        # while the header is read, and ``max_pixels`` is checked just below, before decoding.
        Image.MAX_IMAGE_PIXELS = None
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exn:
        raise SkipSample("not_an_image", f"not an image ({len(data)} bytes)") from exn
    except Exception as exn:  # broken headers raise all sorts
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from exn
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("too_large", f"{width}x{height} > max_image_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise SkipSample("too_small", f"{width}x{height}: a side < min_image_side={min_side}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode in SIXTEEN_BIT or mode == "F":
        values = np.asarray(image, dtype=np.float32)  # (H, W)
        scaled = values if mode == "F" else values / 65535.0
        gray = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def decode_rgb(
    data: bytes,
    max_pixels: int = 40_000_000,
    min_side: int = 8,
    draft: int | None = None,
    convert: bool = True,
) -> Image.Image:
    """Image bytes -> checked, fully decoded RGB image. ``draft``: let a JPEG decode at a reduced
    DCT scale whose sides stay >= ``draft`` (much faster for large photos). ``convert=False``
    leaves the mode as decoded (for a backbone's own ``image_preprocess``)."""
    image = open_image(data, max_pixels, min_side)
    try:
        if draft is not None and image.format == "JPEG":
            image.draft(None, (draft, draft))
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exn:
        raise SkipSample("too_large", str(exn)) from exn
    except Exception as exn:  # truncated data, broken chunks, bad EXIF ...
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from exn
    try:
        return to_rgb(image) if convert else image
    except Exception as exn:
        raise SkipSample("other", f"cannot convert mode {image.mode} to RGB: {exn}") from exn


def load_pixels(
    data: bytes,
    size: int,
    max_pixels: int = 40_000_000,
    min_side: int = 8,
    preprocess: Callable[[Image.Image, int], Image.Image] | None = None,
) -> Tensor:
    """Image bytes -> uint8 (3, size, size): checked, decoded, RGB, resized, centre-cropped."""
    image = decode_rgb(data, max_pixels, min_side, draft=size, convert=preprocess is None)
    return image_pixels(image, size, preprocess)


def image_pixels(
    image: Image.Image,
    size: int,
    preprocess: Callable[[Image.Image, int], Image.Image] | None = None,
) -> Tensor:
    """A decoded image -> uint8 (3, size, size): RGB, shorter side resized, centre-cropped (the
    training data's own preprocessing, also used for images handed in at evaluation), or the
    backbone's own ``preprocess`` (its ``image_preprocess``: PIL image, size -> RGB size x size,
    e.g. Liquid's transparency rule and pad to a square)."""
    if preprocess is not None:
        image = preprocess(image, size)
    else:
        image = ImageOps.fit(to_rgb(image), (size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, S, S)


# ---- captions and codes ----------------------------------------------------------------------
def _utf8(raw: bytes | str, what: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exn:
        raise SkipSample("bad_caption_encoding", f"{what} is not UTF-8: {exn}") from exn


def decode_caption(
    sample: dict, key: str = "txt", field: str | None = None, source: str | None = None
) -> str:
    """Caption from member ``key`` (text), or from dotted ``field`` of the JSON member ``key``.
    ``source`` names where the caption came from in messages (default: the member)."""
    raw = sample.get(key)
    if raw is None:
        raise SkipSample("missing_caption", f"no '{key}' member")
    text = _utf8(raw, source or f"member '{key}'")
    if field is not None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exn:
            raise SkipSample("bad_json", f"'{key}' does not parse: {exn}") from exn
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, str):
            raise SkipSample("missing_caption", f"no string field '{field}' in '{key}'")
        text = value
    text = " ".join(text.split())
    if not text:
        raise SkipSample("empty_caption", "caption is empty or whitespace")
    return text


def decode_codes(data: bytes, grid: tuple[int, int], codebook_size: int | None) -> Tensor:
    """``codes.npy`` bytes -> long (N,); shape (N,) or (rows, cols), values in the codebook."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:
        raise SkipSample("corrupt_codes", f"codes.npy does not load: {exn}") from exn
    problem = codes_problem(array.shape, array.dtype, grid)
    if problem is None and codebook_size is not None and array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= codebook_size:
            problem = f"codes in [{low}, {high}] outside the codebook [0, {codebook_size})"
    if problem is not None:
        raise SkipSample("bad_codes", problem)
    return torch.from_numpy(array.reshape(-1).astype(np.int64))  # (N,)


def codes_problem(shape: tuple, dtype: np.dtype, grid: tuple[int, int]) -> str | None:
    """Why codes of this shape/dtype do not fit ``grid`` (None when they fit)."""
    rows, cols = grid
    if not np.issubdtype(dtype, np.integer):
        return f"codes.npy has dtype {dtype}, expected integers"
    if tuple(shape) not in ((rows * cols,), (rows, cols)):
        return (
            f"codes.npy has shape {tuple(shape)} but the backbone's image grid is "
            f"{(rows, cols)} ({rows * cols} tokens)"
        )
    return None


def check_member_names(sample: dict, known: tuple[str, ...]) -> None:
    """Skip a sample whose member names hold dots before the extension, naming the cause.

    WebDataset's convention, kept here: a member's key ends at the first dot of its name and
    the rest is the extension, so ``photo.v2.final.jpg`` is key ``photo`` with extension
    ``v2.final.jpg``, which no reader expects. Splitting at the last dot instead would break
    multi-part extensions such as ``codes.npy``, and samples sharing a prefix would merge.
    ``diva-cli prepare`` writes names without such dots."""
    dotted = [k for k in sample if not k.startswith("__") and "." in k and k not in known]
    if not dotted or any(k in sample for k in known if k != "json"):
        return
    key = sample.get("__key__")
    names = ", ".join(f"'{key}.{ext}'" for ext in sorted(dotted))
    raise SkipSample(
        "dotted_name",
        f"members {names}: WebDataset ends a key at the first dot, so the extension read is "
        f"'{sorted(dotted)[0]}'. Rename the files with no dot before the extension (as "
        "`diva-cli prepare` writes them).",
    )


# ---- one sample, one stream ------------------------------------------------------------------
@dataclass
class SampleDecoder:
    """Turns one WebDataset sample (dict of raw members) into the data module's sample."""

    image_size: int
    grid: tuple[int, int]
    codebook_size: int | None = None
    caption_key: str = "txt"
    caption_field: str | None = None
    image_keys: tuple[str, ...] = IMAGE_KEYS
    use_codes: bool = False
    decode_pixels: bool = True
    max_image_pixels: int = 40_000_000
    min_image_side: int = 8
    preprocess: Callable[[Image.Image, int], Image.Image] | None = None  # the backbone's

    def __call__(self, sample: dict) -> dict:
        check_member_names(sample, (self.caption_key, "json", CODES_KEY, *self.image_keys))
        caption = decode_caption(sample, self.caption_key, self.caption_field)
        codes = pixels = None
        if self.use_codes:
            if CODES_KEY not in sample:
                raise SkipSample("missing_codes", f"no '{CODES_KEY}' member")
            codes = decode_codes(sample[CODES_KEY], self.grid, self.codebook_size)
        if self.decode_pixels:
            image_key = next((k for k in self.image_keys if k in sample), None)
            if image_key is None:
                raise SkipSample("missing_image", f"none of {list(self.image_keys)} present")
            size, ceiling, side = self.image_size, self.max_image_pixels, self.min_image_side
            pixels = load_pixels(sample[image_key], size, ceiling, side, self.preprocess)
        key, url = sample.get("__key__"), sample.get("__url__")
        return {"key": key, "url": url, "caption": caption, "pixels": pixels, "codes": codes}


def decode_stream(
    samples: Iterable[dict], decoder: SampleDecoder, counter: SkipCounter
) -> Iterator[dict]:
    """Decode each sample; a bad one is recorded in ``counter`` (key, url, cause) and skipped."""
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            out = decoder(sample)
        except SkipSample as skip:
            counter.add(skip.reason, key, url, skip.cause)
            continue
        except Exception as exn:  # never let one sample end the run
            counter.add("other", key, url, f"{type(exn).__name__}: {exn}")
            continue
        counter.add_kept()
        yield out
