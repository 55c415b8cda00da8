"""Low-rank logit readouts and the cross-task logit injection of stage 1 (paper Eq. 8, Eq. 12).

``A = P Q^T`` with ``P (V, r)``, ``Q (d, r)``, rank ``r = 24`` (paper). The bias ``A z`` is
computed as ``P (Q^T z)``, never materialising the ``(V, d)`` matrix, and broadcast over the
sequence positions of the flow's supervised logits. Four readouts (Eq. 12):

    s~_U = s_U + A_U z_sh^(l,G) + B_U z_uni^(l,U)      (text logits, caption positions)
    s~_G = s_G + A_G z_sh^(l,U) + B_G z_uni^(l,G)      (codebook logits, masked positions)

``P`` starts at zero so stage 1 starts from the backbone's native losses.

The authors' partial code injects ``A (z_sh + z_uni)`` of the SAME flow instead; it is offered as
``injection="same_flow_sum"`` (requires ``d_sh == d_uni``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diva_lightning.backbones.flows import supervised_cross_entropy
from diva_lightning.objectives.encoders import Factors

INJECTIONS = ("cross_flow", "same_flow_sum")


class LowRankReadout(nn.Module):
    """``A = P Q^T``: maps a factor ``z (..., d)`` to a logit bias ``(..., V)``."""

    def __init__(self, vocab_size: int, factor_dim: int, rank: int = 24):
        super().__init__()
        self.P = nn.Parameter(torch.zeros(vocab_size, rank))  # (V, r)
        self.Q = nn.Parameter(torch.randn(factor_dim, rank) / factor_dim**0.5)  # (d, r)

    def forward(self, z: Tensor) -> Tensor:
        return (z @ self.Q) @ self.P.T  # (..., d) -> (..., r) -> (..., V)

    def dense(self) -> Tensor:
        """The full ``(V, d)`` matrix; for tests and inspection only."""
        return self.P @ self.Q.T


class LogitInjection(nn.Module):
    """The four readouts ``A_U, B_U`` (text vocab) and ``A_G, B_G`` (codebook) of Eq. 8.

    Args:
        text_vocab_size: ``V_t``, width of the understanding flow's logits.
        codebook_size: ``V_v``, width of the generation flow's logits (with continuous targets
            the embeddings' width ``D_t``: ``A_G``, ``B_G`` are then additive corrections of the
            predicted embeddings, docs/method-choices.md).
        shared_dim: ``d_sh``. unique_dim: ``d_uni``. rank: ``r`` (paper: 24).
        injection: ``cross_flow`` (paper Eq. 8) or ``same_flow_sum`` (authors' code).
    """

    def __init__(
        self,
        text_vocab_size: int,
        codebook_size: int,
        shared_dim: int,
        unique_dim: int,
        rank: int = 24,
        injection: str = "cross_flow",
    ):
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; choose one of {INJECTIONS}")
        if injection == "same_flow_sum" and shared_dim != unique_dim:
            raise ValueError("injection='same_flow_sum' needs shared_dim == unique_dim")
        self.injection = injection
        self.A_U = LowRankReadout(text_vocab_size, shared_dim, rank)
        self.B_U = LowRankReadout(text_vocab_size, unique_dim, rank)
        self.A_G = LowRankReadout(codebook_size, shared_dim, rank)
        self.B_G = LowRankReadout(codebook_size, unique_dim, rank)

    def biases(self, factors: Factors, use_unique: bool = True) -> tuple[Tensor, Tensor]:
        """-> (bias_u (B, L, V_t), bias_g (B, L, V_v)). ``use_unique=False``: shared-only warm-up."""
        if self.injection == "same_flow_sum":
            z_u = factors.shared_u + (factors.unique_u if use_unique else 0)
            z_g = factors.shared_g + (factors.unique_g if use_unique else 0)
            return self.A_U(z_u), self.A_G(z_g)
        bias_u = self.A_U(factors.shared_g)  # cross-flow shared
        bias_g = self.A_G(factors.shared_u)
        if use_unique:
            bias_u = bias_u + self.B_U(factors.unique_u)  # same-flow unique
            bias_g = bias_g + self.B_G(factors.unique_g)
        return bias_u, bias_g


def _layer_loss(logits: Tensor, targets: Tensor, layer_bias: Tensor, native=None) -> Tensor:
    """One middle layer's native loss on injected logits. layer_bias (B, V)."""
    injected = logits + layer_bias[:, None, :].to(logits.dtype)
    return (native or supervised_cross_entropy)(injected, targets)


def injected_loss(logits: Tensor, targets: Tensor, bias: Tensor, native=None) -> Tensor:
    """Native loss on injected logits, averaged over layers (Eq. 8).

    logits (B, S, V) at supervised slots, targets (B, S), bias (B, L, V) one per middle layer.
    ``native(outputs, targets)``: the flow's native loss (default: cross-entropy over real
    slots). A generation flow with continuous targets passes its regression: then ``logits``
    are the predicted embeddings (B, S, D), ``V = D``, targets (B, S, D), and the bias is the
    low-rank additive correction of the embeddings (docs/method-choices.md).

    Memory: each layer's loss runs under ``torch.utils.checkpoint``, so autograd keeps only its
    inputs (the shared logits and a ``(B, V)`` bias row) and recomputes the ``(B, S, V)``
    injected logits and their softmax layer by layer in backward. Without it the graph holds L
    float copies of ``(B, S, V)`` at once: at Show-o's 58,498 or Liquid's ~264K vocabulary and
    the paper's 11 middle layers that, not the encoders, is stage 1's peak. Values and gradients
    equal the plain computation (tests: to 1e-6).
    """
    if bias.shape[0] != logits.shape[0] or bias.shape[-1] != logits.shape[-1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not fit logits {tuple(logits.shape)}")
    needs_grad = torch.is_grad_enabled() and (logits.requires_grad or bias.requires_grad)
    losses = [
        checkpoint(_layer_loss, logits, targets, bias[:, layer], native, use_reentrant=False)
        if needs_grad
        else _layer_loss(logits, targets, bias[:, layer], native)
        for layer in range(bias.shape[1])
    ]
    return torch.stack(losses).mean()
