"""Orthogonality regulariser (paper Eq. 9) and the linear ramps of the loss weights (Table 8).

Eq. 9 is ``L_perp = sum_{i in {U,G}} ||(z_sh^i)^T z_uni^i||_F^2``. Its raw value grows with the
square of the batch size, so this project normalises the cross-correlation by the batch size,
``||(z_sh^i)^T z_uni^i / B||_F^2`` (= Eq. 9 divided by ``B^2``), computes it per middle layer and
averages over layers. ``lambda_perp`` (paper: 0.2) is therefore independent of batch size.
With ``reduction="mean"`` (the stages' default) the squared entries are also averaged over the
``d_sh x d_uni`` cross-correlation matrix instead of summed, so the weight does not depend on the
factor widths either (LayerNorm-ed factors give a sum of order ``d_sh * d_uni`` at init, which
would swamp the native losses at the paper's 0.2); ``reduction="sum"`` is Eq. 9 / B^2.
"""

from __future__ import annotations

from torch import Tensor

from diva_lightning.objectives.encoders import Factors


def orthogonality(shared: Tensor, unique: Tensor, reduction: str = "sum") -> Tensor:
    """shared (B, L, d_sh) or (B, d_sh), unique likewise -> mean_l ||Z_sh^T Z_uni / B||_F^2.

    ``reduction="mean"`` averages the squared entries instead of summing them.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if shared.dim() == 2:
        shared, unique = shared.unsqueeze(1), unique.unsqueeze(1)
    cross = shared.transpose(0, 1).transpose(1, 2) @ unique.transpose(0, 1)  # (L, d_sh, d_uni)
    squared = (cross / shared.shape[0]).pow(2)  # (L, d_sh, d_uni)
    per_layer = squared.sum((-1, -2)) if reduction == "sum" else squared.mean((-1, -2))
    return per_layer.mean()


def orthogonality_loss(factors: Factors, reduction: str = "mean") -> Tensor:
    """Eq. 9 summed over both flows (batch-normalised, layer-averaged)."""
    return orthogonality(factors.shared_u, factors.unique_u, reduction) + orthogonality(
        factors.shared_g, factors.unique_g, reduction
    )


class LinearRamp:
    """Weight that goes linearly from ``start`` to ``end`` over ``steps`` steps after ``delay``.

    Args:
        start: value before and at ``delay``. end: value from ``delay + steps`` on.
        steps: ramp length in optimizer steps (0 = jump straight to ``end``). delay: first step.
    """

    def __init__(self, start: float = 0.0, end: float = 0.6, steps: int = 1000, delay: int = 0):
        if steps < 0 or delay < 0:
            raise ValueError(f"ramp steps and delay must be >= 0, got {steps}, {delay}")
        self.start, self.end, self.steps, self.delay = start, end, steps, delay

    def __call__(self, step: int) -> float:
        if step < self.delay:
            return self.start
        if self.steps == 0:
            return self.end
        progress = min(1.0, (step - self.delay) / self.steps)
        return self.start + (self.end - self.start) * progress

    def __repr__(self) -> str:
        return f"LinearRamp({self.start} -> {self.end} over {self.steps} steps from {self.delay})"
