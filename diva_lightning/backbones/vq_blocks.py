"""The classic (taming) VQGAN building blocks: GroupNorm + swish ResNet blocks, single-head spatial
self-attention, stride-2 down- and nearest x2 up-sampling convolutions.

Shared by Show-o's MAGVIT-v2 (``showo/magvitv2.py``) and Liquid's Chameleon VQGAN decoder
(``liquid/vqgan_decoder.py``): both checkpoints name their parameters this way (``norm1``,
``conv1``, ``nin_shortcut``, ``q``/``k``/``v``/``proj_out``, ``conv``), so they load strictly.
Hand-written because transformers exposes these blocks only inside whole models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus (1x1 ``nin_shortcut``) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, 1x1 q/k/v/proj_out, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, height * width).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(b, c, height * width)  # (B, C, HW)
        v = self.v(h).reshape(b, c, height * width)  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (B, HW query, HW key)
        h = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, conv3x3 stride 2 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2, then conv3x3 pad 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
