"""Generation-flow masks over the image-token grid, and per-sample prompt choice (paper Sec. 3.1).

The generation flow reconstructs masked VQ tokens; the mask ratio is ``r ~ U[min_ratio,
max_ratio]`` (paper: 0.2..0.6). Everything here is a pure function of ``(seed, key, epoch)``: the
random stream is seeded by a BLAKE2b hash of those three values (never Python's salted
``hash``), so a sample gets the same mask on any worker, rank or order, and a new one each epoch.

Rounding: the number of masked tokens is ``k = floor(r * N + 0.5)`` (round half up), then clamped
to ``[ceil(min_ratio * N), floor(max_ratio * N)]`` so that ``k / N`` always lies in the ratio
range (when that integer range is empty, for a tiny grid, to ``[1, N]``); ``k >= 1`` always,
so every sample has a generation target.

Patterns:

* ``dispersed`` (default, the paper's choice): ``k`` positions drawn uniformly without
  replacement.
* ``contiguous`` (the paper's ablation): one spatial block with exactly ``k`` tokens. Its width is
  ``w = min(cols, ceil(sqrt(k)))`` and its height ``h = ceil(k / w)`` (if ``h > rows``:
  ``h = rows, w = ceil(k / rows)``); it is placed at a uniform random top-left corner and filled
  in raster order, so all its rows are full except possibly the last, which is filled from the
  left. The block is thus a rectangle when ``w`` divides ``k``, and otherwise a rectangle minus the
  right end of its last row: always one 4-connected region with the same ratio as the dispersed
  mask (a plain raster run would wrap across rows and be a thin stripe, not a block).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MASK_PATTERNS = ("dispersed", "contiguous")


def sample_rng(seed: int, key: str, epoch: int, stream: str) -> np.random.Generator:
    """Independent random stream per (seed, key, epoch, stream name), stable across processes."""
    text = f"{seed}\x1f{key}\x1f{epoch}\x1f{stream}".encode()
    digest = hashlib.blake2b(text, digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def mask_count(ratio: float, n: int, min_ratio: float, max_ratio: float) -> int:
    """Tokens to mask for ratio ``ratio`` of ``n`` (see the module docstring for the rounding)."""
    k = math.floor(ratio * n + 0.5)
    low, high = math.ceil(min_ratio * n - 1e-9), math.floor(max_ratio * n + 1e-9)
    if low > high:
        low, high = 1, n
    return int(min(max(k, low, 1), high, n))


def dispersed_mask(rng: np.random.Generator, grid: tuple[int, int], k: int) -> np.ndarray:
    """``k`` uniform random positions of the ``rows * cols`` grid -> bool (N,)."""
    n = grid[0] * grid[1]
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def block_shape(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """(h, w) of the contiguous block holding ``k`` tokens in raster order."""
    rows, cols = grid
    w = min(cols, math.ceil(math.sqrt(k)))
    h = math.ceil(k / w)
    if h > rows:
        h, w = rows, math.ceil(k / rows)
    return h, w


def contiguous_mask(rng: np.random.Generator, grid: tuple[int, int], k: int) -> np.ndarray:
    """One block of exactly ``k`` tokens at a random place -> bool (N,)."""
    rows, cols = grid
    h, w = block_shape(grid, k)
    top = int(rng.integers(0, rows - h + 1))
    left = int(rng.integers(0, cols - w + 1))
    block = np.zeros(h * w, dtype=bool)
    block[:k] = True  # raster fill: full rows, then the last row from the left
    mask = np.zeros((rows, cols), dtype=bool)
    mask[top : top + h, left : left + w] = block.reshape(h, w)
    return mask.reshape(-1)


def generation_mask(
    key: str,
    epoch: int,
    *,
    seed: int,
    grid: tuple[int, int],
    min_ratio: float = 0.2,
    max_ratio: float = 0.6,
    pattern: str = "dispersed",
) -> Tensor:
    """The generation-flow mask of one sample -> bool (N,), N = rows * cols, row-major."""
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"mask_pattern must be one of {MASK_PATTERNS}, got {pattern!r}")
    rng = sample_rng(seed, key, epoch, "mask")
    ratio = rng.uniform(min_ratio, max_ratio)
    k = mask_count(ratio, grid[0] * grid[1], min_ratio, max_ratio)
    build = dispersed_mask if pattern == "dispersed" else contiguous_mask
    return torch.from_numpy(build(rng, grid, k))


def batch_masks(keys: Sequence[str], epoch: int, **kwargs) -> Tensor:
    """Masks of a batch -> bool (B, N)."""
    return torch.stack([generation_mask(key, epoch, **kwargs) for key in keys])


def choose_prompt(key: str, epoch: int, seed: int, prompts: Sequence[str]) -> str:
    """The understanding-flow prompt of one sample, uniform over ``prompts``."""
    if len(prompts) == 1:
        return prompts[0]
    return prompts[int(sample_rng(seed, key, epoch, "prompt").integers(len(prompts)))]


def check_mask_config(min_ratio: float, max_ratio: float, pattern: str) -> None:
    """Raise a clear error for an unusable ratio range or pattern."""
    if not 0.0 < min_ratio <= max_ratio <= 1.0:
        raise ValueError(
            f"mask ratios need 0 < mask_ratio_min <= mask_ratio_max <= 1, "
            f"got {min_ratio}..{max_ratio}"
        )
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"mask_pattern must be one of {MASK_PATTERNS}, got {pattern!r}")
