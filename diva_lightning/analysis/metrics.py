"""Representation-divergence diagnostics of the paper's Section 2 (Figure 2, Eq. 2-3).

* ``gradient_cosine``: cosine similarity between the gradients of two losses w.r.t. a set of
  parameters (Fig. 2a: L_Und vs L_Gen per layer).
* ``reconstruction_residual``: ``R_res(G|U) = ||G - Pi_U G||_F^2 / ||G||_F^2`` (Eq. 2) with
  ``Pi_U`` the projection onto the PCA basis of U, keeping the components that explain
  ``variance_threshold`` of U's variance.
* ``effective_rank``: ``exp(entropy(s / sum s))`` of the singular values ``s``;
  ``effective_rank_increment``: ``ER([U; G]) - ER(U)`` (Eq. 3).
* ``high_frequency_share``: share of spectral energy above a radial cut-off of the 2D FFT of
  token states laid out on the image grid, per channel (Fig. 2c).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradient_cosine(loss_a: Tensor, loss_b: Tensor, params: list[Tensor]) -> float:
    """cos(grad loss_a, grad loss_b) over ``params`` (flattened and concatenated)."""
    grads_a = torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(loss_b, params, retain_graph=True, allow_unused=True)
    flat = lambda gs: torch.cat(  # noqa: E731
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(gs, params, strict=True)
        ]
    )
    a, b = flat(grads_a).double(), flat(grads_b).double()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def pca_basis(states: Tensor, variance_threshold: float = 0.95) -> Tensor:
    """states (M, D) -> orthonormal basis (D, k) of the leading principal directions."""
    centred = states.double() - states.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    energy = s.pow(2)
    if energy.sum() == 0:
        return vh[:1].T
    cumulative = energy.cumsum(0) / energy.sum()
    k = (
        int(
            torch.searchsorted(cumulative, torch.tensor(variance_threshold, dtype=cumulative.dtype))
        )
        + 1
    )
    return vh[: min(k, len(s))].T  # (D, k)


def reconstruction_residual(g: Tensor, u: Tensor, variance_threshold: float = 0.95) -> float:
    """Eq. 2: share of G's energy outside U's PCA subspace. g, u (M, D) centred per flow."""
    basis = pca_basis(u, variance_threshold)  # (D, k)
    g = g.double() - g.double().mean(0)
    projected = g @ basis @ basis.T
    total = g.pow(2).sum()
    return float((g - projected).pow(2).sum() / total) if total > 0 else 0.0


def effective_rank(states: Tensor) -> float:
    """exp of the entropy of the normalised singular values of centred ``states (M, D)``."""
    centred = states.double() - states.double().mean(0)
    s = torch.linalg.svdvals(centred)
    s = s[s > s.max() * 1e-12] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank_increment(g: Tensor, u: Tensor) -> float:
    """Eq. 3: ER of the two flows' states stacked along samples minus ER of U alone."""
    return effective_rank(torch.cat([u, g], 0)) - effective_rank(u)


def high_frequency_share(grid_states: Tensor, cutoff: float = 0.5) -> float:
    """grid_states (M, H, W, D): share of 2D-FFT energy at normalised radius > ``cutoff``.

    The radius is ``sqrt(fy^2 + fx^2) / sqrt(0.5^2 + 0.5^2)`` with ``f`` in cycles per token, so
    1 is the highest representable frequency. The mean over the grid (DC) is removed first.
    """
    x = grid_states.double()
    x = x - x.mean((1, 2), keepdim=True)
    spectrum = torch.fft.fft2(x, dim=(1, 2)).abs().pow(2)  # (M, H, W, D)
    fy = torch.fft.fftfreq(x.shape[1], dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[2], dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() / (0.5**2 * 2) ** 0.5  # (H, W)
    total = spectrum.sum()
    if total == 0:
        return 0.0
    return float(spectrum[:, radius > cutoff].sum() / total)
