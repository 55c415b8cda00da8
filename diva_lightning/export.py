"""``diva-cli export``: write a post-trained backbone with ``save_pretrained``.

Rebuilds the run's model from its config (the ``config.yaml`` LightningCLI saves next to the
logs), loads a checkpoint (with its EMA weights by default) and writes the backbone so it can be
evaluated with the usual tools; a stage-1 checkpoint also writes its factor encoders.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

EXPORT_RECORD = "export.json"  # what an export came from; marks a folder --overwrite may replace


def ema_weights(checkpoint: dict) -> dict[str, torch.Tensor] | None:
    """The EMA callback's weights stored in a Lightning checkpoint, if any.

    A ZeRO-3 run stores one partition per rank (``stages/ema.py``); they are put back together
    here, shaped like the checkpoint's (consolidated) ``state_dict``.
    """
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("EMA") and isinstance(state, dict) and "per_rank" in state:
            per_rank = state["per_rank"]
            if len(per_rank) == 1:
                return per_rank[0]
            shapes = {k: v.shape for k, v in checkpoint.get("state_dict", checkpoint).items()}
            return {name: _unpartition(name, [r[name] for r in per_rank], shapes.get(name))
                    for name in per_rank[0]}  # fmt: skip
    return None


def _unpartition(name: str, parts: list[torch.Tensor], shape) -> torch.Tensor:
    """A parameter from its ZeRO-3 partitions: DeepSpeed gives rank r the elements
    ``[r*p, (r+1)*p)`` of the flattened parameter, the last one zero-padded (the same rebuild
    as ``stages.ema._refresh_gathered``, here on saved tensors, without a process group)."""
    if shape is None:
        raise ValueError(f"EMA weights hold {name}, which the checkpoint's state_dict lacks")
    numel, sizes = torch.Size(shape).numel(), {p.numel() for p in parts}
    size = sizes.pop() if len(sizes) == 1 else -1
    if size < 0 or size * len(parts) < numel or (size - 1) * len(parts) >= numel:
        raise ValueError(
            f"EMA partitions of {name} ({[p.numel() for p in parts]} elements over "
            f"{len(parts)} ranks) do not make up its shape {tuple(shape)}"
        )
    return torch.cat([p.flatten() for p in parts])[:numel].view(shape)


def read_checkpoint(checkpoint: Path) -> dict:
    """A Lightning checkpoint: a ``.ckpt`` file, or a DeepSpeed checkpoint directory (consolidated
    to one fp32 state dict with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``, in a
    temporary file)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not (checkpoint / "latest").is_file() and not (checkpoint / "checkpoint").is_dir():
        raise ValueError(
            f"checkpoint {checkpoint} is a directory but not a DeepSpeed checkpoint (no 'latest' "
            "file, no 'checkpoint/' folder): give a Lightning .ckpt file or the DeepSpeed "
            "checkpoint directory Lightning wrote"
        )
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as scratch:
        single = Path(scratch) / "consolidated.ckpt"
        try:
            convert_zero_checkpoint_to_fp32_state_dict(checkpoint, single)
        except (ModuleNotFoundError, ImportError) as error:
            raise ValueError(
                f"checkpoint {checkpoint} is a DeepSpeed directory; consolidating it needs "
                f"deepspeed installed ({error})"
            ) from error
        return torch.load(single, map_location="cpu", weights_only=False)


def load_trained_model(run_config: Path, checkpoint: Path, use_ema: bool = True):
    """Rebuild a run's stage module from its config and load a checkpoint (EMA by default)."""
    from diva_lightning.lightning_cli import build_cli

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    ckpt = read_checkpoint(checkpoint)  # first: a wrong checkpoint fails before any building
    if not Path(run_config).is_file():
        raise FileNotFoundError(f"--run_config {run_config} does not exist (a run's config.yaml)")
    config = yaml.safe_load(Path(run_config).read_text())
    for key in ("ckpt_path", "weights_only"):  # `fit` subcommand arguments, not the model's
        config.pop(key, None)
    model = build_cli(config, run=False).model
    state = ckpt.get("state_dict", ckpt)
    if use_ema and (ema := ema_weights(ckpt)) is not None:
        state = {**state, **{k: v.to(state[k].dtype) for k, v in ema.items() if k in state}}
        print(f"using EMA weights for {len(ema)} tensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith("backbone.")]:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit {run_config}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model, ckpt


def export(
    *, run_config: Path, checkpoint: Path, out: Path, use_ema: bool = True, overwrite: bool = False
) -> Path:
    """Export a trained backbone.

    Args:
        run_config: the run's config YAML (``runs/.../config.yaml``, saved by ``diva-cli fit``).
        checkpoint: a Lightning ``.ckpt`` of that run, or its DeepSpeed checkpoint directory
            (consolidated on the fly).
        out: directory to write (``save_pretrained`` of the backbone).
        use_ema: load the EMA weights stored in the checkpoint when there are any.
        overwrite: replace ``out`` when it holds an earlier export (its ``export.json``);
            without it an ``out`` that holds files is refused before anything is loaded, and a
            folder without ``export.json`` is never replaced.

    The export is written to ``OUT.partial`` and renamed when complete, so ``out`` never holds
    a half-written backbone; ``export.json`` records the run config and checkpoint it came from.
    """
    from diva_lightning.objectives.checkpoint import save_factor_encoders

    out = Path(out)
    if out.is_file():
        raise ValueError(f"export: --out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"export: --out {out} already holds files; choose a new folder, or "
                             "pass --overwrite true to replace an earlier export")  # fmt: skip
        if not (out / EXPORT_RECORD).is_file():  # never delete a folder export did not write
            raise ValueError(f"export: --out {out} holds files but no {EXPORT_RECORD}: it is not "
                             "an earlier export, so --overwrite does not replace it")  # fmt: skip
    model, ckpt = load_trained_model(run_config, checkpoint, use_ema)
    target = out.resolve()  # "." has no name of its own to put ".partial" after
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier export that did not finish
    model.backbone.save_pretrained(partial)
    if "diva_factor_config" in ckpt:
        save_factor_encoders(
            partial / "factor_encoders", model.encoders, ckpt["diva_factor_config"], model.injection
        )
    record = {"run_config": str(run_config), "checkpoint": str(checkpoint), "use_ema": use_ema}
    (partial / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"backbone written to {out}")
    return out
