"""Data-loading throughput: decoded-JPEG shards vs pre-tokenised shards, side by side.

Writes the synthetic shapes world twice into a temp dir with ``prepare`` (JPEG images, once
without and once with ``codes.npy`` from the tiny Emu3 VQ), then reads both with the same
``DualFlowDataModule`` settings (same samples, batch size, workers, shuffle buffer) and reports
samples/s of training epochs, round-robin over the paths after a warm-up epoch (worker start-up
and shuffle-buffer filling excluded; the median of ``--rounds`` epochs is reported):

* ``jpeg -> pixels``: decode + resize + crop, the batch carries pixels;
* ``jpeg -> pixels -> codes``: the same plus ``adapter.tokenize_images`` in the main process,
  which is what a stage does per batch when the shards carry no codes;
* ``pre-tokenised -> codes``: the batch carries codes, no image is decoded.

Usage: ``python benchmarks/bench_data.py [--samples 2048] [--image-size 256] [--workers 2]
[--rounds 3]`` (``make bench-data``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2048, help="samples per measured epoch")
    parser.add_argument("--image-size", type=int, default=256, help="stored image side (px)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--shard-size", type=int, default=128, help="samples per shard")
    parser.add_argument("--rounds", type=int, default=3, help="measured epochs per path")
    return parser.parse_args()


def write_shards(root: Path, args, adapter) -> dict[str, float]:
    from diva_lightning.data.prepare import prepare

    seconds = {}
    common = dict(  # noqa: C408
        synthetic=args.samples,
        synthetic_image_size=args.image_size,
        image_format="jpg",
        max_count=args.shard_size,
        quiet=True,
    )
    for name, backbone in (("jpeg", None), ("coded", adapter)):
        start = time.perf_counter()
        prepare(str(root / name), backbone=backbone, **common)
        seconds[name] = time.perf_counter() - start
    return seconds


def make_loader(shards: Path, args, adapter, use_codes: bool):
    from diva_lightning.data import DualFlowDataModule

    dm = DualFlowDataModule(
        str(shards),
        batch_size=args.batch_size,
        num_workers=args.workers,
        samples_per_epoch=args.samples,
        shuffle_buffer=256,
        use_codes=use_codes,
    )
    dm.bind_backbone(adapter)
    dm.setup("fit")
    return dm.make_loader("train")


def epoch_rate(loader, adapter, tokenize: bool) -> float:
    """Samples/s of one epoch of ``loader`` (plus VQ tokenisation of the pixels if asked)."""
    start, count = time.perf_counter(), 0
    for batch in loader:
        codes = adapter.tokenize_images(batch.pixels) if tokenize else batch.codes  # (B, N)
        assert codes is not None or batch.pixels is not None
        count += len(batch.keys)
    return count / (time.perf_counter() - start)


def measure(root: Path, args, adapter) -> dict[str, list[float]]:
    """Round-robin over the arms, ``--rounds`` measured epochs each after one warm-up epoch, so
    that load from other processes on the machine hits every arm alike."""
    arms = {
        "jpeg -> pixels": (make_loader(root / "jpeg", args, adapter, False), False),
        "jpeg -> pixels -> codes": (make_loader(root / "jpeg", args, adapter, False), True),
        "pre-tokenised -> codes": (make_loader(root / "coded", args, adapter, True), False),
    }
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(args.rounds + 1):
        for name, (loader, tokenize) in arms.items():
            rate = epoch_rate(loader, adapter, tokenize)
            if round_:  # round 0 starts the workers and fills the shuffle buffers
                rates[name].append(rate)
    return rates


def main() -> None:
    args = parse_args()
    import torch

    from diva_lightning.backbones.emu3 import Emu3Adapter

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the workers use the other cores
    adapter = Emu3Adapter.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prep = write_shards(root, args, adapter)
        rates = measure(root, args, adapter)
    rows = [(name, statistics.median(r), min(r), max(r)) for name, r in rates.items()]
    print(
        f"\n{args.samples} samples/epoch, stored {args.image_size} px JPEG -> "
        f"{adapter.image_size} px, batch {args.batch_size}, {args.workers} workers, "
        f"grid {adapter.image_grid}"
    )
    print(f"samples/s, median of {args.rounds} epochs per path (min..max)")
    print(f"{'path':<26}{'median':>10}{'min':>10}{'max':>10}")
    for name, median, low, high in rows:
        print(f"{name:<26}{median:>10.0f}{low:>10.0f}{high:>10.0f}")
    coded = rows[2][1]
    print(f"ratio pre-tokenised / jpeg -> pixels:          {coded / rows[0][1]:.2f}x")
    print(f"ratio pre-tokenised / jpeg -> pixels -> codes: {coded / rows[1][1]:.2f}x")
    print(
        f"one-off prepare time for {args.samples} samples: "
        f"{prep['jpeg']:.1f} s plain, {prep['coded']:.1f} s with codes"
    )


if __name__ == "__main__":
    main()
