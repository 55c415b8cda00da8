"""Every shipped config parses through the CLI; DeepSpeed JSONs validate; bad keys fail clearly."""

import json
from pathlib import Path

import pytest

from diva_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--config", str(CONFIGS / "tiny/trainer.yaml"), "--config", str(CONFIGS / "tiny/data.yaml")]


def print_config(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


GPU_CONFIGS = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("[!t]*/*.yaml"))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_gpu_configs_parse(path, capsys):
    out = print_config(["--config", str(path)], capsys)
    assert "class_path: diva_lightning.stages." in out and "DeepSpeedStrategy" in out
    assert path.read_text().startswith("# "), "each YAML starts with the command that runs it"


@pytest.mark.parametrize("stage", ["stage1", "stage2", "sft"])
def test_tiny_configs_parse(stage, capsys):
    path = CONFIGS / "tiny" / f"{stage}.yaml"
    out = print_config([*TINY, "--config", str(path)], capsys)
    assert "Emu3Adapter" in out
    assert "diva-cli fit" in path.read_text().splitlines()[1]


@pytest.mark.parametrize("name", ["showo", "liquid", "nexus_gen"])
def test_tiny_backbone_overlays_parse(name, capsys):
    path = CONFIGS / "tiny" / f"{name}.yaml"
    out = print_config(
        [*TINY, "--config", str(CONFIGS / "tiny/stage1.yaml"), "--config", str(path)], capsys
    )
    adapters = {"showo": "ShowoAdapter", "liquid": "LiquidAdapter", "nexus_gen": "NexusGenAdapter"}
    assert adapters[name] in out


def test_unknown_key_fails_with_exit_code_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                *TINY,
                "--config",
                str(CONFIGS / "tiny/sft.yaml"),
                "--model.init_args.lamda_und=1",
            ]
        )
    assert exit_info.value.code == 2
    assert "lamda_und" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name
)
def test_deepspeed_configs_validate(path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads(path.read_text())
    assert (
        "gradient_accumulation_steps" not in config
    )  # Lightning's accumulate_grad_batches owns it
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])  # rejects unknown keys
    assert zero.stage in (2, 3)
    # diva-cli fills the micro-batch from data.batch_size (lightning_cli.deepspeed_micro_batch)
    assert "train_micro_batch_size_per_gpu" not in config
    DeepSpeedConfig({**config, "train_micro_batch_size_per_gpu": 2})  # batch arithmetic


def test_deepspeed_gets_the_data_modules_micro_batch_and_refuses_another():
    """A DeepSpeed config without ``train_micro_batch_size_per_gpu`` (the shipped JSONs, or a
    strategy given by name) takes ``data.batch_size``: Lightning would read it off the loader's
    batch sampler, which WebDataset batching leaves None (AttributeError at the first fit).
    A JSON that says another number is refused, naming both keys."""
    from types import SimpleNamespace

    from diva_lightning.lightning_cli import deepspeed_micro_batch
    from diva_lightning.strategies import CPUDeepSpeedStrategy

    data = SimpleNamespace(batch_size=3)
    for name in ("zero2", "zero3", "zero3_offload"):
        strategy = CPUDeepSpeedStrategy(config=f"configs/deepspeed/{name}.json")
        assert "train_micro_batch_size_per_gpu" not in strategy.config, name
        deepspeed_micro_batch(strategy, data)
        assert strategy.config["train_micro_batch_size_per_gpu"] == 3
    strategy = CPUDeepSpeedStrategy(config={"train_micro_batch_size_per_gpu": 6, "bf16": {}})
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 6.*batch_size is 3"):
        deepspeed_micro_batch(strategy, data)
    same = CPUDeepSpeedStrategy(config={"train_micro_batch_size_per_gpu": 3})
    deepspeed_micro_batch(same, data)  # agreeing numbers pass
