"""The per-worker stream: shards -> tar samples -> decoded samples -> shuffled -> batches.

One ``ShardPipeline`` (a torch ``IterableDataset``) runs in every DataLoader worker (a pickled
copy each) and yields pre-batched dicts, so the loader is ``DataLoader(batch_size=None)``:

    shard urls of (rank, worker)          split_shards: every shard read by exactly one of them
      -> wds.tarfile_to_samples(handler)  tar errors recorded, never raised, never slept on
      -> decode_stream                    bad samples recorded (key, url, cause) and skipped
      -> shuffle_stream                   (train) seeded buffer shuffle
      -> batch_stream                     stack fixed-shape tensors; ship the worker's skip counts

Training is an endless stream per worker. The shards are cut into ``R x W`` shares (one per
rank and worker: ``split_shards``); on pass ``p`` the (rank, worker) of slot ``s`` reads share
``(s + p) mod (R x W)``, its shards reshuffled (seeded by seed, rank, worker, epoch and pass).
So on every pass each share is read by exactly one (rank, worker), and over ``R x W`` passes
every worker has read every share: a worker whose own share holds few or no valid samples
moves on to the next share, instead of repeating one sample or stopping the run. The stream
persists across epochs (``persistent_workers``; with non-persistent workers the epoch, set in
the main process before the workers start, reseeds the order). An epoch is
``batches_per_worker`` batches of each worker. If ``R x W`` passes in a row (every share)
yield no valid sample, the worker raises instead of spinning forever. Validation is one
deterministic pass in shard order, the last batch partial.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from diva_lightning.data.decode import SampleDecoder, decode_stream
from diva_lightning.data.shards import bounded_stream, split_shards
from diva_lightning.data.skips import MemberNames, SkipCounter, TarErrorHandler


def shuffle_stream(samples: Iterable[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style buffer shuffle: fill ``bufsize``, then emit a random slot per new sample."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: Sequence[dict], skips: dict, origin: tuple[int, int]) -> dict:
    """Stack a list of decoded samples. Pixels/codes have fixed shapes after decoding (the image
    is resized to the backbone size, codes checked against its grid), so stacking needs no
    padding; text stays as strings and is tokenised and padded by the adapter's flow builders."""
    first = samples[0] if samples else {}
    stack = lambda name: (  # noqa: E731
        torch.stack([s[name] for s in samples]) if first.get(name) is not None else None
    )
    return {
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "urls": [s["url"] for s in samples],
        "pixels": stack("pixels"),  # (B, 3, S, S) uint8
        "codes": stack("codes"),  # (B, N) long
        "skips": skips,
        "origin": origin,  # (rank, worker) that read this batch
    }


def batch_stream(
    samples: Iterable[dict],
    batch_size: int,
    partial: bool,
    counter: SkipCounter,
    origin: tuple[int, int],
) -> Iterator[dict]:
    """Batches of ``batch_size``; each carries the skips recorded since the previous batch. At
    the end, remaining skips leave in a last (possibly empty) batch, which the loader drops."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield collate(buffer, counter.drain(), origin)
            buffer = []
    skips = counter.drain()
    rest = buffer if partial else []
    if rest or skips["counts"]:
        yield collate(rest, skips, origin)


class ShardPipeline(IterableDataset):
    """Pre-batched WebDataset stream of one rank (see the module docstring).

    Args:
        shards: all shard urls of the split (every rank gets the full list and takes its share).
        decoder: turns raw samples into decoded samples.
        batch_size: samples per batch.
        rank: this process's rank.
        world_size: number of ranks.
        seed: seed of the shard order and the shuffle buffer.
        train: endless reshuffled stream (True) or one ordered pass (False).
        shuffle_buffer: samples in the shuffle buffer (train; 0 or 1 = no shuffle).
        batches_per_worker: batches each worker yields per epoch (train).
        num_workers: DataLoader workers (only for ``__len__``).
        stream_timeout: seconds a streamed shard may take (``shards.bounded_stream``).
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: SampleDecoder,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        train: bool = True,
        shuffle_buffer: int = 0,
        batches_per_worker: int | None = None,
        num_workers: int = 0,
        stream_timeout: float | None = None,
    ):
        super().__init__()
        if train and not batches_per_worker:
            raise ValueError("a training ShardPipeline needs batches_per_worker")
        self.shards, self.decoder, self.batch_size = list(shards), decoder, batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.shuffle_buffer, self.batches_per_worker = shuffle_buffer, batches_per_worker
        self.num_workers, self.stream_timeout = num_workers, stream_timeout
        self.counter = SkipCounter()  # this process's copy; drained into every batch
        self.epoch = 0
        self._stream: Iterator[dict] | None = None
        self._current: dict = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("a validation pass has no known length")
        return self.batches_per_worker * max(1, self.num_workers)

    def _shard_stream(self, worker: int, workers: int) -> Iterator[dict]:
        if not self.train:
            yield from self._announce(
                split_shards(self.shards, self.rank, self.world_size, worker, workers)
            )
            return
        slots = self.world_size * workers
        slot, empty = self.rank + self.world_size * worker, 0  # split_shards' share of ours
        for npass in range(2**62):
            share = (slot + npass) % slots
            order = split_shards(self.shards, share % self.world_size, self.world_size,
                                 share // self.world_size, workers)  # fmt: skip
            random.Random(f"{self.seed}/{self.rank}/{worker}/{self.epoch}/{npass}").shuffle(order)
            before = self.counter.kept_total
            yield from self._announce(order)
            empty = empty + 1 if self.counter.kept_total == before else 0
            if empty >= slots:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: {slots} passes in a row, over every "
                    f"shard, gave no valid sample.\n" + self._worker_summary()
                )

    def _announce(self, urls: Sequence[str]) -> Iterator[dict]:
        for url in urls:
            self._current["url"] = url  # tar errors without a url are attributed to it
            yield {"url": bounded_stream(url, self.stream_timeout)}

    def _worker_summary(self) -> str:
        pending = SkipCounter()
        pending.merge({"counts": self.counter._pending, "examples": self.counter._pending_examples})
        return pending.summary()

    def _batches(self, worker: int, workers: int) -> Iterator[dict]:
        handler = TarErrorHandler(self.counter, self._current)
        names = MemberNames(self.counter, self._current)
        samples = wds.tarfile_to_samples(handler=handler, select_files=names)(
            self._shard_stream(worker, workers)
        )
        decoded = decode_stream(samples, self.decoder, self.counter)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"shuffle/{self.seed}/{self.rank}/{worker}/{self.epoch}")
            decoded = shuffle_stream(decoded, self.shuffle_buffer, rng)
        origin = (self.rank, worker)
        return batch_stream(decoded, self.batch_size, not self.train, self.counter, origin)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.train:
            return self._batches(worker, workers)
        if self._stream is None:  # kept across epochs: the stream goes on where it stopped
            self._stream = self._batches(worker, workers)
        return islice(self._stream, self.batches_per_worker)
