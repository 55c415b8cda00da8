"""Chameleon adapter (``ChameleonForConditionalGeneration``).

One causal LM over one vocabulary; VQ code ``k`` is the token named ``"IMGIMG" + digits of k
mapped 0->A..9->J + "Z"``. Images sit between ``<racm3:break>`` and ``<eoss>``, without row
tokens.

* Understanding flow (U): ``<s> <racm3:break> IMAGE <eoss> prompt caption </s>``; labels on the
  caption and ``</s>``.
* Generation flow (G): ``<s> caption <racm3:break> IMAGE' <eoss>``; masked codes replaced by
  ``mask_token`` (a reserved token, never an image code); labels at masked positions; next-token
  shift (the output at ``p - 1`` scores the code at ``p``). The default mask is
  ``<reserved08999>`` (Lumina-mGPT's mask on the Chameleon vocabulary), not ``<reserved08706>``,
  which Chameleon uses as its separator / end-of-turn token.

The stock ``forward`` sets every image-token logit to ``finfo.min`` (Chameleon's chat models
may not emit images), which makes a generation loss infinite: this adapter runs the decoder
(``model.model``) and projects only the supervised slots itself. ``V_t`` is the full LM
vocabulary; generation logits are ``h @ lm_head.weight[image_token_ids].T`` (codebook order).
transformers' ``ChameleonVQVAE`` has no decoder, so ``decode_images`` is not available.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from diva_lightning.backbones.base import (
    BackboneAdapter,
)
from diva_lightning.backbones.tokenizers import (
    TINY_LM,
    build_word_tokenizer,
    mapped_image_ids,
    tiny_vq,
)

BOI, EOI, IMAGE = "<racm3:break>", "<eoss>", "<image>"
DEFAULT_MASK = "<reserved08999>"


def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name of VQ code ``code``: digits mapped 0->A .. 9->J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def tiny_config(vocab: dict[str, int], codebook_size: int, **overrides) -> ChameleonConfig:
    """Random tiny Chameleon: ``TINY_LM``; 32 px -> 8 x 8 codes from a 2-level VQ."""
    vq = tiny_vq(num_embeddings=codebook_size, resolution=32, attn_resolutions=[])
    vq.update(overrides.pop("vq_config", {}))
    config = dict(TINY_LM, vocab_size=len(vocab), **overrides)
    return ChameleonConfig(vq_config=vq, vocabulary_map=vocab, **config)


class ChameleonAdapter(BackboneAdapter):
    """Adapter for Chameleon.

    Args:
        pretrained_path: a local ``ChameleonForConditionalGeneration`` folder with its tokenizer.
            ``None``: a random tiny Chameleon (tests, the embedded default).
        config_overrides: for the tiny config: LM config keys, ``vq_config`` (dict) and
            ``image_size`` (pixels, default 32).
        mask_token: the reserved token at masked image positions of the generation flow;
            ``None``: the one saved with the checkpoint, else ``<reserved08999>``.
        **kwargs: ``torch_dtype``, ``max_caption_tokens`` (``BackboneAdapter``).
    """

    def __init__(
        self, pretrained_path: str | None = None, config_overrides: dict | None = None,
        mask_token: str | None = None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        saved = self.saved_settings(pretrained_path)
        mask_token = mask_token or saved.get("mask_token", DEFAULT_MASK)
        if pretrained_path is not None:
            self.load_checkpoint(ChameleonForConditionalGeneration, pretrained_path)
        else:
            self._build_tiny(dict(config_overrides or {}), mask_token)
        self.mask_token = mask_token
        tokens = {"boi": BOI, "eoi": EOI, "mask": mask_token}
        self.set_vocabulary(tokens, mapped_image_ids(self.model.model.vocabulary_mapping))
        self.train(False)

    def _build_tiny(self, overrides: dict, mask_token: str) -> None:
        vq = dict(overrides.pop("vq_config", {}))  # a copy: never edit the caller's dict
        if "image_size" in overrides:
            vq["resolution"] = int(overrides.pop("image_size"))
        codebook = int(vq.get("num_embeddings", 256))
        visual = [image_token_name(i) for i in range(codebook)]
        self.tokenizer = build_word_tokenizer([IMAGE, BOI, EOI, mask_token, *visual])
        config = tiny_config(self.tokenizer.get_vocab(), codebook, vq_config=vq, **overrides)
        self.model = ChameleonForConditionalGeneration(config).to(self.torch_dtype)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.model.config.vq_config.resolution)

    @property
    def vq_downsample(self) -> int:
        return 2 ** (len(self.model.config.vq_config.channel_multiplier) - 1)

    # ---- images --------------------------------------------------------------------------------
    def _encode_images(self, pixels: Tensor) -> Tensor:
        vq_input = (pixels * 2 - 1).to(self.vq.dtype)  # Chameleon normalises to [-1, 1]
        return self.vq.encode(vq_input).image_tokens.view(len(pixels), -1)  # (B, N) codes

    @classmethod
    def can_decode_images(cls) -> bool:
        return False  # see _decode_images

    def _decode_images(self, codes: Tensor) -> Tensor:
        raise NotImplementedError(
            "ChameleonAdapter cannot decode image tokens: transformers' ChameleonVQVAE has no "
            "decoder (generated codes need Meta's original VQ decoder)"
        )

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.save_settings(path, {"mask_token": self.mask_token})
