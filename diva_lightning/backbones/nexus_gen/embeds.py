"""Nexus-Gen's generation flow on embeddings: its inputs at the image positions and the slots
whose hidden states regress the next image embedding.

Their training ("prefilled autoregression"): the inputs at the 81 generated-image positions are
``image_prefill_embeds[0..80]``, never the real embeddings, and the hidden state at position
``t``, through ``vision_head``, predicts the target embedding at ``t + 1`` (a next-token shift:
``<|vision_start|>`` predicts image embedding 0, pad ``j`` predicts ``j + 1``). The attention is
causal, as in any LLM: unlike MaskGIT's bidirectional image block, an image position sees only
the positions before it.

DIVA's inpainting flow maps onto this with a mask over the 81 embeddings: a **masked** position
gets the prefill row as input and is supervised; an **unmasked** one gets the real target
embedding (the frozen vision tower's output) and is not. All masked is Nexus-Gen's own training.
"""

from __future__ import annotations

import torch
from torch import Tensor


def image_positions(input_ids: Tensor, image_pad: int, count: int) -> Tensor:
    """(B, L) ids -> (B, count) positions of the LAST ``count`` image pads of each row (the
    generated image: the assistant's, after any user image)."""
    is_pad = input_ids == image_pad  # (B, L)
    if (is_pad.sum(1) < count).any():
        raise ValueError(f"a generation sample needs {count} image pads; found "
                         f"{is_pad.sum(1).tolist()}")  # fmt: skip
    order = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    ranked = torch.where(is_pad, order, -1).sort(dim=1).values  # pads last, ascending
    return ranked[:, -count:]  # (B, count)


def generation_embeds(token_embeds: Tensor, positions: Tensor, prefill: Tensor, targets: Tensor,
                      masked: Tensor) -> Tensor:  # fmt: skip
    """The generation flow's inputs. token_embeds (B, L, D) of the ids; positions (B, N) of the
    image; prefill (N, D); targets (B, N, D) real embeddings; masked (B, N) bool -> (B, L, D):
    prefill rows at masked positions, targets at the others, token embeddings elsewhere."""
    image = torch.where(
        masked[..., None], prefill[None].to(token_embeds.dtype), targets.to(token_embeds.dtype)
    )
    rows = torch.arange(token_embeds.shape[0], device=token_embeds.device)[:, None]  # (B, 1)
    out = token_embeds.clone()
    out[rows, positions] = image
    return out


def prediction_slots(positions: Tensor) -> Tensor:
    """Positions (B, N) of the image -> (B, N) positions whose hidden state predicts each image
    embedding: the one before it (next-token shift)."""
    return positions - 1


def understanding_embeds(token_embeds: Tensor, input_ids: Tensor, image_pad: int,
                         image_embeds: Tensor) -> Tensor:  # fmt: skip
    """token_embeds (B, L, D) with every image pad, in order, replaced by the frozen tower's
    output ``image_embeds`` (n_pads, D) (the stock Qwen2.5-VL input)."""
    is_pad = input_ids == image_pad
    if int(is_pad.sum()) != image_embeds.shape[0]:
        raise ValueError(f"{int(is_pad.sum())} image pads but {image_embeds.shape[0]} image "
                         "embeddings: the image's grid and its pads disagree")  # fmt: skip
    out = token_embeds.clone()
    out[is_pad] = image_embeds.to(out.dtype)
    return out


def text_labels(labels: Tensor, image_pad: int, ignore: int = -100) -> Tensor:
    """The cross-entropy's labels: image pads ignored (the regression reads them), the markers
    ``<|vision_start|>``, ``<|vision_end|>`` and ``<|im_end|>`` keep their next-token loss."""
    return labels.masked_fill(labels == image_pad, ignore)
