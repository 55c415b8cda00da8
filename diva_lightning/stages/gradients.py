"""Per-term gradients on a set of parameters: norms, cosines, clipped shares (no Lightning).

Shared by the ``GradientBalance`` callback and stage 2's ``balance: cap``. Each term gets its
own ``torch.autograd.grad`` pass over the same graph (``retain_graph``), which never touches
``.grad``, so the training step that follows is unaffected. Gradients stay per parameter
(lists of tensors, reduced with ``torch._foreach`` ops) instead of one flat copy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

Grads = list[Tensor]


def term_gradients(terms: dict[str, Tensor], params: Sequence[Tensor]) -> dict[str, Grads]:
    """d term / d params for every term, zeros where a term does not reach a parameter."""
    out = {}
    for name, term in terms.items():
        if not term.requires_grad:
            out[name] = [torch.zeros_like(p) for p in params]
            continue
        grads = torch.autograd.grad(term, list(params), retain_graph=True, allow_unused=True)
        out[name] = [
            torch.zeros_like(p) if g is None else g.detach()
            for g, p in zip(grads, params, strict=True)
        ]
    return out


def combine(grads: dict[str, Grads], names: Sequence[str]) -> Grads:
    """The gradient of the sum of ``names`` (gradients are linear in the terms)."""
    present = [grads[n] for n in names if n in grads]
    if not present:
        raise ValueError(f"none of {list(names)} among the terms {sorted(grads)}")
    total = [g.clone() for g in present[0]]
    for other in present[1:]:
        torch._foreach_add_(total, other)
    return total


def dot(a: Grads, b: Grads) -> float:
    """Inner product of two per-parameter gradients, in float64."""
    return float(sum(torch.sum(x.double() * y.double()) for x, y in zip(a, b, strict=True)))


def gradient_stats(
    grads: dict[str, Grads], groups: dict[str, Sequence[str]], clip: float | None
) -> dict[str, float]:
    """Norms of every term and group, pairwise cosines, and what each contributes after the
    gradient-norm clip.

    Returns ``norm/<x>``, ``cos/<x>__<y>`` for every pair, ``share/<term>`` (the term's part of
    the total along the total's direction, ``<g_t, g> / |g|^2``: the shares sum to 1) and
    ``clipped_norm/<x>`` (``min(1, clip / |g|) |g_x|``: its size in the clipped update), where
    ``g`` is the sum of all terms.
    """
    named = dict(grads)
    for group, members in groups.items():
        if any(m in grads for m in members):
            named[group] = combine(grads, members)
    total = combine(grads, list(grads))
    sq = {name: dot(g, g) for name, g in named.items()}
    total_sq = dot(total, total)
    scale = 1.0 if not clip or total_sq == 0 else min(1.0, clip / math.sqrt(total_sq))
    stats = {"norm/total": math.sqrt(total_sq), "clip_scale": scale}
    for name, value in sq.items():
        stats[f"norm/{name}"] = math.sqrt(value)
        stats[f"clipped_norm/{name}"] = scale * math.sqrt(value)
    for a, b in itertools.combinations(named, 2):
        denominator = math.sqrt(sq[a] * sq[b])
        stats[f"cos/{a}__{b}"] = dot(named[a], named[b]) / denominator if denominator else 0.0
    for name in grads:
        stats[f"share/{name}"] = dot(grads[name], total) / total_sq if total_sq else 0.0
    return stats
