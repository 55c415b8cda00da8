"""Nexus-Gen's frozen vision tower: understanding inputs and generation targets.

Pixels are turned into patches by transformers' own ``Qwen2VLImageProcessorPil`` (CLIP mean
and std, 14 px patches duplicated to 2 frames, merge groups of 2 x 2 consecutive): bit-exact
with the values their 4.49 processor gave (golden fixtures). The tower (merger included)
returns the merged embeddings in ``pooler_output`` under transformers 5.x.

- Understanding: the user's image at its native size (capped at ``UNDERSTANDING_MAX_PIXELS``);
  the tower's output replaces its pads in the input.
- Generation targets: the image resized to 252 x 252 (PIL's default filter, as their template),
  18 x 18 patches merged 2 x 2 -> 81 embeddings, computed on the fly and detached.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

TARGET_SIZE = 252  # 18 x 18 patches of 14 px -> 81 merged embeddings
UNDERSTANDING_MAX_PIXELS = 262_640


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:  # (3, H, W) -> HWC
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:  # floats in [0, 1]
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def patches(images: list, target: bool) -> tuple[Tensor, Tensor]:
    """Images (PIL, uint8 HWC arrays or float (3, H, W) in [0, 1]) -> (pixel_values (P, 1176),
    grid_thw (n, 3)). ``target``: resized to 252 x 252 (generation targets); else native size
    within the understanding pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    pil = [_pil(i) for i in images]
    if target:
        pil = [i.resize((TARGET_SIZE, TARGET_SIZE)) for i in pil]
    processor = Qwen2VLImageProcessorPil(max_pixels=UNDERSTANDING_MAX_PIXELS)
    out = processor(images=pil, do_resize=not target, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def tower_embeds(visual, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
    """The frozen tower (merger included) -> merged embeddings (n_tokens, D), in pad order."""
    out = visual(pixel_values.to(next(visual.parameters()).dtype), grid_thw=grid_thw)
    return getattr(out, "pooler_output", out)


@torch.no_grad()
def generation_targets(visual, images: list) -> Tensor:
    """Images -> (B, 81, D) detached target embeddings."""
    pixel_values, grid = patches(images, target=True)
    embeds = tower_embeds(visual, pixel_values.to(next(visual.parameters()).device), grid)
    return embeds.reshape(len(images), -1, embeds.shape[-1])
