"""``diva-cli plan``: the per-GPU memory of a training config, before any weight is loaded.

    diva-cli plan --config configs/showo/stage2.yaml                 # against 24 GiB
    diva-cli plan --config configs/stage2.yaml --gpu_memory_gb 80
    diva-cli plan --config configs/tiny/trainer.yaml --config configs/tiny/stage2.yaml

The YAML is read as ``diva-cli fit`` would compose it (later files override earlier ones); the
model is never built. A config whose backbone names a ``pretrained_path`` is planned with the
released checkpoint's dimensions (``planning.shapes.PUBLISHED``); one without (the tiny configs)
builds its random tiny backbone on CPU and counts it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import yaml

from diva_lightning.planning.memory import GIB, MemoryPlan, RunSpec, plan_memory
from diva_lightning.planning.shapes import PUBLISHED, ModelShape, from_adapter, published_shape
from diva_lightning.sizes import check_sizes

STAGES = {"SFT": "sft", "Stage1": "stage1", "Stage2": "stage2"}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def read_configs(paths: list[str]) -> dict:
    """The composed YAML of ``paths`` (later ones win, nested keys merged)."""
    config: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"plan: config {path} does not exist")
        config = _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _zero(strategy) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded) of the trainer's strategy (0: no DeepSpeed)."""
    if isinstance(strategy, str):
        if strategy.startswith("deepspeed"):
            return int(strategy.split("_")[2]) if "stage" in strategy else 2, "offload" in strategy
        return 0, False
    if not isinstance(strategy, dict) or "DeepSpeed" not in strategy.get("class_path", ""):
        return 0, False
    args = strategy.get("init_args", {})
    ds = args.get("config")
    if isinstance(ds, str):
        if not Path(ds).is_file():
            raise FileNotFoundError(f"plan: the DeepSpeed config {ds} does not exist")
        ds = json.loads(Path(ds).read_text())
    zero = (ds or {}).get("zero_optimization", {})
    stage = int(zero.get("stage", args.get("stage", 2)))
    return stage, "offload_optimizer" in zero or bool(args.get("offload_optimizer"))


def _devices(trainer: dict) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, list):
        return len(devices)
    return int(devices) if str(devices).isdigit() else 1


def shape_of(backbone: dict, name: str | None = None, **overrides) -> ModelShape:
    """The backbone's dimensions: published ones for a real checkpoint, else built tiny."""
    cls = _class(backbone["class_path"])
    args = dict(backbone.get("init_args") or {})
    if args.get("pretrained_path") or name:
        preset = args.get("preset")
        return published_shape(cls, name or (preset if preset in PUBLISHED else None), **overrides)
    args.pop("torch_dtype", None)
    return from_adapter(cls(**args))


def spec_of(config: dict, shape: ModelShape) -> RunSpec:
    """What the composed config decides about memory (``RunSpec``)."""
    trainer, model, data = (config.get(k) or {} for k in ("trainer", "model", "data"))
    stage_name = model.get("class_path", "").rpartition(".")[2]
    if stage_name not in STAGES:
        raise ValueError(
            f"plan: model.class_path must be one of the stages {sorted(STAGES)}, got {stage_name!r}"
        )
    args, data_args = model.get("init_args") or {}, data.get("init_args") or {}
    middle = tuple(args.get("middle_layers", (8, 18)))
    stage = STAGES[stage_name]
    trainable = None if stage == "stage1" else tuple(args.get("trainable_layers") or middle)
    zero, offload = _zero(trainer.get("strategy"))
    callbacks = trainer.get("callbacks") or []
    precision = str(trainer.get("precision", "32"))
    return RunSpec(
        stage=stage,
        micro_batch=int(data_args.get("batch_size", 8)),
        middle_layers=middle,
        trainable_layers=trainable,
        checkpointing=bool(args.get("activation_checkpointing", False)),
        bytes_per_value=2 if ("bf16" in precision or "16" in precision) else 4,
        zero_stage=zero,
        offload=offload,
        gpus_per_node=_devices(trainer),
        nodes=int(trainer.get("num_nodes", 1)),
        ema=any("EMA" in c.get("class_path", "") for c in callbacks if isinstance(c, dict)),
        shared_dim=int(args.get("shared_dim", 256)),
        unique_dim=args.get("unique_dim"),
        encoder_arch=args.get("encoder_arch", "gated_mlp"),
        readout_rank=int(args.get("readout_rank", 24)),
        critic_hidden=int(args.get("critic_hidden", 256)),
        mask_ratio=float(data_args.get("mask_ratio_max", 0.6)),
    )


