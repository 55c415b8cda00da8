"""DualFlowDataModule: batches for both flows, shard splitting over ranks x workers, epoch length,
configuration errors before training, and a real Lightning fit loop over it."""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from diva_lightning.data import DualFlowBatch, DualFlowDataModule, ShapesWorld, generation_mask
from tests.data_helpers import fake_adapter, synthetic_shards, write_tar

SEED = 11


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 PNG shapes-world shards of 6 samples (keys 000000000..000000047), 32 px."""
    return synthetic_shards(tmp_path_factory.mktemp("shapes"), 48, max_count=6)


def module(train=None, val=None, **kwargs) -> DualFlowDataModule:
    args = {"num_workers": 0, "batch_size": 4, "seed": SEED, "shuffle_buffer": 8}
    return DualFlowDataModule(train, val, **{**args, **kwargs})


def test_both_flows_come_from_the_same_samples(shards):
    prompts = ["describe this image.", "what is in the picture?"]
    dm = module(shards, samples_per_epoch=16, prompts=prompts, mask_pattern="contiguous")
    dm.bind_backbone(fake_adapter(image_size=32, grid=(4, 4)))
    world = ShapesWorld(seed=0)
    loader = dm.make_loader("train")
    for epoch, batch in [(e, b) for e in range(2) for b in loader]:
        assert isinstance(batch, DualFlowBatch) and batch.codes is None
        assert batch.pixels.shape == (4, 3, 32, 32) and batch.pixels.dtype == torch.float32
        assert batch.gen_mask.shape == (4, 16) and batch.gen_mask.dtype == torch.bool
        assert batch.epoch == epoch
        for i, key in enumerate(batch.keys):
            image, caption, _ = world.sample(int(key))
            expected = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
            assert batch.captions[i] == caption
            assert torch.equal(batch.pixels[i], expected)  # the pixels of the same pair
            mask = generation_mask(key, epoch, seed=SEED, grid=(4, 4), pattern="contiguous")
            assert torch.equal(batch.gen_mask[i], mask)
            assert batch.prompts[i] in prompts


def test_masks_do_not_depend_on_workers_or_order(shards):
    masks = []
    for workers in (0, 2):
        dm = module(val=shards, image_size=32, image_grid=(4, 4), num_workers=workers)
        batches = list(dm.make_loader("val"))
        masks.append({k: m for b in batches for k, m in zip(b.keys, b.gen_mask, strict=True)})
    assert masks[0].keys() == masks[1].keys() and len(masks[0]) == 48
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert all(
        torch.equal(m, generation_mask(k, 0, seed=SEED, grid=(4, 4))) for k, m in masks[0].items()
    )


def test_every_shard_read_by_exactly_one_rank_worker(shards):
    """2 ranks x 2 workers: one validation pass and one training epoch."""
    for split in ("val", "train"):
        dm = module(shards, shards, image_size=32, image_grid=(4, 4), num_workers=2)
        dm.samples_per_epoch = 32
        readers, keys = defaultdict(set), []
        for rank in range(2):
            for batch in dm.make_loader(split, rank, world_size=2):
                assert batch.origin[0] == rank
                for url, key in zip(batch.urls, batch.keys, strict=True):
                    readers[url].add(batch.origin)
                    keys.append(key)
        assert sorted(readers) == sorted(shards)
        assert all(len(r) == 1 for r in readers.values()), readers
        assert len({next(iter(r)) for r in readers.values()}) == 4  # every (rank, worker) reads
        if split == "val":
            assert sorted(keys) == [f"{i:09d}" for i in range(48)]  # each sample exactly once
        else:
            assert len(keys) == 32 and len(set(keys)) == 32  # no repeats within an epoch


def test_epoch_length_and_streams_continue_across_epochs(shards):
    dm = module(shards, image_size=32, image_grid=(4, 4), num_workers=2, samples_per_epoch=20)
    # 20 samples / (4 x 2 ranks) = 3 batches per rank -> 2 per worker -> len 4
    assert dm.batches_per_worker(2) == 2 and len(dm.make_loader("train", 0, 2)) == 4
    dm = module(shards, image_size=32, image_grid=(4, 4), num_workers=2, samples_per_epoch=16)
    dm.shuffle_buffer = 4  # each worker owns 2 shards = 12 samples: 4 buffered + 4 per epoch
    loader = dm.make_loader("train", rank=0, world_size=2)
    epochs = [[k for b in loader for k in b.keys] for _ in range(2)]
    assert len(loader) == 2 and all(len(e) == 8 for e in epochs)
    assert not set(epochs[0]) & set(epochs[1])  # the stream went on: no sample re-read


def test_batch_moves_with_lightning_helpers(shards):
    dm = module(val=shards[:1], image_size=32, image_grid=(4, 4))
    batch = next(iter(dm.make_loader("val")))
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, DualFlowBatch) and moved.keys == batch.keys
    assert moved.pixels.device.type == "meta" and moved.gen_mask.device.type == "meta"
    assert batch.pixels.device.type == "cpu"  # the original is untouched


# ---- configuration errors --------------------------------------------------------------------
def test_missing_path_and_no_match_name_the_culprit(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        module(str(tmp_path / "nope.tar")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"train_shards: pattern .*\*\.tar' matches no"):
        module(str(tmp_path / "*.tar")).setup("fit")
    pattern = shards[0].replace("000000.tar", "{000000..000009}.tar")  # only 8 exist
    with pytest.raises(FileNotFoundError, match=r"shard-000008\.tar' does not exist"):
        module(pattern).setup("fit")
    with pytest.raises(FileNotFoundError, match="val_shards"):
        module(shards, str(tmp_path / "missing-val.tar")).setup("fit")
    with pytest.raises(ValueError, match="train_shards: no shard pattern"):
        module(None).setup("fit")


def test_too_few_shards_for_ranks_and_workers(shards):
    dm = module(shards[:3], shards[:1], image_size=32, image_grid=(4, 4), num_workers=2)
    with pytest.raises(ValueError, match=r"train_shards: 3 shard\(s\) for 2 rank\(s\) x 2 worker"):
        dm.make_loader("train", rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"val_shards: 1 shard\(s\) for 2 rank\(s\)"):
        dm.make_loader("val", rank=1, world_size=2)
    assert len(dm.make_loader("train", rank=0, world_size=1)) > 0  # 3 >= 1 x 2


def test_backbone_facts_required_and_checked(shards):
    dm = module(shards)
    dm.setup("fit")
    with pytest.raises(ValueError, match="needs the backbone's image_size and image_grid"):
        dm.make_loader("train")
    fixed = module(shards, image_size=64)
    with pytest.raises(ValueError, match="image_size=64 disagrees with the backbone"):
        fixed.bind_backbone(fake_adapter(image_size=32))


def test_code_shape_mismatch_names_shard_and_key(tmp_path):
    codes = np.arange(16, dtype=np.int32).reshape(4, 4)
    sample = {"__key__": "k0", "png": b"unused", "txt": "a red circle.", "codes.npy": codes}
    shard = str(write_tar(tmp_path / "coded.tar", [sample]))
    dm = module(shard)
    dm.setup("fit")  # no facts yet: checked when the backbone is bound
    with pytest.raises(ValueError, match=r"coded\.tar, key k0: codes\.npy has shape \(4, 4\)"):
        dm.bind_backbone(fake_adapter(grid=(8, 8)))
    with pytest.raises(ValueError, match=r"coded\.tar, key k0: codes in \[0, 15\] outside"):
        module(shard, image_size=32, image_grid=(4, 4), codebook_size=8).setup("fit")
    dm = module(shard)
    dm.bind_backbone(fake_adapter(grid=(4, 4)))
    dm.setup("fit")
    assert dm.split_uses_codes == {"train": True}


# ---- inside a real Lightning loop ------------------------------------------------------------
class Recorder(L.LightningModule):
    """Binds the backbone facts in setup (as the stages do) and records what it receives."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = defaultdict(list)

    def setup(self, stage):
        self.trainer.datamodule.bind_backbone(fake_adapter(grid=(4, 4)))

    def training_step(self, batch, batch_idx):
        self.seen["train"].append((self.current_epoch, batch.epoch, list(batch.keys)))
        return (self.weight * batch.pixels.mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append((batch.epoch, list(batch.keys)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_loop_uses_epoch_length_and_epochs(shards):
    dm = module(shards, shards[:2], num_workers=2, samples_per_epoch=16)
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    train = model.seen["train"]
    assert trainer.num_training_batches == 4 and len(train) == 8
    assert all(epoch == batch_epoch for epoch, batch_epoch, _ in train)
    assert len({k for _, _, keys in train for k in keys}) == 32  # no re-reads across epochs
    val_keys = sorted(k for _, keys in model.seen["val"] for k in keys)
    assert val_keys == sorted([f"{i:09d}" for i in range(12)] * 2)  # two full passes
    assert {epoch for epoch, _ in model.seen["val"]} == {0}  # validation masks never change


# ---- embedded default: the synthetic world on first use --------------------------------------
def test_synthetic_world_is_written_on_first_use(tmp_path):
    root = tmp_path / "shapes"
    dm = module(
        str(root / "train"),  # the embedded default: the shards' own folder, written on first use
        str(root / "val"),
        synthetic_samples=40,
        synthetic_val_samples=8,
        synthetic_dir=str(root),
        image_size=32,
        image_grid=(4, 4),
        num_workers=2,
        batches_per_epoch=3,
    )
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        dm.setup("fit")  # nothing written yet
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.shards["train"]) == 8 and len(dm.shards["val"]) == 8  # >= 8 shards
    assert all(s.startswith(str(root / "train")) for s in dm.shards["train"])
    val = [k for b in dm.make_loader("val") for k in b.keys]
    assert sorted(val) == [f"{i:09d}" for i in range(8)]
    loader = dm.make_loader("train")
    assert len(loader) == 4  # batches_per_epoch=3 per rank -> 2 per worker x 2 workers
    first = next(iter(loader))
    world = ShapesWorld(seed=SEED)  # train uses the data seed, val seed + 1
    assert first.captions[0] == world.sample(int(first.keys[0]))[1]
    stamp = (root / "train" / "summary.json").stat().st_mtime_ns
    dm.prepare_data()  # second use: nothing rewritten
    assert (root / "train" / "summary.json").stat().st_mtime_ns == stamp
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_configured_pattern_that_matches_nothing_never_falls_back(tmp_path, split):
    """#18 item 15: a typo in a shard pattern must not train on the synthetic world."""
    typo = str(tmp_path / "my-data" / "shard-*.tar")
    patterns = {"train": str(tmp_path / "syn" / "train"), "val": str(tmp_path / "syn" / "val")}
    patterns[split] = typo
    dm = module(patterns["train"], patterns["val"], synthetic_samples=16,
                synthetic_dir=str(tmp_path / "syn"), image_size=32, image_grid=(4, 4))  # fmt: skip
    dm.prepare_data()
    assert not (tmp_path / "syn" / split).exists()
    with pytest.raises(FileNotFoundError, match=rf"{split}_shards.*my-data"):
        dm.setup("fit")


def test_partly_missing_pattern_does_not_fall_back(shards, tmp_path):
    pattern = shards[0].replace("000000.tar", "{000000..000009}.tar")  # 8 of 10 exist
    dm = module(pattern, synthetic_samples=16, synthetic_dir=str(tmp_path / "syn"))
    dm.prepare_data()
    assert not (tmp_path / "syn").exists()
    with pytest.raises(FileNotFoundError, match=r"shard-000008\.tar' does not exist"):
        dm.setup("fit")


def test_hyperparameters_saved_and_loaders_freed_without_the_cyclic_gc(shards):
    """Lightning's implicit ``save_hyperparameters()`` frame lookup forms a frame cycle that
    keeps the caller's loaders (and their workers) alive until a GC pass, whose worker shutdown
    then stalls 5 s per worker; the data module passes its frame explicitly."""

    def build():
        dm = module(shards, image_size=32, image_grid=(4, 4), num_workers=2, samples_per_epoch=8)
        loader = dm.make_loader("train")
        next(iter(loader))
        return dm.hparams["samples_per_epoch"], weakref.ref(loader)

    gc.disable()
    try:
        saved, loader = build()
        assert saved == 8 and loader() is None
    finally:
        gc.enable()
