"""Tokenizer helpers: a tiny word-level tokenizer for random tiny backbones (tests, the embedded
default), and ``tokenizer_identity`` of an image tokenizer (recorded with pre-tokenised shards).

Real checkpoints bring their own tokenizer from the local checkpoint directory; tiny configs
have no pretrained vocabulary, so they use this one. It covers the caption prompts and the
synthetic shapes world; any other word maps to ``<unk>`` (never an error).
"""

from __future__ import annotations

import hashlib

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]

_WORD_TEXT = """
a an the this that there is are of in on at with and to image picture photo shows showing
please describe detail detailed caption what generate draw one two three four five zero
object objects shape shapes small large big
circle square triangle star cross diamond heart hexagon ring rectangle ellipse pentagon
red green blue yellow purple orange cyan magenta white black gray grey pink brown
top bottom left right center centre middle upper lower corner row column
. , : ; ? ! - ' "
far yes no
"""
WORDS = _WORD_TEXT.split()  # append only: a word's id must not change


def build_word_tokenizer(extra_tokens: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer; ids: specials, then ``extra_tokens``, then ``WORDS``."""
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + list(extra_tokens or []) + WORDS:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


def tokenizer_identity(vq: nn.Module) -> dict[str, str]:
    """The image tokenizer's class and a SHA-256 of its weights and buffers (every tensor, in
    name order): two tokenizers with the same codebook size but other weights give other codes
    for the same image, so shards record this and the data module checks it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vq.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.numpy().tobytes())
    return {"class": f"{type(vq).__module__}.{type(vq).__qualname__}", "sha256": digest.hexdigest()}
