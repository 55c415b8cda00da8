"""Liquid's image tokenizer: Chameleon's VQGAN in its original format (``vqgan.yaml`` + ``vqgan.ckpt``).

Reproduces ``chameleon/inference/vqgan.py`` as Liquid ships it (commit 4609c47) behaviour for
behaviour; parity is pinned by ``tests/fixtures/liquid-vqgan`` (see its README).

* Encoder side: transformers' ``ChameleonVQVAE`` (encoder, ``quant_conv``, ``quantize``,
  ``post_quant_conv``: 67 keys named exactly as in the original checkpoint). It reproduces the
  reference codes exactly, so it is used as is.
* Decoder: hand-written (transformers has no Chameleon VQGAN decoder): the classic taming VQGAN
  decoder (``vqgan_decoder.VQGANDecoder``), parameter names equal to the checkpoint's ``decoder.*``.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

from diva_lightning.backbones.liquid.vqgan_decoder import VQGANDecoder

YAML_NAME, CKPT_NAME = "vqgan.yaml", "vqgan.ckpt"
TARGET = "chameleon.inference.vqgan.VQModel"
# The tiny configuration of the parity fixtures (real Liquid: 512 px -> 32 x 32 codes, codebook
# 8192, ch_mult [1, 1, 2, 2, 4]).
TINY_DDCONFIG = {
    "double_z": False,
    "z_channels": 8,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


def chameleon_vqvae_config(ddconfig: dict, n_embed: int, embed_dim: int) -> ChameleonVQVAEConfig:
    """The transformers config whose ``ChameleonVQVAE`` is the encoder side of this ddconfig."""
    if ddconfig.get("double_z", False):
        raise ValueError(
            "ddconfig double_z: true is not supported (Chameleon's VQGAN has double_z false)"
        )
    return ChameleonVQVAEConfig(
        embed_dim=embed_dim,
        num_embeddings=n_embed,
        double_latent=False,
        latent_channels=ddconfig["z_channels"],
        resolution=ddconfig["resolution"],
        in_channels=ddconfig.get("in_channels", 3),
        base_channels=ddconfig["ch"],
        channel_multiplier=list(ddconfig["ch_mult"]),
        num_res_blocks=ddconfig["num_res_blocks"],
        attn_resolutions=list(ddconfig["attn_resolutions"]),
        dropout=ddconfig.get("dropout", 0.0),
    )


class ChameleonVQGAN(nn.Module):
    """Chameleon / Liquid VQGAN: pixels (B, 3, H, W) in [-1, 1] <-> codes (B, N), N = grid**2."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int):
        super().__init__()
        ddconfig = {k: list(v) if isinstance(v, tuple) else v for k, v in ddconfig.items()}
        self.ddconfig, self.n_embed, self.embed_dim = ddconfig, n_embed, embed_dim
        self.encoder_side = ChameleonVQVAE(
            chameleon_vqvae_config(self.ddconfig, n_embed, embed_dim)
        )
        self.decoder = VQGANDecoder(self.ddconfig)
        self.eval()  # a frozen tokenizer: eval mode (dropout off) from the start

    @property
    def post_quant_conv(self) -> nn.Conv2d:
        """1x1 conv embed_dim -> z_channels (owned by ``ChameleonVQVAE``, which already holds it)."""
        return self.encoder_side.post_quant_conv

    @property
    def codebook_size(self) -> int:
        return self.n_embed

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def resolution(self) -> int:
        return self.ddconfig["resolution"]

    def pre_quant(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [-1, 1] -> encoder + quant_conv features (B, embed_dim, h, w)."""
        return self.encoder_side.quant_conv(self.encoder_side.encoder(x))

    def encode(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [-1, 1] -> codes (B, h * w) int64, row-major (nearest codebook entry)."""
        tokens = self.encoder_side.encode(x).image_tokens  # (B * h * w,)
        return tokens.reshape(x.shape[0], -1).long()

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, N) -> pixels (B, out_ch, H, W), about [-1, 1], NOT clamped."""
        b, n = codes.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"decode expects a square grid of codes, got {n} per image")
        z = self.encoder_side.quantize.embedding(codes)  # (B, N, embed_dim)
        z = z.reshape(b, side, side, -1).permute(0, 3, 1, 2).contiguous()  # (B, embed_dim, h, w)
        return self.decoder(self.post_quant_conv(z))  # (B, out_ch, H, W)

    def reference_state_dict(self) -> dict[str, Tensor]:
        """The weights under the original checkpoint's names (encoder side + ``decoder.*``)."""
        sd = dict(self.encoder_side.state_dict())
        sd.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        return sd

    def load_reference_state_dict(self, sd: dict[str, Tensor], source: str | None = None) -> None:
        """Load original-format weights strictly: every key used, none missing, none unexpected."""
        expected = set(self.reference_state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        where = f" in {source}" if source else ""
        if missing or unexpected:
            raise ValueError(
                f"VQGAN state dict{where} does not match the model: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        encoder_side = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
        decoder = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
        try:
            self.encoder_side.load_state_dict(encoder_side, strict=True)
            self.decoder.load_state_dict(decoder, strict=True)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"VQGAN state dict{where} does not fit the config: {err}") from err


def tiny_vqgan(
    codebook_size: int = 64, resolution: int = 16, embed_dim: int = 8, **ddconfig
) -> ChameleonVQGAN:
    """A random tiny VQGAN (the fixtures' shape unless overridden); deterministic given torch's seed."""
    unknown = set(ddconfig) - set(TINY_DDCONFIG)
    if unknown:
        raise TypeError(f"tiny_vqgan: unknown ddconfig keys {sorted(unknown)}")
    config = {**TINY_DDCONFIG, "resolution": resolution, **ddconfig}
    return ChameleonVQGAN(config, codebook_size, embed_dim)


def _paths(folder_or_yaml: str | os.PathLike, ckpt: str | os.PathLike | None) -> tuple[Path, Path]:
    path = Path(folder_or_yaml)
    if path.is_dir():
        yaml_path = path / YAML_NAME
    elif path.suffix in (".yaml", ".yml") or path.exists():
        yaml_path = path
    else:
        raise FileNotFoundError(
            f"VQGAN folder not found: {path} (expected a folder with {YAML_NAME} and {CKPT_NAME})"
        )
    if not yaml_path.is_file():
        raise FileNotFoundError(
            f"VQGAN config not found: {yaml_path} (expected the original {YAML_NAME})"
        )
    ckpt_path = Path(ckpt) if ckpt is not None else yaml_path.parent / CKPT_NAME
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"VQGAN checkpoint not found: {ckpt_path} (expected the original {CKPT_NAME})"
        )
    return yaml_path, ckpt_path


