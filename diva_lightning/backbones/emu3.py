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

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, Emu3Config, Emu3ForConditionalGeneration

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

EOL, BOI, EOI, IMAGE = "<|extra_200|>", "<|image start|>", "<|image end|>", "<image>"


def tiny_config(vocab: dict[str, int], codebook_size: int, **overrides) -> Emu3Config:
    """Random tiny Emu3: LM hidden 64, 8 layers; 32 px -> 8 x 8 codes from a 2-level VQ."""
    text = dict(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_dropout=0.0,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vq = dict(
        codebook_size=codebook_size,
        embed_dim=8,
        latent_channels=8,
        base_channels=32,
        channel_multiplier=[1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        temporal_downsample_factor=1,
        hidden_size=64,
        num_attention_heads=1,
    )
    text.update(overrides.pop("text_config", {}))
    vq.update(overrides.pop("vq_config", {}))
    return Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab, **overrides)


class Emu3Adapter(BackboneAdapter):
    """Adapter for Emu3.

    Args:
        pretrained_path: local directory of a checkpoint (model + tokenizer). ``None`` builds a
            random tiny config (tests, the embedded default).
        config_overrides: for the tiny config: ``text_config`` / ``vq_config`` dicts and
            ``image_size`` (pixels, default 32).
        mask_token: reserved token put at masked image positions in the generation flow.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_caption_tokens: longest caption in tokens; longer ones are cut and counted
            (default: what the position embeddings leave beside the image and the prompt).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config_overrides: dict | None = None,
        mask_token: str = "<|extra_201|>",
        torch_dtype: str = "float32",
        max_caption_tokens: int | None = None,
    ):
        super().__init__(max_caption_tokens)
        overrides = dict(config_overrides or {})
        self._image_size = int(overrides.pop("image_size", 32))
        if pretrained_path is not None:
            local_checkpoint(pretrained_path)
            self.model = Emu3ForConditionalGeneration.from_pretrained(
                pretrained_path, dtype=DTYPES[torch_dtype], local_files_only=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained_path, local_files_only=True)
            extra = Path(pretrained_path) / "diva_adapter.pt"
            if extra.exists():
                self._image_size = torch.load(extra)["image_size"]
        else:
            codebook = int(overrides.get("vq_config", {}).get("codebook_size", 256))
            visual = [f"<|visual token{i:06d}|>" for i in range(codebook)]
            self.tokenizer = build_word_tokenizer([IMAGE, EOL, BOI, EOI, mask_token, *visual])
            config = tiny_config(self.tokenizer.get_vocab(), codebook, **overrides)
            self.model = Emu3ForConditionalGeneration(config).to(DTYPES[torch_dtype])
        self.mask_token = mask_token
        self._init_vocabulary()
        self.train(False)

    def _init_vocabulary(self) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (EOL, BOI, EOI, self.mask_token) if t not in vocab]
        if missing:
            raise ValueError(f"Emu3 tokenizer lacks the special tokens {missing}")
        mapping = self.model.model.vocabulary_mapping
        image_ids = torch.tensor([mapping.img2bpe[i] for i in range(len(mapping.img2bpe))])
        self.register_buffer("image_token_ids", image_ids, persistent=False)  # (K,) code -> LM id
        self.special = {
            name: vocab[tok]
            for name, tok in (("eol", EOL), ("boi", BOI), ("eoi", EOI), ("mask", self.mask_token))
        }
        if self.special["mask"] in set(image_ids.tolist()):
            raise ValueError(f"mask token {self.mask_token!r} is an image code")

    # ---- facts -------------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.text_model.layers

    @property
    def vq(self) -> nn.Module:
        return self.model.model.vqmodel

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def codebook_size(self) -> int:
        return len(self.image_token_ids)

    @property
    def text_vocab_size(self) -> int:
        return self.model.lm_head.out_features

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def image_grid(self) -> tuple[int, int]:
        side = self._image_size // self.vq.vision_spatial_factor
        return side, side

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
    def _image_ids(self, codes: Tensor) -> Tensor:
        """codes (N,) -> LM ids with the EOL column, (rows * (cols + 1),)."""
        rows, cols = self.image_grid
        ids = self.image_token_ids[codes.to(self.image_token_ids.device)].view(rows, cols)
        eol = ids.new_full((rows, 1), self.special["eol"])
        return torch.cat([ids, eol], 1).flatten()

    def _image_offsets(self) -> Tensor:
        """Index of each code inside the image block (EOL column skipped), (N,)."""
        rows, cols = self.image_grid
        return (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)).flatten()

    def _batch(self, rows: list[tuple[list[int], list[int], int]]) -> FlowBatch:
        """rows of (token ids, labels, image start) -> right-padded FlowBatch."""
        offsets = self._image_offsets()
        rows = [(ids, lab, start + offsets) for ids, lab, start in rows]
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
            codes = self.tokenize_images(pixels)
        self.check_codes(codes)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = []
        for prompt, caption, image in zip(prompts, captions, codes, strict=True):
            head = [bos, self.special["boi"]]
            image_ids = self._image_ids(image).tolist()
            context = head + image_ids + [self.special["eoi"]] + self._text(prompt)
            target = self.caption_ids(caption) + [eos]
            rows.append((context + target, [IGNORE_INDEX] * len(context) + target, len(head)))
        return self._batch(rows)

    def build_generation(self, captions: Sequence[str], codes: Tensor, mask: Tensor) -> FlowBatch:
        self.check_codes(codes)
        if mask.shape != codes.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match codes {tuple(codes.shape)}")
        offsets = self._image_offsets()
        rows = []
        for caption, image, masked in zip(captions, codes, mask.bool(), strict=True):
            head = [self.tokenizer.bos_token_id, *self.caption_ids(caption), self.special["boi"]]
            image_ids = self._image_ids(image)
            labels = torch.full_like(image_ids, IGNORE_INDEX)
            where = offsets[masked.cpu()]
            labels[where] = image[masked].cpu()  # targets are codes, not LM ids
            image_ids[where] = self.special["mask"]
            ids = head + image_ids.tolist() + [self.special["eoi"]]
            lab = [IGNORE_INDEX] * len(head) + labels.tolist() + [IGNORE_INDEX]
            rows.append((ids, lab, len(head)))
        return self._batch(rows)

    def _hidden(self, batch: FlowBatch) -> Tensor:
        out = self.model.model.text_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        )
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
    def tiny(cls, **overrides) -> Emu3Adapter:
        return cls(config_overrides=overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Emu3Adapter:
        return cls(pretrained_path=str(path), **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        torch.save({"image_size": self._image_size}, path / "diva_adapter.pt")
