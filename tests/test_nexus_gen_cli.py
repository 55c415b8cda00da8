"""Nexus-Gen through ``diva-cli fit``: stage 1 (encoders and the low-rank embedding corrections,
backbone frozen), then stage 2 (the middle blocks, EMA targets) from stage 1's encoders, on the
tiny random Nexus-Gen and synthetic shards (``configs/tiny/nexus_gen.yaml``)."""

import pytest

from tests.stage_helpers import synthetic_shards
from tests.test_cli_stages import assert_logged_finite, fit_args, run

NEXUS = ["--config", "configs/tiny/nexus_gen.yaml"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("shapes"), train=16, val=4)


def fit(stage, shards, out, *extra):
    args = fit_args(stage, shards, out, *NEXUS, "--data.init_args.batch_size=2", *extra)
    return run([*args, "--trainer.max_steps=3", "--trainer.val_check_interval=3"])


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    export = out / "encoders"
    extra = [f"--model.init_args.export_dir={export}", "--model.init_args.shared_only_steps=1"]
    cli, changed = fit("stage1", shards, out, *extra)
    return cli, changed, export


def test_stage1_trains_the_embedding_corrections_with_the_backbone_frozen(stage1):
    cli, changed, export = stage1
    assert not [k for k in changed if k.startswith("backbone.")]
    width = cli.model.backbone.generation_width  # A_G, B_G correct the 64-d embeddings
    assert cli.model.injection.A_G.P.shape[0] == width == 64
    assert any(k.startswith("injection.A_G") for k in changed)
    assert any(k.startswith("injection.B_G") for k in changed)
    names = ["loss", "loss_gen_injected", "loss_und_injected", "loss_gen", "loss_und"]
    assert_logged_finite(cli, [f"train/{n}" for n in names] + ["val/loss_gen"])
    assert (export / "factors.safetensors").exists()


def test_stage2_from_stage1_trains_exactly_the_middle_blocks(stage1, shards, tmp_path):
    _, _, export = stage1
    extra = [
        f"--model.init_args.stage1_encoders={export}",
        "--model.init_args.trainable_layers=[4, 5]",
    ]
    cli, changed = fit("stage2", shards, tmp_path, *extra)
    backbone = {k for k in changed if k.startswith("backbone.")}
    assert backbone and all(".layers.3." in k or ".layers.4." in k for k in backbone)
    assert not [k for k in changed if "vision_head" in k or "image_prefill" in k or "visual" in k]
    names = ["loss", "loss_u2g", "loss_g2u", "loss_uni", "loss_gen", "loss_und"]
    assert_logged_finite(cli, [f"train/{n}" for n in names])