def format_plan(plan: MemoryPlan, shape: ModelShape, spec: RunSpec, gpu_memory_gb: float) -> str:
    strategy = f"ZeRO-{spec.zero_stage}" if spec.zero_stage else "no DeepSpeed"
    lines = [
        f"{shape.name}: {plan.params['total'] / 1e9:.2f}B parameters, "
        f"{plan.params['trainable'] / 1e6:.1f}M trainable; {spec.stage}, {strategy}, "
        f"{spec.gpus} GPU(s), micro-batch {spec.micro_batch}, "
        f"{shape.tokens('U')} + {shape.tokens('G')} tokens per sample, "
        f"checkpointing {'on' if spec.checkpointing else 'off'}",
        f"{'part':<20}{'GiB per GPU':>12}",
    ]
    lines += [f"{name:<20}{value / GIB:>12.2f}" for name, value in plan.parts.items()]
    lines.append(f"{'total':<20}{plan.total / GIB:>12.2f}")
    verdict = "fits" if plan.fits(gpu_memory_gb * GIB) else "does NOT fit"
    lines.append(f"verdict: {verdict} in {gpu_memory_gb:g} GiB (10% kept for the CUDA context)")
    return "\n".join(lines)


def plan(
    config: list[str],
    gpu_memory_gb: float = 24.0,
    shape: str | None = None,
    image_tokens: int | None = None,
    micro_batch: int | None = None,
) -> MemoryPlan:
    """Print the per-GPU memory plan of a training config (no weights are loaded).

    Args:
        config: the YAML files ``diva-cli fit`` would get, in order.
        gpu_memory_gb: the memory of one GPU, for the verdict.
        shape: plan with this published shape (``showo-256``, ``showo-512``, ``liquid``,
            ``emu3``) instead of the config's.
        image_tokens: override the image tokens per sample (another resolution).
        micro_batch: override ``data.init_args.batch_size``.
    """
    check_sizes("plan", **{"--micro_batch": micro_batch, "--image_tokens": image_tokens})
    if gpu_memory_gb <= 0:
        raise ValueError(f"plan: --gpu_memory_gb must be > 0, got {gpu_memory_gb}")
    composed = read_configs(config)
    backbone = ((composed.get("model") or {}).get("init_args") or {}).get("backbone")
    if not backbone:
        raise ValueError("plan: the config has no model.init_args.backbone")
    overrides = {} if image_tokens is None else {"image_tokens": image_tokens}
    model_shape = shape_of(backbone, shape, **overrides)
    spec = spec_of(composed, model_shape)
    if micro_batch is not None:
        spec = replace(spec, micro_batch=micro_batch)
    result = plan_memory(model_shape, spec)
    print(format_plan(result, model_shape, spec, gpu_memory_gb))
    return result


def main(args: list[str]) -> MemoryPlan:
    """``diva-cli plan``'s command line: ``--config`` repeats, as for ``diva-cli fit``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="diva-cli plan", description=plan.__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="a training YAML")
    parser.add_argument("--gpu_memory_gb", type=float, default=24.0, help="memory of one GPU")
    parser.add_argument(
        "--shape", type=str | None, default=None, help=f"one of {sorted(PUBLISHED)}"
    )
    parser.add_argument("--image_tokens", type=int | None, default=None, help="per sample")
    parser.add_argument("--micro_batch", type=int | None, default=None, help="per GPU")
    options = parser.parse_args(args)
    return plan(
        options.config, options.gpu_memory_gb, options.shape, options.image_tokens,
        options.micro_batch,
    )  # fmt: skip
