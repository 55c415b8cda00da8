"""The backbone adapter contract: one abstract class every UMM adapter subclasses once.

An adapter wraps one unified multimodal model and exposes the small surface DIVA needs (paper
Sec. 3.1): facts (layers, hidden size, codebook, image grid); the frozen VQ
(``tokenize_images`` / ``decode_images``); the two flows built from one image-text pair
(understanding: loss on the caption; generation: loss on the masked image codes only); one
forward per flow returning the image-token states of requested layers ``(B, L, N, D)`` or
pooled ``(B, L, D)``, the logits and the native loss; freezing; ``from_pretrained`` /
``save_pretrained``. Token-layout UMMs (codes as vocabulary ids) only describe their layout.

Layer numbering: layer ``l`` (1-based) is decoder block ``l``; its output is
``hidden_states[l]`` of a transformers forward with ``output_hidden_states=True``. The last
block is the raw block output (transformers puts the final norm into its last entry). A block
is called as ``block(hidden, *args, **kwargs)`` and returns the hidden state, or a tuple that
starts with it (every transformers decoder layer does): ``BlockCalls`` relies on this to run a
range of blocks again for the EMA teacher.

Logits (``flows.FlowOutput``): the understanding flow's ``V`` is the text vocabulary, the
generation flow's the codebook, in codebook order (code ``k`` is column ``k``). Stage 1 adds a
per-sample bias ``(B, V)`` to them (Eq. 8): an adapter never returns logits it does not score.

Continuous targets (``continuous_targets``, Nexus-Gen): "codes" are the regressed embeddings
``(B, N, D_t)``; flow G returns the predicted ones (``generation_width = D_t``, ``FlowOutput.valid``).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

from diva_lightning.backbones import checks
from diva_lightning.backbones.flows import (
    IGNORE_INDEX,
    FlowBatch,
    FlowOutput,
    LayerCapture,
    right_padded_batch,
    shifted_slot_states,
)
from diva_lightning.backbones.loading import DTYPES, local_checkpoint
from diva_lightning.backbones.zero import rows


class BackboneAdapter(nn.Module, abc.ABC):
    """Abstract UMM adapter. Subclasses implement the abstract members; everything else is shared.

    Attributes set by subclasses in ``__init__``: ``self.model`` (the wrapped network) and
    ``self.tokenizer`` (a ``transformers`` tokenizer used to turn prompts and captions into ids).
    """

    model: nn.Module
    CAPTION_RESERVE = 64  # positions left beside the image for the prompt and special tokens
    CHARS_PER_TOKEN_CAP = 32  # a caption is cut to limit x this many characters before tokenising
    # sampling through the generation flow: "raster" (one code at a time, causal image attention)
    # or "confidence" (MaskGIT: needs bidirectional attention in the image, as Show-o's)
    generation_order = "raster"
    # how images become pixels (data pipeline, prepare, evaluation): None, the data module's RGB
    # conversion, shorter side resized (bicubic) and centre-cropped; else a picklable function
    # (PIL image, size) -> RGB PIL image of size x size: the model's own (Liquid's)
    image_preprocess = None
    # True: the generation flow regresses image embeddings (see the module docstring)
    continuous_targets = False

    def __init__(self, torch_dtype: str = "float32", max_caption_tokens: int | None = None):
        """Settings every adapter takes (subclasses forward them with ``**kwargs``).

        Args:
            torch_dtype: dtype of the language model: ``float32``, ``bfloat16`` or ``float16``.
            max_caption_tokens: longest caption in tokens; longer ones are cut and counted
                (``pop_truncated_captions``). Default: what the position embeddings leave beside
                the image and ``CAPTION_RESERVE`` tokens of prompt.
        """
        super().__init__()
        if torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
        if max_caption_tokens is not None and max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be >= 1, got {max_caption_tokens}")
        self.torch_dtype = DTYPES[torch_dtype]
        self.max_caption_tokens = max_caption_tokens
        self.truncated_captions = 0

    def load_checkpoint(self, model_class, path: str | Path) -> Path:
        """``self.model`` (``model_class.from_pretrained``, in ``torch_dtype``) and
        ``self.tokenizer`` from a local folder, never the network; returns the folder."""
        folder = local_checkpoint(path)
        self.model = model_class.from_pretrained(
            folder, dtype=self.torch_dtype, local_files_only=True
        )
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return folder

    # ---- facts -------------------------------------------------------------------------------
    # Defaults for a transformers LM whose image codes are vocabulary ids (``image_token_ids``);
    # other layouts override them.
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, blocks, final norm) that returns ``last_hidden_state``."""
        return self.model.model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order (block ``l`` is ``decoder_layers[l - 1]``)."""
        return self.language_model.layers

    @property
    def vq(self) -> nn.Module:
        """The frozen image tokenizer (default: where transformers' UMMs keep it)."""
        return self.model.model.vqmodel

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.config.hidden_size)

    @property
    def codebook_size(self) -> int:
        return len(self.image_token_ids)

    @property
    def generation_width(self) -> int:
        """Width of the generation flow's logits: the codebook, or the target embeddings' dim."""
        return self.codebook_size

    @property
    def text_vocab_size(self) -> int:
        """Width ``V_t`` of the understanding flow's logits (the LM head's vocabulary)."""
        return self.model.get_output_embeddings().out_features

    @property
    def image_size(self) -> int:
        """Square pixel size the VQ expects (default: ``self._image_size``, set by the adapter)."""
        return self._image_size

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid (default: a square, ``vq_downsample`` pixels a
        code along each side)."""
        side = self.image_size // self.vq_downsample
        return side, side

    @property
    def vq_downsample(self) -> int:
        """Pixels per image code along each side; an adapter gives it or ``image_grid``."""
        raise NotImplementedError(f"{type(self).__name__}: no image_grid nor vq_downsample")

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def tokens_per_image(self) -> int:
        rows, cols = self.image_grid
        return rows * cols

    @property
    def max_positions(self) -> int | None:
        """The position embeddings of the LM (``max_position_embeddings`` of its config or
        text config); None when the config states none."""
        config = getattr(self.model, "config", None)
        for part in (config, getattr(config, "text_config", None)):
            value = getattr(part, "max_position_embeddings", None)
            if value:
                return int(value)
        return None

    @property
    def caption_token_limit(self) -> int | None:
        """The longest caption in tokens (``max_caption_tokens`` or what the positions allow)."""
        if self.max_caption_tokens is not None:
            return self.max_caption_tokens
        if self.max_positions is None:
            return None
        return max(1, self.max_positions - self.tokens_per_image - self.CAPTION_RESERVE)

    @property
    def needs_pixels_for_understanding(self) -> bool:
        """True when the understanding flow reads pixels (e.g. Janus's SigLIP), not VQ codes."""
        return False

    # ---- images --------------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode_images(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> codes (B, N) in ``[0, codebook_size)``."""

    def _decode_images(self, codes: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot decode image tokens to pixels")

    @classmethod
    def can_decode_images(cls) -> bool:
        """Whether this adapter decodes image codes to pixels (overrides ``_decode_images``)."""
        return cls._decode_images is not BackboneAdapter._decode_images

    @torch.no_grad()
    def tokenize_images(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> codes (B, N), with the VQ frozen and in eval mode
        (continuous targets: embeddings (B, N, D_t))."""
        expected = (3, self.image_size, self.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be (B, {expected}), got {tuple(pixels.shape)}")
        self.vq.eval()
        codes = self._encode_images(pixels)
        return codes if self.continuous_targets else codes.long()

    @torch.no_grad()
    def decode_images(self, codes: Tensor) -> Tensor:
        """codes (B, N) -> pixels (B, 3, H, W) in [0, 1]."""
        self.check_codes(codes)
        self.vq.eval()
        return self._decode_images(codes).clamp(0, 1)

    @staticmethod
    def to_uint8(pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounded (or as the model's own)."""
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def check_codes(self, codes: Tensor) -> None:
        """Raise a clear error for codes that do not fit this backbone's codebook and grid (or,
        continuous targets, embeddings that are not (B, N, ``generation_width``) floats)."""
        if self.continuous_targets:
            name = type(self).__name__
            return checks.check_target_embeddings(
                codes, self.tokens_per_image, self.generation_width, name
            )
        checks.check_codes(codes, self.tokens_per_image, self.codebook_size, self.image_grid)

    # ---- flows ---------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def caption_ids(self, caption: str) -> list[int]:
        """Token ids of ``caption``, cut to ``caption_token_limit`` (each cut is counted). The
        text is cut to ``CHARS_PER_TOKEN_CAP`` characters per token first, so that a megabyte
        caption is never tokenised whole."""
        limit = self.caption_token_limit
        if limit is None:
            return self._text(caption)
        ids = self._text(caption[: limit * self.CHARS_PER_TOKEN_CAP])
        if len(ids) > limit or len(caption) > limit * self.CHARS_PER_TOKEN_CAP:
            self.truncated_captions += 1
        return ids[:limit]

    def pop_truncated_captions(self) -> int:
        """Captions truncated since the last call (the stage logs them)."""
        count, self.truncated_captions = self.truncated_captions, 0
        return count

    def check_positions(self, batch: FlowBatch, flow: str) -> None:
        """A flow longer than the position embeddings is an error, never a silent overrun."""
        checks.check_positions(batch.labels.shape[1], self.max_positions, flow, self)

    # Token layouts: each flow as one right-padded token sequence, the text around the image from
    # the ``_*_text`` hooks, the image block from ``_image_block`` (Show-o overrides ``_layout_*``).
    def _understanding_text(self, prompt: str) -> tuple[list[int], list[int]]:
        """Ids before and after the image block of the understanding flow (prompt included)."""
        bos, boi, eoi = self.tokenizer.bos_token_id, self.special["boi"], self.special["eoi"]
        return [bos, boi], [eoi, *self._text(prompt)]

    def _answer_end(self) -> list[int]:
        """Ids after the caption in the understanding flow (labelled, like the caption)."""
        return [self.tokenizer.eos_token_id]

    def _generation_text(self, caption: str) -> tuple[list[int], list[int]]:
        """Ids before and after the image block of the generation flow (caption included)."""
        bos, boi, eoi = self.tokenizer.bos_token_id, self.special["boi"], self.special["eoi"]
        return [bos, *self.caption_ids(caption), boi], [eoi]

    def _image_block(self, codes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """codes (N,), mask (N,) bool -> (ids (M,), offsets (N,)) on the CPU: the image block's
        ids, every masked code's id replaced by the mask token (never the code itself), and the
        index of each code inside the block (row-major). Default: one vocabulary id per code."""
        ids = self.image_token_ids.cpu()[codes.cpu()]  # (N,) a copy
        ids[mask.cpu()] = self.special["mask"]
        return ids, torch.arange(len(codes))

    def _flow_extra(self, flow: str, codes: Tensor | None, mask: Tensor | None, pixels) -> dict:
        """Tensors a flow's forward needs besides the ids (``FlowBatch.extra``)."""
        return {}

    def build_understanding(
        self,
        prompts: Sequence[str],
        captions: Sequence[str],
        codes: Tensor | None = None,
        pixels: Tensor | None = None,
    ) -> FlowBatch:
        """Image + prompt -> caption. Labels only on caption tokens (and ``_answer_end``)."""
        return self._layout_understanding(
            prompts, captions, *self._understanding_image(codes, pixels)
        )

    def _understanding_image(self, codes: Tensor | None, pixels: Tensor | None) -> tuple:
        """(codes (B, N) checked, pixels) for the understanding flow, tokenising pixels when no
        codes are given; placeholder codes when the flow reads pixels (Janus)."""
        if self.needs_pixels_for_understanding:
            if pixels is None:
                raise ValueError(f"{type(self).__name__}'s understanding flow reads pixels")
            image_codes = torch.zeros(len(pixels), self.tokens_per_image, dtype=torch.long)
        else:
            if codes is None and pixels is None:
                raise ValueError("build_understanding needs image codes or pixels")
            image_codes = self.tokenize_images(pixels) if codes is None else codes
            self.check_codes(image_codes)
        return image_codes, pixels

    def _layout_understanding(self, prompts, captions, codes: Tensor, pixels) -> FlowBatch:
        """The understanding flow as one right-padded token sequence per sample."""
        rows, nothing = [], torch.zeros(self.tokens_per_image, dtype=torch.bool)
        for prompt, caption, image in zip(prompts, captions, codes, strict=True):
            before, after = self._understanding_text(prompt)
            block, offsets = self._image_block(image, nothing)
            context = before + block.tolist() + after
            target = self.caption_ids(caption) + self._answer_end()
            labels = [IGNORE_INDEX] * len(context) + target
            rows.append((context + target, labels, len(before) + offsets))
        return self._token_batch(rows, self._flow_extra("U", codes, None, pixels))

    def build_generation(self, captions: Sequence[str], codes: Tensor, mask: Tensor) -> FlowBatch:
        """Caption + image codes with ``mask`` (B, N) bool: masked inputs replaced by the mask
        token/embedding, labels (codes) exactly at masked image positions."""
        self.check_codes(codes)
        if mask.shape != codes.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match codes {tuple(codes.shape)}")
        return self._layout_generation(captions, codes, mask.bool())

    def _layout_generation(self, captions, codes: Tensor, mask: Tensor) -> FlowBatch:
        """The generation flow as one right-padded token sequence per sample."""
        rows = []
        for caption, image, masked in zip(captions, codes.cpu(), mask.bool().cpu(), strict=True):
            before, after = self._generation_text(caption)
            block, offsets = self._image_block(image, masked)
            labels = torch.full_like(block, IGNORE_INDEX)
            labels[offsets[masked]] = image[masked]  # targets are codes, not LM ids
            ids = before + block.tolist() + after
            lab = [IGNORE_INDEX] * len(before) + labels.tolist() + [IGNORE_INDEX] * len(after)
            rows.append((ids, lab, len(before) + offsets))
        return self._token_batch(rows, self._flow_extra("G", codes, mask, None))

    def _token_batch(self, rows: list, extra: dict) -> FlowBatch:
        """rows of (ids, labels, image positions (N,)) -> right-padded ``FlowBatch``."""
        device = next(self.parameters()).device
        batch = right_padded_batch(rows, self.tokenizer.pad_token_id or 0, device)
        batch.extra.update({k: v.to(device) for k, v in extra.items()})
        return batch

    def _lm_hidden(self, batch: FlowBatch) -> Tensor:
        """(B, T, D) states after the final norm of ``language_model`` on the batch's ids."""
        out = self.language_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state

    def _forward_understanding(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        """Run the model on a U batch -> (logits (B, S, V_t), targets (B, S)). Default: a causal
        LM, the state at ``p - 1`` scores the token at ``p``."""
        return self._understanding_logits(self._lm_hidden(batch), batch)

    def _forward_generation(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        """Run the model on a G batch -> (logits (B, S, K), targets (B, S) codes). Default: the
        LM head's rows of the image tokens, in codebook order (never the full vocabulary)."""
        return self._generation_logits(self._lm_hidden(batch), batch)

    def _understanding_logits(self, hidden: Tensor, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        h, targets = shifted_slot_states(hidden, batch.labels)  # (B, S, D)
        return self.model.get_output_embeddings()(h), targets  # (B, S, V_t)

    def _generation_logits(self, hidden: Tensor, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        h, targets = shifted_slot_states(hidden, batch.labels)  # (B, S, D)
        image_rows = rows(self.model.get_output_embeddings().weight, self.image_token_ids)
        return h @ image_rows.T, targets  # (B, S, K)

    @property
    def supports_fused_flows(self) -> bool:
        """Token-id flows through the default causal forward: ``backbones.fused`` applies."""
        own = ("_lm_hidden", "_forward_understanding", "_forward_generation")
        return all(getattr(type(self), n) is getattr(BackboneAdapter, n) for n in own)

    def forward_flow(
        self,
        batch: FlowBatch,
        flow: str,
        layers: Sequence[int] = (),
        pool: bool = True,
        pool_mask: Tensor | None = None,
    ) -> FlowOutput:
        """One forward of flow ``"U"`` or ``"G"``, capturing image-token states of ``layers``.

        ``pool_mask`` (B, N) bool restricts the mean pooling to the True image slots.
        """
        self.check_layers(layers)
        self.check_positions(batch, flow)
        forward = {"U": self._forward_understanding, "G": self._forward_generation}.get(flow)
        if forward is None:
            raise ValueError(f"flow must be 'U' or 'G', got {flow!r}")
        capture = LayerCapture(self.decoder_layers, layers, batch.image_positions, pool, pool_mask)
        with capture:  # a forward returns (logits, targets) or, continuous, (.., .., valid)
            logits, targets, *valid = forward(batch)
        hidden = capture.stacked() if layers else logits.new_zeros(0)
        out = FlowOutput(hidden, logits, targets, logits.new_zeros(()), *valid)
        out.loss = out.loss_fn()(logits, targets)
        return out

    # ---- freezing ------------------------------------------------------------------------------
    def check_layers(self, layers: Sequence[int]) -> None:
        bad = [layer for layer in layers if not 1 <= layer <= self.num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} are outside {type(self).__name__}'s blocks 1..{self.num_layers}"
            )

    def freeze_all(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)

    def unfreeze_layers(self, start: int, end: int) -> None:
        """Freeze everything, then make exactly blocks ``start..end`` (inclusive, 1-based) trainable."""
        if not 1 <= start <= end <= self.num_layers:
            raise ValueError(
                f"layer range {start}..{end} is outside {type(self).__name__}'s "
                f"blocks 1..{self.num_layers}"
            )
        self.freeze_all()
        for block in self.decoder_layers[start - 1 : end]:
            for param in block.parameters():
                param.requires_grad_(True)

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    def train(self, mode: bool = True) -> BackboneAdapter:
        """Like ``nn.Module.train`` but the VQ stays in eval mode with gradients off."""
        super().train(mode)
        self.vq.eval()
        for param in self.vq.parameters():
            param.requires_grad_(False)
        return self

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Turn activation checkpointing of the wrapped transformers model on or off.

        transformers also makes the embedding output require grad (a need of reentrant
        checkpointing and of PEFT), which here would make every frozen block below the trainable
        ones keep its input and run again in backward; non-reentrant checkpointing does not
        need it, so the hook is removed.
        """
        if enabled:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            for module in self.model.modules():
                if hasattr(module, "_require_grads_hook"):
                    module.disable_input_require_grads()
        else:
            self.model.activation_checkpointing_disable()

    # ---- persistence ---------------------------------------------------------------------------
    SETTINGS_FILE = "diva_adapter.json"  # adapter settings saved next to the model's files

    @classmethod
    def tiny(cls, **overrides) -> BackboneAdapter:
        """A random tiny config of the real architecture, for tests and the embedded default."""
        return cls(config_overrides=overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> BackboneAdapter:
        """Load a real checkpoint (and its tokenizer) from a local directory."""
        return cls(pretrained_path=str(path), **kwargs)

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a directory ``from_pretrained`` reads back exactly."""

    def save_settings(self, path: str | Path, settings: dict) -> None:
        """Write the adapter's own settings (mask token, image size, ...) next to the weights."""
        (Path(path) / self.SETTINGS_FILE).write_text(json.dumps(settings, indent=1))

    @classmethod
    def saved_settings(cls, path: str | Path | None) -> dict:
        """What ``save_settings`` wrote in ``path`` ({} for None or a folder without them)."""
        file = Path(path) / cls.SETTINGS_FILE if path is not None else None
        return json.loads(file.read_text()) if file is not None and file.exists() else {}

    def set_vocabulary(self, tokens: dict[str, str], image_token_ids: Tensor) -> None:
        """Record ``self.special`` (name -> id of each layout token) and ``image_token_ids``
        (K,) (code -> LM id, a buffer), and check the mask token (``tokens["mask"]``)."""
        self.special = self.special_ids(tokens)
        self.register_buffer("image_token_ids", image_token_ids.long(), persistent=False)
        if "mask" in tokens:
            checks.check_mask_token(
                self.special, self.image_token_ids, self.tokenizer, tokens["mask"]
            )

    def special_ids(self, tokens: dict[str, str]) -> dict[str, int]:
        """Ids of named special tokens, or an error naming every one the tokenizer lacks."""
        return checks.special_ids(self.tokenizer, tokens, type(self).__name__)
