"""Show-o's attention masks (omni-attention) and its training-time masking of image tokens.

Behaviour of the official ``training/prompting_utils.py`` (``create_attention_mask_predict_next``,
``create_attention_mask_for_mmu``) and ``training/utils.py`` (``mask_or_random_replace_tokens``):

* Masks are additive float32 ``(B, 1, L, L)``: 0 = may attend, ``-2**63`` (the int64 minimum as
  float32, not the float32 minimum) = blocked. Omni-attention: text rows are causal, rows of the image
  block (``<|soi|>`` .. ``<|eoi|>`` inclusive) attend to every column.
* ``rm_pad_in_image`` (t2i training and generation) folds the left padding in: non-image rows after
  the last pad lose the pad prefix, rows from ``<|soi|>`` on lose every pad column; pad rows stay
  causal among pads so no row is fully blocked.
* MaskGIT training masking (cosine schedule): ``num_masked = round(N cos(t pi / 2))`` (at least 1),
  position ``j`` is masked iff ``argsort(noise)[j] < num_masked``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK_VALUE = float(torch.iinfo(torch.int64).min)  # -2**63, the official "blocked" value


def to_additive(allow: Tensor) -> Tensor:
    """bool (B, 1, L, L) True = attend -> float32 additive mask."""
    return torch.where(allow, 0.0, MASK_VALUE).to(torch.float32)


def image_block(ids: Tensor, soi_id: int, eoi_id: int) -> Tensor:
    """ids (B, L) -> bool (B, L), True from each ``<|soi|>`` to its ``<|eoi|>`` inclusive."""
    opened = torch.cumsum(ids == soi_id, dim=1)
    closed_before = torch.cumsum(ids == eoi_id, dim=1) - (ids == eoi_id).long()
    return opened > closed_before


def omni_attention_mask(
    ids: Tensor, pad_id: int, soi_id: int, eoi_id: int, rm_pad_in_image: bool = True
) -> Tensor:
    """Omni-attention for t2i sequences: ids (B, L) -> bool (B, 1, L, L), True = may attend."""
    length = ids.shape[1]
    allow = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    allow = allow.expand(ids.shape[0], length, length).clone()  # (B, L, L) causal
    in_image = image_block(ids, soi_id, eoi_id)  # (B, L)
    allow |= in_image.unsqueeze(-1)  # image rows see every column
    if rm_pad_in_image:
        index = torch.arange(length, device=ids.device)
        is_pad = ids == pad_id  # (B, L)
        last_pad = torch.where(is_pad, index, -1).amax(dim=1, keepdim=True)  # (B, 1), -1 = none
        after_pads = (index > last_pad) & ~in_image  # (B, L) rows
        pad_prefix = index <= last_pad  # (B, L) columns
        allow &= ~(after_pads.unsqueeze(-1) & pad_prefix.unsqueeze(1))
        is_soi = ids == soi_id
        first_soi = torch.where(is_soi, index, length).amin(dim=1, keepdim=True)  # (B, 1)
        from_soi = index >= first_soi  # (B, L) rows
        allow &= ~(from_soi.unsqueeze(-1) & is_pad.unsqueeze(1))
    return allow.unsqueeze(1)


def t2i_attention_mask(ids: Tensor, pad_id: int, soi_id: int, eoi_id: int) -> Tensor:
    """The float mask Show-o uses for t2i training and generation (pads removed), (B, 1, L, L)."""
    return to_additive(omni_attention_mask(ids, pad_id, soi_id, eoi_id, rm_pad_in_image=True))


def mmu_attention_mask(ids: Tensor, eoi_id: int) -> Tensor:
    """Causal + a bidirectional prefix up to the first ``<|eoi|>`` of row 0, float (B, 1, L, L).

    Right padding is not masked: causality already hides it from the real tokens.
    """
    batch, length = ids.shape
    allow = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    eoi_positions = torch.nonzero(ids[0] == eoi_id).flatten()
    if len(eoi_positions):
        allow[:, : int(eoi_positions[0]) + 1] = True
    return to_additive(allow.expand(batch, 1, length, length))


def grow_generation_mask(mask: Tensor) -> Tensor:
    """One generated token more: (L, L) -> (L+1, L+1) as Show-o's ``mmu_generate`` grows it.

    Old rows get a blocked new column (float32 minimum there), the new row repeats the last row.
    """
    blocked = torch.full((mask.shape[0], 1), torch.finfo(mask.dtype).min, dtype=mask.dtype)
    grown = torch.cat([mask, blocked.to(mask.device)], dim=1)  # (L, L+1)
    new_row = torch.cat([mask[-1], mask.new_zeros(1)]).unsqueeze(0)  # (1, L+1)
    return torch.cat([grown, new_row], dim=0)


def cosine_schedule(t: Tensor) -> Tensor:
    """Fraction of tokens still masked at time ``t`` in [0, 1]."""
    return torch.cos(t * math.pi * 0.5)


def mask_from_draws(
    timesteps: Tensor, noise: Tensor, min_masking_rate: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine-schedule masks from the random draws.

    Args:
        timesteps: (B,) ``t ~ U(0, 1)`` per image.
        noise: (B, N) ``u ~ U(0, 1)`` per image token.
        min_masking_rate: lower clip of the masking probability.

    Returns:
        mask (B, N) bool, num_masked (B,) float, mask_prob (B,).
    """
    mask_prob = cosine_schedule(timesteps).clip(min=min_masking_rate)
    num_masked = (noise.shape[1] * mask_prob).round().clamp(min=1)  # half to even
    mask = noise.argsort(dim=-1) < num_masked.unsqueeze(-1)
    return mask, num_masked, mask_prob


def draw_cosine_mask(
    batch: int, num_tokens: int, generator: torch.Generator | None = None, min_rate: float = 0.0
) -> Tensor:
    """(B, N) bool mask drawn like Show-o's training: ``t`` first, then the noise row."""
    timesteps = torch.rand(batch, generator=generator)
    noise = torch.rand(batch, num_tokens, generator=generator)
    return mask_from_draws(timesteps, noise, min_rate)[0]


def apply_token_mask(
    image_tokens: Tensor, mask: Tensor, mask_token_id: int, ignore_id: int = -100
) -> tuple[Tensor, Tensor]:
    """(B, N) tokens + (B, N) mask -> (input tokens with the mask id, labels at masked only)."""
    inputs = torch.where(mask, mask_token_id, image_tokens)
    labels = torch.where(mask, image_tokens, ignore_id)
    return inputs, labels
