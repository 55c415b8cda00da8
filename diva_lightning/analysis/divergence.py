"""Per-layer divergence curves of the two flows (paper Sec. 2, Fig. 2) and a suggested I_mid.

For every block ``l`` of the backbone, over a set of image-text pairs:

* ``grad_cosine[l]``: cosine between the gradients of L_Und and L_Gen w.r.t. block ``l``'s
  parameters, each accumulated over all batches (Fig. 2a);
* ``residual[l]``: ``R_res(G|U)`` of the image-token states (Eq. 2) and ``rank_increment[l]``:
  ``dER`` (Eq. 3) (Fig. 2b);
* ``high_freq_u[l]``, ``high_freq_g[l]``: share of high-frequency energy of each flow's
  image-token states over the 2D token grid (Fig. 2c).

Suggested range (rule): standardise ``grad_cosine`` and ``residual`` across layers, add them,
and take the longest contiguous run of layers with a positive score, excluding the first and
last block. Middle layers where the two objectives conflict least and the flows diverge most
are where the paper factorises (Sec. 2, Point 3).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diva_lightning.analysis.metrics import (
    effective_rank_increment,
    high_frequency_share,
    reconstruction_residual,
)
from diva_lightning.backbones.base import BackboneAdapter


def _flat_grads(loss: Tensor, blocks: list[list[Tensor]]) -> list[Tensor]:
    params = [p for block in blocks for p in block]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    out, i = [], 0
    for block in blocks:
        chunk = [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(grads[i : i + len(block)], block, strict=True)
        ]
        out.append(torch.cat([g.flatten() for g in chunk]).double())
        i += len(block)
    return out


def _cosine(a: Tensor, b: Tensor) -> float:
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else 0.0


def suggest_range(grad_cosine: list[float], residual: list[float]) -> tuple[int, int]:
    """Longest run of positive standardised ``grad_cosine + residual`` (blocks are 1-based)."""
    score = torch.zeros(len(grad_cosine), dtype=torch.float64)
    for curve in (grad_cosine, residual):
        values = torch.tensor(curve, dtype=torch.float64)
        std = values.std() if len(values) > 1 else torch.tensor(0.0)
        score += (values - values.mean()) / std if std > 0 else 0 * values
    runs, i, n = [], 1, len(score)
    while i < n - 1:  # the first and last block are excluded
        if score[i] > 0:
            j = i
            while j + 1 < n - 1 and score[j + 1] > 0:
                j += 1
            runs.append((i, j))
            i = j + 1
        else:
            i += 1
    if not runs:  # no layer stands out: fall back to the middle third
        return max(1, n // 3 + 1), max(1, (2 * n) // 3)
    first, last = max(runs, key=lambda run: run[1] - run[0])
    return first + 1, last + 1


def divergence_curves(
    adapter: BackboneAdapter,
    batches: Iterable,
    variance_threshold: float = 0.95,
    freq_cutoff: float = 0.5,
    total: int | None = None,
) -> dict:
    """Run both flows over ``batches`` (objects with keys/captions/prompts/pixels/codes/gen_mask)."""
    layers = list(range(1, adapter.num_layers + 1))
    blocks = [[p for p in block.parameters()] for block in adapter.decoder_layers]
    for p in (p for block in blocks for p in block):
        p.requires_grad_(True)
    grads_u = grads_g = None
    states_u, states_g = [], []
    adapter.eval()
    for batch in tqdm(batches, total=total, desc="analyze", unit="batch"):
        codes = batch.codes if batch.codes is not None else adapter.tokenize_images(batch.pixels)
        pixels = batch.pixels if adapter.needs_pixels_for_understanding else None
        out_u = adapter.forward_flow(
            adapter.build_understanding(batch.prompts, batch.captions, codes=codes, pixels=pixels),
            "U",
            layers,
            pool=False,
        )
        out_g = adapter.forward_flow(
            adapter.build_generation(batch.captions, codes, batch.gen_mask), "G", layers, pool=False
        )
        g_u, g_g = _flat_grads(out_u.loss, blocks), _flat_grads(out_g.loss, blocks)
        grads_u = g_u if grads_u is None else [a + b for a, b in zip(grads_u, g_u, strict=True)]
        grads_g = g_g if grads_g is None else [a + b for a, b in zip(grads_g, g_g, strict=True)]
        states_u.append(out_u.hidden.detach().float())  # (B, L, N, D)
        states_g.append(out_g.hidden.detach().float())
    if grads_u is None:
        raise ValueError("analyze got no batches")
    hu, hg = torch.cat(states_u), torch.cat(states_g)  # (M, L, N, D)
    rows, cols = adapter.image_grid
    curves: dict[str, list[float]] = {
        k: [] for k in ("grad_cosine", "residual", "rank_increment", "high_freq_u", "high_freq_g")
    }
    for i in range(len(layers)):
        u_tokens, g_tokens = hu[:, i].flatten(0, 1), hg[:, i].flatten(0, 1)  # (M*N, D)
        curves["grad_cosine"].append(_cosine(grads_u[i], grads_g[i]))
        curves["residual"].append(reconstruction_residual(g_tokens, u_tokens, variance_threshold))
        curves["rank_increment"].append(effective_rank_increment(g_tokens, u_tokens))
        grid = (-1, rows, cols, hu.shape[-1])
        curves["high_freq_u"].append(high_frequency_share(hu[:, i].reshape(grid), freq_cutoff))
        curves["high_freq_g"].append(high_frequency_share(hg[:, i].reshape(grid), freq_cutoff))
    start, end = suggest_range(curves["grad_cosine"], curves["residual"])
    return {
        "layers": layers,
        "samples": int(hu.shape[0]),
        **curves,
        "suggested_range": [start, end],
        "rule": "longest run of positive z(grad_cosine) + z(residual), first and last block excluded",
        "variance_threshold": variance_threshold,
        "freq_cutoff": freq_cutoff,
    }
