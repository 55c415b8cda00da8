"""MAGVIT-v2 behaviour the parity fixtures cannot cover (their tiny configs have no channel changes
and no per-level attention): 1x1 ``nin_shortcut`` blocks, per-level attention, LFQ bit order, the
padding of ``Downsample`` and reading the architecture back from a state dict."""

import pytest
import torch
import torch.nn.functional as F

from diva_lightning.backbones.showo.checkpoint import infer_magvit_config
from diva_lightning.backbones.showo.magvitv2 import CoderConfig, LFQuantizer, MAGVITv2
from diva_lightning.backbones.vq_blocks import AttnBlock, Downsample, ResnetBlock

# level 0 runs at 16 px and has attention after each of its two blocks; level 1 changes channels
ATTN_CODER = dict(
    ch=32, ch_mult=[1, 2], num_res_blocks=[2, 1], attn_resolutions=[16], resolution=16
)


def _perturb(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module.eval()


def _gn(x, norm):
    return F.silu(F.group_norm(x, 32, norm.weight, norm.bias, eps=1e-6))


def test_resnet_block_with_channel_change_uses_1x1_nin_shortcut():
    block = _perturb(ResnetBlock(32, 64))
    assert set(k.split(".")[0] for k in block.state_dict()) == {
        "norm1",
        "conv1",
        "norm2",
        "conv2",
        "nin_shortcut",
    }
    assert block.nin_shortcut.weight.shape == (64, 32, 1, 1)
    assert not hasattr(ResnetBlock(32, 32), "nin_shortcut")
    x = torch.randn(2, 32, 8, 8)
    h = F.conv2d(_gn(x, block.norm1), block.conv1.weight, block.conv1.bias, padding=1)
    h = F.conv2d(_gn(h, block.norm2), block.conv2.weight, block.conv2.bias, padding=1)
    skip = F.conv2d(x, block.nin_shortcut.weight, block.nin_shortcut.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x), skip + h)


def test_attention_block_is_single_head_over_all_positions():
    attn = _perturb(AttnBlock(32))
    x = torch.randn(2, 32, 4, 4)
    h = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6)
    q, k, v = (
        conv(h).flatten(2).transpose(1, 2) for conv in (attn.q, attn.k, attn.v)
    )  # (B, HW, C)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), x + attn.proj_out(out), atol=1e-5, rtol=1e-5)


def test_per_level_attention_keys_and_order():
    coder = CoderConfig(**ATTN_CODER)
    vq = _perturb(MAGVITv2(coder, coder, codebook_dim=8))
    keys = vq.state_dict().keys()
    assert {"encoder.down.0.attn.0.q.weight", "encoder.down.0.attn.1.proj_out.bias"} <= set(keys)
    assert {"decoder.up.0.attn.0.k.weight", "encoder.down.1.block.0.nin_shortcut.weight"} <= set(
        keys
    )
    assert not any(k.startswith(("encoder.down.1.attn", "decoder.up.1.attn")) for k in keys)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in keys  # 64 -> 32 channels on the way up
    enc, x = vq.encoder, torch.randn(1, 3, 16, 16)
    with torch.no_grad():  # attention right after each block, before the downsample
        h = enc.conv_in(x)
        h = enc.down[0].attn[1](enc.down[0].block[1](enc.down[0].attn[0](enc.down[0].block[0](h))))
        h = enc.down[1].block[0](enc.down[0].downsample(h))
        h = enc.mid.block_2(enc.mid.attn_1(enc.mid.block_1(h)))
        h = enc.quant_conv(enc.conv_out(_gn(h, enc.norm_out)))
        torch.testing.assert_close(enc(x), h)
        # per-level attention is really used: zeroing its output projection changes the result
        for level in enc.down[0].attn:
            level.proj_out.weight.zero_(), level.proj_out.bias.zero_()
        assert not torch.allclose(enc(x), h)


@pytest.mark.parametrize(
    "coder", [ATTN_CODER, dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=[1, 0, 2])]
)
def test_architecture_is_read_back_from_the_weights(coder):
    vq = _perturb(MAGVITv2(CoderConfig(**coder), CoderConfig(**coder), codebook_dim=8))
    rebuilt = MAGVITv2.from_config(infer_magvit_config(vq.state_dict())).eval()
    rebuilt.load_state_dict(vq.state_dict(), strict=True)
    size = coder.get("resolution", 32)
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(rebuilt.get_code(pixels), vq.get_code(pixels))
        codes = vq.get_code(pixels)
        torch.testing.assert_close(rebuilt.decode_code(codes), vq.decode_code(codes))


def test_lfq_bit_order_and_zero_threshold():
    lfq = LFQuantizer(codebook_dim=4)
    assert lfq.power_vals.tolist() == [8, 4, 2, 1]
    z = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)  # bits 1 0 0 1 (exact 0 -> bit 0)
    z_q, codes, _ = lfq(z)
    assert codes.tolist() == [[9]] and z_q.flatten().tolist() == [1.0, -1.0, -1.0, 1.0]
    assert lfq.embedding[9].tolist() == [1.0, -1.0, -1.0, 1.0]
    all_codes = torch.arange(16)
    vectors = lfq.codes_to_vectors(all_codes).view(16, 4, 1, 1)
    assert torch.equal(lfq(vectors)[1].flatten(), all_codes)


def test_codes_are_row_major_and_downsample_pads_right_bottom():
    vq = _perturb(MAGVITv2(CoderConfig(**ATTN_CODER), CoderConfig(**ATTN_CODER), 8))
    with torch.no_grad():
        z = vq.encoder(torch.rand(1, 3, 16, 16) * 2 - 1)  # (1, 8, 8, 8)
        codes = vq.quantize(z)[1]
        bits = (z[0] > 0).long()  # (D, h, w)
        assert codes[0, 3 * 8 + 5] == int("".join(str(int(b)) for b in bits[:, 3, 5]), 2)
    down = _perturb(Downsample(32))
    x = torch.randn(1, 32, 8, 8)
    padded = torch.cat([torch.cat([x, torch.zeros(1, 32, 8, 1)], 3), torch.zeros(1, 32, 1, 9)], 2)
    with torch.no_grad():
        expected = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
        torch.testing.assert_close(down(x), expected)
