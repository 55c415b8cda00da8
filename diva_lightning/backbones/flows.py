"""What flows through an adapter: ``FlowBatch`` / ``FlowOutput`` and the tensor helpers every
adapter shares (padding, supervised slots, the causal next-token shift, image-state pooling and
``LayerCapture``, the forward hooks that keep only the requested layers' image-token states).

Logits convention (``FlowOutput``): ``logits`` is ``(B, S, V)`` over the ``S`` supervised slots of
each sample (padded), ``targets`` is ``(B, S)`` with ``-100`` at padding, and
``loss = cross_entropy(logits, targets, ignore_index=-100)`` averaged over real slots. A generation
flow with continuous targets (Nexus-Gen) returns predicted embeddings ``(B, S, D)`` as its logits,
target embeddings ``(B, S, D)`` and ``valid`` ``(B, S)``; its loss is ``embedding_regression``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


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
    loss: Tensor  # () native loss = loss_fn()(logits, targets)
    # continuous targets: logits are predicted embeddings (B, S, D), targets (B, S, D), and
    # valid (B, S) bool marks the real slots; None for class targets
    valid: Tensor | None = None

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The flow's native loss as ``fn(logits, targets)`` (stage 1 applies it to the injected
        logits, Eq. 8): cross-entropy over real slots, or the regression over ``valid`` slots."""
        if self.valid is None:
            return supervised_cross_entropy
        return partial(embedding_regression, valid=self.valid)


def supervised_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over real slots. logits (B, S, V), targets (B, S)."""
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keep the graph; no supervised slot in this batch
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def embedding_regression(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Native loss of a generation flow with continuous targets (Nexus-Gen's image term):
    ``0.5 * MSE + 0.5 * mean(1 - cos)`` over the supervised embeddings.

    pred, target (B, S, D) or (n, D); ``valid`` (B, S) bool marks the supervised slots. MSE is
    the mean over all ``n * D`` elements, the cosine per embedding (eps 1e-8, as
    ``F.cosine_similarity``); both in float32. No supervised slot gives 0 with the graph kept
    (their forward turns the empty means' NaN into 0)."""
    if valid is not None:
        pred, target = pred[valid], target[valid]  # (n, D)
    if pred.numel() == 0:
        return pred.sum() * 0.0
    pred, target = pred.float(), target.float()
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)  # (n,)
    return 0.5 * mse + 0.5 * (1.0 - cos).mean()


def take_positions(values: Tensor, positions: Tensor) -> Tensor:
    """values (B, T, D), positions (B, S) long -> values at those positions (B, S, D).

    Advanced indexing rather than ``torch.gather``: gather keeps its whole ``(B, T, D)`` input
    for backward, indexing keeps only the indices. Under activation checkpointing that is one
    full hidden state per captured layer saved (measured: ``planning.measure``).
    """
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(-1)  # (B, 1)
    return values[rows, positions]


def gather_slots(values: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
    """Pick per-sample positions from a sequence tensor, zero where not valid.

    values (B, T, D), positions (B, S) long, valid (B, S) bool -> (B, S, D)
    """
    picked = take_positions(values, positions.clamp(min=0))  # (B, S, D)
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
    image_states = take_positions(hidden, positions)  # (B, N, D)
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
