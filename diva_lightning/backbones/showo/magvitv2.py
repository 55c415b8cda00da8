"""MAGVIT-v2 image tokenizer of Show-o: conv encoder/decoder + lookup-free quantizer (LFQ).

Written from the behaviour of the official ``models/modeling_magvitv2.py`` (Show-o commit 45a5a2d);
parameter names match its ``state_dict`` (``encoder.*``, ``decoder.*``, ``quantize.embedding``,
``quantize.power_vals``) so the released ``showlab/magvitv2`` weights load strictly.

* Encoder: ``conv_in`` -> per level ``num_res_blocks[i]`` ResNet blocks (+ attention where the level's
  resolution is in ``attn_resolutions``) and a stride-2 ``downsample`` except at the last level ->
  ``mid`` (block, attention, block) -> GroupNorm -> swish -> ``conv_out`` -> 1x1 ``quant_conv``.
* Decoder: 1x1 ``post_quant_conv`` -> ``conv_in`` -> ``mid`` -> levels deepest first, each exactly
  ``num_res_blocks[i]`` blocks and a nearest x2 ``upsample`` except at level 0 -> norm -> ``conv_out``.
* LFQ (MAGVIT-v2, Yu et al. 2023): bit ``k`` = channel ``k`` strictly > 0; code = sum_k bit_k 2^(D-1-k)
  (channel 0 is the most significant bit); the quantised value is +-1; codes are row-major over (h, w).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diva_lightning.backbones.vq_blocks import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    normalize,
    swish,
)


@dataclass
class CoderConfig:
    """Constructor arguments of the official Encoder / Decoder (same names)."""

    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2])
    num_res_blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    attn_resolutions: list[int] = field(default_factory=lambda: [5])
    dropout: float = 0.0
    in_ch: int = 3
    out_ch: int = 3
    resolution: int = 32
    z_channels: int = 8
    double_z: bool = False


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """pixels (B, in_ch, H, W) in [-1, 1] -> pre-quantisation latents (B, z, H/f, W/f)."""

    def __init__(self, config: CoderConfig):
        super().__init__()
        c = config
        self.conv_in = nn.Conv2d(c.in_ch, c.ch, 3, padding=1)
        in_mult, resolution = (1, *c.ch_mult), c.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            block_in, block_out = c.ch * in_mult[i], c.ch * mult
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks[i]):
                level.block.append(ResnetBlock(block_in, block_out, c.dropout))
                block_in = block_out
                if resolution in c.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(level)
        self.mid = _mid(block_in, c.dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, 1, 1
        )
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(swish(self.norm_out(_run_mid(self.mid, h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """latents (B, z, h, w) -> raw pixels (B, out_ch, h*f, w*f), unclamped (about [-1, 1])."""

    def __init__(self, config: CoderConfig):
        super().__init__()
        c = config
        levels = len(c.ch_mult)
        block_in, resolution = c.ch * c.ch_mult[-1], c.resolution // 2 ** (levels - 1)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, c.dropout)
        up: list[nn.Module] = []
        for i in reversed(range(levels)):
            block_out = c.ch * c.ch_mult[i]
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks[i]):
                level.block.append(ResnetBlock(block_in, block_out, c.dropout))
                block_in = block_out
                if resolution in c.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                resolution *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)  # up[0] = full resolution, run last
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Lookup-free quantizer over ``codebook_dim`` binary channels (2^D codes).

    Buffers (persistent, part of the official state dict): ``embedding`` (2^D, D) the +-1 vector of
    every code in index order, ``power_vals`` (D,) = 2^(D-1) ... 1 (int64).
    """

    def __init__(self, codebook_dim: int = 8, beta: float = 0.25, multiplier: float = 0.1):
        super().__init__()
        self.codebook_dim, self.beta, self.multiplier = codebook_dim, beta, multiplier
        powers = 2 ** torch.arange(codebook_dim - 1, -1, -1, dtype=torch.long)  # (D,) MSB first
        self.register_buffer("power_vals", powers)
        self.register_buffer("embedding", self.codes_to_vectors(torch.arange(2**codebook_dim)))

    @property
    def codebook_size(self) -> int:
        return 2**self.codebook_dim

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """codes (...) -> +-1 vectors (..., D), bit ``k`` = (code // 2^(D-1-k)) % 2."""
        powers = getattr(self, "power_vals", None)
        if powers is None:
            powers = 2 ** torch.arange(self.codebook_dim - 1, -1, -1, dtype=torch.long)
        bits = torch.div(codes.long().unsqueeze(-1), powers.to(codes.device), rounding_mode="floor")
        return (bits % 2).float() * 2 - 1

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """z (B, D, h, w) -> (z_q (B, D, h, w) straight-through, codes (B, h*w), (commit, entropy))."""
        bits = z > 0  # exact zero -> bit 0 -> -1
        quantized = torch.where(bits, 1.0, -1.0).to(z.dtype)
        codes = (bits.long() * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)  # (B, h*w)
        commit = self.beta * F.mse_loss(z, quantized.detach()) + F.mse_loss(quantized, z.detach())
        z_q = z + (quantized - z).detach()
        return z_q, codes, (self.multiplier * commit, self.multiplier * self.entropy_term(z))

    @staticmethod
    def entropy_term(z: Tensor) -> Tensor:
        """Mean per-element entropy minus entropy of the batch-mean distribution, per bit."""
        logits = torch.stack([-((z - 1) ** 2), -((z + 1) ** 2)], dim=-1)  # (B, D, h, w, 2)
        probs = logits.softmax(-1)
        per_element = -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1).mean()
        mean_probs = probs.mean(dim=(0, 2, 3))  # (D, 2)
        of_mean = -(mean_probs * torch.log(mean_probs.clamp(min=1e-20))).sum(-1).mean()
        return per_element - of_mean


