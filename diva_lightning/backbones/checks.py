"""Input checks of the adapter contract: image codes, continuous targets, sequence lengths and
the layout tokens.

Plain functions of tensors and a tokenizer, so that every adapter gets the same clear error
(which names the shape, range or token) before any forward pass; ``BackboneAdapter`` calls them
with its facts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_codes(codes: Tensor, tokens: int, codebook: int, grid: tuple[int, int]) -> None:
    """Discrete codes must be (B, ``tokens``) in ``[0, codebook)``."""
    if codes.dim() != 2 or codes.shape[1] != tokens:
        raise ValueError(
            f"image codes must be (B, {tokens}) for grid {grid}, got {tuple(codes.shape)}"
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook):
        raise ValueError(
            f"image codes must lie in [0, {codebook}), got [{int(codes.min())}, {int(codes.max())}]"
        )


def check_target_embeddings(targets: Tensor, tokens: int, width: int, owner: str) -> None:
    """Continuous targets must be finite floats (B, ``tokens``, ``width``), e.g. not a VQ's
    integer codes."""
    if targets.dim() != 3 or tuple(targets.shape[1:]) != (tokens, width):
        raise ValueError(
            f"{owner} regresses image embeddings: its targets must be float (B, {tokens}, "
            f"{width}) from tokenize_images, got {tuple(targets.shape)} {targets.dtype} (codes "
            "of a VQ do not apply)"
        )
    if not targets.is_floating_point() or not torch.isfinite(targets).all():
        raise ValueError(f"target embeddings must be finite floats, got {targets.dtype}")


def special_ids(tokenizer, tokens: dict[str, str], owner: str) -> dict[str, int]:
    """Ids of named special tokens, or an error naming every one the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens.values() if token not in vocab]
    if missing:
        raise ValueError(f"{owner}: the tokenizer lacks the tokens {missing}")
    return {name: vocab[token] for name, token in tokens.items()}


def check_mask_token(special: dict[str, int], image_ids: Tensor, tokenizer, name: str) -> None:
    """The generation flow's mask token (``special["mask"]``) must be neither an image code nor
    a layout token."""
    mask = special["mask"]
    if mask in set(image_ids.tolist()):
        raise ValueError(f"mask token {name!r} is an image code")
    layout = {v for k, v in special.items() if k != "mask"}
    layout |= {tokenizer.bos_token_id, tokenizer.eos_token_id}
    if mask in layout | {tokenizer.pad_token_id}:
        raise ValueError(f"mask token {name!r} is a layout token (BOS/EOS/pad or a marker)")


def check_positions(length: int, limit: int | None, flow: str, adapter) -> None:
    """A ``flow`` sequence of ``length`` tokens must fit the ``limit`` position embeddings."""
    if limit is not None and length > limit:
        raise ValueError(
            f"{type(adapter).__name__}: a {flow} sequence of {length} tokens exceeds the "
            f"backbone's {limit} position embeddings; lower max_caption_tokens (now "
            f"{adapter.caption_token_limit}) or shorten the prompts"
        )
