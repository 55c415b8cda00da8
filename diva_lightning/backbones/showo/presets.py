"""Configuration presets of Show-o: the official 256 px / 512 px models and a tiny random one.

A preset fixes what the checkpoint files do not say: the Phi dimensions (when no ``phi/config.json``
is given), the MAGVIT-v2 architecture (when it cannot be read from the weights), the image size and
Show-o's text length ``max_text_len`` (the official ``dataset.preprocessing.max_seq_length``).
The vocabulary is never preset: ``vocab_size = len(text tokenizer) + 10 + codebook_size + 1``.

Official values (``configs/showo_demo.yaml`` / ``showo_demo_512x512.yaml``): Phi-1.5 (hidden 2048,
24 layers, 32 heads, MLP 8192, ``gelu_new``, partial rotary 0.5), ``llm_vocab_size`` 50295,
codebook 2^13 = 8192, vocab 58498, ``max_seq_length`` 128; 256 px -> 16 x 16 = 256 image tokens,
512 px -> 32 x 32 = 1024. The MAGVIT-v2 dims below are the released tokenizer's as we understand
them (5 levels, downsampling 16); ``from_pretrained`` reads the real architecture from the weights.
"""

from __future__ import annotations

import copy

PHI_1_5 = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
}

_MAGVIT_CODER = {
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": [4, 3, 4, 3, 4],
    "attn_resolutions": [5],
    "dropout": 0.0,
    "in_ch": 3,
    "out_ch": 3,
    "resolution": 128,
    "z_channels": 13,
    "double_z": False,
}
MAGVIT_V2 = {"encoder": _MAGVIT_CODER, "decoder": _MAGVIT_CODER, "codebook_dim": 13}

TINY_PHI = {
    **PHI_1_5,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "initializer_range": 0.05,
}
_TINY_CODER = {
    **_MAGVIT_CODER,
    "ch": 32,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": [1, 1, 1],
    "resolution": 32,
    "z_channels": 8,
}
TINY_MAGVIT = {"encoder": _TINY_CODER, "decoder": _TINY_CODER, "codebook_dim": 8}

PRESETS: dict[str, dict] = {
    # 32 px -> 8 x 8 = 64 codes of a 2^8 codebook; 8 Phi blocks of width 64; runs on a laptop CPU.
    "tiny": {"phi": TINY_PHI, "magvit": TINY_MAGVIT, "image_size": 32, "max_text_len": 32},
    "showo-256": {"phi": PHI_1_5, "magvit": MAGVIT_V2, "image_size": 256, "max_text_len": 128},
    "showo-512": {"phi": PHI_1_5, "magvit": MAGVIT_V2, "image_size": 512, "max_text_len": 128},
}
PRESET_BY_TOKENS = {256: "showo-256", 1024: "showo-512"}


def merge(base: dict, overrides: dict) -> dict:
    """Recursive dict update (overrides win), on copies."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def get_preset(name: str, overrides: dict | None = None) -> dict:
    """Preset ``name`` with ``overrides`` merged in (keys ``phi``, ``magvit``, ``image_size``,
    ``max_text_len``; ``magvit`` holds ``encoder`` / ``decoder`` / ``codebook_dim``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Show-o preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides or {}) - {"phi", "magvit", "image_size", "max_text_len"}
    if unknown:
        raise ValueError(f"unknown Show-o config overrides {sorted(unknown)}")
    return merge(PRESETS[name], overrides or {})
