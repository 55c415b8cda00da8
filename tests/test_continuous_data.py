"""Data for a backbone with continuous targets (Nexus-Gen): its targets come from pixels, so
``prepare`` refuses to store codes for it and shards that carry another backbone's codes are read
for their pixels only."""

import pytest
import torch

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.nexus_gen import NexusGenAdapter
from diva_lightning.data import DualFlowDataModule
from diva_lightning.data.prepare import prepare


@pytest.fixture(scope="module")
def nexus():
    torch.manual_seed(0)
    return NexusGenAdapter.tiny(num_hidden_layers=2)


def test_prepare_refuses_a_continuous_backbone_before_writing(nexus, tmp_path):
    with pytest.raises(ValueError, match="NexusGenAdapter regresses image embeddings"):
        prepare(out=str(tmp_path / "out"), synthetic=4, backbone=nexus, quiet=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_shards_with_codes_give_pixels_and_no_codes(nexus, tmp_path):
    out = tmp_path / "coded"
    prepare(out=str(out), synthetic=4, backbone=Emu3Adapter.tiny(), max_count=4, quiet=True)

    def module(**kwargs):
        dm = DualFlowDataModule(str(out), str(out), num_workers=0, batch_size=2, **kwargs)
        dm.bind_backbone(nexus)
        dm.setup("fit")
        return dm

    batch = next(iter(module().make_loader("val")))
    assert batch.codes is None and batch.pixels.shape == (2, 3, 252, 252)
    assert nexus.tokenize_images(batch.pixels).shape == (2, 81, 64)
    with pytest.raises(ValueError, match="use_codes: false"):
        module(use_codes=True)
