"""MaskGIT sampling of Show-o (text-to-image, inpainting) and greedy understanding decoding.

Behaviour of the official ``Showo.t2i_generate`` / ``models/sampling.py`` (Chang et al. 2022,
"MaskGIT"), reproduced down to torch's random-number consumption so that a seeded generator gives
the reference's codes:

* every step runs the model on the current ids (and, with guidance ``g``, on the unconditional
  prompt followed by the current image part): logits ``(1 + g) cond - g uncond`` at the N image
  positions over the codebook columns (mask column dropped);
* one code per position is drawn from the softmax (``torch.multinomial``); known positions keep theirs;
* ``mask_len = clamp(floor(N cos(pi/2 (s+1)/T)), 1, unknown - 1)``; confidence =
  ``log p(sampled) + temperature * Gumbel`` (known positions: p = float max), the temperature being
  multiplied by ``1 - (s+1)/T`` cumulatively; the ``mask_len`` least confident positions are re-masked.

The last step's samples are returned (the in-place ids may keep one mask token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diva_lightning.backbones.showo.masks import (
    cosine_schedule,
    grow_generation_mask,
    t2i_attention_mask,
)
from diva_lightning.backbones.showo.model import ShowoModel
from diva_lightning.backbones.showo.prompting import SpecialIds


@dataclass
class SamplingTrace:
    """Per-step record of one ``maskgit_generate`` call (for tests and inspection)."""

    mask_ratio: list[float] = field(default_factory=list)
    mask_len: list[int] = field(default_factory=list)
    num_masked: list[int] = field(default_factory=list)
    first_logits: Tensor | None = None  # (B or 2B, N, K) logits of step 0 before guidance


def gumbel_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    noise = torch.zeros_like(like).uniform_(0, 1, generator=generator)
    return -torch.log((-torch.log(noise.clamp(1e-20))).clamp(1e-20))


def mask_by_random_topk(
    mask_len: Tensor, probs: Tensor, temperature: float, generator: torch.Generator | None
) -> Tensor:
    """mask_len (B, 1), probs (B, N) -> bool (B, N): True for the ``mask_len`` least confident."""
    confidence = torch.log(probs.clamp(1e-20)) + temperature * gumbel_noise(probs, generator)
    cut_off = torch.gather(confidence.sort(dim=-1).values, 1, mask_len.long())  # (B, 1)
    return confidence < cut_off


def _image_logits(
    model: ShowoModel, ids: Tensor, uncond_prefix: Tensor | None, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """-> (guided codebook logits (B, N, K), raw logits of every row (B or 2B, N, K))."""
    n = model.config.num_vq_tokens
    start = model.config.image_token_offset
    if uncond_prefix is not None:
        uncond = torch.cat([uncond_prefix, ids[:, uncond_prefix.shape[1] :]], dim=1)
        ids = torch.cat([ids, uncond], dim=0)  # (2B, L)
    logits = model(ids, attention_mask=mask).logits[:, -(n + 1) : -1, start:-1]  # (., N, K)
    if uncond_prefix is None:
        return logits, logits
    cond, uncond = logits.chunk(2, dim=0)
    return (1 + scale) * cond - scale * uncond, logits


@torch.no_grad()
def maskgit_generate(
    model: ShowoModel,
    special: SpecialIds,
    input_ids: Tensor,
    uncond_input_ids: Tensor | None = None,
    guidance_scale: float = 0.0,
    timesteps: int = 18,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    schedule: Callable[[Tensor], Tensor] = cosine_schedule,
) -> tuple[Tensor, Tensor, SamplingTrace]:
    """Iterative parallel decoding of the image block of ``t2i_gen`` sequences.

    Args:
        input_ids: (B, L) t2i_gen ids; image positions hold codes + offset (known, inpainting) or
            the mask token (to generate). Not modified.
        uncond_input_ids: (B, L) t2i_gen ids of the empty prompt; its first ``L - N - 2`` ids are
            the unconditional text part. Required when ``guidance_scale > 0``.

    Returns:
        codes (B, N) in ``[0, codebook)``, the final ids (B, L), the per-step trace.
    """
    cfg, ids = model.config, input_ids.clone()
    n, offset, mask_id = cfg.num_vq_tokens, cfg.image_token_offset, cfg.mask_token_id
    prefix = None
    if guidance_scale > 0:
        prefix = uncond_input_ids[:, : ids.shape[1] - n - 2]  # (B, M + 1)
        both = torch.cat([ids, uncond_input_ids], dim=0)
        mask = t2i_attention_mask(both, special.pad, special.soi, special.eoi)
    else:
        mask = t2i_attention_mask(ids, special.pad, special.soi, special.eoi)
    trace = SamplingTrace()
    for step in range(timesteps):
        logits, raw = _image_logits(model, ids, prefix, mask, guidance_scale)
        if step == 0:
            trace.first_logits = raw
        probs = logits.softmax(dim=-1)  # (B, N, K)
        sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        sampled = sampled[:, 0].view(probs.shape[:-1])  # (B, N)
        current = ids[:, -(n + 1) : -1]
        unknown = current == mask_id
        sampled = torch.where(unknown, sampled, current - offset)
        ratio = (step + 1) / timesteps
        mask_ratio = schedule(torch.tensor(ratio))
        chosen = torch.gather(probs, -1, sampled.unsqueeze(-1)).squeeze(-1)  # (B, N)
        chosen = torch.where(unknown, chosen, torch.finfo(probs.dtype).max)
        floor = (n * mask_ratio).floor().long().view(1, 1)
        mask_len = torch.minimum(unknown.sum(dim=-1, keepdim=True) - 1, floor).clamp(min=1)
        temperature = temperature * (1.0 - ratio)
        masking = mask_by_random_topk(mask_len, chosen, temperature, generator)
        ids[:, -(n + 1) : -1] = torch.where(masking, mask_id, sampled + offset)
        trace.mask_ratio.append(float(mask_ratio))
        trace.mask_len.append(int(mask_len[0]))
        trace.num_masked.append(int((ids[0, -(n + 1) : -1] == mask_id).sum()))
    return sampled, ids, trace


@torch.no_grad()
def greedy_understanding(
    model: ShowoModel, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, eot_id=None
) -> Tensor:
    """Greedy text decoding (official ``mmu_generate`` with ``top_k=1``), batch 1, no KV cache.

    input_ids (1, L), attention_mask (1, 1, L, L) additive -> new token ids (1, T <= max_new_tokens).
    """
    ids, mask, new = input_ids, attention_mask[0, 0], []
    for _ in range(max_new_tokens):
        logits = model(ids, attention_mask=mask[None, None]).logits[:, -1]  # (1, V)
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        new.append(token)
        if eot_id is not None and int(token) == eot_id:
            break
        ids = torch.cat([ids, token], dim=1)
        mask = grow_generation_mask(mask)
    return torch.cat(new, dim=1)
