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

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration

from diva_lightning.backbones.base import (
    DTYPES,
    IGNORE_INDEX,
    BackboneAdapter,
    FlowBatch,
    local_checkpoint,
    right_padded_batch,
    shifted_slot_states,
)
from diva_lightning.backbones.tokenizers import build_word_tokenizer

BOI, EOI, IMAGE = "<racm3:break>", "<eoss>", "<image>"
DEFAULT_MASK = "<reserved08999>"
ADAPTER_FILE = "diva_adapter.json"  # adapter settings next to the transformers checkpoint


def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name of VQ code ``code``: digits mapped 0->A .. 9->J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def tiny_config(vocab: dict[str, int], codebook_size: int, **overrides) -> ChameleonConfig:
    """Random tiny Chameleon: LM hidden 64, 8 layers; 32 px -> 8 x 8 codes from a 2-level VQ."""
    vq = dict(
        embed_dim=8,
        num_embeddings=codebook_size,
        latent_channels=8,
        resolution=32,
        base_channels=32,
        channel_multiplier=[1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[],
    )
    vq.update(overrides.pop("vq_config", {}))
    config = dict(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        attention_dropout=0.0,
    )
    config.update(overrides)
    return ChameleonConfig(vq_config=vq, vocabulary_map=vocab, **config)


class ChameleonAdapter(BackboneAdapter):
    """Adapter for Chameleon.

    Args:
        pretrained_path: local directory of a checkpoint (model + tokenizer). ``None`` builds a
            random tiny config (tests, the embedded default).
        config_overrides: for the tiny config: LM config keys, ``vq_config`` (dict) and
            ``image_size`` (pixels, default 32).
        mask_token: reserved token put at masked image positions in the generation flow;
            ``None`` takes the one saved with the checkpoint, else ``<reserved08999>``.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_caption_tokens: longest caption in tokens; longer ones are cut and counted
            (default: what the position embeddings leave beside the image and the prompt).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config_overrides: dict | None = None,
        mask_token: str | None = None,
        torch_dtype: str = "float32",
        max_caption_tokens: int | None = None,
    ):
        super().__init__(max_caption_tokens)
        overrides = dict(config_overrides or {})
        if pretrained_path is not None:
            local_checkpoint(pretrained_path)
        mask_token = mask_token or _saved_mask_token(pretrained_path) or DEFAULT_MASK
        if pretrained_path is not None:
            self.model = ChameleonForConditionalGeneration.from_pretrained(
                pretrained_path, dtype=DTYPES[torch_dtype], local_files_only=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained_path, local_files_only=True)
        else:
            vq = dict(overrides.pop("vq_config", {}))  # a copy: never edit the caller's dict
            if "image_size" in overrides:
                vq["resolution"] = int(overrides.pop("image_size"))
            overrides["vq_config"] = vq
            codebook = int(vq.get("num_embeddings", 256))
            visual = [image_token_name(i) for i in range(codebook)]
            self.tokenizer = build_word_tokenizer([IMAGE, BOI, EOI, mask_token, *visual])
            config = tiny_config(self.tokenizer.get_vocab(), codebook, **overrides)
            self.model = ChameleonForConditionalGeneration(config).to(DTYPES[torch_dtype])
        self.mask_token = mask_token
        self._init_vocabulary()
        self.train(False)

    def _init_vocabulary(self) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (BOI, EOI, self.mask_token) if t not in vocab]
        if missing:
            raise ValueError(f"Chameleon tokenizer lacks the special tokens {missing}")
        mapping = self.model.model.vocabulary_mapping
        image_ids = torch.tensor([mapping.img2bpe[i] for i in range(len(mapping.img2bpe))])
        self.register_buffer("image_token_ids", image_ids, persistent=False)  # (K,) code -> LM id
        self.special = {"boi": vocab[BOI], "eoi": vocab[EOI], "mask": vocab[self.mask_token]}
        if self.special["mask"] in set(image_ids.tolist()):
            raise ValueError(f"mask token {self.mask_token!r} is an image code")
        structural = {self.special["boi"], self.special["eoi"], self.tokenizer.bos_token_id}
        structural |= {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        if self.special["mask"] in structural:
            raise ValueError(f"mask token {self.mask_token!r} is a structural token")

    # ---- facts -------------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def vq(self) -> nn.Module:
        return self.model.model.vqmodel

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def codebook_size(self) -> int:
        return len(self.image_token_ids)

    @property
    def text_vocab_size(self) -> int:
        return self.model.lm_head.out_features

    @property
    def image_size(self) -> int:
        return int(self.model.config.vq_config.resolution)

    @property
    def image_grid(self) -> tuple[int, int]:
        factor = 2 ** (len(self.model.config.vq_config.channel_multiplier) - 1)
        side = self.image_size // factor
        return side, side

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

    # ---- flows ---------------------------------------------------------------------------------
    def _batch(self, rows: list[tuple[list[int], list[int], int]]) -> FlowBatch:
        n = self.tokens_per_image
        rows = [(ids, lab, start + torch.arange(n)) for ids, lab, start in rows]
        pad = self.tokenizer.pad_token_id or 0
        return right_padded_batch(rows, pad, self.image_token_ids.device)

    def build_understanding(
        self,
        prompts: Sequence[str],
        captions: Sequence[str],
        codes: Tensor | None = None,
        pixels: Tensor | None = None,
    ) -> FlowBatch:
        if codes is None:
            if pixels is None:
                raise ValueError("build_understanding needs image codes or pixels")
            codes = self.tokenize_images(pixels)
        self.check_codes(codes)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = []
        for prompt, caption, image in zip(prompts, captions, codes, strict=True):
            head = [bos, self.special["boi"]]
            image_ids = self.image_token_ids[image.to(self.image_token_ids.device)].tolist()
            context = head + image_ids + [self.special["eoi"]] + self._text(prompt)
            target = self.caption_ids(caption) + [eos]
            rows.append((context + target, [IGNORE_INDEX] * len(context) + target, len(head)))
        return self._batch(rows)

    def build_generation(self, captions: Sequence[str], codes: Tensor, mask: Tensor) -> FlowBatch:
        self.check_codes(codes)
        if mask.shape != codes.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match codes {tuple(codes.shape)}")
        rows = []
        for caption, image, masked in zip(captions, codes, mask.bool(), strict=True):
            head = [self.tokenizer.bos_token_id, *self.caption_ids(caption), self.special["boi"]]
            image_ids = self.image_token_ids[image.to(self.image_token_ids.device)].cpu()
            labels = torch.where(
                masked.cpu(), image.cpu(), torch.full_like(image.cpu(), IGNORE_INDEX)
            )
            image_ids[masked.cpu()] = self.special["mask"]
            ids = head + image_ids.tolist() + [self.special["eoi"]]
            lab = [IGNORE_INDEX] * len(head) + labels.tolist() + [IGNORE_INDEX]
            rows.append((ids, lab, len(head)))
        return self._batch(rows)

    def _hidden(self, batch: FlowBatch) -> Tensor:
        out = self.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state  # (B, T, D), after the final norm

    def _forward_understanding(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        h, targets = shifted_slot_states(self._hidden(batch), batch.labels)  # (B, S, D)
        return self.model.lm_head(h), targets  # (B, S, V_t)

    def _forward_generation(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        h, targets = shifted_slot_states(self._hidden(batch), batch.labels)  # (B, S, D)
        image_rows = self.model.lm_head.weight[self.image_token_ids]  # (K, D)
        return h @ image_rows.T, targets  # (B, S, K) codebook order

    # ---- persistence ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> ChameleonAdapter:
        return cls(config_overrides=overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> ChameleonAdapter:
        return cls(pretrained_path=str(path), **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (Path(path) / ADAPTER_FILE).write_text(json.dumps({"mask_token": self.mask_token}))


def _saved_mask_token(path: str | None) -> str | None:
    """The mask token ``save_pretrained`` wrote next to a checkpoint, if any."""
    settings = Path(path) / ADAPTER_FILE if path is not None else None
    if settings is None or not settings.exists():
        return None
    return json.loads(settings.read_text()).get("mask_token")
