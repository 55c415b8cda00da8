"""Stage 1, stage 2 and SFT through the real CLI (``build_cli``: the parser and instantiation of
``diva-cli fit``) on the tiny Emu3 backbone and synthetic shards written in a temp dir."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from diva_lightning.cli import build_cli
from tests.stage_helpers import synthetic_shards

TINY = ["--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("shapes"), train=96, val=16)


def fit_args(stage, shards, out, *extra):
    return [
        "fit",
        *TINY,
        "--config",
        f"configs/tiny/{stage}.yaml",
        f"--data.init_args.train_shards={shards / 'train'}",
        f"--data.init_args.val_shards={shards / 'val'}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        *extra,
    ]


def run(args):
    cli = build_cli(args[1:], run=False)  # what `diva-cli fit ...` builds, then fit as it does
    before = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    return cli, changed


def assert_logged_finite(cli, names):
    metrics = cli.trainer.callback_metrics
    for name in names:
        assert name in metrics, f"{name} not logged; logged: {sorted(metrics)}"
        assert math.isfinite(float(metrics[name])), name


def logged_tags(cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli.trainer.logger.experiment.flush()
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    export = out / "encoders"
    cli, changed = run(
        fit_args(
            "stage1",
            shards,
            out,
            f"--model.init_args.export_dir={export}",
            "--model.init_args.shared_only_steps=2",
        )
    )
    return cli, changed, export


def test_stage1_trains_encoders_and_readouts_only(stage1):
    cli, changed, export = stage1
    assert changed, "nothing trained"
    assert not [k for k in changed if k.startswith("backbone.")]  # bit-identical backbone
    assert any(k.startswith("encoders.encoders.U_shared") for k in changed)
    assert any(k.startswith("encoders.encoders.G_unique") for k in changed)
    assert any(k.startswith("injection.A_U") for k in changed)
    assert any(k.startswith("injection.B_G") for k in changed)
    assert_logged_finite(
        cli,
        [
            f"train/{t}"
            for t in (
                "loss",
                "loss_und_injected",
                "loss_gen_injected",
                "loss_perp",
                "loss_und",
                "loss_gen",
            )
        ]
        + ["val/loss_und", "val/loss_gen"],
    )
    assert (export / "factors.json").exists() and (export / "factors.safetensors").exists()


@pytest.fixture(scope="module")
def stage2(stage1, shards, tmp_path_factory):
    _, _, export = stage1
    out = tmp_path_factory.mktemp("stage2")
    args = [
        f"--model.init_args.stage1_encoders={export}",
        "--model.init_args.trainable_layers=[4, 5]",
    ]
    return run(fit_args("stage2", shards, out, *args))


def test_stage2_trains_exactly_the_configured_layers(stage2):
    cli, changed = stage2
    backbone = {k for k in changed if k.startswith("backbone.")}
    assert backbone and all(".layers.3." in k or ".layers.4." in k for k in backbone)
    assert not [k for k in changed if k.startswith("encoders.")]  # frozen stage-1 encoders
    assert any(k.startswith("unique_critic.") for k in changed)
    assert_logged_finite(
        cli,
        [
            f"train/{t}"
            for t in (
                "loss",
                "loss_u2g",
                "loss_g2u",
                "loss_uni",
                "loss_critic",
                "loss_und",
                "loss_gen",
                "lambda_sha",
                "lambda_uni",
                "mi_shared_nce",
            )
        ]
        + ["val/loss_und", "val/loss_gen", "data/skipped"],
    )
    assert {"lr-AdamW/pg1", "lr-AdamW/pg2"} <= logged_tags(cli)  # backbone and critic groups


def test_sft_logs_no_diva_terms(shards, tmp_path):
    cli, changed = run(fit_args("sft", shards, tmp_path))
    assert all(
        ".layers.2." in k or ".layers.3." in k or ".layers.4." in k or ".layers.5." in k
        for k in changed
    )
    metrics = set(cli.trainer.callback_metrics)
    assert {"train/loss_und", "train/loss_gen", "val/loss_und"} <= metrics
    diva_terms = {
        m
        for m in metrics
        if any(t in m for t in ("u2g", "g2u", "uni", "perp", "injected", "critic", "lambda"))
    }
    assert diva_terms == set()


def test_export_writes_the_ema_backbone_that_loads_back(stage2, tmp_path):
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.cli import main

    cli, _ = stage2
    ckpt = tmp_path / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    config = Path(cli.trainer.log_dir) / "config.yaml"
    main(
        [
            "export",
            "--run_config",
            str(config),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    exported = Emu3Adapter.from_pretrained(tmp_path / "out")
    ema = torch.load(ckpt, weights_only=False)["callbacks"]
    shadow = next(v for k, v in ema.items() if k.startswith("EMA"))["per_rank"][0]
    name = "backbone.model.model.text_model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(exported.state_dict()[name.removeprefix("backbone.")], shadow[name])
    frozen = "model.model.text_model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(
        exported.state_dict()[frozen], cli.model.backbone.state_dict()[frozen]
    )


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])


def _fit_recording(args, ckpt_path=None, save_every=None, dirpath=None):
    cli = build_cli(args[1:], run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    if save_every:
        every = L.pytorch.callbacks.ModelCheckpoint(
            dirpath, every_n_train_steps=save_every, save_top_k=-1
        )
        cli.trainer.callbacks.append(every)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli, recorder.losses


def test_interrupted_and_resumed_run_matches_uninterrupted(stage1, shards, tmp_path):
    """A run killed after step 4 (its step-4 checkpoint, written mid-epoch by ModelCheckpoint)
    and resumed continues the same optimizer, scheduler, EMA, critic and data position."""
    _, _, export = stage1
    extra = [
        f"--model.init_args.stage1_encoders={export}",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--trainer.max_steps=8",
    ]
    args = fit_args("stage2", shards, tmp_path / "run", *extra)
    _, whole = _fit_recording(args, save_every=4, dirpath=tmp_path / "ckpts")
    (ckpt,) = [p for p in (tmp_path / "ckpts").iterdir() if "step=4" in p.name]
    _, rest = _fit_recording(
        fit_args("stage2", shards, tmp_path / "resumed", *extra), ckpt_path=ckpt
    )
    assert sorted(rest) == [5, 6, 7, 8]
    assert [rest[s] for s in (5, 6, 7, 8)] == pytest.approx(
        [whole[s] for s in (5, 6, 7, 8)], rel=1e-5, abs=1e-6
    )


@pytest.mark.parametrize("name", ["showo", "liquid"])
def test_stage1_then_stage2_on_a_tiny_backbone_overlay(name, shards, tmp_path):
    showo = ["--config", f"configs/tiny/{name}.yaml", "--trainer.max_steps=2"]
    export = tmp_path / "encoders"
    args = fit_args("stage1", shards, tmp_path / "s1", f"--model.init_args.export_dir={export}")
    cli, changed = run([*args[:3], *args[3:], *showo])
    assert type(cli.model.backbone).__name__ == {"showo": "ShowoAdapter"}.get(name, "LiquidAdapter")
    assert changed and not [k for k in changed if k.startswith("backbone.")]
    args = fit_args(
        "stage2", shards, tmp_path / "s2", f"--model.init_args.stage1_encoders={export}"
    )
    cli, changed = run([*args, *showo])
    assert {k for k in changed if k.startswith("backbone.")}
    assert_logged_finite(cli, ["train/loss", "train/loss_u2g", "train/loss_uni", "train/loss_gen"])


@pytest.mark.parametrize("backbone", ["janus.JanusAdapter", "chameleon.ChameleonAdapter"])
def test_stage1_and_sft_run_on_other_backbones(backbone, shards, tmp_path):
    swap = [
        f"--model.init_args.backbone=diva_lightning.backbones.{backbone}",
        "--trainer.max_steps=2",
    ]
    cli, changed = run([*fit_args("stage1", shards, tmp_path / "s1"), *swap])
    assert changed and not [k for k in changed if k.startswith("backbone.")]
    cli, changed = run([*fit_args("sft", shards, tmp_path / "sft"), *swap])
    assert {k for k in changed if k.startswith("backbone.")}
    assert_logged_finite(cli, ["train/loss_und", "train/loss_gen"])


def test_training_streams_shards_through_pipe_commands_and_counts_a_failing_one(shards, tmp_path):
    """``pipe:`` URLs go to WebDataset; a stream whose command fails is a counted
    ``stream_error``, and training goes on with the other streams."""
    good = sorted((shards / "train").glob("*.tar"))[0]  # 12 samples: a pass is < 4 steps
    urls = f"[pipe:cat {good}, pipe:cat {tmp_path}/missing-shard.tar]"
    args = fit_args("sft", shards, tmp_path, f"--data.init_args.train_shards={urls}")
    cli, changed = run(args)
    assert cli.trainer.global_step == 4 and changed
    assert cli.datamodule.skips["train"].as_dict().get("stream_error", 0) >= 1
