"""The base architecture of DIVA-mini: a tiny Show-o (default) or a tiny Emu3, built from the
library's adapters with the benchmark's sizes.

Show-o is the default because the paper runs its Table 2 ablations on Show-o and because the
generation metric decodes with MaskGIT: Show-o attends bidirectionally inside the image block,
so a masked code sees every code already revealed. Emu3 is a causal LM; under MaskGIT order a
code cannot see the revealed codes to its right, which caps what its generation can learn here
(kept as ``backbone: emu3`` for comparison).

The images are tokenised by the benchmark's patch tokenizer (pre-tokenised shards), so the
adapter's own VQ only has to agree on the codebook size and the 8 x 8 grid; it is never used.
"""

from __future__ import annotations

from pathlib import Path

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.showo import ShowoAdapter

ADAPTERS: dict[str, type[BackboneAdapter]] = {"showo": ShowoAdapter, "emu3": Emu3Adapter}


def adapter_class(name: str) -> type[BackboneAdapter]:
    if name not in ADAPTERS:
        raise ValueError(f"unknown DIVA-mini backbone {name!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def build_base(cfg) -> BackboneAdapter:
    """A randomly initialised base of ``cfg.backbone`` with ``cfg``'s LM sizes."""
    width = dict(
        hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
    )  # fmt: skip
    if cfg.backbone == "emu3":
        return Emu3Adapter.tiny(text_config=width, vq_config={"codebook_size": cfg.codebook_size})
    bits = cfg.codebook_size.bit_length() - 1  # LFQ: codebook = 2 ** codebook_dim
    if 2**bits != cfg.codebook_size:
        raise ValueError(f"Show-o's LFQ needs a power-of-two codebook, got {cfg.codebook_size}")
    coder = {"z_channels": bits}
    magvit = {"codebook_dim": bits, "encoder": coder, "decoder": coder}
    return adapter_class(cfg.backbone).tiny(phi=width, magvit=magvit, max_text_len=cfg.max_text_len)


def load_base(cfg, path: str | Path) -> BackboneAdapter:
    """The saved base (or a post-trained model) at ``path``."""
    return adapter_class(cfg.backbone).from_pretrained(path)
