"""The backbone adapter contract: one abstract class every UMM adapter subclasses once.

An adapter wraps one unified multimodal model (a transformers model, or this project's own) and
exposes the small surface DIVA needs (paper Sec. 3.1):

* facts (layers, hidden size, codebook, image size and token grid);
* the frozen VQ: ``tokenize_images`` / ``decode_images``;
* the two flows built from the same image-text pair: understanding (image + caption prompt,
  next-token loss on the caption) and generation (caption + masked image tokens, loss on the
  masked positions only);
* one forward per flow returning the image-token hidden states of requested layers
  ``(B, L, N, D)`` or pooled ``(B, L, D)``, the logits the native loss needs and the native loss;
* freezing helpers and ``from_pretrained`` / ``save_pretrained``.

Layer numbering: layer ``l`` (1-based) is decoder block ``l``; its output is
``hidden_states[l]`` of a transformers forward with ``output_hidden_states=True``. The last
block is the raw block output (transformers puts the final norm into its last entry). A block
is called as ``block(hidden, *args, **kwargs)`` and returns the hidden state, or a tuple that
starts with it (every transformers decoder layer does): ``BlockCalls`` relies on this to run a
range of blocks again for the EMA teacher.

Logits convention (``FlowOutput``): ``logits`` is ``(B, S, V)`` over the ``S`` supervised slots of
each sample (padded), ``targets`` is ``(B, S)`` with ``-100`` at padding, and
``loss = cross_entropy(logits, targets, ignore_index=-100)`` averaged over real slots. The
understanding flow's ``V`` is the text vocabulary; the generation flow's ``V`` is the codebook, in
codebook order (code ``k`` is column ``k``). Stage 1 adds a per-sample bias ``(B, V)`` to these
logits (Eq. 8), so an adapter must never return logits it does not also score.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FlowBatch:
    """Model inputs of one flow for a batch, built by the adapter. Shapes: ``T`` sequence length."""

    attention_mask: Tensor  # (B, T) 1 = real token, 0 = padding
    labels: Tensor  # (B, T) token ids (or codes) to predict, IGNORE_INDEX elsewhere
    image_positions: Tensor  # (B, N) sequence index of each image token, in grid (row-major) order
    input_ids: Tensor | None = None  # (B, T)
    inputs_embeds: Tensor | None = None  # (B, T, D) when the flow needs continuous inputs
    extra: dict = field(default_factory=dict)  # adapter-specific tensors (pixel_values, masks, ...)

    def to(self, device: torch.device | str) -> FlowBatch:
        move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return FlowBatch(
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            image_positions=move(self.image_positions),
            input_ids=move(self.input_ids),
            inputs_embeds=move(self.inputs_embeds),
            extra={k: move(v) for k, v in self.extra.items()},
        )


@dataclass
class FlowOutput:
    """What one forward of a flow returns."""

    hidden: Tensor  # (B, L, N, D) image-token states, or (B, L, D) when pooled
    logits: Tensor  # (B, S, V) at supervised slots (text vocab for U, codebook order for G)
    targets: Tensor  # (B, S) class indices into V, IGNORE_INDEX at padding
    loss: Tensor  # () native loss = CE(logits, targets)


def local_checkpoint(path: str | Path, key: str = "pretrained_path") -> Path:
    """``path`` as an existing local folder, else a ``FileNotFoundError`` naming ``key``.

    Checked before ``transformers`` sees the value: it would read a missing folder as a hub id,
    retry the network, and fail with an error that names neither the key nor the folder.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}: '{path}' is not a local folder. Weights are read from a local checkpoint "
            "folder only (nothing is downloaded): download it first, then give its path."
        )
    return folder


