"""Reading and writing Show-o checkpoint folders (the layout ``ShowoAdapter.from_pretrained`` reads).

Layout of a checkpoint directory (what a user downloads, each sub-folder one Hugging Face repo)::

    <path>/
      showo/      showlab/show-o (or showlab/show-o-512x512): config.json + weights
      magvitv2/   showlab/magvitv2: weights (its config.json is optional)
      phi/        microsoft/phi-1_5: config.json + tokenizer files (its weights are not needed)
      diva_showo.json   optional, written by save_pretrained (max_text_len, prompt template)

Weights may be ``*.safetensors`` (sharded or not) or ``pytorch_model.bin`` /
``diffusion_pytorch_model.bin``. The MAGVIT-v2 architecture is taken from ``magvitv2/config.json``
when it holds this project's keys (``encoder``/``decoder``/``codebook_dim``), else it is read
off the weights' names and shapes (``infer_magvit_config``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "diffusion_pytorch_model*.bin")


def load_weights(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of the weight files of ``folder`` (shards merged), on CPU."""
    folder = Path(folder)
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            state: dict[str, Tensor] = {}
            for file in files:
                if file.suffix == ".safetensors":
                    state.update(load_file(file))
                else:
                    state.update(torch.load(file, map_location="cpu", weights_only=True))
            return state
    raise FileNotFoundError(f"no weights ({', '.join(WEIGHT_PATTERNS)}) in {folder}")


def save_weights(folder: str | Path, state: dict[str, Tensor]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / "model.safetensors"
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _count(state: dict, pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for key in state if (m := regex.fullmatch(key))}


def _coder(state: dict, side: str, levels: int, ch: int, start_channels: int) -> dict:
    """Per-level block counts, channel multipliers and attention levels of one side."""
    group = "down" if side == "encoder" else "up"
    order = range(levels) if side == "encoder" else reversed(range(levels))
    blocks, mult, attn = [0] * levels, [0] * levels, []
    channels = start_channels
    for i in order:
        blocks[i] = len(_count(state, rf"{side}\.{group}\.{i}\.block\.(\d+)\.conv1\.weight"))
        if blocks[i]:
            channels = state[f"{side}.{group}.{i}.block.0.conv1.weight"].shape[0]
        mult[i] = channels // ch
        if _count(state, rf"{side}\.{group}\.{i}\.attn\.(\d+)\.q\.weight"):
            attn.append(i)
    return {"num_res_blocks": blocks, "ch_mult": mult, "attn_levels": attn}


def infer_magvit_config(state: dict[str, Tensor]) -> dict:
    """MAGVIT-v2 constructor config from a state dict's key names and shapes.

    Attention levels are expressed as ``attn_resolutions`` relative to a nominal
    ``resolution = 2**levels`` (level ``i`` runs at ``2**(levels - i)``).
    """
    ch, in_ch = state["encoder.conv_in.weight"].shape[:2]
    levels = len(_count(state, r"encoder\.down\.(\d+)\.downsample\.conv\.weight")) + 1
    z = state["encoder.quant_conv.weight"].shape[0]
    enc = _coder(state, "encoder", levels, ch, ch)
    dec = _coder(state, "decoder", levels, ch, state["decoder.conv_in.weight"].shape[0])
    configs = {}
    for side, found in (("encoder", enc), ("decoder", dec)):
        configs[side] = {
            "ch": int(ch),
            "ch_mult": found["ch_mult"],
            "num_res_blocks": found["num_res_blocks"],
            "attn_resolutions": [2 ** (levels - i) for i in found["attn_levels"]],
            "dropout": 0.0,
            "in_ch": int(in_ch),
            "out_ch": int(state["decoder.conv_out.weight"].shape[0]),
            "resolution": 2**levels,
            "z_channels": int(z),
            "double_z": state["encoder.conv_out.weight"].shape[0] == 2 * z,
        }
    configs["codebook_dim"] = int(state["quantize.embedding"].shape[1])
    return configs
