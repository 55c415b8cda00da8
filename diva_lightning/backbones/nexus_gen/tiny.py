"""A random tiny Nexus-Gen: the Qwen2.5-VL widths of the golden fixtures and a word tokenizer whose
ids are the fixtures' id table (``tests/fixtures/nexus-gen/README.md``).

Qwen2's BPE cannot be built offline, so the tiny tokenizer is word-level with Qwen's split (a
leading space belongs to the next word, punctuation and newlines are their own pieces). Its ids:
the fixtures' 35 word pieces at 10..44, the shapes world's words (with and without the leading
space) after them, Qwen2's 14 special tokens at 496..509 in Qwen2's order; vocabulary 512. The
fixtures' texts therefore tokenise to exactly their ids, which the parity tests rely on.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig

from diva_lightning.backbones.tokenizers import WORDS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
            "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
            "<|video_pad|>"]  # fmt: skip
SPECIAL_START, VOCAB = 496, 512
PIECES = [
    "system",
    "user",
    "assistant",
    "\n",
    "You",
    " are",
    " a",
    " helpful",
    " assistant",
    ".",
    "Generate",
    " an",
    " image",
    " according",
    " to",
    " the",
    " following",
    " description",
    ":",
    " A",
    " red",
    " cat",
    " sitting",
    " on",
    " mat",
    "Here",
    " is",
    " based",
    " ",
    "What",
    " in",
    "?",
    "A",
    " Change",
    " dog",
]  # fmt: skip  (ids 10..44)
SPLIT = Regex(r" ?[A-Za-z0-9]+| ?[^A-Za-z0-9\s]|\s")  # Qwen-like pieces


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level stand-in for Qwen2's tokenizer (see the module docstring)."""
    vocab = {"<unk>": 0}
    vocab.update({piece: 10 + i for i, piece in enumerate(PIECES)})
    words = [p for w in ["Please", *WORDS] for p in (w, " " + w) if p not in vocab]
    vocab.update({piece: 10 + len(PIECES) + i for i, piece in enumerate(dict.fromkeys(words))})
    if max(vocab.values()) >= SPECIAL_START:
        raise AssertionError("the tiny tokenizer's words overlap its special tokens")
    vocab.update({token: SPECIAL_START + i for i, token in enumerate(SPECIALS)})
    used = set(vocab.values())
    vocab.update({f"<unused{i}>": i for i in range(VOCAB) if i not in used})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(SPLIT, behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tokenizer


def tiny_config(**overrides) -> Qwen2_5_VLConfig:
    """The fixtures' Qwen2.5-VL widths (hidden 64, GQA 4/2 heads, mRoPE [2, 3, 3], a 2-block vision
    tower of width 32 whose first block is windowed), 8 text blocks unless overridden."""
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, hidden_act="silu",
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[1], out_hidden_size=64, tokens_per_second=2)  # fmt: skip
    vision.update(overrides.pop("vision_config", {}))
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, attention_dropout=0.0,
                tie_word_embeddings=False, bos_token_id=SPECIAL_START,
                eos_token_id=SPECIAL_START + 2, vision_start_token_id=SPECIAL_START + 9,
                vision_end_token_id=SPECIAL_START + 10, vision_token_id=SPECIAL_START + 11,
                image_token_id=SPECIAL_START + 12, video_token_id=SPECIAL_START + 13)  # fmt: skip
    text.update(overrides)
    config = Qwen2_5_VLConfig(**text, vision_config=vision)
    config._attn_implementation = "sdpa"
    return config