def supervised_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over real slots. logits (B, S, V), targets (B, S)."""
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keep the graph; no supervised slot in this batch
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def gather_slots(values: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
    """Pick per-sample positions from a sequence tensor, zero where not valid.

    values (B, T, D), positions (B, S) long, valid (B, S) bool -> (B, S, D)
    """
    index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, values.shape[-1])  # (B, S, D)
    picked = torch.gather(values, 1, index)
    return picked * valid.unsqueeze(-1).to(picked.dtype)


def pad_positions(rows: Sequence[Tensor], fill: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad a list of 1D position tensors -> (positions (B, S), valid (B, S) bool)."""
    width = max((len(r) for r in rows), default=0)
    positions = torch.full((len(rows), max(width, 1)), fill, dtype=torch.long)
    valid = torch.zeros_like(positions, dtype=torch.bool)
    for i, row in enumerate(rows):
        positions[i, : len(row)] = row
        valid[i, : len(row)] = True
    return positions, valid


def right_padded_batch(
    rows: Sequence[tuple[list[int], list[int], Tensor]], pad_id: int, device: torch.device | str
) -> FlowBatch:
    """rows of (token ids, labels, image positions (N,)) -> right-padded ``FlowBatch``.

    Right padding leaves positions untouched, so a 2D attention mask suffices.
    """
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention = torch.zeros_like(input_ids)
    for i, (ids, lab, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    positions = torch.stack([pos for _, _, pos in rows])  # (B, N)
    return FlowBatch(
        attention.to(device), labels.to(device), positions.to(device), input_ids.to(device)
    )


def supervised_slots(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """labels (B, T) -> (positions (B, S), valid (B, S), targets (B, S)) of the labelled tokens."""
    rows = [torch.nonzero(row != IGNORE_INDEX).flatten() for row in labels]
    positions, valid = pad_positions(rows)
    positions, valid = positions.to(labels.device), valid.to(labels.device)
    targets = torch.gather(labels, 1, positions).masked_fill(~valid, IGNORE_INDEX)
    return positions, valid, targets


def shifted_slot_states(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Causal LMs: the state at ``p - 1`` scores the token at each labelled position ``p``.

    hidden (B, T, D), labels (B, T) -> (states (B, S, D), targets (B, S)).
    """
    positions, valid, targets = supervised_slots(labels)
    return gather_slots(hidden, positions - 1, valid), targets


def pool_image_states(
    hidden: Tensor, positions: Tensor, pool: bool, pool_mask: Tensor | None = None
) -> Tensor:
    """Image-token states of one layer, optionally mean-pooled (paper Sec. 3.2, ``Pool``).

    hidden (B, T, D), positions (B, N) -> (B, N, D), or (B, D) when ``pool``. ``pool_mask``
    (B, N) bool keeps only the True slots in the mean (e.g. the unmasked slots of the generation
    flow); a row without any kept slot pools to zeros.
    """
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, N, D)
    image_states = torch.gather(hidden, 1, index)  # (B, N, D)
    if not pool:
        return image_states
    if pool_mask is None:
        return image_states.mean(1)
    weights = pool_mask.to(image_states.dtype).unsqueeze(-1)  # (B, N, 1)
    return (image_states * weights).sum(1) / weights.sum(1).clamp(min=1)


class LayerCapture:
    """Forward hooks on decoder blocks that keep only the image-token states of chosen layers.

    Used as a context manager around one forward; never keeps the states of other layers.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        layers: Sequence[int],
        positions: Tensor,
        pool: bool,
        pool_mask: Tensor | None = None,
    ):
        self.blocks, self.layers, self.positions, self.pool = blocks, list(layers), positions, pool
        self.pool_mask = pool_mask
        self.states: dict[int, Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        def fn(_module, _inputs, output):
            hidden = block_output(output)  # (B, T, D)
            self.states[layer] = pool_image_states(
                hidden, self.positions, self.pool, self.pool_mask
            )

        return fn

    def __enter__(self) -> LayerCapture:
        for layer in self.layers:
            self._handles.append(self.blocks[layer - 1].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stacked(self) -> Tensor:
        """(B, L, N, D) or (B, L, D) in the order the layers were requested."""
        missing = [layer for layer in self.layers if layer not in self.states]
        if missing:
            raise RuntimeError(f"layers {missing} were not reached by the forward pass")
        return torch.stack([self.states[layer] for layer in self.layers], dim=1)


def block_output(output) -> Tensor:
    """The hidden state a decoder block returns: the tensor itself, or the first of a tuple."""
    return output[0] if isinstance(output, tuple) else output


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

    def __init__(self, max_caption_tokens: int | None = None):
        """``max_caption_tokens``: the longest caption in tokens; longer ones are truncated and
        counted (``pop_truncated_captions``). None: what the position embeddings leave beside
        the image and ``CAPTION_RESERVE`` tokens of prompt."""
        super().__init__()
        if max_caption_tokens is not None and max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be >= 1, got {max_caption_tokens}")
        self.max_caption_tokens = max_caption_tokens
        self.truncated_captions = 0

    # ---- facts -------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order (block ``l`` is ``decoder_layers[l - 1]``)."""

    @property
    @abc.abstractmethod
    def vq(self) -> nn.Module:
        """The frozen image tokenizer."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def text_vocab_size(self) -> int:
        """Width ``V_t`` of the understanding flow's logits."""

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Square pixel size the VQ expects."""

    @property
    @abc.abstractmethod
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid."""

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
        """pixels (B, 3, H, W) in [0, 1] -> codes (B, N), with the VQ frozen and in eval mode."""
        expected = (3, self.image_size, self.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be (B, {expected}), got {tuple(pixels.shape)}")
        self.vq.eval()
        return self._encode_images(pixels).long()

    @torch.no_grad()
    def decode_images(self, codes: Tensor) -> Tensor:
        """codes (B, N) -> pixels (B, 3, H, W) in [0, 1]."""
        self.check_codes(codes)
        self.vq.eval()
        return self._decode_images(codes).clamp(0, 1)

    def check_codes(self, codes: Tensor) -> None:
        """Raise a clear error for codes that do not fit this backbone's codebook and grid."""
        if codes.dim() != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(
                f"image codes must be (B, {self.tokens_per_image}) for grid {self.image_grid}, "
                f"got {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"image codes must lie in [0, {self.codebook_size}), "
                f"got [{int(codes.min())}, {int(codes.max())}]"
            )

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
        length, limit = batch.labels.shape[1], self.max_positions
        if limit is not None and length > limit:
            raise ValueError(
                f"{type(self).__name__}: a {flow} sequence of {length} tokens exceeds the "
                f"backbone's {limit} position embeddings; lower max_caption_tokens (now "
                f"{self.caption_token_limit}) or shorten the prompts"
            )

    @abc.abstractmethod
    def build_understanding(
        self,
        prompts: Sequence[str],
        captions: Sequence[str],
        codes: Tensor | None = None,
        pixels: Tensor | None = None,
    ) -> FlowBatch:
        """Image + prompt -> caption. Labels only on caption tokens (and the end-of-text token)."""

    @abc.abstractmethod
    def build_generation(self, captions: Sequence[str], codes: Tensor, mask: Tensor) -> FlowBatch:
        """Caption + image codes with ``mask`` (B, N) bool: masked inputs replaced by the mask
        token/embedding, labels exactly at masked image positions."""

    @abc.abstractmethod
    def _forward_understanding(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        """Run the model on a U batch -> (logits (B, S, V_t), targets (B, S))."""

    @abc.abstractmethod
    def _forward_generation(self, batch: FlowBatch) -> tuple[Tensor, Tensor]:
        """Run the model on a G batch -> (logits (B, S, codebook), targets (B, S) codes)."""

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
        with capture:
            logits, targets = forward(batch)
        hidden = capture.stacked() if layers else logits.new_zeros(0)
        return FlowOutput(hidden, logits, targets, supervised_cross_entropy(logits, targets))

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
        """Turn activation checkpointing of the wrapped transformers model on or off."""
        if enabled:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            self.model.activation_checkpointing_disable()

    # ---- persistence ---------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def tiny(cls, **overrides) -> BackboneAdapter:
        """A random tiny config of the real architecture, for tests and the embedded default."""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> BackboneAdapter:
        """Load a real checkpoint (and its tokenizer) from a local directory."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a directory ``from_pretrained`` reads back exactly."""
