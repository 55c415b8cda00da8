"""Shared helpers of the stage tests: batches for any tiny adapter, stage-1 encoders, trainers."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from diva_lightning.data import DualFlowBatch
from diva_lightning.objectives import FactorEncoders
from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders

CAPTIONS = [
    "a red circle at the top left.",
    "a blue square at the center.",
    "two green triangles at the bottom.",
    "a yellow star at the right.",
]


def batch_for(adapter, bs: int = 4, seed: int = 0) -> DualFlowBatch:
    """A batch of ``bs`` image-text pairs with pre-tokenised codes and a 40% generation mask."""
    g = torch.Generator().manual_seed(seed)
    n = adapter.tokens_per_image
    return DualFlowBatch(
        keys=[f"{seed}-{i}" for i in range(bs)],
        captions=[CAPTIONS[(seed + i) % len(CAPTIONS)] for i in range(bs)],
        prompts=["Please describe this image in detail."] * bs,
        gen_mask=torch.rand(bs, n, generator=g) < 0.4,
        pixels=torch.rand(bs, 3, adapter.image_size, adapter.image_size, generator=g),
        codes=torch.randint(0, adapter.codebook_size, (bs, n), generator=g),
    )


def loader_for(adapter, n: int = 4, bs: int = 4) -> DataLoader:
    return DataLoader([batch_for(adapter, bs, seed) for seed in range(n)], batch_size=None)


def encoders_for(adapter, folder: Path, layers=(3, 6), dim: int = 16, **kwargs) -> str:
    """Random stage-1 encoders for ``adapter``'s hidden size, saved as stage 1 would."""
    enc = FactorEncoders(adapter.hidden_size, shared_dim=dim, **kwargs)
    config = factor_config(enc, list(range(layers[0], layers[1] + 1)))
    return str(save_factor_encoders(folder, enc, config))


def tiny_stage2(tmp_path: Path, **kwargs):
    """Stage 2 on a tiny Emu3 (middle blocks 3..6, no ramp, online targets unless overridden),
    trainable blocks unfrozen and in train mode."""
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.stages import Stage2

    torch.manual_seed(0)
    backbone = Emu3Adapter.tiny()
    options = dict(middle_layers=(3, 6), ramp_steps=0, critic_hidden=16, targets="online")
    encoders = encoders_for(backbone, tmp_path / "enc")
    module = Stage2(backbone, stage1_encoders=encoders, **{**options, **kwargs})
    module.configure_trainable()
    module.backbone.train()
    return module


def trainer(root: Path, **kw) -> L.Trainer:
    """A quiet CPU trainer whose files (stage-1 encoders, summaries) go under ``root``."""
    kw.setdefault("logger", False)
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )


class LossRecorder(L.Callback):
    """``train/<name>`` after every optimizer step."""

    def __init__(self, name: str = "loss"):
        self.name, self.values = name, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values[trainer.global_step] = float(trainer.callback_metrics[f"train/{self.name}"])


@contextmanager
def rank_zero_messages(caplog):
    """Capture ``rank_zero_info`` messages in ``caplog``: they go to the ``lightning.pytorch``
    logger, which does not propagate (and which other imports may have quietened)."""
    logger = logging.getLogger("lightning.pytorch")
    propagate, logger.propagate = logger.propagate, False  # each record reaches caplog once
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="lightning.pytorch"):
            yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


def synthetic_shards(root: Path, train: int, val: int) -> Path:
    """``root/train`` and ``root/val`` shapes-world shards (seeds 0 and 1) -> ``root``."""
    from diva_lightning.data.prepare import prepare

    prepare(str(root / "train"), synthetic=train, max_count=min(train, 48), seed=0, quiet=True)
    prepare(str(root / "val"), synthetic=val, max_count=val, seed=1, quiet=True)
    return root
