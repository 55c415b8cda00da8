"""The batch both flows are built from, and the loader that assembles it in the main process.

Workers ship raw batches (keys, captions, uint8 pixels and/or codes, skip counts). The main-process
``DualFlowLoader`` then, per batch:

1. merges the worker's skip counts into the split's ``SkipCounter`` (exactly once per skip,
   whatever the number of workers) and applies the skipped-fraction ceiling;
2. drops skip-only (empty) batches;
3. draws prompts and generation masks as pure functions of ``(seed, key, epoch)`` (``masks``):
   the epoch is known here (the trainer's ``current_epoch``), not in persistent workers;
4. returns a ``DualFlowBatch`` with pixels as float [0, 1].

The stage builds both flows from the same batch: ``adapter.build_understanding(prompts, captions,
codes=..., pixels=...)`` and ``adapter.build_generation(captions, codes, gen_mask)``, so the two
flows always come from the same image-text pairs, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from diva_lightning.data.masks import batch_masks, choose_prompt
from diva_lightning.data.pipeline import ShardPipeline
from diva_lightning.data.skips import SkipCounter


@dataclass
class DualFlowBatch:
    """Raw material of both flows for B image-text pairs (N = tokens per image)."""

    keys: list[str]  # sample keys (``__key__``), B
    captions: list[str]  # B
    prompts: list[str]  # understanding-flow prompt per sample, B
    gen_mask: Tensor  # (B, N) bool, generation-flow mask over the image-token grid (row-major)
    pixels: Tensor | None = None  # (B, 3, S, S) float in [0, 1]; None when codes suffice
    codes: Tensor | None = None  # (B, N) long, pre-tokenised VQ codes; None -> tokenize pixels
    urls: list[str] = field(default_factory=list)  # shard of each sample, B
    skips: dict[str, int] = field(default_factory=dict)  # skips reported with this batch
    epoch: int = 0  # the epoch the masks and prompts were drawn for
    origin: tuple[int, int] | None = None  # (rank, worker) that read this batch

    def __len__(self) -> int:
        return len(self.keys)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DualFlowBatch:
        opt = lambda t: fn(t) if t is not None else None  # noqa: E731
        return replace(
            self, gen_mask=fn(self.gen_mask), pixels=opt(self.pixels), codes=opt(self.codes)
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DualFlowBatch:
        """Move the tensors (Lightning's ``move_data_to_device`` calls this)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DualFlowBatch:
        """Used by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())


@dataclass
class BatchAssembler:
    """Raw worker batch + epoch -> ``DualFlowBatch`` (prompts, masks, float pixels)."""

    grid: tuple[int, int]
    prompts: Sequence[str]
    seed: int = 0
    min_ratio: float = 0.2
    max_ratio: float = 0.6
    pattern: str = "dispersed"

    def __call__(self, raw: dict, epoch: int) -> DualFlowBatch:
        keys = raw["keys"]
        masks = batch_masks(
            keys,
            epoch,
            seed=self.seed,
            grid=self.grid,
            min_ratio=self.min_ratio,
            max_ratio=self.max_ratio,
            pattern=self.pattern,
        )  # (B, N)
        pixels = raw["pixels"]
        return DualFlowBatch(
            keys=list(keys),
            captions=list(raw["captions"]),
            prompts=[choose_prompt(k, epoch, self.seed, self.prompts) for k in keys],
            gen_mask=masks,
            pixels=pixels.float().div_(255.0) if pixels is not None else None,  # (B, 3, S, S)
            codes=raw["codes"],
            urls=list(raw["urls"]),
            skips=dict(raw["skips"].get("counts", {})),
            epoch=epoch,
            origin=tuple(raw["origin"]),
        )


class DualFlowLoader(DataLoader):
    """``DataLoader(batch_size=None)`` over a ``ShardPipeline`` that yields ``DualFlowBatch``.

    Args:
        dataset: the pre-batched pipeline.
        assembler: builds the final batch in the main process.
        counter: the split's skip counter (aggregated here from all workers).
        epoch_fn: current epoch (the trainer's); None counts calls to ``iter``.
        max_skip_fraction: abort when more than this fraction of samples was skipped ...
        skip_check_after: ... once at least this many samples were seen.
        split: name used in messages.
        **kwargs: ``num_workers``, ``persistent_workers``, ``pin_memory``, ...
    """

    def __init__(
        self,
        dataset: ShardPipeline,
        assembler: BatchAssembler,
        counter: SkipCounter,
        epoch_fn: Callable[[], int] | None = None,
        max_skip_fraction: float = 1.0,
        skip_check_after: int = 0,
        split: str = "train",
        **kwargs,
    ):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.assembler, self.counter, self.epoch_fn = assembler, counter, epoch_fn
        self.max_skip_fraction, self.skip_check_after = max_skip_fraction, skip_check_after
        self.split = split
        self._iterations = 0

    def __iter__(self) -> Iterator[DualFlowBatch]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        self.dataset.set_epoch(epoch)  # reaches non-persistent workers (copied at iter time)
        self._epoch, self._served = epoch, 0
        skip = self._resume_skip(epoch)
        for raw in super().__iter__():
            self.counter.merge(raw["skips"])
            self.counter.kept += len(raw["keys"])
            self.counter.check_ceiling(self.max_skip_fraction, self.skip_check_after, self.split)
            if not raw["keys"]:
                continue
            self._served += 1
            if self._served <= skip:  # resuming: replay the deterministic stream up to the cut
                continue
            self._resume = None  # restored: later iterations start fresh
            yield self.assembler(raw, epoch)

    # ---- mid-epoch resume (Lightning saves and restores these with the checkpoint) -----------
    def state_dict(self) -> dict:
        """Data position: the epoch and the batches already served in it."""
        return {"epoch": getattr(self, "_epoch", 0), "served": getattr(self, "_served", 0)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def _resume_skip(self, epoch: int) -> int:
        """Batches to replay silently after a restore. The stream of an epoch is a pure function
        of (seed, rank, worker, epoch) when workers are re-created each epoch, so replaying the
        first ``served`` batches lands exactly where the interrupted run stopped."""
        state = getattr(self, "_resume", None)  # kept until a batch is served (Lightning may
        if not state or state["epoch"] != epoch:  # create and drop an iterator first)
            return 0
        return int(state["served"])
