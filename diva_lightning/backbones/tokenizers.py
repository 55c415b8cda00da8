"""Tokenizer helpers: a tiny word-level tokenizer and the tiny LM / VQ configs for random tiny
backbones (tests, the embedded default), and ``tokenizer_identity`` of an image tokenizer (recorded with pre-tokenised shards).

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
# the language model of every tiny random adapter: hidden 64, 8 blocks of 4 heads, 512 positions
TINY_LM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)


def tiny_vq(**keys) -> dict:
    """A fresh config dict of the tiny VQ shared by the tiny adapters (2 downsamplings: 32 px
    -> 8 x 8 codes), with ``keys`` added."""
    vq = dict(embed_dim=8, latent_channels=8, base_channels=32, num_res_blocks=1)
    return {**vq, "channel_multiplier": [1, 2, 2], **keys}


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


def mapped_image_ids(mapping) -> torch.Tensor:
    """(K,) LM id of each VQ code from a transformers vocabulary mapping (Chameleon, Emu3)."""
    return torch.tensor([mapping.img2bpe[i] for i in range(len(mapping.img2bpe))])


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
