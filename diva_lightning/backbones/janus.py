"""Janus adapter (``JanusForConditionalGeneration``): two image encoders on one LLM.

Implements the DIVA backbone contract (``base.BackboneAdapter``, paper Sec. 3.1) for Janus /
Janus-Pro (Chen et al., 2025), whose understanding and generation read images differently:

* Understanding flow (U): ``<s> <begin_of_image> <image_placeholder> x N <end_of_image> prompt
  caption </s>``. The SigLIP features of the pixels (normalised with the checkpoint's image
  processor statistics), through the aligner, replace the placeholders (continuous inputs);
  labels on the caption and ``</s>``; text logits from ``lm_head`` with the next-token shift.
  ``image_positions`` are the placeholder positions.
* Generation flow (G): ``<s> caption <begin_of_image>`` then the generation embeddings of the
  VQ codes (``prepare_embeddings_for_image_generation``), where every masked position gets the
  adapter's ``mask_embedding`` instead (the generation codebook has no mask id), then
  ``<end_of_image>``. Labels are the codes at masked positions; logits come from
  ``generation_head`` (codebook space) at ``p - 1`` for the code at ``p``: the causal
  next-token shift Janus is pretrained with, so a masked token sees the caption and the earlier
  image tokens only (see docs "Inpainting on a causal LM").

Both flows are right-padded with a 2D attention mask (positions are unaffected). The G batch
carries token ids (image positions hold the placeholder id) plus the codes and mask in
``extra``; the embeddings are built in the forward, so gradients reach the mask embedding and
masked codes never reach the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    JanusConfig,
    JanusForConditionalGeneration,
)
from transformers.models.janus import JanusImageProcessorPil

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

PLACEHOLDER, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
MASK_FILE = "diva_mask_embedding.pt"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # Janus-Pro's SigLIP-L statistics


def tiny_config(vocab: dict[str, int], **overrides) -> JanusConfig:
    """Random tiny Janus: Llama hidden 64, 8 layers; 32 px; SigLIP 8x8 patches; VQ 8x8, 256 codes."""
    text = dict(
        model_type="llama",
        vocab_size=len(vocab),
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
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
        projection_dim=64,
        num_image_tokens=64,
        mlp_ratio=2.0,
        attention_dropout=0.0,
    )
    vq = dict(
        num_embeddings=256,
        embed_dim=8,
        latent_channels=8,
        base_channels=32,
        channel_multiplier=[1, 2, 2],
        num_res_blocks=1,
        num_patches=8,
        projection_dim=64,
        image_token_embed_dim=64,
        num_hidden_layers=1,
    )
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    vq.update(overrides.pop("vq_config", {}))
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=vocab[PLACEHOLDER],
        **overrides,
    )


class JanusAdapter(BackboneAdapter):
    """Adapter for Janus / Janus-Pro.

    Args:
        pretrained_path: local directory of a ``JanusForConditionalGeneration`` checkpoint with
            its tokenizer (and ``preprocessor_config.json`` for the SigLIP statistics). ``None``
            builds a random tiny config (tests, the embedded default).
        config_overrides: for the tiny config: ``text_config`` / ``vision_config`` /
            ``vq_config`` dicts merged into the defaults, other keys passed to ``JanusConfig``.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_caption_tokens: longest caption in tokens; longer ones are cut and counted
            (default: what the position embeddings leave beside the image and the prompt).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config_overrides: dict | None = None,
        torch_dtype: str = "float32",
        max_caption_tokens: int | None = None,
    ):
        super().__init__(max_caption_tokens)
        dtype = DTYPES[torch_dtype]
        if pretrained_path is not None:
            local_checkpoint(pretrained_path)
            self.model = JanusForConditionalGeneration.from_pretrained(
                pretrained_path, dtype=dtype, local_files_only=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained_path, local_files_only=True)
        else:
            self.tokenizer = build_word_tokenizer([PLACEHOLDER, BOI, EOI])
            config = tiny_config(self.tokenizer.get_vocab(), **dict(config_overrides or {}))
            self.model = JanusForConditionalGeneration(config).to(dtype)
        self._check_grids()
        self.image_processor = self._load_image_processor(pretrained_path)
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        if not self.image_processor.do_normalize:
            mean, std = (0.0,) * 3, (1.0,) * 3
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # (1, D), not 0-dim: a 0-dim parameter breaks DeepSpeed broadcasts
        mask_file = Path(pretrained_path or "") / MASK_FILE
        init = torch.load(mask_file) if pretrained_path and mask_file.exists() else None
        self.mask_embedding = nn.Parameter(
            (init if init is not None else self._mean_code_embedding()).to(dtype)
        )
        vocab = self.tokenizer.get_vocab()
        self.special = {"placeholder": vocab[PLACEHOLDER], "boi": vocab[BOI], "eoi": vocab[EOI]}
        self.train(False)

    def _check_grids(self) -> None:
        """SigLIP and the VQ must give the same number of image tokens (image_positions (B, N))."""
        siglip = self.model.config.vision_config.num_image_tokens
        if siglip != self.tokens_per_image:
            raise ValueError(
                f"Janus vision_config.num_image_tokens={siglip} differs from the VQ grid "
                f"{self.image_grid} ({self.tokens_per_image} tokens)"
            )

    def _load_image_processor(self, path: str | None):
        """The checkpoint's image processor, or SigLIP statistics at ``image_size``."""
        if path is not None and (Path(path) / "preprocessor_config.json").exists():
            return AutoImageProcessor.from_pretrained(path, local_files_only=True)
        size = {"height": self.image_size, "width": self.image_size}
        return JanusImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, size=size)

    @torch.no_grad()
    def _mean_code_embedding(self, chunk: int = 4096) -> Tensor:
        """Mean generation embedding over the codebook -> (1, D): an in-distribution mask input.

        DIVA's stages freeze the mask embedding with the rest of the model outside the trained
        blocks, so it starts from the codebook centroid rather than from noise.
        """
        codes = torch.arange(self.codebook_size, device=self.model.device)  # (K,)
        total = sum(
            self.model.prepare_embeddings_for_image_generation(part).float().sum(0)
            for part in codes.split(chunk)
        )  # (D,)
        return (total / self.codebook_size).unsqueeze(0).cpu()  # (1, D)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def vq(self) -> nn.Module:
        return self.model.model.vqmodel

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def codebook_size(self) -> int:
        return self.model.config.vq_config.num_embeddings

    @property
    def text_vocab_size(self) -> int:
        return self.model.lm_head.out_features

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def image_grid(self) -> tuple[int, int]:
        side = int(self.model.config.vq_config.num_patches)
        return side, side

    @property
    def needs_pixels_for_understanding(self) -> bool:
        return True

    # ---- images --------------------------------------------------------------------------------
    def _encode_images(self, pixels: Tensor) -> Tensor:
        out = self.vq.encode((pixels * 2 - 1).to(self.vq.dtype))  # VQ input in [-1, 1]
        return out.image_tokens.view(len(pixels), -1)  # (B, N)

    def _decode_images(self, codes: Tensor) -> Tensor:
        # vqmodel.decode is channels-first (B, 3, H, W) in [-1, 1]; the model's
        # decode_image_tokens would permute to channels-last.
        return (self.vq.decode(codes).float() + 1) / 2

    def siglip_pixels(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> SigLIP input, normalised as the Janus processor does."""
        return (pixels.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std

    # ---- flows ---------------------------------------------------------------------------------
    def _batch(self, rows: list[tuple[list[int], list[int], int]], extra: dict) -> FlowBatch:
        """rows of (token ids, labels, image start) -> right-padded FlowBatch."""
        n = self.tokens_per_image
        rows = [(ids, lab, start + torch.arange(n)) for ids, lab, start in rows]
        pad = self.tokenizer.pad_token_id or 0
        batch = right_padded_batch(rows, pad, self.mask_embedding.device)
        batch.extra.update(extra)
        return batch

    def build_understanding(
        self,
        prompts: Sequence[str],
        captions: Sequence[str],
        codes: Tensor | None = None,
        pixels: Tensor | None = None,
    ) -> FlowBatch:
        if pixels is None:
            raise ValueError("JanusAdapter's understanding flow reads pixels (SigLIP encoder)")
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = []
        for prompt, caption in zip(prompts, captions, strict=True):
            head = [bos, self.special["boi"]]
            image = [self.special["placeholder"]] * self.tokens_per_image
            context = head + image + [self.special["eoi"]] + self._text(prompt)
            target = self.caption_ids(caption) + [eos]
            rows.append((context + target, [IGNORE_INDEX] * len(context) + target, len(head)))
        return self._batch(rows, {"pixel_values": self.siglip_pixels(pixels)})

    def build_generation(self, captions: Sequence[str], codes: Tensor, mask: Tensor) -> FlowBatch:
        self.check_codes(codes)
        if mask.shape != codes.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match codes {tuple(codes.shape)}")
        rows = []
        for caption, image, masked in zip(captions, codes.cpu(), mask.bool().cpu(), strict=True):
            head = [self.tokenizer.bos_token_id, *self.caption_ids(caption), self.special["boi"]]
            ids = head + [self.special["placeholder"]] * len(image) + [self.special["eoi"]]
            labels = torch.where(masked, image, torch.full_like(image, IGNORE_INDEX))  # (N,)
            lab = [IGNORE_INDEX] * len(head) + labels.tolist() + [IGNORE_INDEX]
            rows.append((ids, lab, len(head)))
        device = self.mask_embedding.device
        return self._batch(rows, {"codes": codes.to(device), "mask": mask.bool().to(device)})

    def generation_inputs_embeds(self, batch: FlowBatch) -> Tensor:
        """Token embeddings with the image positions replaced by code or mask embeddings."""
        embeds = self.model.get_input_embeddings()(batch.input_ids)  # (B, T, D)
        codes, mask = batch.extra["codes"], batch.extra["mask"]  # (B, N)
        visible = codes.masked_fill(mask, 0)  # masked codes never enter the model
        image = self.model.prepare_embeddings_for_image_generation(visible)  # (B, N, D)
        image = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(image.dtype), image)
        index = batch.image_positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])  # (B, N, D)
        return embeds.scatter(1, index, image.to(embeds.dtype))

    def _forward_understanding(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        out = self.model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.extra["pixel_values"].to(self.model.dtype),
        )
        h, targets = shifted_slot_states(out.last_hidden_state, batch.labels)  # (B, S, D)
        return self.model.lm_head(h), targets  # (B, S, V_t)

    def _forward_generation(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        out = self.model.model.language_model(
            inputs_embeds=self.generation_inputs_embeds(batch), attention_mask=batch.attention_mask
        )
        h, targets = shifted_slot_states(out.last_hidden_state, batch.labels)  # (B, S, D)
        return self.model.model.generation_head(h), targets  # (B, S, K)

    # ---- persistence ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> JanusAdapter:
        return cls(config_overrides=overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> JanusAdapter:
        return cls(pretrained_path=str(path), **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        torch.save(self.mask_embedding.detach().cpu(), Path(path) / MASK_FILE)
