"""The EMA teacher of stage 2: stable alignment targets (paper App. B.2, after BYOL).

The teacher is the online backbone with the EMA weights of the trainable blocks in their place.
Frozen blocks are shared, so there is no second copy of the model: the ``EMA`` callback swaps
its averaged weights in for the duration of a no-grad forward and puts the online ones back.
Blocks below the first trainable block compute the same states in teacher and student, and
nothing above the last middle layer feeds the targets, so the teacher replays only blocks
``first trainable .. last middle`` from the hidden state that entered them in the student's
forward (``BlockCalls``). Its pooled states go through the same (frozen) encoders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from diva_lightning.backbones.replay import BlockCalls


class EMATeacher:
    """Which blocks the teacher runs, and its pooled middle-layer states.

    Args:
        layers: the middle layers ``I_mid`` (1-based blocks).
        trainable: inclusive range of trainable blocks.
    """

    def __init__(self, layers: Sequence[int], trainable: tuple[int, int]):
        self.layers = list(layers)
        self.start, self.end = trainable[0], max(self.layers)

    @property
    def block_range(self) -> tuple[int, int] | None:
        """Blocks the teacher runs; None when no trainable block lies below a middle layer
        (then the teacher's states are the student's)."""
        return (self.start, self.end) if self.start <= self.end else None

    def parameter_names(self, module: nn.Module, parts: Sequence[nn.Module]) -> list[str]:
        """Names (in ``module``) of the parameters of ``parts`` and of the teacher's blocks."""
        blocks = module.backbone.decoder_layers
        if self.block_range:
            parts = [*parts, *blocks[self.start - 1 : self.end]]
        ids = {id(p) for part in parts for p in part.parameters()}
        return [name for name, p in module.named_parameters() if id(p) in ids]

    def pooled(
        self,
        student: Tensor,
        calls: BlockCalls | None,
        positions: Tensor,
        pool_mask: Tensor | None = None,
    ) -> Tensor:
        """student (B, L, D) pooled states of the online forward -> the teacher's (B, L, D).

        Middle layers below the first trainable block are the student's (detached); the others
        come from replaying the recorded blocks under the weights they hold now.
        """
        if calls is None:
            return student.detach()
        replayed = calls.replay(
            [lay for lay in self.layers if lay >= self.start], positions, pool_mask
        )
        rows = [
            replayed[lay] if lay >= self.start else student[:, i].detach()
            for i, lay in enumerate(self.layers)
        ]
        return torch.stack(rows, dim=1)  # (B, L, D)


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``modules`` in eval mode (no dropout: deterministic targets), then restore every
    submodule's own mode."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
