"""Factor encoders of DIVA (paper Eq. 5 and Eq. 13).

Each flow ``i in {U, G}`` has a shared and a unique encoder. They map the pooled image-token
state of every middle layer ``h_i^(l)`` (one vector per layer) to a factor ``z^(l,i)``. The same
encoder is applied to every layer (weights are shared across ``I_mid``).

Variants (paper Table 2, "Architecture of shared/unique encoders"):

* ``gated_mlp`` (default, Eq. 13): ``z = LN(sigmoid(W h) * phi(h))``, ``phi`` a 3-layer GELU MLP.
* ``linear_ln``: ``z = LN(W h)``.
* ``transformer``: the vector is projected to a few tokens, mixed by a small Transformer encoder,
  flattened and projected; still one vector in, one factor out, per layer.

Two readings of Eq. 5 (``projector``): ``per_flow`` builds four independent encoders (Sec. 3.2:
"E_sha^i and E_uni^i ... for each branch"); ``shared`` follows Eq. 5's symbols literally, with
one ``phi_sh`` and one ``phi_uni`` used by both flows and only the gates ``W^i`` (and the
LayerNorm of Eq. 13) per flow. ``shared`` needs the gated-MLP form, the only one with a ``phi``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

ENCODER_ARCHS = ("gated_mlp", "linear_ln", "transformer")
PROJECTORS = ("per_flow", "shared")
FLOWS = ("U", "G")
KINDS = ("shared", "unique")


class GatedMLPEncoder(nn.Module):
    """Eq. 13: ``z = LN(g * phi(h))``, ``g = sigmoid(W h)``, ``phi`` = 3-layer MLP with GELU."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or max(out_dim, min(in_dim, 4 * out_dim))
        self.gate = nn.Linear(in_dim, out_dim)
        self.phi = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, h: Tensor) -> Tensor:  # (..., D) -> (..., d)
        return self.norm(self.gate(h).sigmoid() * self.phi(h))


class LinearLNEncoder(nn.Module):
    """Ablation: ``z = LN(W h)``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, h: Tensor) -> Tensor:  # (..., D) -> (..., d)
        return self.norm(self.proj(h))


class TransformerFactorEncoder(nn.Module):
    """Ablation: a small Transformer over ``num_tokens`` tokens made from one input vector."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        num_tokens: int = 4,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        width = hidden_dim or max(32, out_dim // 2)
        width = max(num_heads, width - width % num_heads)
        self.num_tokens, self.width = num_tokens, width
        self.to_tokens = nn.Linear(in_dim, num_tokens * width)
        layer = nn.TransformerEncoderLayer(
            width, num_heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True
        )
        self.mixer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(num_tokens * width, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, h: Tensor) -> Tensor:  # (..., D) -> (..., d)
        lead = h.shape[:-1]
        tokens = self.to_tokens(h).reshape(-1, self.num_tokens, self.width)  # (M, K, W)
        mixed = self.mixer(tokens).reshape(*lead, self.num_tokens * self.width)  # (..., K*W)
        return self.norm(self.out(mixed))


def build_factor_encoder(
    arch: str, in_dim: int, out_dim: int, hidden_dim: int | None = None
) -> nn.Module:
    """Build one encoder by name (``gated_mlp``, ``linear_ln`` or ``transformer``)."""
    classes = {
        "gated_mlp": GatedMLPEncoder,
        "linear_ln": LinearLNEncoder,
        "transformer": TransformerFactorEncoder,
    }
    if arch not in classes:
        raise ValueError(f"unknown encoder arch {arch!r}; choose one of {ENCODER_ARCHS}")
    return classes[arch](in_dim, out_dim, hidden_dim)


@dataclass
class Factors:
    """Shared and unique factors of both flows, each ``(B, L, d)``."""

    shared_u: Tensor
    unique_u: Tensor
    shared_g: Tensor
    unique_g: Tensor

    def detach(self) -> Factors:
        return Factors(
            *(t.detach() for t in (self.shared_u, self.unique_u, self.shared_g, self.unique_g))
        )


class FactorEncoders(nn.Module):
    """The four encoders ``E_sha^U, E_uni^U, E_sha^G, E_uni^G`` (Eq. 5).

    Args:
        hidden_size: backbone hidden size ``D`` (input width).
        shared_dim: width of shared factors ``d_sh`` (authors' code: 256).
        unique_dim: width of unique factors ``d_uni`` (defaults to ``shared_dim``).
        arch: ``gated_mlp`` (paper default), ``linear_ln`` or ``transformer``.
        mlp_hidden: hidden width of ``phi`` (default ``max(d, min(D, 4 d))``).
        projector: ``per_flow`` (default: four independent encoders) or ``shared`` (one ``phi``
            per kind used by both flows, per-flow gates; see the module docstring).
    """

    def __init__(
        self,
        hidden_size: int,
        shared_dim: int = 256,
        unique_dim: int | None = None,
        arch: str = "gated_mlp",
        mlp_hidden: int | None = None,
        projector: str = "per_flow",
    ):
        super().__init__()
        if projector not in PROJECTORS:
            raise ValueError(f"unknown projector {projector!r}; choose one of {PROJECTORS}")
        if projector == "shared" and arch != "gated_mlp":
            raise ValueError(
                f"projector 'shared' shares the gated MLP's phi; arch {arch!r} has none"
            )
        self.hidden_size, self.arch, self.mlp_hidden = hidden_size, arch, mlp_hidden
        self.shared_dim, self.unique_dim = shared_dim, unique_dim or shared_dim
        self.projector = projector
        dims = {"shared": self.shared_dim, "unique": self.unique_dim}
        encoders = {}
        for flow in FLOWS:
            for kind in KINDS:
                encoders[f"{flow}_{kind}"] = build_factor_encoder(
                    arch, hidden_size, dims[kind], mlp_hidden
                )
                if projector == "shared" and flow != FLOWS[0]:  # the same module, so one tensor
                    encoders[f"{flow}_{kind}"].phi = encoders[f"{FLOWS[0]}_{kind}"].phi
        self.encoders = nn.ModuleDict(encoders)

    def encode(self, flow: str, kind: str, h: Tensor) -> Tensor:
        """h (B, L, D) -> z (B, L, d) with the encoder of ``flow`` and ``kind``, in the
        encoder's own dtype (DeepSpeed's bf16 engine casts the encoders to bf16 while the
        stages hand over float32 states)."""
        if h.shape[-1] != self.hidden_size:
            raise ValueError(
                f"factor encoders expect hidden size {self.hidden_size}, got {h.shape[-1]} "
                f"(do the stage-1 encoders belong to this backbone?)"
            )
        encoder = self.encoders[f"{flow}_{kind}"]
        return encoder(h.to(next(encoder.parameters()).dtype))

    def forward(self, h_u: Tensor, h_g: Tensor) -> Factors:
        """h_u, h_g (B, L, D) pooled middle-layer states of both flows -> four factors (B, L, d)."""
        return Factors(
            shared_u=self.encode("U", "shared", h_u),
            unique_u=self.encode("U", "unique", h_u),
            shared_g=self.encode("G", "shared", h_g),
            unique_g=self.encode("G", "unique", h_g),
        )
