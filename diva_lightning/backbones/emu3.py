"""Emu3 adapter (``Emu3ForConditionalGeneration``), the reference implementation of the contract.

Emu3 is one causal LM over one vocabulary: text tokens, special tokens and one token per VQ code
(``<|visual token{i:06d}|>``). An image is laid out row by row with ``<|extra_200|>`` ending each
row (EOL), between ``<|image start|>`` and ``<|image end|>``.

* Understanding flow (U): ``<s> boi IMAGE eoi prompt caption </s>``; labels on caption + ``</s>``.
* Generation flow (G): ``<s> caption boi IMAGE' eoi`` where IMAGE' has every masked code replaced
  by ``mask_token`` (a reserved token, never an image code); labels at the masked positions.
  Inpainting on a causal LM keeps the pretrained next-token shift: the output at ``p - 1``
  scores the code at ``p``, so a masked token sees the caption and earlier image tokens.

Both flows are right-padded with a 2D attention mask (positions are unaffected by right padding).
Logits are computed only at supervised slots: the full LM vocabulary for U (``V_t`` = LM vocab
size), and ``h @ lm_head.weight[image_token_ids].T`` for G (codebook order, never the full
vocabulary at image positions).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Emu3Config, Emu3ForConditionalGeneration

from diva_lightning.backbones.base import (
    BackboneAdapter,
)
from diva_lightning.backbones.tokenizers import (
    TINY_LM,
    build_word_tokenizer,
    mapped_image_ids,
    tiny_vq,
)

EOL, BOI, EOI, IMAGE = "<|extra_200|>", "<|image start|>", "<|image end|>", "<image>"
DEFAULT_MASK = "<|extra_201|>"


def tiny_config(vocab: dict[str, int], codebook_size: int, **overrides) -> Emu3Config:
    """Random tiny Emu3: ``TINY_LM``; 32 px -> 8 x 8 codes from a 2-level VQ."""
    text = dict(TINY_LM, vocab_size=len(vocab), **overrides.pop("text_config", {}))
    vq = tiny_vq(codebook_size=codebook_size, attn_resolutions=[], temporal_downsample_factor=1)
    vq.update(hidden_size=64, num_attention_heads=1)
    vq.update(overrides.pop("vq_config", {}))
    return Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab, **overrides)


class Emu3Adapter(BackboneAdapter):
    """Adapter for Emu3.

    Args:
        pretrained_path: a local ``Emu3ForConditionalGeneration`` folder with its tokenizer (e.g.
            ``Emu3-Chat-hf``). ``None``: a random tiny Emu3 (tests, the embedded default).
        config_overrides: for the tiny config: ``text_config`` / ``vq_config`` dicts and
            ``image_size`` (pixels, default 32).
        mask_token: the reserved token at masked image positions of the generation flow;
            ``None``: the one saved with the checkpoint, else ``<|extra_201|>``.
        **kwargs: ``torch_dtype``, ``max_caption_tokens`` (``BackboneAdapter``).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config_overrides: dict | None = None,
        mask_token: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        overrides = dict(config_overrides or {})
        saved = self.saved_settings(pretrained_path)
        self._image_size = int(overrides.pop("image_size", saved.get("image_size", 32)))
        mask_token = mask_token or saved.get("mask_token", DEFAULT_MASK)
        if pretrained_path is not None:
            self.load_checkpoint(Emu3ForConditionalGeneration, pretrained_path)
        else:
            codebook = int(overrides.get("vq_config", {}).get("codebook_size", 256))
            visual = [f"<|visual token{i:06d}|>" for i in range(codebook)]
            self.tokenizer = build_word_tokenizer([IMAGE, EOL, BOI, EOI, mask_token, *visual])
            config = tiny_config(self.tokenizer.get_vocab(), codebook, **overrides)
            self.model = Emu3ForConditionalGeneration(config).to(self.torch_dtype)
        self.mask_token = mask_token
        tokens = {"eol": EOL, "boi": BOI, "eoi": EOI, "mask": mask_token}
        self.set_vocabulary(tokens, mapped_image_ids(self.model.model.vocabulary_mapping))
        self.train(False)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def vq_downsample(self) -> int:
        return self.vq.vision_spatial_factor

    # ---- images --------------------------------------------------------------------------------
    def _encode_images(self, pixels: Tensor) -> Tensor:
        sizes = torch.tensor([[self.image_size, self.image_size]] * len(pixels))
        vq_input = (pixels * 2 - 1).to(self.vq.dtype)  # Emu3 normalises to [-1, 1]
        grids = self.vq.encode(vq_input, sizes).image_tokens  # B x (h, w)
        return torch.stack(grids).flatten(1)  # (B, N)

    def _decode_images(self, codes: Tensor) -> Tensor:
        rows, cols = self.image_grid
        pixels = self.vq.decode(codes.view(-1, rows, cols))  # (B, 3, H, W) in [-1, 1]
        return (pixels.float() + 1) / 2

    # ---- flows ---------------------------------------------------------------------------------
    def _image_block(self, codes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Codes row by row, an EOL token ending each row: ids (rows * (cols + 1),)."""
        rows, cols = self.image_grid
        ids, _ = super()._image_block(codes, mask)
        eol = ids.new_full((rows, 1), self.special["eol"])
        offsets = torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)  # EOLs skipped
        return torch.cat([ids.view(rows, cols), eol], 1).flatten(), offsets.flatten()

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.save_settings(path, {"image_size": self._image_size, "mask_token": self.mask_token})
