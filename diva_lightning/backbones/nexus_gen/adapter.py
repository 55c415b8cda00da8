"""Nexus-Gen: Qwen2.5-VL whose ``vision_head`` regresses image embeddings (continuous targets).

The model (issue #22, facts from its public repository): transformers'
``Qwen2_5_VLForConditionalGeneration`` plus ``vision_head`` (bias-free Linear, hidden -> hidden)
and ``image_prefill_embeds`` (81 rows). Its "codes" are the frozen vision tower's 81 merged
embeddings of the image at 252 x 252 (``tokenize_images``, ``vision.generation_targets``).

* Understanding flow (U): the chat template with the system prompt "You are a helpful assistant.",
  USER = image + ``\\n`` + prompt, ASSISTANT = caption; CE on the caption and ``<|im_end|>``.
  The image's tower output replaces its pads. DIVA's pairs give it at 252 x 252 (81 tokens),
  the generation target's view; Nexus-Gen's own understanding data keeps native sizes.
* Generation flow (G): USER = "Generate an image according to the following description:" +
  caption, ASSISTANT = "Here is an image based on the description: " + the 81 image pads. The
  inputs at a **masked** pad are ``image_prefill_embeds`` (their "prefilled autoregression"), at
  an unmasked one the real target embedding; the state before each masked pad, through
  ``vision_head``, predicts its embedding (next-token shift). The native loss is their image loss,
  ``0.5 MSE + 0.5 (1 - cos)`` (``flows.embedding_regression``) over the masked pads. All masked is
  Nexus-Gen's own training. The attention is causal (a pad sees only what precedes it), unlike
  MaskGIT's bidirectional image block: the unmasked pads after a masked one do not inform it.

Positions are Qwen2.5-VL's 3-D rotary positions (transformers' ``get_rope_index``). Checked token
for token and to 1e-5 against their reference code (golden fixtures, ``tests/test_nexus_gen_*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import (
    IGNORE_INDEX,
    FlowBatch,
    pad_positions,
    take_positions,
)
from diva_lightning.backbones.loading import local_checkpoint
from diva_lightning.backbones.nexus_gen import embeds, layout, vision
from diva_lightning.backbones.nexus_gen.checkpoint import EXTRA
from diva_lightning.backbones.nexus_gen.sampling import greedy_generate
from diva_lightning.backbones.nexus_gen.tiny import tiny_config, tiny_tokenizer

HEADS_FILE = "nexus_gen_heads.safetensors"  # vision_head and image_prefill_embeds, when saved here
GRID = (1, 18, 18)  # (t, h, w) patches of a 252 x 252 image: 81 merged tokens


class NexusGenAdapter(BackboneAdapter):
    """Adapter for Nexus-Gen (see the module docstring).

    Args:
        pretrained_path: local folder of a Nexus-Gen checkpoint (their key layout or this
            adapter's ``save_pretrained``) with its tokenizer. ``None``: a random tiny model.
        config_overrides: for the tiny config (``tiny.tiny_config`` keys).
        **kwargs: ``torch_dtype``, ``max_caption_tokens`` (``BackboneAdapter``).
    """

    continuous_targets = True
    SYSTEM = "You are a helpful assistant."
    GENERATION_USER = "Generate an image according to the following description:"
    GENERATION_ANSWER = "Here is an image based on the description: "
    ROLE_WORDS = {"system": "system", "user": "user", "assistant": "assistant", "newline": "\n"}

    def __init__(
        self, pretrained_path: str | None = None, config_overrides: dict | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        if pretrained_path is not None:
            heads = self._load(pretrained_path)
        else:
            self.tokenizer = tiny_tokenizer()
            model = Qwen2_5_VLForConditionalGeneration(tiny_config(**(config_overrides or {})))
            self.model, heads = model.to(self.torch_dtype), None
        width = self.hidden_size
        self.vision_head = nn.Linear(width, width, bias=False, dtype=self.torch_dtype)
        self.image_prefill_embeds = nn.Embedding(
            self.tokens_per_image, width, dtype=self.torch_dtype
        )
        if heads is not None:
            self.load_state_dict(heads, strict=False)
        self.tokens = self._chat_tokens()
        self.train(False)

    def _load(self, path: str) -> dict[str, Tensor]:
        """The stock model and tokenizer from ``path``, and their two heads from its files.
        transformers maps the 4.49 key layout; every key must be accounted for."""
        folder = local_checkpoint(path)
        self.model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=self.torch_dtype, local_files_only=True, output_loading_info=True
        )
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        missing = [k for k in info["missing_keys"] if not k.endswith("inv_freq")]
        unexpected = sorted(set(info["unexpected_keys"]) - set(EXTRA))
        heads = _read_heads(folder)
        if missing or unexpected or set(heads) != set(EXTRA):
            raise ValueError(
                f"{folder} is not a Nexus-Gen checkpoint: missing keys {missing[:5]}, unexpected "
                f"{unexpected[:5]}, Nexus-Gen heads found {sorted(heads)} (expected {list(EXTRA)})"
            )
        self.loading_report = {"missing": missing, "unexpected": unexpected}
        return {k: v.to(self.torch_dtype) for k, v in heads.items()}

    def _chat_tokens(self) -> layout.ChatTokens:
        special = self.special_ids({n.strip("<|>"): n for n in ("<|im_start|>", "<|im_end|>",
                                   "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")})  # fmt: skip
        self.special = special
        words = {}
        for name, word in self.ROLE_WORDS.items():
            ids = self._text(word)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer splits the chat word {word!r} into {ids}")
            words[name] = ids[0]
        return layout.ChatTokens(**special, **words)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vq(self) -> nn.Module:
        """The frozen vision tower, merger included (it makes the targets)."""
        return self.model.model.visual

    @property
    def image_size(self) -> int:
        return vision.TARGET_SIZE

    @property
    def image_grid(self) -> tuple[int, int]:
        return GRID[1] // 2, GRID[2] // 2  # merged 2 x 2

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError("Nexus-Gen has no codebook: its targets are embeddings "
                             "(continuous_targets, generation_width)")  # fmt: skip

    @property
    def generation_width(self) -> int:
        return self.vision_head.out_features

    @property
    def needs_pixels_for_understanding(self) -> bool:
        return True

    # ---- images --------------------------------------------------------------------------------
    def _encode_images(self, pixels: Tensor) -> Tensor:
        return vision.generation_targets(self.vq, list(pixels))  # (B, 81, D)

    # ---- flows ---------------------------------------------------------------------------------
    def _pads(self, ids: Tensor) -> Tensor:
        return torch.nonzero(ids == self.tokens.image_pad).flatten()

    def build_understanding(self, prompts: Sequence[str], captions: Sequence[str],
                            codes: Tensor | None = None, pixels: Tensor | None = None) -> FlowBatch:  # fmt: skip
        """Image + prompt -> caption, the image through the frozen tower (pixels required)."""
        if pixels is None:
            raise ValueError("NexusGenAdapter's understanding flow reads pixels")
        pixel_values, grid = vision.patches(list(pixels), target=False)
        counts = (grid.prod(-1) // 4).tolist()  # merged tokens per image
        system, rows = self._text(self.SYSTEM), []
        for prompt, caption, count in zip(prompts, captions, counts, strict=True):
            user = [layout.IMAGE, *self._text("\n" + prompt)]
            answer = self.caption_ids(caption)
            ids, labels = layout.chat_sample(system, user, answer, self.tokens, [count])
            rows.append((ids, labels, self._pads(torch.tensor(ids))))
        return self._token_batch(rows, {"pixel_values": pixel_values, "image_grid_thw": grid})

    def build_generation(self, captions: Sequence[str], codes: Tensor, mask: Tensor) -> FlowBatch:
        """Caption -> image embeddings ``codes`` (B, 81, D) with ``mask`` (B, 81): prefill rows
        at masked pads, labels (the pad id) exactly there."""
        self.check_codes(codes)
        if mask.shape != codes.shape[:2]:
            raise ValueError(
                f"mask {tuple(mask.shape)} must be (B, N) of codes {tuple(codes.shape)}"
            )
        system, user_words, rows = self._text(self.SYSTEM), self._text(self.GENERATION_USER), []
        answer = [*self._text(self.GENERATION_ANSWER), layout.IMAGE]
        for caption, masked in zip(captions, mask.bool().cpu(), strict=True):
            user = [*user_words, *self.caption_ids(" " + caption)]
            ids, _ = layout.chat_sample(
                system, user, answer, self.tokens, (), [self.tokens_per_image]
            )
            pads = self._pads(torch.tensor(ids))
            labels = torch.full((len(ids),), IGNORE_INDEX)
            labels[pads[masked]] = self.tokens.image_pad
            rows.append((ids, labels.tolist(), pads))
        grid = torch.tensor([GRID] * len(captions))
        return self._token_batch(
            rows, {"targets": codes, "gen_mask": mask.bool(), "image_grid_thw": grid}
        )

    def rope_positions(self, batch: FlowBatch) -> Tensor:
        """(3, B, T) 3-D rotary positions of a flow (transformers' ``get_rope_index``)."""
        ids, grid = batch.input_ids, batch.extra["image_grid_thw"]
        types = (ids == self.tokens.image_pad).int()  # 1 at image tokens
        positions, _ = self.model.model.get_rope_index(
            ids, types, grid, None, None, batch.attention_mask
        )
        return positions

    def _hidden(self, batch: FlowBatch, inputs: Tensor) -> Tensor:
        """(B, T, D) final states of the language model on ``inputs`` at 3-D rotary positions."""
        out = self.language_model(inputs_embeds=inputs, attention_mask=batch.attention_mask,
                                  position_ids=self.rope_positions(batch))  # fmt: skip
        return out.last_hidden_state

    def _forward_understanding(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        tokens = self.language_model.get_input_embeddings()(batch.input_ids)  # (B, T, D)
        with torch.no_grad():  # the tower is frozen
            image = vision.tower_embeds(self.vq, batch.extra["pixel_values"],
                                        batch.extra["image_grid_thw"])  # fmt: skip
        inputs = embeds.understanding_embeds(tokens, batch.input_ids, self.tokens.image_pad, image)
        return self._understanding_logits(self._hidden(batch, inputs), batch)

    def _forward_generation(self, batch: FlowBatch) -> tuple[Tensor, Tensor, Tensor]:
        """-> (predicted embeddings (B, S, D), targets (B, S, D), valid (B, S)) at the masked pads."""
        targets, masked = batch.extra["targets"], batch.extra["gen_mask"]  # (B, N, D), (B, N)
        tokens = self.language_model.get_input_embeddings()(batch.input_ids)
        rows = torch.arange(self.tokens_per_image, device=tokens.device)
        prefill = self.image_prefill_embeds(rows)  # (N, D); a module call: ZeRO-3 gathers it
        inputs = embeds.generation_embeds(tokens, batch.image_positions, prefill, targets, masked)
        hidden = self._hidden(batch, inputs)  # (B, T, D)
        slots = embeds.prediction_slots(batch.image_positions)  # (B, N)
        picked, valid = pad_positions([torch.nonzero(m).flatten() for m in masked.cpu()])
        picked, valid = picked.to(hidden.device), valid.to(hidden.device)  # (B, S)
        pred = self.vision_head(take_positions(hidden, torch.gather(slots, 1, picked)))
        return pred, take_positions(targets, picked).to(pred.dtype), valid

    # ---- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_image_embeddings(
        self, captions: Sequence[str], max_new_tokens: int = 128
    ) -> Tensor:
        """Nexus-Gen's own text-to-image inference -> (B, 81, D) image embeddings.

        Their greedy loop with prefilled autoregression (``sampling.greedy_generate``, one
        caption at a time, as their ``_sample``): the generation prompt, the answer prefix
        "Here is an image based on the description: " and ``<|vision_start|>`` imposed (a
        trained model writes them itself), then the 81 prefill steps."""
        system, user_words = self._text(self.SYSTEM), self._text(self.GENERATION_USER)
        forced = [*self._text(self.GENERATION_ANSWER), self.tokens.vision_start]
        rows = []
        for caption in captions:
            user = [*user_words, *self.caption_ids(" " + caption)]
            prompt = layout.chat_sample(system, user, [], self.tokens)[0][:-1]  # no <|im_end|>
            out = greedy_generate(self.model, self.vision_head.weight,
                                  self.image_prefill_embeds.weight, prompt, self.tokens,
                                  {self.tokens.im_end}, max(max_new_tokens, len(forced) + 82),
                                  forced=forced)  # fmt: skip
            rows.append(out["image_embeds"])
        return torch.stack(rows)

    def generate_images(self, captions: Sequence[str], decoder=None) -> Tensor:
        """Captions -> pixels (B, 3, H, W) in [0, 1] through ``decoder`` (a callable on the
        (B, 81, D) embeddings: Nexus-Gen's separately trained FLUX.1-dev decoder, which this
        library does not ship). Without one: a ``ValueError`` saying so."""
        if decoder is None:
            raise ValueError(
                "NexusGenAdapter generates image embeddings, not pixels: rendering them needs "
                "Nexus-Gen's FLUX.1-dev decoder (their repository; not a dependency here). Pass "
                "decoder=<callable (B, 81, D) -> (B, 3, H, W) in [0, 1]>, or call "
                "generate_image_embeddings"
            )
        pixels = decoder(self.generate_image_embeddings(captions))
        if pixels.dim() != 4 or pixels.shape[:2] != (len(captions), 3):
            raise ValueError(f"decoder must return (B, 3, H, W) pixels, got {tuple(pixels.shape)}")
        return pixels.clamp(0, 1)

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        heads = {
            k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k in EXTRA
        }
        save_file(heads, str(Path(path) / HEADS_FILE))


def _read_heads(folder: Path) -> dict[str, Tensor]:
    """``vision_head.weight`` and ``image_prefill_embeds.weight`` from any safetensors file of
    ``folder`` (their checkpoints keep them among the model's shards; ``save_pretrained`` in
    ``HEADS_FILE``)."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update({k: handle.get_tensor(k) for k in handle.keys() if k in EXTRA})  # noqa: SIM118
    return found
