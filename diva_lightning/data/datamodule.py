"""``DualFlowDataModule``: WebDataset shards -> batches carrying both DIVA flows' raw material.

Per image-text pair it emits the caption, a prompt (understanding flow U), the image as pixels
and/or pre-tokenised VQ codes, and the generation mask (generation flow G), all from the same
sample (paper Sec. 3.1). Built from YAML without a backbone: the backbone facts (image size,
token grid, codebook size) come from init args or from ``bind_backbone(adapter)``, which the stage
calls in its ``setup()``; a loader cannot be built before one of the two happened.

Checks before the first step: shard patterns resolve (``shards``), shard counts suffice for
ranks x workers, and the first sample of the first shard of each split is probed: its codes (when
the run uses them) must fit the backbone's grid and codebook, else the error names the shard and
key. Bad samples during the run are skipped and counted (``skips``); see ``pipeline`` and
``batch`` for the stream, the epoch length and the skip accounting across workers.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Literal

import lightning as L

from diva_lightning.data.batch import BatchAssembler, DualFlowLoader
from diva_lightning.data.decode import CODES_KEY, SampleDecoder, SkipSample, decode_codes
from diva_lightning.data.masks import check_mask_config
from diva_lightning.data.pipeline import ShardPipeline
from diva_lightning.data.prepare import write_synthetic_shards
from diva_lightning.data.shards import (
    any_shard_exists,
    check_codes_tokenizer,
    check_shard_count,
    probe_first_sample,
    resolve_shards,
)
from diva_lightning.data.skips import SkipCounter
from diva_lightning.sizes import check_sizes

DEFAULT_PROMPTS = ["Please describe this image in detail."]
# Lightning warns that an IterableDataset with __len__ may duplicate data across workers; ours
# splits shards per (rank, worker) and sets its length per worker, so the warning is noise.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
SPLITS = ("train", "val")


PROBED_SHARDS = 3  # shards tried for a first sample before the codes decision


class DualFlowDataModule(L.LightningDataModule):
    """Dual-flow batches from WebDataset shards.

    Args:
        train_shards: training shards: a pattern (braces, globs, a directory) or a list of them.
        val_shards: validation shards, read once per validation in order; None: no validation.
        batch_size: samples per batch and rank.
        val_batch_size: validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers per rank (training needs >= ranks x workers shards).
        samples_per_epoch: samples per training epoch over all ranks (the stream is endless).
        batches_per_epoch: training batches per rank and epoch; overrides ``samples_per_epoch``.
        shuffle_buffer: samples in each worker's shuffle buffer (0 or 1: no sample shuffle).
        seed: seed of shard order, shuffling, prompts and masks.
        prompts: understanding-flow prompts, one chosen per sample and epoch (seeded).
        mask_ratio_min: smallest generation-mask ratio.
        mask_ratio_max: largest generation-mask ratio.
        mask_pattern: ``dispersed`` (random positions) or ``contiguous`` (one block).
        caption_key: tar member holding the caption (``txt``), or the JSON member (``json``).
        caption_field: dotted field of the JSON member ``caption_key``; None: plain text.
        use_codes: use the shards' ``codes.npy``: None = when the first sample has them.
        check_tokenizer: codes must come from the backbone's own image tokenizer: its class
            and weight hash must match the ``summary.json`` that ``prepare`` wrote beside the
            shards. False: accept codes of another tokenizer deliberately.
        keep_pixels: decode pixels even with codes: None = when the backbone's understanding
            flow needs pixels (``needs_pixels_for_understanding``, e.g. Janus).
        image_size: backbone image side in pixels (or from ``bind_backbone``).
        image_grid: backbone token grid (rows, cols) (or from ``bind_backbone``).
        codebook_size: backbone codebook size for code checks (or from ``bind_backbone``).
        max_image_pixels: skip images with more pixels (decompression-bomb guard).
        min_image_side: skip images with a side shorter than this (e.g. 1x1 pixels).
        max_skip_fraction: abort when the skipped fraction of a split exceeds this ...
        skip_check_after: ... once this many samples (kept + skipped) were seen.
        persistent_workers: keep workers (and the training stream) alive across epochs.
        pin_memory: pin host memory of batches.
        stream_timeout: seconds a streamed shard (``pipe:`` command, ``http(s)://`` URL) may
            take; a stalled or failed stream is cut, counted as ``stream_error`` and skipped.
        synthetic_samples: when set and ``train_shards`` is None, or is ``synthetic_dir/train``
            itself and holds no shard yet, write this many shapes-world samples there on first
            use (``prepare_data``, local rank 0) and train on them (the embedded default). Any
            other pattern is the user's own data: one that matches nothing, or only some of its
            files, is an error, never a silent switch to synthetic data.
        synthetic_val_samples: likewise for ``val_shards`` = ``synthetic_dir/val``, written
            with seed ``seed + 1``; 0: never.
        synthetic_dir: where synthetic shards are written (delete it to regenerate).
        synthetic_shard_size: most samples per synthetic shard (fewer, so that there are at
            least 8 shards, when the count is small).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int = 10_000,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        prompts: list[str] | None = None,
        mask_ratio_min: float = 0.2,
        mask_ratio_max: float = 0.6,
        mask_pattern: Literal["dispersed", "contiguous"] = "dispersed",
        caption_key: str = "txt",
        caption_field: str | None = None,
        use_codes: bool | None = None,
        check_tokenizer: bool = True,
        keep_pixels: bool | None = None,
        image_size: int | None = None,
        image_grid: tuple[int, int] | None = None,
        codebook_size: int | None = None,
        max_image_pixels: int = 40_000_000,
        min_image_side: int = 8,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 1000,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        stream_timeout: float = 1800.0,
        synthetic_samples: int | None = None,
        synthetic_val_samples: int = 64,
        synthetic_dir: str = "data/shapes",
        synthetic_shard_size: int = 64,
    ):
        super().__init__()
        check_mask_config(mask_ratio_min, mask_ratio_max, mask_pattern)
        check_sizes("DualFlowDataModule", batch_size=batch_size, val_batch_size=val_batch_size,
                    synthetic_val_samples=synthetic_val_samples,
                    synthetic_shard_size=synthetic_shard_size)  # fmt: skip
        check_sizes("DualFlowDataModule", minimum=0, num_workers=num_workers)
        # an explicit frame: Lightning's own currentframe() lookup forms a frame cycle that keeps the
        # caller's locals (loaders with live workers) alive until the cyclic GC runs
        self.save_hyperparameters(frame=inspect.currentframe())
        self.patterns = {"train": train_shards, "val": val_shards}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.samples_per_epoch = num_workers, samples_per_epoch
        self.batches_per_epoch = batches_per_epoch
        self.synthetic = {"train": synthetic_samples or 0, "val": synthetic_val_samples}
        self.synthetic_dir, self.synthetic_shard_size = synthetic_dir, synthetic_shard_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        self.mask = (mask_ratio_min, mask_ratio_max, mask_pattern)
        self.caption_key, self.caption_field = caption_key, caption_field
        self.use_codes, self.keep_pixels = use_codes, keep_pixels
        self.check_tokenizer = check_tokenizer
        self.image_size, self.codebook_size = image_size, codebook_size
        self.image_grid = tuple(image_grid) if image_grid is not None else None
        self.max_image_pixels, self.min_image_side = max_image_pixels, min_image_side
        self.max_skip_fraction, self.skip_check_after = max_skip_fraction, skip_check_after
        self.persistent_workers, self.pin_memory = persistent_workers, pin_memory
        if stream_timeout <= 0:
            raise ValueError(f"stream_timeout must be > 0 seconds, got {stream_timeout}")
        self.stream_timeout = stream_timeout
        self.backbone_needs_pixels = False
        self.continuous_targets = False
        self.image_preprocess = None  # the backbone's (bind_backbone)
        self.shards: dict[str, list[str]] = {}
        self.split_uses_codes: dict[str, bool] = {}
        self.skips = {split: SkipCounter() for split in SPLITS}

    # ---- backbone facts ----------------------------------------------------------------------
    def bind_backbone(self, adapter) -> None:
        """Take image size, grid and codebook size from ``adapter`` (a ``BackboneAdapter``);
        values given as init args must agree. Then check the shards' codes against them."""
        continuous = bool(getattr(adapter, "continuous_targets", False))
        facts = {
            "image_size": int(adapter.image_size),
            "image_grid": tuple(int(x) for x in adapter.image_grid),
            "codebook_size": None if continuous else int(adapter.codebook_size),
        }
        for name, value in facts.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(
                    f"data {name}={given} disagrees with the backbone "
                    f"{type(adapter).__name__}, which has {name}={value}"
                )
            setattr(self, name, value)
        self.backbone_needs_pixels = bool(adapter.needs_pixels_for_understanding)
        self.continuous_targets = continuous  # targets come from pixels: shard codes unused
        self.image_preprocess = getattr(adapter, "image_preprocess", None)
        self.split_uses_codes.clear()  # re-probe with the new facts
        self._adapter = adapter
        for split in self.shards:
            self._probe(split)

    def _require_facts(self) -> tuple[int, tuple[int, int]]:
        if self.image_size is None or self.image_grid is None:
            raise ValueError(
                "DualFlowDataModule needs the backbone's image_size and image_grid: give them "
                "as init args (data.init_args.image_size / image_grid) or call "
                "bind_backbone(adapter) (the stage does so in its setup())"
            )
        return self.image_size, self.image_grid

    # ---- shards ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve shard patterns (fails on missing paths); probe codes if facts are known."""
        splits = ["train", "val"] if stage in (None, "fit") else ["val"]
        for split in splits:
            if split == "train" or self.patterns["val"] is not None:
                self._resolve(split)

    def prepare_data(self) -> None:
        """Write the synthetic shapes world where a split falls back to it (see
        ``synthetic_samples``). Lightning calls this on local rank 0 before ``setup``."""
        for split in SPLITS:
            target = self._synthetic_target(split)
            if target is not None and not any_shard_exists(target):
                seed = self.seed + (split == "val")
                write_synthetic_shards(
                    target,
                    self.synthetic[split],
                    seed,
                    self.image_size or 32,
                    self.synthetic_shard_size,
                )

    def _synthetic_target(self, split: str) -> str | None:
        """``synthetic_dir/split`` when ``split`` falls back to the synthetic world, else None."""
        pattern, count = self.patterns[split], self.synthetic[split]
        if not self.synthetic["train"] or count <= 0:
            return None
        if split == "val" and pattern is None:
            return None  # no validation asked for
        target = Path(self.synthetic_dir) / split
        if pattern is not None and (not isinstance(pattern, str) or Path(pattern) != target):
            return None  # the user's own shards: a pattern that matches nothing is an error
        if pattern is not None and any_shard_exists(pattern):
            return None
        return str(target)

    def _resolve(self, split: str) -> list[str]:
        if split not in self.shards:
            target = self._synthetic_target(split)
            pattern = self.patterns[split] if target is None else target
            if target is not None and not any_shard_exists(target):
                raise FileNotFoundError(
                    f"{split}_shards: no synthetic shards in '{target}' yet; "
                    "prepare_data() writes them (the Trainer calls it)"
                )
            self.shards[split] = resolve_shards(pattern, f"{split}_shards")
            if self.image_grid is not None:
                self._probe(split)
        return self.shards[split]

    def _probe(self, split: str) -> bool:
        """Does ``split`` use codes? Checks the first sample's codes against the backbone."""
        if split in self.split_uses_codes:
            return self.split_uses_codes[split]
        _, grid = self._require_facts()
        # the first shard that yields a sample among the first few (one may be broken or stall)
        for url in self.shards[split][:PROBED_SHARDS]:
            sample = probe_first_sample(url, self.stream_timeout) or {}
            if sample:
                break
        has_codes = CODES_KEY in sample
        if self.continuous_targets:
            if self.use_codes:
                raise ValueError(f"{split}_shards: use_codes=True, but the backbone regresses image "
                                 "embeddings made from pixels (continuous_targets): set "
                                 "use_codes: false")  # fmt: skip
            self.split_uses_codes[split] = False
            return False
        if self.use_codes and sample and not has_codes:
            raise ValueError(f"{split}_shards: use_codes=True but {url} has no {CODES_KEY}")
        uses = has_codes if self.use_codes is None else bool(self.use_codes)
        if uses and has_codes:
            try:
                decode_codes(sample[CODES_KEY], grid, self.codebook_size)
            except SkipSample as exn:
                if exn.reason != "bad_codes":  # damaged bytes: one sample, the loader counts it
                    self.split_uses_codes[split] = uses
                    return uses
                raise ValueError(
                    f"{split}_shards: shard {url}, key {sample.get('__key__')}: {exn.cause}. "
                    "Re-run `diva-cli prepare` with this backbone, or set use_codes: false."
                ) from exn
        adapter = getattr(self, "_adapter", None)
        if uses and self.check_tokenizer and adapter is not None:
            check_codes_tokenizer(self.shards[split], adapter, split)
        self.split_uses_codes[split] = uses
        return uses

    # ---- loaders -----------------------------------------------------------------------------
    def batches_per_worker(self, world_size: int) -> int:
        """Training batches each worker yields per epoch (rank total = this x workers)."""
        per_rank = self.batches_per_epoch or math.ceil(
            self.samples_per_epoch / (self.batch_size * world_size)
        )
        return max(1, math.ceil(per_rank / max(1, self.num_workers)))

    def _decoder(self, split: str) -> SampleDecoder:
        size, grid = self._require_facts()
        uses_codes = self._probe(split)
        keep = self.backbone_needs_pixels if self.keep_pixels is None else self.keep_pixels
        return SampleDecoder(
            image_size=size,
            grid=grid,
            codebook_size=self.codebook_size,
            caption_key=self.caption_key,
            caption_field=self.caption_field,
            use_codes=uses_codes,
            decode_pixels=not uses_codes or keep,
            max_image_pixels=self.max_image_pixels,
            preprocess=self.image_preprocess,
            min_image_side=self.min_image_side,
        )

    def make_loader(self, split: str, rank: int = 0, world_size: int = 1) -> DualFlowLoader:
        """The loader of ``split`` for one rank (the hooks below take rank/world from the
        trainer; tests and tools call this with explicit values)."""
        shards, train = self._resolve(split), split == "train"
        check_shard_count(shards, world_size, self.num_workers, f"{split}_shards", train)
        workers = self.num_workers if train else min(self.num_workers, len(shards) // world_size)
        dataset = ShardPipeline(
            shards,
            self._decoder(split),
            self.batch_size if train else self.val_batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            batches_per_worker=self.batches_per_worker(world_size) if train else None,
            num_workers=workers,
            stream_timeout=self.stream_timeout,
        )
        ratio_min, ratio_max, pattern = self.mask
        assembler = BatchAssembler(
            self.image_grid, self.prompts, self.seed, ratio_min, ratio_max, pattern
        )
        trainer = self._trainer_or_none()
        epoch_fn = (lambda: trainer.current_epoch) if train and trainer is not None else None
        return DualFlowLoader(
            dataset,
            assembler,
            self.skips[split],
            epoch_fn=epoch_fn if train else (lambda: 0),  # validation masks never change
            max_skip_fraction=self.max_skip_fraction,
            skip_check_after=self.skip_check_after,
            split=split,
            num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=self.pin_memory,
        )

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DualFlowLoader:
        return self.make_loader("train", *self._rank_world())

    def val_dataloader(self) -> DualFlowLoader | list:
        if self.patterns["val"] is None:
            return []
        return self.make_loader("val", *self._rank_world())
