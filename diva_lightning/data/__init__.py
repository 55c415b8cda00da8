"""Data side of DIVA: WebDataset shards -> dual-flow batches, shard preparation, synthetic world.

* ``datamodule.DualFlowDataModule``: the LightningDataModule (both flows from the same pairs);
* ``batch``: ``DualFlowBatch`` and the main-process loader (masks, prompts, skip aggregation);
* ``pipeline``: the per-worker WebDataset stream; ``shards``: patterns, checks, splitting;
* ``decode``: robust image/caption/codes decoding; ``skips``: skip accounting by reason;
* ``masks``: generation-flow masks; ``shapes``: the synthetic shapes world;
* ``prepare`` / ``sources``: ``diva-cli prepare`` (folders, JSONL, CSV, synthetic -> shards).
"""

from diva_lightning.data.batch import DualFlowBatch, DualFlowLoader
from diva_lightning.data.datamodule import DualFlowDataModule
from diva_lightning.data.masks import generation_mask
from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.data.skips import DataQualityError, SkipCounter

__all__ = [
    "DataQualityError",
    "DualFlowBatch",
    "DualFlowDataModule",
    "DualFlowLoader",
    "ShapesWorld",
    "SkipCounter",
    "generation_mask",
]
