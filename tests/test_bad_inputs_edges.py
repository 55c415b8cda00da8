"""Wrong inputs found by probing the CLI after #18: sizes below 1, an empty result and an
export over another folder, each refused with the option named before any work is done."""

from __future__ import annotations

import json

import pytest
import torch

from diva_lightning.data.datamodule import DualFlowDataModule
from diva_lightning.data.prepare import prepare


@pytest.mark.parametrize("key", ["batch_size", "val_batch_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_a_batch_size_below_one_is_refused_naming_it(key, value):
    """-4 used to hang while filling memory; 0 divided by zero when the epoch was sized."""
    with pytest.raises(ValueError, match=rf"{key} must be >= 1, got {value}"):
        DualFlowDataModule(synthetic_samples=8, **{key: value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"synthetic": -5}, "--synthetic must be >= 1, got -5"),
        ({"synthetic": 0}, "--synthetic must be >= 1, got 0"),
        ({"synthetic": 4, "max_count": 0}, "--max_count must be >= 1, got 0"),
        ({"synthetic": 4, "synthetic_image_size": 0}, "--synthetic_image_size must be >= 1"),
    ],
)
def test_prepare_sizes_below_one_are_refused_before_the_folder_is_made(tmp_path, options, message):
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=message):
        prepare(out=str(out), quiet=True, **options)
    assert not out.exists()


def test_a_prepare_that_writes_nothing_is_an_error_and_its_summary_says_why(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not an image")
    (images / "broken.txt").write_text("a caption.")
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=r"(?s)no sample written.*summary\.json"):
        prepare(out=str(out), images=str(images), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no empty shard


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_export_refuses_an_out_that_is_a_file_or_holds_files_before_loading(
    tmp_path, monkeypatch, existing
):
    import diva_lightning.export as export_module

    monkeypatch.setattr(export_module, "load_trained_model", pytest.fail)  # must not be reached
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("someone's notes")
    else:
        out.mkdir()
        (out / "model.safetensors").write_text("another export")
    match = "is a file" if existing == "file" else "overwrite"
    with pytest.raises(ValueError, match=match):
        export_module.export(
            run_config=tmp_path / "c.yaml", checkpoint=tmp_path / "x.ckpt", out=out
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_writes_through_a_partial_folder_and_overwrite_replaces_only_an_export(
    tmp_path, monkeypatch
):
    import diva_lightning.export as export_module

    class Backbone:
        def save_pretrained(self, path):
            assert path.name.endswith(".partial")  # never half-written under the final name
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.safetensors").write_text("new")

    model = type("Model", (), {"backbone": Backbone()})()
    monkeypatch.setattr(export_module, "load_trained_model", lambda *a: (model, {}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not an export")
    with pytest.raises(ValueError, match="not an earlier export"):  # --overwrite never deletes it
        export_module.export(run_config="c.yaml", checkpoint="x.ckpt", out=out, overwrite=True)
    (out / "notes.txt").unlink()
    export_module.export(run_config="c.yaml", checkpoint="x.ckpt", out=out)  # empty: allowed
    (out / "stale.bin").write_text("old")
    export_module.export(run_config="c.yaml", checkpoint="x.ckpt", out=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.safetensors"]
    assert json.loads((out / "export.json").read_text())["checkpoint"] == "x.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("micro_batch", [0, -2])
def test_plan_refuses_a_micro_batch_below_one(micro_batch):
    from diva_lightning.planning.tool import plan

    with pytest.raises(ValueError, match=rf"--micro_batch must be >= 1, got {micro_batch}"):
        plan(["configs/stage2.yaml"], micro_batch=micro_batch)


@pytest.mark.parametrize(
    ("left", "version"),
    [
        (["events.out.tfevents.1.host"], "sft"),  # a run that stopped before training: reused
        (["events.out.tfevents.1.host", "hparams.yaml"], "sft"),
        (["events.out.tfevents.1.host", "config.yaml"], "sft-1"),  # an earlier run: kept apart
        (["checkpoints/last.ckpt"], "sft-1"),
    ],
)
def test_a_run_folder_left_by_a_start_that_failed_is_reused(tmp_path, monkeypatch, left, version):
    """A fit that failed before training (a wrong shard path, say) used to leave its event file
    behind, and the corrected rerun moved to ``sft-1``, away from the folder that stage-2
    configs name."""
    from jsonargparse import Namespace

    from diva_lightning.lightning_cli import VERSION_ENV, fresh_log_version

    monkeypatch.delenv(VERSION_ENV, raising=False)
    for name in left:
        (tmp_path / "tiny" / "sft" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tiny" / "sft" / name).write_text("x")
    logger = Namespace(save_dir=str(tmp_path), name="tiny", version="sft")
    config = Namespace(trainer=Namespace(logger=Namespace(init_args=logger)))
    fresh_log_version(config)
    assert config["trainer.logger.init_args"]["version"] == version


def test_analyze_names_its_own_options_and_checks_them_before_any_output(tmp_path):
    from diva_lightning.analysis.tool import analyze

    out = tmp_path / "analysis"
    for options, message in [({"samples": 0}, "--samples must be >= 1, got 0"),
                             ({"batch_size": -1}, "--batch_size must be >= 1, got -1")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            analyze(out=out, **options)
        assert not out.exists()
    with pytest.raises(FileNotFoundError, match=r"analyze --shards: shard .*missing\.tar"):
        analyze(out=out, shards=str(tmp_path / "missing.tar"), samples=2, batch_size=2)


def test_export_names_a_missing_checkpoint_or_run_config(tmp_path):
    from diva_lightning.export import export, load_trained_model

    with pytest.raises(FileNotFoundError, match=r"--checkpoint .*nope\.ckpt does not exist"):
        export(
            run_config=tmp_path / "c.yaml", checkpoint=tmp_path / "nope.ckpt", out=tmp_path / "o"
        )
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(FileNotFoundError, match=r"--run_config .*c\.yaml does not exist"):
        load_trained_model(tmp_path / "c.yaml", ckpt)
