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

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    JanusConfig,
    JanusForConditionalGeneration,
)
from transformers.models.janus import JanusImageProcessorPil

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import FlowBatch, shifted_slot_states
from diva_lightning.backbones.tokenizers import TINY_LM, build_word_tokenizer, tiny_vq

PLACEHOLDER, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
MASK_FILE = "diva_mask_embedding.pt"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # Janus-Pro's SigLIP-L statistics


def tiny_config(vocab: dict[str, int], **overrides) -> JanusConfig:
    """Random tiny Janus: Llama hidden 64, 8 layers; 32 px; SigLIP 8x8 patches; VQ 8x8, 256 codes."""
    text = dict(TINY_LM, model_type="llama", vocab_size=len(vocab))
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
    vq = tiny_vq(num_embeddings=256, num_patches=8, projection_dim=64, image_token_embed_dim=64)
    vq.update(num_hidden_layers=1)
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
        pretrained_path: a local ``JanusForConditionalGeneration`` folder with its tokenizer
            (and ``preprocessor_config.json`` for the SigLIP statistics). ``None``: a random
            tiny Janus (tests, the embedded default).
        config_overrides: for the tiny config: ``text_config`` / ``vision_config`` /
            ``vq_config`` dicts merged into the defaults, other keys passed to ``JanusConfig``.
        **kwargs: ``torch_dtype``, ``max_caption_tokens`` (``BackboneAdapter``).
    """

    def __init__(
        self, pretrained_path: str | None = None, config_overrides: dict | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        dtype = self.torch_dtype
        if pretrained_path is not None:
            self.load_checkpoint(JanusForConditionalGeneration, pretrained_path)
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
        self.special = self.special_ids({"placeholder": PLACEHOLDER, "boi": BOI, "eoi": EOI})
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
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def codebook_size(self) -> int:
        return self.model.config.vq_config.num_embeddings

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
    def _image_block(self, codes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Placeholders: the forward puts SigLIP features (U) or code embeddings (G) there."""
        return torch.full_like(codes, self.special["placeholder"]), torch.arange(len(codes))

    def _flow_extra(self, flow: str, codes: Tensor | None, mask: Tensor | None, pixels) -> dict:
        if flow == "U":
            return {"pixel_values": self.siglip_pixels(pixels)}
        return {"codes": codes, "mask": mask.bool()}

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
    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        torch.save(self.mask_embedding.detach().cpu(), Path(path) / MASK_FILE)
