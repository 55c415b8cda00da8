"""Liquid's image preprocessing around the Chameleon VQGAN (pixels <-> [-1, 1] tensors).

Reproduces the behaviour of Chameleon's ``image_tokenizer.py`` as Liquid ships it (commit 4609c47:
transparency whitening, shorter-side LANCZOS resize, centre crop, [-1, 1] scaling, and the way a
decoded tensor becomes an image) and the pad-to-square of Liquid's understanding script. It is
hand-written because transformers has no Liquid processor, and ``ChameleonImageProcessor`` resizes
and normalises differently; parity is pinned by ``tests/fixtures/liquid-vqgan``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Background colour of Liquid's understanding pad-to-square.
PAD_COLOR = (122, 116, 104)


def to_rgb(image: Image.Image) -> Image.Image:
    """Reference transparency rule: non-RGB -> RGBA; any alpha < 255 -> blended over white, else RGB.

    Blend: ``(1 - a) * 255 + a * rgb`` with ``a = alpha / 255`` in float64, truncated to uint8.
    """
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4) uint8
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:4] / 255.0  # (H, W, 1) float64
    blended = (1 - alpha) * 255 + alpha * rgba[:, :, :3]
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def pad_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Liquid understanding's pad to a square of side max(w, h), the image centred on ``color``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Reference: shorter side -> ``size`` (each side ``round(scale * side)``, LANCZOS), centre crop."""
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((round(scale * width), round(scale * height)), Image.Resampling.LANCZOS)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int, pad: bool = False) -> Tensor:
    """PIL image -> (1, 3, size, size) float32 in [-1, 1], as the reference feeds its VQGAN.

    ``pad=True`` first pads to a square (``PAD_COLOR``) and resizes to ``size`` with LANCZOS, as
    Liquid's understanding script does (512 there); the fixtures use ``pad=False``.
    """
    image = to_rgb(image)
    if pad:
        image = pad_to_square(image).resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(_resize_and_crop(image, size)) / 255.0 * 2 - 1  # (size, size, 3) float64
    return torch.from_numpy(array).permute(2, 0, 1).float().unsqueeze(0).contiguous()


def prepare_image(image: Image.Image, size: int) -> Image.Image:
    """Liquid's image preparation, as an RGB PIL image of ``size`` x ``size``: the transparency
    rule, the pad to a square (``PAD_COLOR``), then the reference resize (LANCZOS) and centre
    crop. The backbone's ``image_preprocess``: the data pipeline and evaluation use it."""
    return _resize_and_crop(pad_to_square(to_rgb(image)), size)


def to_uint8(decoded: Tensor) -> Tensor:
    """Decoded pixels (B, 3, H, W) or (3, H, W) in about [-1, 1] -> uint8 HWC (B, H, W, 3) / (H, W, 3).

    Reference: clamp to [-1, 1], ``(x + 1) / 2``, times 255, cast to uint8 by truncation.
    """
    if decoded.dim() not in (3, 4):
        raise ValueError(f"to_uint8 expects (B, 3, H, W) or (3, H, W), got {tuple(decoded.shape)}")
    x = (decoded.detach().float().clamp(-1, 1) + 1) / 2
    return (x * 255).to(torch.uint8).movedim(-3, -1).contiguous()