def load_vqgan(
    folder_or_yaml: str | os.PathLike,
    ckpt: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> ChameleonVQGAN:
    """Build from the original ``vqgan.yaml`` (``model.params``) and load ``vqgan.ckpt`` strictly.

    ``lossconfig`` in the yaml and ``loss.*`` weights in the checkpoint (training-only LPIPS /
    discriminator) are ignored, as the reference deletes the loss before building.
    """
    yaml_path, ckpt_path = _paths(folder_or_yaml, ckpt)
    params = yaml.safe_load(yaml_path.read_text())
    for level in ("model", "params"):
        params = params.get(level) if isinstance(params, dict) else None
    params = params if isinstance(params, dict) else {}
    for key in ("ddconfig", "n_embed", "embed_dim"):
        if key not in params:
            raise ValueError(
                f"{yaml_path}: missing model.params.{key} (not an original VQGAN yaml?)"
            )
    try:
        obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{ckpt_path} needs a full unpickle (weights_only=False)", stacklevel=2)
        obj = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{ckpt_path}: expected a torch.save'd dict with a 'state_dict' entry")
    sd = {k: v for k, v in obj["state_dict"].items() if not k.startswith("loss.")}
    model = ChameleonVQGAN(params["ddconfig"], int(params["n_embed"]), int(params["embed_dim"]))
    model.load_reference_state_dict(sd, source=str(ckpt_path))
    return model.to(dtype)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_vqgan(model: ChameleonVQGAN, folder: str | os.PathLike) -> Path:
    """Write ``vqgan.yaml`` + ``vqgan.ckpt`` in the original format; ``load_vqgan`` reads them back exactly."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = {"ddconfig": model.ddconfig, "n_embed": model.n_embed, "embed_dim": model.embed_dim}
    text = yaml.safe_dump({"model": {"target": TARGET, "params": params}}, sort_keys=False)
    sd = {k: v.detach().cpu().clone() for k, v in model.reference_state_dict().items()}
    _atomic_write(folder / YAML_NAME, lambda tmp: Path(tmp).write_text(text))
    _atomic_write(folder / CKPT_NAME, lambda tmp: torch.save({"state_dict": sd}, tmp))
    return folder