class MAGVITv2(nn.Module):
    """The tokenizer: ``get_code(pixels) -> codes``, ``decode_code(codes) -> pixels``."""

    def __init__(self, encoder: CoderConfig, decoder: CoderConfig, codebook_dim: int):
        super().__init__()
        if not encoder.z_channels == decoder.z_channels == codebook_dim:
            raise ValueError(
                f"LFQ needs z_channels == codebook_dim, got encoder {encoder.z_channels}, "
                f"decoder {decoder.z_channels}, codebook_dim {codebook_dim}"
            )
        self.encoder_config, self.decoder_config = encoder, decoder
        self.encoder = Encoder(encoder)
        self.decoder = Decoder(decoder)
        self.quantize = LFQuantizer(codebook_dim)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_config.ch_mult) - 1)

    def config_dict(self) -> dict:
        return {
            "encoder": asdict(self.encoder_config),
            "decoder": asdict(self.decoder_config),
            "codebook_dim": self.quantize.codebook_dim,
        }

    @classmethod
    def from_config(cls, config: dict) -> MAGVITv2:
        return cls(
            CoderConfig(**config["encoder"]),
            CoderConfig(**config["decoder"]),
            int(config["codebook_dim"]),
        )

    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """pixels (B, 3, H, W) in [-1, 1] -> (z_q, codes (B, h*w), quantizer losses)."""
        return self.quantize(self.encoder(pixels))

    def get_code(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> codes (B, h*w), row-major over (h, w)."""
        return self.encode(pixels)[1]

    def codebook_entry(self, codes: Tensor) -> Tensor:
        """codes (B, N) -> +-1 latents (B, D, h, w) with h = w = sqrt(N)."""
        side = math.isqrt(codes.shape[-1])
        vectors = self.quantize.codes_to_vectors(codes)  # (B, N, D)
        vectors = vectors.to(self.decoder.conv_in.weight.dtype)
        return vectors.view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)

    def decode_code(self, codes: Tensor) -> Tensor:
        """codes (B, N) -> raw decoder output (B, 3, H, W), unclamped."""
        return self.decoder(self.codebook_entry(codes))
