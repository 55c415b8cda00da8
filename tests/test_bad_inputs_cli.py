"""Issue #18: wrong inputs that used to get through (backbones, configs, the CLI and runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diva_lightning.data.prepare import prepare

ADAPTERS = [
    "diva_lightning.backbones.emu3.Emu3Adapter",
    "diva_lightning.backbones.janus.JanusAdapter",
    "diva_lightning.backbones.chameleon.ChameleonAdapter",
    "diva_lightning.backbones.showo.ShowoAdapter",
    "diva_lightning.backbones.liquid.LiquidAdapter",
]


@pytest.mark.parametrize("mismatch", ["middle_layers", "backbone", "num_layers"])
def test_stage1_encoders_from_another_backbone_or_range_are_refused(tmp_path, mismatch):
    """Item 11: factors.json records the backbone class, layer count and middle range; stage 2
    checks all of them (not only the hidden size), unless the transfer is asked for."""
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders
    from diva_lightning.objectives.encoders import FactorEncoders
    from diva_lightning.stages import Stage2

    backbone = Emu3Adapter.tiny()
    recorded = {"middle_layers": [3, 4, 5, 6], "backbone": "Emu3Adapter",
                "num_layers": backbone.num_layers}  # fmt: skip
    recorded[mismatch] = {"middle_layers": [2, 3, 4], "backbone": "JanusAdapter",
                          "num_layers": backbone.num_layers + 2}[mismatch]  # fmt: skip
    enc = FactorEncoders(backbone.hidden_size, shared_dim=16)
    config = factor_config(enc, recorded.pop("middle_layers"), **recorded)
    path = save_factor_encoders(tmp_path / "enc", enc, config)
    options = dict(middle_layers=(3, 6), targets="online", critic_hidden=16)
    with pytest.raises(ValueError, match="allow_encoder_transfer") as error:
        Stage2(backbone, stage1_encoders=str(path), **options)
    assert str(path) in str(error.value)
    Stage2(backbone, stage1_encoders=str(path), allow_encoder_transfer=True, **options)


def test_stage1_records_what_stage2_checks(tmp_path):
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.stages import Stage1

    backbone = Emu3Adapter.tiny()
    config = Stage1(backbone, middle_layers=(3, 6), shared_dim=16).factor_config()
    assert config["backbone"] == "Emu3Adapter" and config["num_layers"] == backbone.num_layers
    assert config["middle_layers"] == [3, 4, 5, 6]


def test_resuming_from_a_checkpoint_of_another_stage_is_refused_before_anything_is_built(tmp_path):
    """Item 10: LightningCLI takes the model class from the checkpoint's hyperparameters, so a
    stage-2 config resumed from a stage-1 checkpoint used to train stage 1 as if it were stage 2."""
    import torch

    from diva_lightning.lightning_cli import build_cli

    ckpt = tmp_path / "stage1.ckpt"
    hparams = {"_class_path": "diva_lightning.stages.stage1.Stage1", "middle_layers": [3, 6]}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, ckpt)
    args = ["fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
            "--config", "configs/tiny/stage2.yaml", "--ckpt_path", str(ckpt),
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match=r"Stage1.*Stage2|Stage2.*Stage1") as error:
        build_cli(args)
    assert str(ckpt) in str(error.value)


def _adapter(class_path: str, **kwargs):
    import importlib

    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


@pytest.mark.parametrize("class_path", ADAPTERS)
def test_an_enormous_caption_is_truncated_and_counted_within_the_positions(class_path):
    """Item 3: captions are capped by tokens per backbone; a capped caption is counted, and
    no flow grows past the backbone's position embeddings."""
    import torch

    adapter = _adapter(class_path)
    huge, short = "a red square. " * 20_000, "a red square."
    codes = torch.zeros(2, adapter.tokens_per_image, dtype=torch.long)
    mask = torch.ones_like(codes, dtype=torch.bool)
    pixels = torch.rand(2, 3, adapter.image_size, adapter.image_size)
    flow_u = adapter.build_understanding(["describe"] * 2, [huge, short], codes=codes,
                                         pixels=pixels)  # fmt: skip
    flow_g = adapter.build_generation([huge, short], codes, mask)
    for flow in (flow_u, flow_g):
        assert flow.labels.shape[1] <= adapter.max_positions
    assert adapter.pop_truncated_captions() == 2 and adapter.pop_truncated_captions() == 0
    small = _adapter(class_path, max_caption_tokens=3)
    flow = small.build_generation([short, short], codes, mask)
    assert small.pop_truncated_captions() == 2
    assert flow.attention_mask.sum(1).max() < flow_g.attention_mask.sum(1).min()


