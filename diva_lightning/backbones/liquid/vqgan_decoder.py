"""The classic (taming) VQGAN decoder of Chameleon / Liquid, hand-written.

transformers' ``ChameleonVQVAE`` holds the encoder side only, so decoding codes to pixels needs a
decoder of our own. Parameter names equal the original checkpoint's ``decoder.*`` keys. The ResNet /
attention / upsample blocks are the same taming blocks as Show-o's MAGVIT-v2 and are shared with it.
"""

from __future__ import annotations

from torch import Tensor, nn

from diva_lightning.backbones.vq_blocks import (
    AttnBlock,
    ResnetBlock,
    Upsample,
    normalize,
    swish,
)


class VQGANDecoder(nn.Module):
    """Classic VQGAN decoder: latents (B, z_channels, h, w) -> pixels (B, out_ch, h*f, w*f), unclamped.

    conv_in -> mid (block_1, attn_1, block_2) -> levels deepest first, each ``num_res_blocks + 1``
    ResNet blocks (attention after each where the level's resolution is in ``attn_resolutions``) and
    a nearest x2 ``upsample`` (+ conv3x3) except at level 0 -> GroupNorm -> swish -> conv_out.
    ``up[0]`` is the shallowest (full-resolution) level, so the levels run in reverse index order.
    """

    def __init__(self, ddconfig: dict):
        super().__init__()
        ch, ch_mult = ddconfig["ch"], list(ddconfig["ch_mult"])
        dropout = ddconfig.get("dropout", 0.0)
        attn_resolutions = list(ddconfig["attn_resolutions"])
        block_in = ch * ch_mult[-1]
        resolution = ddconfig["resolution"] // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(ddconfig["z_channels"], block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        up: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(ddconfig["num_res_blocks"] + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if resolution in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                resolution *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, ddconfig["out_ch"], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # (B, C, 2h, 2w)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, H, W)
