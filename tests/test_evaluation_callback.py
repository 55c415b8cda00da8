"""Issue #19 item 3: the in-training evaluation callback logs captioned grids (and, on the shapes
world, its metrics) to TensorBoard; the demo's stage configs turn it on."""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.cli import build_cli
from diva_lightning.data.prepare import prepare
from diva_lightning.evaluation import SampleEvaluation
from diva_lightning.evaluation.decoding import greedy_captions
from diva_lightning.stages import SFT
from tests.stage_helpers import batch_for

TINY = ["--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml"]


def events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_the_demo_stage_config_writes_grids_and_shapes_scores_to_tensorboard(tmp_path):
    prepare(str(tmp_path / "train"), synthetic=32, max_count=32, seed=0, quiet=True)
    prepare(str(tmp_path / "val"), synthetic=8, max_count=8, seed=1, quiet=True)
    cli = build_cli([
        *TINY, "--config", "configs/tiny/stage1.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.export_dir={tmp_path / 'enc'}",
    ], run=False)  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SampleEvaluation)]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    acc = events(cli.trainer.logger.log_dir)
    assert "eval/samples" in acc.Tags()["images"]
    (image,) = acc.Images("eval/samples")  # once, at the end of the 3-step fit
    assert image.step == 3 and image.width >= 3 * 128 and image.height > 4 * 128
    scalars = acc.Tags()["scalars"]
    for name in ("eval/caption_score", "eval/caption_exact", "eval/mc_accuracy",
                 "eval/gen_score", "eval/gen_exact"):  # fmt: skip
        assert name in scalars, sorted(scalars)
        (value,) = [e.value for e in acc.Scalars(name)]
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    # the fixed set came from the validation shards, 4 shapes-world captions
    assert len(callback.samples["captions"]) == 4


def test_other_data_gets_grids_only_every_n_steps_and_once_at_the_end(tmp_path):
    adapter = ShowoAdapter.tiny()  # MaskGIT order: a few forward passes per image
    module = SFT(backbone=adapter, middle_layers=(3, 6), lr=1e-3, warmup_steps=0)
    callback = SampleEvaluation(every_n_steps=2, num_samples=2, max_caption_tokens=3,
                                generation_steps=2)  # fmt: skip
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(max_steps=3, logger=logger, callbacks=[callback], accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    photos = ["a dog asleep on a sofa.", "two people by the sea.", "a red bus.", "snow."]
    batches = [replace(batch_for(adapter, bs=4, seed=k), captions=photos) for k in range(4)]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    acc = events(logger.log_dir)
    assert [e.step for e in acc.Images("eval/samples")] == [2, 3]
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("eval/")]  # no ground truth
    callback.score = True
    with pytest.raises(ValueError, match="not the shapes world"):
        callback.evaluate(trainer, module)


def test_wrong_settings_are_refused_before_training():
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleEvaluation(every_n_steps=0)
    with pytest.raises(ValueError, match="score"):
        SampleEvaluation(score="yes")


def test_decoding_every_step_gives_the_same_captions():
    torch.manual_seed(0)
    adapter = Emu3Adapter.tiny().eval()
    batch = batch_for(adapter, bs=3)
    early = greedy_captions(adapter, batch.prompts, codes=batch.codes, max_tokens=6)
    every = greedy_captions(adapter, batch.prompts, codes=batch.codes, max_tokens=6,
                            stop_early=False)  # fmt: skip
    assert early == every