@pytest.mark.parametrize("class_path", ADAPTERS)
def test_a_flow_longer_than_the_position_embeddings_is_an_error_naming_the_cap(class_path):
    import torch

    adapter = _adapter(class_path, max_caption_tokens=100_000)
    if adapter.max_positions is None or adapter.caption_token_limit < 100_000:
        pytest.skip("this backbone's text slots are fixed: captions never pass its positions")
    codes = torch.zeros(1, adapter.tokens_per_image, dtype=torch.long)
    mask = torch.ones_like(codes, dtype=torch.bool)
    flow = adapter.build_generation(["a red square. " * 2000], codes, mask)
    with pytest.raises(ValueError, match=r"(?s)position embeddings.*max_caption_tokens"):
        adapter.forward_flow(flow, "G")


def test_a_fit_through_the_cli_saves_its_final_weights_as_last_ckpt(tmp_path):
    """Item 13: the run's last step is saved (the tiny configs used to keep only step 4)."""
    import torch

    from diva_lightning.cli import main

    prepare(str(tmp_path / "train"), synthetic=32, max_count=16, quiet=True)
    prepare(str(tmp_path / "val"), synthetic=8, max_count=8, seed=1, quiet=True)
    out = tmp_path / "run"
    main([
        "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
        "--config", "configs/tiny/sft.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--trainer.max_steps=5", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    (last,) = out.rglob("last.ckpt")
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 5


def test_export_of_a_directory_that_is_no_deepspeed_checkpoint_says_what_to_do(tmp_path):
    from diva_lightning.export import export

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"(?s)last\.ckpt.*DeepSpeed"):
        export(run_config=tmp_path / "config.yaml", checkpoint=folder, out=tmp_path / "out")


TINY_FIT = ["fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
            "--config", "configs/tiny/stage1.yaml"]  # fmt: skip


def test_a_constructor_error_is_the_last_thing_printed_in_one_block(capsys, monkeypatch):
    """Item 18: not line 25 of a double traceback ending in jsonargparse's union message."""
    from diva_lightning.cli import main

    monkeypatch.delenv("DIVA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        main([*TINY_FIT, "--model.init_args.middle_layers=[3, 20]"])
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "middle_layers 3..20 is outside the backbone's blocks 1..8" in lines[-1]
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("ask", [["--trainer.accelerator=gpu"], ["--trainer.devices=64"]])
def test_devices_that_do_not_exist_are_refused_before_the_backbone_is_built(ask, monkeypatch):
    """Item 17: say what exists, before any model is built or process started."""
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.cli import build_cli

    built = []
    monkeypatch.setattr(Emu3Adapter, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(ValueError, match=r"(?s)trainer\.(accelerator|devices).*(CUDA|core)"):
        build_cli([*TINY_FIT[1:], *ask], run=False)
    assert not built


def test_the_help_lists_the_tools_and_offers_only_working_subcommands(capsys):
    """Item 19: prepare, analyze and export are discoverable; `test` is not offered."""
    from diva_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"diva-cli {tool}" in out for tool in ("prepare", "analyze", "export", "generate"))
    assert "{fit,validate}" in out
    with pytest.raises(SystemExit):
        main(["test"])
    assert "invalid choice: 'test'" in capsys.readouterr().err


USER_CLASSES = [
    "diva_lightning.stages.Stage1", "diva_lightning.stages.Stage2",
    "diva_lightning.stages.sft.SFT", "diva_lightning.data.DualFlowDataModule",
    "diva_lightning.stages.ema.EMA", "diva_lightning.stages.balance.GradientBalance", *ADAPTERS,
]  # fmt: skip


@pytest.mark.parametrize("class_path", USER_CLASSES)
def test_every_argument_has_its_own_description(class_path):
    """Item 19: `--help` shows a description per argument, none merged into another's."""
    import importlib
    import inspect

    import docstring_parser

    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    docs = {}
    for klass in cls.__mro__:
        for text in (klass.__doc__, getattr(klass.__init__, "__doc__", None)):
            for param in docstring_parser.parse(text or "").params:
                docs.setdefault(param.arg_name, param.description)
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    assert [n for n in names if not docs.get(n)] == []
    merged = [n for n, text in docs.items() if any(f" {m}:" in f" {text}" for m in names if m != n)]
    assert merged == []


def _tiny_fit(tmp_path, out, stage="sft", *extra):
    from diva_lightning.cli import main

    if not (tmp_path / "train").exists():
        prepare(str(tmp_path / "train"), synthetic=32, max_count=16, quiet=True)
        prepare(str(tmp_path / "val"), synthetic=8, max_count=8, seed=1, quiet=True)
    main([
        "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
        "--config", f"configs/tiny/{stage}.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={out}", *extra,
    ])  # fmt: skip


def test_the_progress_bar_shows_the_loss_and_no_product_tips(tmp_path, caplog):
    """Item 20: no "Epoch 0/-2 ... v_num: age1", the loss instead; no third-party tips."""
    import logging

    from diva_lightning.cli import build_cli
    from diva_lightning.lightning_cli import NoProductTips
    from diva_lightning.stages.progress import StepRichProgressBar, StepTQDMProgressBar

    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
    assert any(isinstance(f, NoProductTips) for f in tips)
    record = lambda msg: logging.LogRecord("x", logging.INFO, "", 0, msg, None, None)  # noqa: E731
    assert not NoProductTips().filter(record("💡 Tip: For seamless cloud uploads, try this"))
    assert NoProductTips().filter(record("a message of the run"))
    prepare(str(tmp_path / "train"), synthetic=32, max_count=16, quiet=True)
    cli = build_cli([
        *TINY_FIT[1:5], "--config", "configs/tiny/sft.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'train'}", "--data.init_args.num_workers=0",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ], run=False)  # fmt: skip
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepRichProgressBar | StepTQDMProgressBar)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = bar.get_metrics(cli.trainer, cli.model)
    assert "v_num" not in metrics and "train/loss" in metrics
    if isinstance(bar, StepRichProgressBar):
        assert bar._get_train_description(0) == "Epoch 0"


@pytest.mark.parametrize("class_path", ADAPTERS)
@pytest.mark.parametrize("where", ["missing/local/folder", "some-org/some-model"])
def test_pretrained_path_that_is_not_a_local_folder_names_the_key_and_never_downloads(
    class_path, where, monkeypatch
):
    """Item 16: a missing folder, or a hub id, fails at once naming the key and the path."""
    import importlib
    import time

    module, name = class_path.rsplit(".", 1)
    adapter = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even when the hub is allowed, nothing is fetched
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        adapter(pretrained_path=where)
    message = str(error.value)
    assert "pretrained_path" in message and where in message and "local" in message
    assert time.perf_counter() - start < 5


def test_a_rerun_gets_a_new_version_folder_and_relative_outputs_stay_inside_it(
    tmp_path, monkeypatch
):  # fmt: skip
    """Items 14 and 20: nothing of the first run is overlaid; a relative export_dir lands in
    the run's own log dir, never in the working directory."""
    out = tmp_path / "runs"
    _tiny_fit(tmp_path, out)
    first = sorted(p.name for p in (out / "tiny" / "sft").iterdir())
    _tiny_fit(tmp_path, out)
    assert sorted(p.name for p in (out / "tiny" / "sft").iterdir()) == first
    assert (out / "tiny" / "sft-1" / "config.yaml").is_file()
    monkeypatch.chdir(tmp_path)  # configs by absolute path: the working directory is elsewhere
    repo = Path(__file__).resolve().parents[1]
    for name in ("trainer", "data", "stage1"):
        (tmp_path / "configs" / "tiny").mkdir(parents=True, exist_ok=True)
        target = tmp_path / "configs" / "tiny" / f"{name}.yaml"
        target.write_text((repo / "configs" / "tiny" / f"{name}.yaml").read_text())
    _tiny_fit(tmp_path, out, "stage1", "--model.init_args.export_dir=encoders",
              "--model.init_args.shared_only_steps=1")  # fmt: skip
    assert (out / "tiny" / "stage1" / "encoders" / "factors.json").is_file()
    assert not (tmp_path / "encoders").exists()
