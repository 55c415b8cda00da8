"""Nexus-Gen's training sequences, token for token (their ms-swift ``qwen`` chat template).

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n{USER}<|im_end|>\\n
    <|im_start|>assistant\\n{ASSISTANT}<|im_end|>

An image in a message is ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``, N
the merged patch count (81 for a generated 252 x 252 image). Labels: -100 over the system turn,
the user turn and the assistant header; the assistant ids and the closing ``<|im_end|>`` are
their own labels, image pads included (the pads' label is the pad id; the loss reads the image
targets there). The builders take token ids, so any tokenizer (or the fixtures' id table)
supplies the text; ``IMAGE`` marks where an image goes. The 3-D rotary positions come from
transformers' own ``get_rope_index`` (``positions``). Checked against their template's output
on the golden fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
IMAGE = "<image>"


@dataclass(frozen=True)
class ChatTokens:
    """The ids the frame needs: special tokens and the role words with the newline."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    newline: int
    system: int
    user: int
    assistant: int


def _content(pieces: list, tokens: ChatTokens, pads: list[int]) -> list[int]:
    """Token ids with each ``IMAGE`` expanded to its pads (``pads``: counts, in order)."""
    out, counts = [], iter(pads)
    for piece in pieces:
        if piece == IMAGE:
            out += [tokens.vision_start, *[tokens.image_pad] * next(counts), tokens.vision_end]
        else:
            out.append(int(piece))
    return out


def chat_sample(system: list, user: list, assistant: list, tokens: ChatTokens,
                user_pads: list[int] = (), assistant_pads: list[int] = ()) -> tuple[list, list]:  # fmt: skip
    """One training sample -> (input ids, labels), both of length L."""
    t = tokens
    head = [t.im_start, t.system, t.newline, *system, t.im_end, t.newline]
    head += [
        t.im_start,
        t.user,
        t.newline,
        *_content(user, t, list(user_pads)),
        t.im_end,
        t.newline,
    ]
    head += [t.im_start, t.assistant, t.newline]
    answer = [*_content(assistant, t, list(assistant_pads)), t.im_end]
    return head + answer, [IGNORE_INDEX] * len(head) + answer


def positions(model, input_ids: Tensor, image_pad: int, grids: Tensor | None) -> Tensor:
    """3-D rotary positions (3, B, L) of ``input_ids`` (B, L) with the images' ``grids``
    ``(n_images, 3)`` (t, h, w in patches), through transformers' ``get_rope_index``."""
    token_types = (input_ids == image_pad).int()  # 1 at image tokens, 0 at text
    attention = torch.ones_like(input_ids)
    pos, _ = model.get_rope_index(input_ids, token_types, grids, None, None, attention)
    return pos
