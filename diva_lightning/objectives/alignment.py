"""Shared-factor alignment: directed InfoNCE with stop-gradient (paper Eq. 6 and Eq. 10).

    L_{U->G} = -log exp(sim(z_sh^U, sg[z_sh^G]) / tau) / sum_j exp(sim(z_sh^U, sg[z_sh^{G,j}]) / tau)

and the mirror ``L_{G->U}``; ``sim`` is cosine similarity. The targets ``sg[z_sh]`` are the
online factors, detached, or, given explicitly, another network's (stage 2's EMA teacher, paper
App. B.2). Pairs are matched per middle layer
(factor ``(B, L, d)`` -> one ``B x B`` problem per layer) and averaged over layers. With
``stop_gradient=False`` the target side also receives gradient (the paper's "w/o sg" ablation,
and the authors' symmetric code). ``gather_negatives`` adds the other ranks' targets as
negatives: targets are detached, so an all-gather without gradient is cheap and exact.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def gather_from_ranks(t: Tensor) -> tuple[Tensor, int]:
    """All-gather a detached tensor along dim 0 -> (gathered, offset of this rank's rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, 0
    chunks = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, t.detach().contiguous())
    return torch.cat(chunks, 0), dist.get_rank() * t.shape[0]


def directed_info_nce(
    query: Tensor,
    target: Tensor,
    tau: float = 0.07,
    stop_gradient: bool = True,
    gather_negatives: bool = False,
) -> Tensor:
    """InfoNCE of ``query`` against ``target`` with cosine similarity / tau.

    query, target (B, L, d) or (B, d). Positives are same-index rows. Returns a scalar loss
    averaged over batch and layers.
    """
    if query.shape != target.shape:
        raise ValueError(f"query {tuple(query.shape)} and target {tuple(target.shape)} differ")
    if query.dim() == 2:
        query, target = query.unsqueeze(1), target.unsqueeze(1)  # (B, 1, d)
    q = F.normalize(query.float(), dim=-1)  # (B, L, d)
    k = F.normalize(target.float(), dim=-1)
    if stop_gradient:
        k = k.detach()
    offset = 0
    if gather_negatives:
        gathered, offset = gather_from_ranks(k.detach())  # (W*B, L, d)
        k = torch.cat([gathered[:offset], k, gathered[offset + k.shape[0] :]], 0)
    scores = torch.einsum("bld,cld->lbc", q, k) / tau  # (L, B, B_all)
    labels = torch.arange(q.shape[0], device=q.device) + offset  # (B,)
    return F.cross_entropy(scores.flatten(0, 1), labels.repeat(scores.shape[0]))


def infonce_lower_bound(scores: Tensor) -> Tensor:
    """InfoNCE MI lower bound from a critic score matrix ``scores[i, j] = f(x_i, y_j)`` (N, N).

    ``I_NCE = mean_i [ f(x_i, y_i) - logsumexp_j f(x_i, y_j) ] + log N``; never above ``log N``.
    """
    n = scores.shape[-1]
    return (scores.diagonal(dim1=-2, dim2=-1) - scores.logsumexp(-1)).mean() + math.log(n)


class SharedAlignment(nn.Module):
    """Both directed terms of Eq. 10.

    Args:
        tau: temperature (authors' code: 0.07).
        stop_gradient: detach the target side of each directed term (paper default).
        gather_negatives: add the other ranks' (detached) targets as negatives.
    """

    def __init__(
        self, tau: float = 0.07, stop_gradient: bool = True, gather_negatives: bool = False
    ):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau, self.stop_gradient, self.gather_negatives = tau, stop_gradient, gather_negatives

    def forward(
        self,
        shared_u: Tensor,
        shared_g: Tensor,
        target_u: Tensor | None = None,
        target_g: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """shared_u, shared_g (B, L, d) -> (L_{U->G}, L_{G->U}).

        ``target_u`` / ``target_g`` (B, L, d): the targets of ``L_{G->U}`` / ``L_{U->G}``
        (default: the online factors themselves).
        """
        kwargs = dict(
            tau=self.tau, stop_gradient=self.stop_gradient, gather_negatives=self.gather_negatives
        )
        target_u = shared_u if target_u is None else target_u
        target_g = shared_g if target_g is None else target_g
        return (
            directed_info_nce(shared_u, target_g, **kwargs),
            directed_info_nce(shared_g, target_u, **kwargs),
        )
