"""Upper bounds on the mutual information of unique factors (paper Eq. 7).

``NCECLUB`` (paper default; FactorCL, Liang et al. 2023): a critic ``f(x, y) = MLP([x; y])``.
With ``T0_i = f(x_i, y_i)`` and ``T1_ij = f(x_i, y_j)``:

* the critic is trained to MAXIMISE the InfoNCE lower bound
  ``I_NCE = mean_i T0_i - mean_i (logsumexp_j T1_ij - log N)`` on DETACHED inputs
  (``critic_loss``, its own optimizer);
* the model MINIMISES ``I_CLUB = mean_i T0_i - mean_ij T1_ij`` (``upper_bound``), evaluated with
  the critic's parameters detached, so this term never updates the critic.

``GaussianCLUB`` (Cheng et al. 2020, used by the authors' code): ``q(y|x) = N(mu(x),
diag exp(logvar(x)))`` with ``logvar`` through tanh; the critic is trained on the
log-likelihood of detached pairs, and the estimate is the mean log-density of positive pairs
minus that of all (shuffled) pairs.

Both accept ``(N, d)`` or per-layer ``(B, L, d)`` inputs; pairs are formed within a layer only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ESTIMATORS = ("nce_club", "gaussian_club")


def _per_layer(x: Tensor) -> Tensor:
    """(N, d) -> (1, N, d); (B, L, d) -> (L, B, d)."""
    return x.unsqueeze(0) if x.dim() == 2 else x.transpose(0, 1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, out_dim),
    )


class _FrozenCall(nn.Module):
    """Calls a submodule with its parameters out of the graph: gradients reach the inputs,
    never the critic. The module runs through its own ``__call__`` with its own parameters
    (``requires_grad`` off for the call), so module hooks such as DeepSpeed ZeRO-3's parameter
    gathering see what they expect; a ``functional_call`` with detached copies does not."""

    def frozen(self, module: nn.Module, *args: Tensor) -> Tensor:
        params = [p for p in module.parameters() if p.requires_grad]
        for param in params:
            param.requires_grad_(False)
        try:
            return module(*args)
        finally:
            for param in params:
                param.requires_grad_(True)


class NCECLUB(_FrozenCall):
    """NCE-CLUB upper bound with a concatenation critic. Args: x_dim, y_dim, hidden."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256):
        super().__init__()
        self.critic = _mlp(x_dim + y_dim, hidden, 1)

    def scores(self, x: Tensor, y: Tensor, frozen: bool = False) -> Tensor:
        """x (N, dx) | (B, L, dx), y likewise -> T (L, N, N) with T[l, i, j] = f(x_i, y_j)."""
        xs, ys = _per_layer(x), _per_layer(y)  # (L, N, d)
        n = xs.shape[1]
        pairs = torch.cat(
            [xs.unsqueeze(2).expand(-1, -1, n, -1), ys.unsqueeze(1).expand(-1, n, -1, -1)], -1
        )  # (L, N, N, dx+dy)
        out = self.frozen(self.critic, pairs) if frozen else self.critic(pairs)
        return out.squeeze(-1)  # (L, N, N)

    def lower_bound(self, x: Tensor, y: Tensor) -> Tensor:
        """I_NCE (averaged over layers), with gradients to the critic."""
        t = self.scores(x, y)
        t0 = t.diagonal(dim1=-2, dim2=-1)  # (L, N)
        return (t0 - t.logsumexp(-1) + math.log(t.shape[-1])).mean()

    def critic_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Loss of the critic's own optimizer step: -I_NCE on detached inputs."""
        return -self.lower_bound(x.detach(), y.detach())

    def upper_bound(self, x: Tensor, y: Tensor) -> Tensor:
        """I_CLUB = mean T0 - mean T1; gradients reach x and y, never the critic."""
        t = self.scores(x, y, frozen=True)
        return (t.diagonal(dim1=-2, dim2=-1).mean(-1) - t.mean((-1, -2))).mean()


class GaussianCLUB(_FrozenCall):
    """CLUB with a diagonal Gaussian variational ``q(y|x)`` (Cheng et al. 2020)."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256):
        super().__init__()
        self.mu = _mlp(x_dim, hidden, y_dim)
        self.logvar = nn.Sequential(_mlp(x_dim, hidden, y_dim), nn.Tanh())

    def _moments(self, x: Tensor, frozen: bool) -> tuple[Tensor, Tensor]:
        if frozen:
            return self.frozen(self.mu, x), self.frozen(self.logvar, x)
        return self.mu(x), self.logvar(x)

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean ``log q(y_i | x_i)`` over positive pairs (constant dropped)."""
        mu, logvar = self._moments(x, frozen=False)
        return (-((y - mu) ** 2) / logvar.exp() / 2 - logvar / 2).sum(-1).mean()

    def critic_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood on detached inputs (the variational net's own step)."""
        return -self.log_likelihood(x.detach(), y.detach())

    def upper_bound(self, x: Tensor, y: Tensor) -> Tensor:
        """CLUB estimate: E[log q(y_i|x_i)] - E_i E_j[log q(y_j|x_i)]; critic not updated."""
        xs, ys = _per_layer(x), _per_layer(y)  # (L, N, d)
        mu, logvar = self._moments(xs, frozen=True)
        var = logvar.exp()
        positive = (-((ys - mu) ** 2) / var / 2).sum(-1)  # (L, N)
        # mean_j (y_j - mu_i)^2 = (mean_j y_j^2) - 2 mu_i mean_j y_j + mu_i^2, no (N, N, d) tensor
        y_mean, y_sq = ys.mean(1, keepdim=True), (ys**2).mean(1, keepdim=True)  # (L, 1, d)
        negative = (-(y_sq - 2 * mu * y_mean + mu**2) / var / 2).sum(-1)  # (L, N)
        return (positive - negative).mean()


def build_unique_estimator(name: str, x_dim: int, y_dim: int, hidden: int = 256) -> nn.Module:
    """``nce_club`` (paper) or ``gaussian_club`` (authors' code)."""
    if name == "nce_club":
        return NCECLUB(x_dim, y_dim, hidden)
    if name == "gaussian_club":
        return GaussianCLUB(x_dim, y_dim, hidden)
    raise ValueError(f"unknown unique estimator {name!r}; choose one of {ESTIMATORS}")
