"""Any causal LM whose vocabulary is extended with VQ codes; Liquid is the first preset.

This is the most common UMM pattern (Liquid, Lumina-mGPT-style models): a plain text LM
(``AutoModelForCausalLM``) whose embeddings were resized so that image code ``c`` is the token
``code_offset + c`` (Liquid: ``code_offset = len(tokenizer)``, the Gemma-7B text vocabulary, then
8192 codes of Chameleon's VQGAN, 512 px -> 32 x 32). A preset (``PRESETS``) holds what differs
between such models: the prompt layouts, the mask token, the understanding-side padding colour.

* Understanding flow (U): ``<bos>`` + the preset's understanding template with ``{image}`` the code
  tokens and ``{prompt}`` the question, then the caption and ``answer_end`` (labelled). Liquid:
  ``<start_of_turn>user\\n<boi>{image}<eoi>\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n``
  then ``caption<end_of_turn>\\n<eos>``.
* Generation flow (G): ``<bos>`` + ``{caption} Generate an image based on this
  description.<boi>{image}<eoi>``; masked codes are replaced by ``mask_token`` (Gemma's own
  ``<mask>``, never an image code); labels at the masked positions, next-token shift. An empty
  caption gives the unconditional layout (``<unconditional><boi>{image}<eoi>``), which is what
  classifier-free guidance contrasts with (``decoding.maskgit_generate``, ``cfg_scale``).

The text around the image is tokenised in pieces (prefix, caption, suffix) rather than as one
string, so that the caption's tokens are exactly ``caption_ids`` (cut and counted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GemmaConfig

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.liquid.preprocess import prepare_image
from diva_lightning.backbones.liquid.vqgan import ChameleonVQGAN, load_vqgan, save_vqgan
from diva_lightning.backbones.liquid.vqgan import tiny_vqgan as build_tiny_vqgan
from diva_lightning.backbones.tokenizers import TINY_LM, build_word_tokenizer


@dataclass(frozen=True)
class Preset:
    """The layout facts of one model built as "LM + codes appended to the vocabulary"."""

    understanding: str  # holds {image} and {prompt}
    answer_end: str  # after the caption, labelled
    generation: str  # holds {caption} and {image}
    unconditional: str  # holds {image}: the CFG prompt
    mask_token: str  # an existing vocabulary token put at masked image positions
    image_preprocess: Callable[[Image.Image, int], Image.Image]  # PIL, size -> RGB size x size


PRESETS = {
    "liquid": Preset(
        understanding=(
            "<start_of_turn>user\n<boi>{image}<eoi>\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
        ),
        answer_end="<end_of_turn>\n<eos>",
        generation="{caption} Generate an image based on this description.<boi>{image}<eoi>",
        unconditional="<unconditional><boi>{image}<eoi>",
        mask_token="<mask>",
        image_preprocess=prepare_image,
    )
}
# the tiny tokenizer's own tokens: every marker of the Liquid layouts is one token
TINY_TOKENS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<boi>", "<eoi>", "\n"]
TINY_TOKENS += ["<unconditional>", "<mask>", "user", "model", "based", "description"]


def tiny_gemma(vocab_size: int, **overrides) -> GemmaConfig:
    """Random tiny Gemma: ``TINY_LM`` with one KV head (Gemma-2B's multi-query attention)."""
    gemma = {"num_key_value_heads": 1, "head_dim": 16, "vocab_size": vocab_size}
    return GemmaConfig(**{**TINY_LM, **gemma, **overrides})


class LiquidAdapter(BackboneAdapter):
    """Adapter for a causal LM with VQ codes appended to its vocabulary (Liquid preset).

    Args:
        pretrained_path: local folder with the LM (``AutoModelForCausalLM``) and its tokenizer.
            ``None`` builds a random tiny Gemma with a tiny Chameleon VQGAN (tests, CPU demo).
        vqgan_path: folder (or ``vqgan.yaml``) of the original-format VQGAN, ``vqgan.yaml`` +
            ``vqgan.ckpt``; default ``pretrained_path``. Without ``pretrained_path``: a random
            tiny LM around this VQGAN.
        preset: layout preset (``liquid``).
        code_offset: vocabulary id of code 0; default the one saved with the checkpoint, else
            ``len(tokenizer)`` (codes appended right after the text vocabulary).
        mask_token: token at masked image positions; default the saved one, else the preset's.
        config_overrides: for the tiny config: Gemma config keys, ``vqgan`` (ddconfig keys plus
            ``codebook_size``) and ``image_size`` (pixels, default 32 -> 8 x 8 codes).
        **kwargs: ``torch_dtype`` (of the LM; the VQGAN stays fp32), ``max_caption_tokens``
            (``BackboneAdapter``).
    """

    def __init__(
        self, pretrained_path: str | None = None, vqgan_path: str | None = None,
        preset: str = "liquid", code_offset: int | None = None, mask_token: str | None = None,
        config_overrides: dict | None = None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        self.preset_name, self.preset = preset, PRESETS[preset]
        saved = self.saved_settings(pretrained_path)
        if pretrained_path is not None:
            folder = self.load_checkpoint(AutoModelForCausalLM, pretrained_path)
            self.vqgan = _load_vqgan(vqgan_path or folder)
        else:
            self._build_tiny(dict(config_overrides or {}), vqgan_path)
        offsets = (code_offset, saved.get("code_offset"), len(self.tokenizer))
        self.code_offset = int(next(o for o in offsets if o is not None))
        self.mask_token = mask_token or saved.get("mask_token") or self.preset.mask_token
        codes = self.code_offset + torch.arange(self.vqgan.codebook_size)
        if int(codes[-1]) >= self.text_vocab_size:
            raise ValueError(
                f"code_offset {self.code_offset} + codebook {self.vqgan.codebook_size} exceeds the "
                f"LM vocabulary ({self.text_vocab_size}): the checkpoint's embeddings were not "
                "extended with the image codes, or code_offset is wrong"
            )
        self.set_vocabulary({"mask": self.mask_token}, codes)
        layouts = [self.preset.understanding, self.preset.generation, self.preset.unconditional]
        layout_ids = self._text(" ".join([*layouts, self.preset.answer_end]))
        if self.special["mask"] in layout_ids:
            raise ValueError(
                f"mask token {self.mask_token!r} is a layout token of the {preset} prompts"
            )
        self.train(False)

    def _build_tiny(self, overrides: dict, vqgan_path: str | None) -> None:
        """A random tiny Gemma around a random tiny VQGAN, or around the one in ``vqgan_path``."""
        vq = {"codebook_size": 256, "ch_mult": [1, 2, 2], **overrides.pop("vqgan", {})}
        vq["resolution"] = int(overrides.pop("image_size", vq.get("resolution", 32)))
        self.vqgan = _load_vqgan(vqgan_path) if vqgan_path else build_tiny_vqgan(**vq)
        self.tokenizer = build_word_tokenizer(TINY_TOKENS)
        self.tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
        vocab = len(self.tokenizer) + self.vqgan.codebook_size  # codes appended after the text
        config = tiny_gemma(vocab, **overrides)
        self.model = AutoModelForCausalLM.from_config(config).to(self.torch_dtype)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def vq(self) -> nn.Module:
        return self.vqgan

    @property
    def image_preprocess(self) -> Callable[[Image.Image, int], Image.Image]:
        return self.preset.image_preprocess

    @property
    def image_size(self) -> int:
        return self.vqgan.resolution

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.vqgan.grid, self.vqgan.grid

    # ---- images --------------------------------------------------------------------------------
    def _encode_images(self, pixels: Tensor) -> Tensor:
        return self.vqgan.encode(pixels.float() * 2 - 1)  # (B, N); the VQGAN reads [-1, 1]

    def _decode_images(self, codes: Tensor) -> Tensor:
        return (self.vqgan.decode(codes).float() + 1) / 2  # (B, 3, H, W), clamped by the base

    @staticmethod
    def to_uint8(pixels: Tensor) -> Tensor:
        """Truncation, as the reference turns decoded pixels into an image (fixture README)."""
        return (pixels.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)

    # ---- flows ---------------------------------------------------------------------------------
    def _around_image(self, template: str, **fields: str) -> tuple[list[int], list[int]]:
        """``<bos>`` + the ids before ``{image}`` of a layout, and the ids after it."""
        for name, value in fields.items():
            template = template.replace(f"{{{name}}}", value)
        before, after = template.split("{image}")
        return [self.tokenizer.bos_token_id, *self._text(before)], self._text(after)

    def _understanding_text(self, prompt: str) -> tuple[list[int], list[int]]:
        return self._around_image(self.preset.understanding, prompt=prompt)

    def _answer_end(self) -> list[int]:
        return self._text(self.preset.answer_end)

    def _generation_text(self, caption: str) -> tuple[list[int], list[int]]:
        if not caption:  # the unconditional prompt of classifier-free guidance
            return self._around_image(self.preset.unconditional)
        head, tail = self.preset.generation.split("{caption}")
        tail, after = tail.split("{image}")
        caption_ids = self.caption_ids(caption)
        before = [self.tokenizer.bos_token_id, *self._text(head), *caption_ids, *self._text(tail)]
        return before, self._text(after)

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_vqgan(self.vqgan, path)
        settings = {"preset": self.preset_name, "code_offset": self.code_offset}
        self.save_settings(path, {**settings, "mask_token": self.mask_token})


def _load_vqgan(path: str | Path) -> ChameleonVQGAN:
    """The original-format VQGAN, with an error that names ``vqgan_path`` when it is missing."""
    try:
        return load_vqgan(path)
    except FileNotFoundError as exn:
        raise FileNotFoundError(
            f"vqgan_path: {exn} (Liquid ships Chameleon's vqgan.yaml and vqgan.ckpt; give their "
            "folder as vqgan_path, or put them into pretrained_path)"
        ) from exn
