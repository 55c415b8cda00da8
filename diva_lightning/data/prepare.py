"""``diva-cli prepare``: image-caption pairs -> WebDataset tar shards (optionally with VQ codes).

    diva-cli prepare SHARDS --images DIR                      # sidecar DIR/x.jpg + DIR/x.txt
    diva-cli prepare SHARDS --images DIR --captions pairs.jsonl
    diva-cli prepare SHARDS --captions pairs.csv              # paths relative to the csv
    diva-cli prepare SHARDS --synthetic 1000                  # the shapes world
    diva-cli prepare SHARDS --synthetic 1000 \\
        --backbone diva_lightning.backbones.emu3.Emu3Adapter # + codes.npy per sample

Each sample is ``KEY.{jpg,png,...}`` (the image), ``KEY.txt`` (caption), ``KEY.json`` (source
and caption; plus the object list for the shapes world) and, with a backbone, ``KEY.codes.npy``:
int32 ``(rows, cols)`` codes computed by ``backbone.tokenize_images`` on exactly the pixels the
data module would decode from the written image bytes. Keys are the zero-padded input index.
Every image is fully decoded before it is written; bad inputs are skipped and counted by reason.
A summary is printed and written to ``OUT/summary.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.tokenizers import tokenizer_identity
from diva_lightning.data.decode import SkipSample, decode_rgb, load_pixels
from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.data.shapes_v2 import ShapesWorldV2
from diva_lightning.data.skips import SkipCounter
from diva_lightning.data.sources import SourceItem, folder_items, synthetic_items
from diva_lightning.sizes import check_sizes

PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def _encode(item: SourceItem, image_format: str, ceiling: int, min_side: int) -> tuple[str, bytes]:
    """Validate the image by decoding it; return (extension, bytes to write)."""
    data = item.image
    if data is None:
        try:
            data = item.path.read_bytes()
        except FileNotFoundError as exn:
            raise SkipSample("missing_image", f"no file {item.path}") from exn
        except OSError as exn:
            raise SkipSample("other", f"cannot read {item.path}: {exn}") from exn
    image = decode_rgb(data, ceiling, min_side)
    if image_format == "keep":
        from PIL import Image

        fmt = Image.open(io.BytesIO(data)).format
        if fmt in PIL_EXT:
            return PIL_EXT[fmt], data
        image_format = "png"  # a format the loader's keys do not cover: re-encode losslessly
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image_format == "jpg" else "PNG", quality=90)
    return image_format, buffer.getvalue()


PARTIAL = ".partial"


class _Writer:
    """ShardWriter plus per-shard counts and batched VQ tokenisation.

    Each shard is written as ``PREFIX-NNNNNN.tar.partial`` and renamed to its ``.tar`` name only
    once closed complete (ShardWriter's ``post`` hook); ``close(complete=False)`` deletes the
    shard in progress, and a killed run leaves only a ``.partial`` file that no pattern
    matches. A shard that received no sample is deleted rather than renamed."""

    def __init__(self, out: Path, prefix: str, max_count: int, backbone, batch_size: int):
        pattern = str(out / f"{prefix}-%06d.tar{PARTIAL}")
        # An integer mtime keeps members in plain ustar headers: WebDataset's default float
        # time.time() forces a PAX extended header per member, which doubles tar parsing cost.
        mtime = int(time.time())
        self.sink = wds.ShardWriter(
            pattern, maxcount=max_count, verbose=0, mtime=mtime, post=self._complete
        )  # fmt: skip
        self.backbone, self.batch_size = backbone, batch_size
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.per_shard: Counter = Counter()

    def add(self, sample: dict, ext: str) -> None:
        if self.backbone is None:
            return self._write(sample)
        size, preprocess = (
            self.backbone.image_size,
            getattr(self.backbone, "image_preprocess", None),
        )
        pixels = load_pixels(sample[ext], size, preprocess=preprocess)  # as the loader decodes
        self.pending.append((sample, pixels))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pixels = torch.stack([p for _, p in self.pending]).float() / 255.0  # (B, 3, S, S)
        codes = self.backbone.tokenize_images(pixels)  # (B, N)
        rows, cols = self.backbone.image_grid
        for (sample, _), row in zip(self.pending, codes, strict=True):
            sample["codes.npy"] = row.view(rows, cols).numpy().astype(np.int32)
            self._write(sample)
        self.pending = []

    def _write(self, sample: dict) -> None:
        self.sink.write(sample)
        self.per_shard[Path(self.sink.fname).name.removesuffix(PARTIAL)] += 1

    def _complete(self, fname: str) -> None:
        done = Path(fname.removesuffix(PARTIAL))
        if self.per_shard[done.name]:
            os.replace(fname, done)
        else:
            Path(fname).unlink(missing_ok=True)

    def close(self, complete: bool = True) -> None:
        """Finish the shard in progress; ``complete=False`` (an error or an interrupt): delete
        it, so that only shards closed complete carry a ``.tar`` name."""
        if complete:
            self.flush()
        else:
            self.sink.post = None
        fname = self.sink.fname
        self.sink.close()
        if not complete:
            Path(fname).unlink(missing_ok=True)


def _check_out(out: Path, prefix: str, overwrite: bool) -> None:
    old = sorted(out.glob(f"{prefix}-*.tar"))
    if old and not overwrite:
        raise FileExistsError(
            f"prepare: {out} already holds {len(old)} '{prefix}-*.tar' shard(s); "
            "pass --overwrite true or choose another --out"
        )
    for path in [*old, *out.glob(f"{prefix}-*.tar{PARTIAL}")]:  # and an interrupted run's
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def prepare(
    out: str,
    images: str | None = None,
    captions: str | None = None,
    synthetic: int | None = None,
    backbone: BackboneAdapter | None = None,
    max_count: int = 1000,
    image_format: Literal["keep", "png", "jpg"] = "keep",
    synthetic_image_size: int = 32,
    synthetic_world: str = "v1",
    synthetic_split: str | None = None,
    seed: int = 0,
    prefix: str = "shard",
    batch_size: int = 32,
    max_image_pixels: int = 40_000_000,
    min_image_side: int = 8,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Write WebDataset shards of image-caption pairs and a summary of what was skipped and why.

    Args:
        out: output directory for ``PREFIX-NNNNNN.tar`` shards and ``summary.json``.
        images: folder of images (sidecar ``.txt`` captions unless ``captions`` is given).
        captions: a ``.jsonl`` or ``.csv`` file of (image path, caption) pairs.
        synthetic: write this many shapes-world samples instead of reading a folder.
        backbone: when given, also write ``codes.npy`` (its VQ codes of each image).
        max_count: most samples per shard.
        image_format: ``keep`` the input bytes (synthetic: PNG), or re-encode as ``png``/``jpg``.
        synthetic_image_size: image side of the shapes world.
        synthetic_world: ``v1`` (the original world) or ``v2`` (``ShapesWorldV2``: harder, with
            image-only and caption-only content).
        synthetic_split: world v2 only: write only scenes of this split (``pretrain``, ``post``,
            ``val``, ``eval``; disjoint by construction).
        seed: seed of the shapes world.
        prefix: shard file name prefix.
        batch_size: images per VQ tokenisation call.
        max_image_pixels: skip images with more pixels (decompression-bomb guard).
        min_image_side: skip images with a shorter side.
        overwrite: replace existing ``PREFIX-*.tar`` shards in ``out``.
        quiet: no progress bar and no printed summary.
    """
    sizes = {"--synthetic": synthetic, "--max_count": max_count, "--batch_size": batch_size,
             "--synthetic_image_size": synthetic_image_size}  # fmt: skip
    check_sizes("prepare", **sizes)  # before the output folder is made
    synthetic = synthetic or 0
    if backbone is not None and getattr(backbone, "continuous_targets", False):
        raise ValueError(f"prepare: --backbone {type(backbone).__name__} regresses image embeddings "
                         "computed from pixels during training (continuous_targets): there are "
                         "no codes to store; prepare the shards without --backbone")  # fmt: skip
    if (synthetic > 0) == (images is not None or captions is not None):
        raise ValueError("prepare: give either --synthetic N or --images/--captions (not both)")
    out_dir = Path(out)
    if synthetic > 0:
        world, indices = synthetic_world_of(synthetic_world, synthetic_image_size, seed), None
        if synthetic_split is not None:
            if synthetic_world != "v2":
                raise ValueError("prepare: --synthetic_split needs --synthetic_world v2")
            indices = world.split_indices(synthetic_split, synthetic)
        fmt = "png" if image_format == "keep" else image_format
        items = synthetic_items(synthetic, world, fmt, indices)
        total, source = (
            synthetic,
            f"synthetic {synthetic_world}" + (f" {synthetic_split}" if synthetic_split else ""),
        )
    else:
        items, total, source = folder_items(images, captions), None, str(captions or images)
    _check_out(out_dir, prefix, overwrite)
    writer = _Writer(out_dir, prefix, max_count, backbone, batch_size)
    skips = SkipCounter()
    try:
        for index, item in enumerate(tqdm(items, total=total, disable=quiet, desc="prepare")):
            _write_item(writer, skips, index, item, image_format, max_image_pixels, min_image_side)
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    summary = _summary(out_dir, source, writer, skips, backbone, image_format, max_count)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not summary["written"]:
        raise ValueError(f"prepare: no sample written to {out_dir} from {source}: "
                         f"{skips.summary()} (details in {out_dir / 'summary.json'})")  # fmt: skip
    if not quiet:
        print(
            f"prepare: wrote {summary['written']} samples in {len(summary['shards'])} shard(s)"
            f" to {out_dir}\n{skips.summary()}"
        )
    return summary


def synthetic_world_of(name: str, image_size: int, seed: int) -> ShapesWorld:
    """The shapes world ``v1`` or ``v2`` with ``image_size`` and ``seed``."""
    if name not in ("v1", "v2"):
        raise ValueError(f"prepare: synthetic_world must be 'v1' or 'v2', got {name!r}")
    world = ShapesWorldV2 if name == "v2" else ShapesWorld
    return world(image_size=image_size, seed=seed)


def _write_item(writer, skips, index, item, image_format, ceiling, min_side) -> None:
    if item.skip is not None:
        skips.add(item.skip[0], item.name, None, item.skip[1])
        return
    try:
        ext, data = _encode(item, image_format, ceiling, min_side)
    except SkipSample as skip:
        skips.add(skip.reason, item.name, None, skip.cause)
        return
    meta = {"source": item.name, "caption": item.caption, **item.meta}
    sample = {"__key__": f"{index:09d}", ext: data, "txt": item.caption, "json": meta}
    writer.add(sample, ext)
    skips.kept += 1
    skips.add_kept()


def _summary(out, source, writer, skips: SkipCounter, backbone, image_format, max_count) -> dict:
    codes = None
    if backbone is not None:
        codes = {
            "backbone": f"{type(backbone).__module__}.{type(backbone).__name__}",
            "image_size": backbone.image_size,
            "image_grid": list(backbone.image_grid),
            "codebook_size": backbone.codebook_size,
            "tokenizer": tokenizer_identity(getattr(backbone, "vq", backbone)),
        }
    skips.merge(skips.drain())
    examples = {
        reason: [{"item": r.key, "cause": r.cause} for r in records]
        for reason, records in skips.examples.items()
    }
    return {
        "out": str(out),
        "source": source,
        "written": skips.kept,
        "skipped": skips.as_dict(),
        "skipped_total": skips.skipped,
        "skipped_examples": examples,
        "shards": [{"name": n, "count": c} for n, c in sorted(writer.per_shard.items())],
        "max_count": max_count,
        "image_format": image_format,
        "codes": codes,
    }


def write_synthetic_shards(
    out: str, count: int, seed: int, image_size: int = 32, shard_size: int = 64
) -> dict:
    """Shapes-world shards for the data module's synthetic fallback, written atomically: into a
    temporary sibling directory, then moved into ``out`` (a reader never sees a half-written
    shard). At most ``shard_size`` samples per shard, fewer so that there are >= 8 shards
    (enough for 2 ranks x 4 workers) when ``count`` allows."""
    target = Path(out)
    per_shard = max(1, min(shard_size, math.ceil(count / 8)))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        summary = prepare(
            out=tmp,
            synthetic=count,
            max_count=per_shard,
            synthetic_image_size=image_size,
            seed=seed,
            quiet=True,
        )
        target.mkdir(exist_ok=True)
        for shard in summary["shards"]:
            os.replace(Path(tmp) / shard["name"], target / shard["name"])
        summary["out"] = str(target)
        (target / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {count} synthetic shapes-world samples to {target}")
    return summary
