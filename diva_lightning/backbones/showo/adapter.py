"""Show-o adapter: Phi + MAGVIT-v2 + omni-attention behind the ``BackboneAdapter`` contract.

* Understanding flow (U), the official MMU layout: ``<|mmu|> <|soi|> IMAGE <|eoi|>`` then the text
  part ``BOS prompt caption EOS`` right-padded to ``max_text_len``; the prompt is wrapped in
  ``prompt_template`` (the official chat format of ``inference_mmu.py``; an empty prompt gives the
  official captioning layout). Labels on the caption and EOS only; the attention mask is Show-o's
  MMU mask (causal text, bidirectional image prefix). Logits at ``p - 1`` score the token at ``p``.
* Generation flow (G), the official T2I layout: ``<|t2i|> BOS caption EOS`` left-padded, then
  ``<|soi|> IMAGE' <|eoi|>`` with masked codes replaced by the mask token; omni-attention (image block
  bidirectional, padding removed) as an additive float 4D mask; MaskGIT prediction AT each masked
  position (no shift), logits over the codebook columns only, in codebook order.

The 4D mask travels in ``FlowBatch.extra["attention_mask_4d"]`` (float32 ``(B, 1, T, T)``);
``attention_mask`` is the usual 2D real-token mask. ``generate_images`` samples codes with
MaskGIT (text-to-image or inpainting, classifier-free guidance) for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import IGNORE_INDEX, FlowBatch, gather_slots, pad_positions
from diva_lightning.backbones.loading import local_checkpoint
from diva_lightning.backbones.showo import checkpoint as ckpt
from diva_lightning.backbones.showo.magvitv2 import MAGVITv2
from diva_lightning.backbones.showo.masks import (
    apply_token_mask,
    mmu_attention_mask,
    t2i_attention_mask,
)
from diva_lightning.backbones.showo.model import ShowoConfig, ShowoModel
from diva_lightning.backbones.showo.presets import PRESET_BY_TOKENS, get_preset, merge
from diva_lightning.backbones.showo.prompting import ShowoPrompting, extend_tokenizer
from diva_lightning.backbones.showo.sampling import greedy_understanding, maskgit_generate
from diva_lightning.backbones.tokenizers import build_word_tokenizer

CHAT_TEMPLATE = "USER: \n{prompt} ASSISTANT:"  # official inference_mmu.py prompt


class ShowoAdapter(BackboneAdapter):
    """Adapter for Show-o (``showlab/show-o``, ``showlab/show-o-512x512``).

    Args:
        pretrained_path: local checkpoint directory laid out as described in
            ``diva_lightning.backbones.showo.checkpoint`` (``showo/``, ``magvitv2/``, ``phi/``).
            ``None`` builds a random model of ``preset``.
        config_overrides: merged into the chosen preset's settings; keys ``phi`` (PhiConfig
            kwargs), ``magvit`` (``encoder`` / ``decoder`` / ``codebook_dim``), ``image_size``,
            ``max_text_len``.
        preset: ``tiny`` (default, random), ``showo-256`` or ``showo-512``. With a checkpoint
            the preset only supplies what the folder lacks; ``tiny`` there means "infer from the
            number of image tokens".
        prompt_template: format of the understanding prompt (``{prompt}`` is replaced); default
            the saved one, else the official ``"USER: \\n{prompt} ASSISTANT:"``.
        **kwargs: ``torch_dtype`` (of the LLM; the VQ stays fp32) and ``max_caption_tokens`` (at
            most the ``max_text_len`` slots less BOS and EOS, the default), ``BackboneAdapter``.
    """

    generation_order = "confidence"  # MaskGIT over omni-attention, as Show-o generates

    def __init__(
        self,
        pretrained_path: str | None = None,
        config_overrides: dict | None = None,
        preset: str = "tiny",
        prompt_template: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        overrides = dict(config_overrides or {})
        self._saved = {"preset": preset, "overrides": overrides, "prompt_template": CHAT_TEMPLATE}
        if pretrained_path is None:
            self._build_random(get_preset(preset, overrides))
        else:
            self._load(local_checkpoint(pretrained_path), preset, overrides)
        self.model.to(self.torch_dtype)
        self.prompt_template = prompt_template or self._saved["prompt_template"]
        self.prompting = ShowoPrompting(self.special, self.max_text_len, IGNORE_INDEX)
        self.train(False)

    # ---- construction --------------------------------------------------------------------------
    def _set_parts(self, tokenizer, phi: dict, magvit: MAGVITv2, max_text_len: int) -> None:
        llm_vocab_size, self.special = extend_tokenizer(tokenizer)
        side = self._image_size // magvit.downsample_factor
        codebook = magvit.quantize.codebook_size
        config = ShowoConfig(
            vocab_size=llm_vocab_size + 10 + codebook + 1,
            llm_vocab_size=llm_vocab_size,
            codebook_size=codebook,
            num_vq_tokens=side * side,
        )
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self.model = ShowoModel(phi, config)
        self.magvit = magvit.float()
        self.max_text_len = int(max_text_len)

    def _build_random(self, preset: dict) -> None:
        self._image_size = int(preset["image_size"])
        magvit = MAGVITv2.from_config(preset["magvit"])
        self._set_parts(build_word_tokenizer(), preset["phi"], magvit, preset["max_text_len"])

    def _load(self, path: Path, preset: str, overrides: dict) -> None:
        showo_cfg = ckpt.read_json(path / "showo" / "config.json")
        saved = ckpt.read_json(path / "diva_showo.json")
        if preset == "tiny":
            preset = saved.get("preset") or PRESET_BY_TOKENS.get(showo_cfg["num_vq_tokens"], "tiny")
        settings = get_preset(preset, merge(saved.get("overrides", {}), overrides))
        vq_state = ckpt.load_weights(path / "magvitv2")
        vq_cfg = ckpt.read_json(path / "magvitv2" / "config.json")
        if "encoder" not in vq_cfg:
            vq_cfg = ckpt.infer_magvit_config(vq_state)
        magvit = MAGVITv2.from_config(merge(vq_cfg, overrides.get("magvit", {})))
        side = int(showo_cfg["num_vq_tokens"] ** 0.5)
        self._image_size = side * magvit.downsample_factor
        phi = ckpt.read_json(path / "phi" / "config.json") or settings["phi"]
        phi = merge(phi, overrides.get("phi", {}))
        tokenizer = AutoTokenizer.from_pretrained(path / "phi")
        self._set_parts(tokenizer, phi, magvit, settings["max_text_len"])
        built = {k: getattr(self.model.config, k) for k in ("vocab_size", "codebook_size")}
        if built != {k: showo_cfg[k] for k in built}:
            raise ValueError(
                f"tokenizer ({path / 'phi'}) + MAGVIT-v2 give {built}, the Show-o config says "
                f"{ {k: showo_cfg[k] for k in built} }"
            )
        self._strict_load(self.model, ckpt.load_weights(path / "showo"), "showo")
        self._strict_load(self.magvit, vq_state, "magvitv2")
        self._saved = {
            "preset": preset,
            "overrides": merge(saved.get("overrides", {}), overrides),
            "prompt_template": saved.get("prompt_template", CHAT_TEMPLATE),
        }

    @staticmethod
    def _strict_load(module: nn.Module, state: dict, name: str) -> None:
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{name} weights do not fit the model: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )

    # ---- facts -------------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def vq(self) -> nn.Module:
        return self.magvit

    @property
    def hidden_size(self) -> int:
        return self.model.showo.config.hidden_size

    @property
    def codebook_size(self) -> int:
        return self.model.config.codebook_size

    @property
    def text_vocab_size(self) -> int:
        return self.model.config.vocab_size  # the native MMU loss is over the whole vocabulary

    @property
    def vq_downsample(self) -> int:
        return self.magvit.downsample_factor

    @property
    def mask_token_id(self) -> int:
        return self.model.config.mask_token_id

    # ---- images --------------------------------------------------------------------------------
    def _encode_images(self, pixels: Tensor) -> Tensor:
        dtype = self.magvit.encoder.conv_in.weight.dtype
        vq_input = ((pixels - 0.5) / 0.5).to(dtype)  # Show-o normalises to [-1, 1]
        return self.magvit.get_code(vq_input)

    def _decode_images(self, codes: Tensor) -> Tensor:
        return (self.magvit.decode_code(codes).float() + 1) / 2

    @property
    def max_positions(self) -> int:
        return int(self.model.showo.config.max_position_embeddings)

    @property
    def caption_token_limit(self) -> int:
        """Show-o's text slots are fixed (``max_text_len``, BOS and EOS included): a caption
        never passes them, and one cut to fit them is counted."""
        slots = self.max_text_len - 2
        return min(self.max_caption_tokens or slots, slots)

    # ---- flows ---------------------------------------------------------------------------------
    def _flow_batch(self, ids: Tensor, labels: Tensor, mask4d: Tensor, start: int) -> FlowBatch:
        device = self.model.showo.lm_head.weight.device
        n = self.tokens_per_image
        positions = torch.arange(start, start + n).expand(ids.shape[0], n)  # (B, N)
        return FlowBatch(
            attention_mask=(ids != self.special.pad).long().to(device),
            labels=labels.to(device),
            image_positions=positions.to(device),
            input_ids=ids.to(device),
            extra={"attention_mask_4d": mask4d.to(device)},
        )

    def _layout_understanding(self, prompts, captions, codes: Tensor, pixels) -> FlowBatch:
        """The official MMU layout (module docstring)."""
        texts, contexts = [], []
        for prompt, caption in zip(prompts, captions, strict=True):
            context = self._text(self.prompt_template.format(prompt=prompt)) if prompt else []
            text = context + self.caption_ids(f" {caption}" if context else caption)
            bos_added = not text or text[0] != self.special.bos
            texts.append(text)
            contexts.append(int(bos_added) + len(context))
        image_tokens = codes.cpu() + self.model.config.image_token_offset
        ids, _, labels = self.prompting.mmu(image_tokens, texts)  # (B, N + 3 + M)
        for row, context in zip(labels, contexts, strict=True):
            row[: self.tokens_per_image + 3 + context] = IGNORE_INDEX  # caption + EOS only
        return self._flow_batch(ids, labels, mmu_attention_mask(ids, self.special.eoi), 2)

    def _layout_generation(self, captions, codes: Tensor, mask: Tensor) -> FlowBatch:
        """The official T2I layout with omni-attention (module docstring)."""
        codes, mask = codes.cpu(), mask.cpu().bool()
        image_tokens = codes + self.model.config.image_token_offset
        inputs, _ = apply_token_mask(image_tokens, mask, self.mask_token_id)
        ids, _, _ = self.prompting.t2i([self.caption_ids(c) for c in captions], inputs, inputs)
        start = self.max_text_len + 2
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, start : start + self.tokens_per_image] = torch.where(mask, codes, IGNORE_INDEX)
        sp = self.special
        return self._flow_batch(ids, labels, t2i_attention_mask(ids, sp.pad, sp.soi, sp.eoi), start)

    def _slots(self, batch: FlowBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Supervised positions -> (positions (B, S), valid (B, S), targets (B, S))."""
        rows = [torch.nonzero(row != IGNORE_INDEX).flatten() for row in batch.labels]
        positions, valid = pad_positions(rows)
        positions, valid = positions.to(batch.labels.device), valid.to(batch.labels.device)
        targets = torch.gather(batch.labels, 1, positions).masked_fill(~valid, IGNORE_INDEX)
        return positions, valid, targets

    def _hidden(self, batch: FlowBatch) -> Tensor:
        return self.model.hidden(batch.input_ids, batch.extra["attention_mask_4d"])  # (B, T, D)

    def _forward_understanding(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        positions, valid, targets = self._slots(batch)
        h = gather_slots(self._hidden(batch), positions - 1, valid)  # (B, S, D), next-token shift
        return self.model.lm_logits(h), targets  # (B, S, V)

    def _forward_generation(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        positions, valid, targets = self._slots(batch)
        h = gather_slots(self._hidden(batch), positions, valid)  # (B, S, D), no shift (MaskGIT)
        return self.model.image_logits(h), targets  # (B, S, K) codebook order

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_images(
        self,
        captions: Sequence[str],
        guidance_scale: float = 1.75,
        timesteps: int = 18,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        codes: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """MaskGIT text-to-image -> codes (B, N). Inpainting: give ``codes`` and ``mask`` (B, N),
        True where a code is regenerated. Defaults: guidance 1.75, 18 steps (Show-o's demo)."""
        n = self.tokens_per_image
        if codes is None:
            tokens = torch.full((len(captions), n), self.mask_token_id)
        else:
            self.check_codes(codes)
            tokens, _ = apply_token_mask(
                codes.cpu() + self.model.config.image_token_offset,
                mask.cpu().bool(),
                self.mask_token_id,
            )
        device = self.model.showo.lm_head.weight.device
        cond, _ = self.prompting.t2i_gen([self._text(c) for c in captions], tokens)
        uncond, _ = self.prompting.t2i_gen([[]] * len(captions), tokens)
        sampled, _, _ = maskgit_generate(
            self.model, self.special, cond.to(device), uncond.to(device), guidance_scale,
            timesteps, temperature, generator,
        )  # fmt: skip
        return sampled

    @torch.no_grad()
    def generate_text(self, codes: Tensor, prompt: str, max_new_tokens: int = 32) -> list[str]:
        """Greedy answer to ``prompt`` about each image (official MMU inference layout)."""
        self.check_codes(codes)
        prompt_ids = self._text(self.prompt_template.format(prompt=prompt))
        answers = []
        for image in codes.cpu() + self.model.config.image_token_offset:
            ids = self.prompting.mmu_infer(image, prompt_ids).to(self.model.showo.device)
            mask = mmu_attention_mask(ids, self.special.eoi)
            new = greedy_understanding(self.model, ids, mask, max_new_tokens, self.special.eos)
            answers.append(self.tokenizer.decode(new[0], skip_special_tokens=True))
        return answers

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        ckpt.save_weights(path / "showo", self.model.state_dict())
        ckpt.write_json(path / "showo" / "config.json", self.model.config.to_dict())
        ckpt.save_weights(path / "magvitv2", self.magvit.state_dict())
        ckpt.write_json(path / "magvitv2" / "config.json", self.magvit.config_dict())
        phi = self.model.showo.config.to_dict()
        ckpt.write_json(path / "phi" / "config.json", phi)
        self.tokenizer.save_pretrained(path / "phi")
        overrides = merge(self._saved["overrides"], {"max_text_len": self.max_text_len})
        ckpt.write_json(
            path / "diva_showo.json",
            {
                "preset": self._saved["preset"],
                "overrides": overrides,
                "prompt_template": self.prompt_template,
            },
        )
