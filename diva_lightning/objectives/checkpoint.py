"""Save and load the stage-1 factor encoders (and readouts) without Lightning.

Layout of an encoders directory::

    factors.json          # config: hidden size, factor dims, arch, middle layers, ...
    factors.safetensors   # tensors, keys "encoders.*" and (optionally) "injection.*"

Writes go to a temporary sibling directory that is renamed into place, so a crash never
leaves a half-written directory. ``load_factor_encoders`` also reads a stage-1 Lightning
``.ckpt`` (it carries the same config under ``"diva_factor_config"``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diva_lightning.objectives.encoders import FactorEncoders
from diva_lightning.objectives.readouts import LogitInjection

CONFIG_NAME, TENSORS_NAME = "factors.json", "factors.safetensors"


def factor_config(encoders: FactorEncoders, middle_layers: list[int], **extra) -> dict:
    """The config needed to rebuild ``encoders`` (plus anything in ``extra``)."""
    return {
        "hidden_size": encoders.hidden_size,
        "shared_dim": encoders.shared_dim,
        "unique_dim": encoders.unique_dim,
        "arch": encoders.arch,
        "mlp_hidden": encoders.mlp_hidden,
        "projector": encoders.projector,
        "middle_layers": list(middle_layers),
        **extra,
    }


def save_factor_encoders(
    path: str | Path,
    encoders: FactorEncoders,
    config: dict,
    injection: LogitInjection | None = None,
) -> Path:
    """Write encoders (+ readouts) to directory ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoders.{k}": v for k, v in _distinct(encoders.state_dict()).items()}
    if injection is not None:
        tensors.update({f"injection.{k}": v for k, v in _distinct(injection.state_dict()).items()})
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(staging / TENSORS_NAME))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def _distinct(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of a state dict, each shared tensor once (safetensors refuses aliases; a
    ``projector: shared`` encoder holds one ``phi`` under both flows' names)."""
    seen, out = set(), {}
    for key, value in state.items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[key] = value.detach().cpu().contiguous()
    return out


def _read(path: Path) -> tuple[dict, dict]:
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_NAME}: not a stage-1 encoders directory"
            )
        config = json.loads((path / CONFIG_NAME).read_text())
        return config, load_file(str(path / TENSORS_NAME))
    if path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if "diva_factor_config" not in ckpt:
            raise ValueError(f"{path} is not a stage-1 checkpoint (no 'diva_factor_config')")
        return ckpt["diva_factor_config"], ckpt["state_dict"]
    raise FileNotFoundError(f"stage-1 encoders not found at {path} (expected a directory or .ckpt)")


def check_encoder_origin(
    config: dict, path, backbone_name: str, num_layers: int, layers, allow_transfer: bool
) -> None:
    """Refuse encoders trained on another backbone class, layer count or middle range (as
    recorded in ``factors.json``; keys older files lack are not checked), unless
    ``allow_transfer``."""
    recorded = {"backbone": config.get("backbone"), "num_layers": config.get("num_layers"),
                "middle_layers": config.get("middle_layers")}  # fmt: skip
    here = {"backbone": backbone_name, "num_layers": num_layers, "middle_layers": list(layers)}
    differ = [f"{key} {recorded[key]} (this run: {here[key]})" for key in here
              if recorded[key] is not None and recorded[key] != here[key]]  # fmt: skip
    if differ and not allow_transfer:
        raise ValueError(
            f"stage-1 encoders at {path} were trained with {'; '.join(differ)}. Run stage 1 "
            "for this backbone and range, or set allow_encoder_transfer: true to use them anyway"
        )


def load_factor_encoders(
    path: str | Path, hidden_size: int | None = None
) -> tuple[FactorEncoders, dict]:
    """Rebuild the stage-1 encoders from ``path``; check them against ``hidden_size`` if given."""
    config, tensors = _read(Path(path))
    if hidden_size is not None and config["hidden_size"] != hidden_size:
        raise ValueError(
            f"stage-1 encoders at {path} expect hidden size {config['hidden_size']}, "
            f"but the backbone has {hidden_size}: they were trained on another backbone"
        )
    encoders = FactorEncoders(
        config["hidden_size"],
        config["shared_dim"],
        config["unique_dim"],
        config["arch"],
        config.get("mlp_hidden"),
        config.get("projector", "per_flow"),
    )
    prefix = "encoders."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = encoders.load_state_dict(state, strict=False)
    aliases = set(encoders.state_dict()) - set(_distinct(encoders.state_dict()))
    if unexpected or set(missing) - aliases:
        raise ValueError(
            f"stage-1 encoders at {path} do not match their config: missing "
            f"{sorted(set(missing) - aliases)[:5]}, unexpected {unexpected[:5]}"
        )
    return encoders, config
