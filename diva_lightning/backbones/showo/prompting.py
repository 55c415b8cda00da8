"""Show-o's sequence layouts (the official ``UniversalPrompting`` of ``training/prompting_utils.py``).

Text is given as token ids of the text tokenizer (no special tokens); the rules below are the
official ones (``M`` = ``max_text_len``, ``N`` = ``num_vq_tokens``):

* Text preprocessing: an empty text becomes ``[BOS]``; BOS is prepended when missing.
* ``t2i`` (length ``M + N + 3``): ``[<|t2i|>] + text + [EOS]`` left-padded with ``<|pad|>`` to ``M + 1``
  (or cut to its first ``M`` ids + EOS), then ``<|soi|>``, the N image tokens, ``<|eoi|>``. Labels: the
  text part with pads -> ignore, ``<|soi|>`` / ``<|eoi|>`` kept, the image labels given.
* ``t2i_gen``: the same ids without labels; the unconditional prompt uses the empty text.
* ``mmu`` (length ``N + 3 + M``): ``<|mmu|>``, ``<|soi|>``, image tokens, ``<|eoi|>``, then
  ``text + [EOS]`` right-padded to ``M`` (or cut to its first ``M - 1`` ids + EOS). Labels: ignore
  over the first ``N + 3`` positions, then the text part with pads -> ignore (not shifted).
* ``mmu_infer``: ``<|mmu|>, <|soi|>``, image, ``<|eoi|>, <|sot|>`` (= BOS), prompt ids; no padding.

Image tokens here are unified ids (code + ``image_token_offset``) or the mask token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_TOKEN = "[PAD]"
SPECIAL_TOKENS = (
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of Show-o's special tokens in the unified vocabulary."""

    pad: int
    soi: int
    eoi: int
    t2i: int
    mmu: int
    bos: int  # <|sot|>
    eos: int  # <|eot|>


def extend_tokenizer(tokenizer) -> tuple[int, SpecialIds]:
    """Add ``[PAD]`` (as pad token) then the 9 special tokens, as Show-o does (idempotent).

    Returns ``(llm_vocab_size, ids)``; ``llm_vocab_size`` is the id of ``[PAD]`` (the text
    vocabulary size before the additions) and the image offset is ``llm_vocab_size + 10``.
    """
    vocab = tokenizer.get_vocab()
    if PAD_TOKEN in vocab:
        tokenizer.pad_token = PAD_TOKEN
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if special != list(range(pad + 1, pad + 1 + len(SPECIAL_TOKENS))) or len(tokenizer) != pad + 10:
        raise ValueError(
            "the tokenizer does not have Show-o's layout (text ids, [PAD], 9 special tokens last)"
        )
    names = dict(zip(SPECIAL_TOKENS, special, strict=True))
    ids = SpecialIds(
        pad=pad,
        soi=names["<|soi|>"],
        eoi=names["<|eoi|>"],
        t2i=names["<|t2i|>"],
        mmu=names["<|mmu|>"],
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
    )
    return pad, ids


class ShowoPrompting:
    """Builds Show-o's sequences from token ids. ``ignore_id`` marks unsupervised labels."""

    def __init__(self, ids: SpecialIds, max_text_len: int, ignore_id: int = -100):
        self.ids, self.max_text_len, self.ignore_id = ids, max_text_len, ignore_id

    def with_bos(self, text_ids: Sequence[int]) -> list[int]:
        text = list(text_ids) or [self.ids.bos]
        return text if text[0] == self.ids.bos else [self.ids.bos, *text]

    def t2i_text(self, text_ids: Sequence[int]) -> tuple[list[int], int]:
        """-> (text part of length M + 1, number of left pads)."""
        width = self.max_text_len + 1
        part = [self.ids.t2i, *self.with_bos(text_ids), self.ids.eos]
        if len(part) > width:
            return part[: width - 1] + [self.ids.eos], 0
        pads = width - len(part)
        return [self.ids.pad] * pads + part, pads

    def t2i(
        self, texts: Sequence[Sequence[int]], image_tokens: Tensor, image_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """texts (B lists), image_tokens (B, N), image_labels (B, N) -> ids, 1-D mask, labels (B, L).

        The 1-D mask is all ones of length ``L + 1`` (a quirk of the official builder; unused).
        """
        rows, label_rows = [], []
        for text, image, image_label in zip(texts, image_tokens, image_labels, strict=True):
            part, pads = self.t2i_text(text)
            head = torch.tensor([*part, self.ids.soi])
            rows.append(torch.cat([head, image.cpu(), torch.tensor([self.ids.eoi])]))
            label_head = head.clone()
            label_head[:pads] = self.ignore_id
            label_rows.append(
                torch.cat([label_head, image_label.cpu(), torch.tensor([self.ids.eoi])])
            )
        ids = torch.stack(rows)
        return (
            ids,
            torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long),
            torch.stack(label_rows),
        )

    def t2i_gen(
        self, texts: Sequence[Sequence[int]], image_tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> ids (B, L) and the all-ones 1-D mask of length ``M + 1`` (unused)."""
        ids, _, _ = self.t2i(texts, image_tokens, torch.zeros_like(image_tokens))
        return ids, torch.ones(ids.shape[0], self.max_text_len + 1, dtype=torch.long)

    def mmu_text(self, text_ids: Sequence[int]) -> tuple[list[int], int]:
        """-> (text part of length M, number of right pads)."""
        part = [*self.with_bos(text_ids), self.ids.eos]
        if len(part) > self.max_text_len:
            return part[: self.max_text_len - 1] + [self.ids.eos], 0
        pads = self.max_text_len - len(part)
        return part + [self.ids.pad] * pads, pads

    def mmu_head(self, image: Tensor) -> Tensor:
        """image tokens (N,) -> ``<|mmu|> <|soi|> image <|eoi|>`` (N + 3,)."""
        start = torch.tensor([self.ids.mmu, self.ids.soi])
        return torch.cat([start, image.cpu(), torch.tensor([self.ids.eoi])])

    def mmu(
        self, image_tokens: Tensor, texts: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """image_tokens (B, N), texts (B lists) -> ids, 1-D mask (all ones), labels (B, L)."""
        rows, label_rows = [], []
        for image, text in zip(image_tokens, texts, strict=True):
            part, pads = self.mmu_text(text)
            head = self.mmu_head(image)
            labels = torch.tensor(part)
            if pads:
                labels[-pads:] = self.ignore_id
            rows.append(torch.cat([head, torch.tensor(part)]))
            label_rows.append(torch.cat([torch.full_like(head, self.ignore_id), labels]))
        ids = torch.stack(rows)
        return ids, torch.ones_like(ids), torch.stack(label_rows)

    def mmu_infer(self, image_tokens: Tensor, prompt_ids: Sequence[int]) -> Tensor:
        """image_tokens (N,), prompt ids -> (1, N + 4 + len(prompt)) ids of the inference script."""
        tail = torch.tensor([self.ids.bos, *prompt_ids], dtype=torch.long)
        return torch.cat([self.mmu_head(image_tokens), tail]).unsqueeze(0)
