"""A captioned image grid for TensorBoard: one row per sample, real | reconstruction |
generated, the true and the generated caption written under each row.

Written with PIL rather than ``torchvision.utils.make_grid``: torchvision is not a dependency of
this project (PyPI's builds do not load beside the CPU build of torch), and the captions are text
drawn on the picture, which ``make_grid`` does not do.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

CELL = 128  # pixels per image in the grid (small images are scaled up, nearest neighbour)
LINE = 12  # pixels per line of text
GAP = 4  # white pixels between the columns


def _tile(pixels: Tensor | None) -> Image.Image:
    """(3, H, W) in [0, 1] -> a CELL x CELL PIL image; None -> a grey tile."""
    if pixels is None:
        return Image.new("RGB", (CELL, CELL), (96, 96, 96))
    array = (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    return Image.fromarray(array.astype(np.uint8)).resize((CELL, CELL), Image.NEAREST)


def captioned_grid(
    columns: Sequence[Tensor | None],
    column_names: Sequence[str],
    lines: Sequence[Sequence[str]],
    width_chars: int = 60,
) -> Tensor:
    """Images per column ``(B, 3, H, W)`` (None: not available, a grey tile) and text lines per
    sample -> the grid as a ``(3, H, W)`` float tensor in [0, 1] (TensorBoard's CHW)."""
    rows = len(lines)
    font = ImageFont.load_default()
    wrapped = [[w for line in sample for w in textwrap.wrap(line, width_chars)] for sample in lines]
    heights = [CELL + LINE * (len(w) + 1) for w in wrapped]
    width = max((CELL + GAP) * len(columns), 6 * width_chars + 8)
    canvas = Image.new("RGB", (width, LINE + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(column_names):
        draw.text((c * (CELL + GAP) + 4, 0), name, fill=(0, 0, 0), font=font)
    top = LINE
    for r in range(rows):
        for c, images in enumerate(columns):
            canvas.paste(_tile(None if images is None else images[r]), (c * (CELL + GAP), top))
        for k, text in enumerate(wrapped[r]):
            draw.text((4, top + CELL + 2 + k * LINE), text, fill=(0, 0, 0), font=font)
        top += heights[r]
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0
