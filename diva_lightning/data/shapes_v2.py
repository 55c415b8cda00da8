"""World v2 of the shapes world: harder, and with content specific to each flow.

``ShapesWorldV2`` keeps v1's exact ground truth for the attributes both flows share, and adds:

* **harder shared content**: a finer grid (4 x 4 by default), up to 4 objects, and a size per
  object ("small" or "large"), stated in the caption;
* **image-only content** (the caption never states it): each object is jittered by up to
  ``jitter`` pixels inside its cell, and the background is a seeded dark noise texture;
* **caption-only content** (the image never shows it): the objects are listed in a random
  order, after one of several openers ("there is", "this image shows", ...), with "big" for
  "large" half of the time.

So the caption no longer determines the image, nor the image the caption: the unique factors of
DIVA have something to hold. Every sample is a pure function of ``(seed, index)``.

**Disjoint sets by construction** (``split_of``): a scene (its objects with shape, colour, size
and cell) belongs to exactly one split, by a hash of its canonical description, so the
pre-training, post-training, validation and evaluation sets can never share a scene, whatever
their seeds and sizes. ``split_indices`` lists the sample indices of one split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diva_lightning.data.shapes import ShapesWorld, _sample_seed, cell_name, draw_objects

SIZES = {"small": 0.25, "large": 0.42}  # half extent, as a fraction of the cell
OPENERS = ("", "there is ", "this image shows ", "a picture of ", "an image of ")
# Buckets 16..19 were the only ones scored while the world was calibrated (issue #17's first
# calibration runs): they are the validation split, and the evaluation split is buckets no run
# ever scored or trained on.
SPLITS = {
    "pretrain": range(0, 12),
    "post": range(12, 14),
    "eval": range(14, 16),
    "val": range(16, 20),
}
SPLIT_BUCKETS = 20


@dataclass
class ShapesWorldV2(ShapesWorld):
    """World v2 (see module docstring). Base arguments are documented on ``ShapesWorld``.

    Args:
        sizes: size vocabulary (keys of ``SIZES``).
        jitter: largest offset of an object from its cell centre, in pixels (image only).
        noise: largest background intensity per channel of the noise texture (image only).
        phrasing: vary the caption (order, opener, "big"); False gives the canonical caption.
    """

    grid: int = 4
    max_objects: int = 4
    sizes: tuple[str, ...] = tuple(SIZES)
    jitter: int = 1
    noise: int = 24
    phrasing: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown:
            raise ValueError(f"ShapesWorldV2: unknown sizes {unknown}")

    # ---- ground truth ------------------------------------------------------------------------
    def objects(self, index: int) -> list[dict]:
        """Shape, colour, size, cell, jitter (and the centre and box they give), cell order."""
        rng = random.Random(_sample_seed(self.seed, index))
        count = rng.randint(self.min_objects, self.max_objects)
        cells = sorted(rng.sample(range(self.grid**2), count))
        objects = []
        for cell in cells:
            row, col = divmod(cell, self.grid)
            shape, colour, size = (
                rng.choice(self.shapes),
                rng.choice(self.colours),
                rng.choice(self.sizes),
            )
            offset = (
                rng.randint(-self.jitter, self.jitter),
                rng.randint(-self.jitter, self.jitter),
            )
            objects.append(self.place(shape, colour, row, col, size=size, offset=offset))
        return objects

    def place(
        self, shape: str, colour: str, row: int, col: int, size: str = "large", offset=(0, 0)
    ) -> dict:
        """The object ``shape`` of ``colour`` and ``size`` in cell ``(row, col)``, its centre
        moved by ``offset`` (dx, dy) pixels."""
        obj = super().place(shape, colour, row, col)
        cx, cy = obj["center"][0] + offset[0], obj["center"][1] + offset[1]
        r = max(1, int(self._cell * SIZES[size]))
        return {**obj, "size": size, "center": [cx, cy], "bbox": [cx - r, cy - r, cx + r, cy + r]}

    @staticmethod
    def canonical(objects: list[dict]) -> str:
        """The scene in a fixed form (cell order, no phrasing): what the split hash reads."""
        parts = [
            f"{o['size']} {o['colour']} {o['shape']} {o['cell'][0]},{o['cell'][1]}"
            for o in sorted(objects, key=lambda o: tuple(o["cell"]))
        ]
        return "; ".join(parts)

    def split_of(self, objects: list[dict]) -> str:
        """The split a scene belongs to (``SPLITS``), by a hash of its canonical form."""
        digest = hashlib.blake2b(self.canonical(objects).encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest, "little") % SPLIT_BUCKETS
        return next(name for name, buckets in SPLITS.items() if bucket in buckets)

    def split_indices(self, split: str, count: int, start: int = 0) -> list[int]:
        """The first ``count`` sample indices from ``start`` whose scene is in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        indices, index = [], start
        while len(indices) < count:
            if self.split_of(self.objects(index)) == split:
                indices.append(index)
            index += 1
        return indices

    # ---- the two flows' views ------------------------------------------------------------------
    def describe(self, objects: list[dict], rng: random.Random | None = None) -> str:
        """Caption of ``objects``; with ``rng`` (and ``phrasing``), a random phrasing of it."""
        objs = sorted(objects, key=lambda o: tuple(o["cell"]))
        opener, big = "", False
        if rng is not None and self.phrasing:
            rng.shuffle(objs)
            opener, big = rng.choice(OPENERS), rng.random() < 0.5
        article = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
        parts = []
        for o in objs:
            size = "big" if big and o["size"] == "large" else o["size"]
            where = cell_name(*o["cell"], self.grid)
            parts.append(f"{article(size)} {size} {o['colour']} {o['shape']} at the {where}")
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return opener + text + "."

    def render(self, objects: list[dict], noise_seed: int | None = None) -> Image.Image:
        """Draw ``objects``; with ``noise_seed``, over the seeded background texture."""
        image = Image.new("RGB", (self.image_size, self.image_size), self.background)
        if noise_seed is not None and self.noise > 0:
            rng = np.random.default_rng(noise_seed)
            texture = rng.integers(0, self.noise + 1, (self.image_size, self.image_size, 3))
            image = Image.fromarray(texture.astype(np.uint8), "RGB")
        draw_objects(image, objects)
        return image

    def sample(self, index: int) -> tuple[Image.Image, str, dict]:
        """(image, caption, meta): the caption's phrasing and the image's noise are seeded by
        ``(seed, index)`` on streams of their own."""
        objects = self.objects(index)
        phrasing = random.Random(_sample_seed(self.seed, index) ^ 0x5EED)
        caption = self.describe(objects, phrasing)
        meta = {"caption": caption, "objects": objects, "seed": self.seed, "index": index,
                "world": "v2", "split": self.split_of(objects)}  # fmt: skip
        return self.render(objects, noise_seed=_sample_seed(self.seed, index)), caption, meta
