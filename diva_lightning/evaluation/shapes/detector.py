"""A programmatic object detector for the synthetic shapes world (GenEval-style scoring).

GenEval scores generated images with an object detector and a colour classifier. The shapes
world (``diva_lightning.data.shapes``) has exact ground truth, so its detector can be written
down instead of learned:

1. colour segmentation: every pixel takes the nearest colour among the background and the
   palette (RGB distance); non-background pixels are foreground;
2. connected components (8-connectivity) of each colour's pixels; components smaller than
   ``min_area`` pixels are noise and dropped;
3. each component belongs to the grid cell of its centroid; components in one cell are merged
   (the world puts at most one object per cell);
4. colour = majority palette colour of the object's pixels; shape = the template (each shape
   drawn by the world's own renderer) with the highest IoU over small shifts around the
   centroid, ``None`` when no template reaches ``min_iou``. In world v2 there is one template
   per shape and size, so the best template also names the size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from diva_lightning.data.shapes import PALETTE, ShapesWorld, cell_name

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass
class Detection:
    """One detected object."""

    colour: str
    shape: str | None  # None: no template matched well enough
    cell: tuple[int, int]  # (row, col) of the centroid's grid cell
    area: int  # pixels
    iou: float  # IoU with the chosen shape's template
    size: str | None = None  # world v2: the size of the best template

    def as_object(self, grid: int) -> dict:
        """The world's object format (``shape``, ``colour``, ``cell``, ``position``, v2 ``size``)."""
        obj = {
            "shape": self.shape,
            "colour": self.colour,
            "cell": list(self.cell),
            "position": cell_name(*self.cell, grid),
        }
        if self.size is not None:
            obj["size"] = self.size
        return obj


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool (H, W) mask -> list of (n, 2) arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy, dx in NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(np.array(pixels))
    return components


class ShapesDetector:
    """Detect the objects of a shapes-world image.

    Args:
        world: the world the images come from (image size, grid, background, shape sizes).
        min_area: smallest component kept, in pixels (smaller ones are noise).
        min_iou: smallest template IoU that names a shape.
        max_shift: the template is tried at every offset up to this many pixels from the centroid.
    """

    def __init__(
        self, world: ShapesWorld, min_area: int = 6, min_iou: float = 0.5, max_shift: int = 1
    ):
        self.world, self.min_area, self.min_iou, self.max_shift = (
            world,
            min_area,
            min_iou,
            max_shift,
        )
        self.colour_names = ["background", *world.colours]
        rgb = [world.background] + [PALETTE[c] for c in world.colours]
        self.rgb = np.array(rgb, dtype=np.float32)  # (C + 1, 3)
        sizes = getattr(world, "sizes", (None,))
        self.templates = {
            (shape, size): self._template(shape, size) for shape in world.shapes for size in sizes
        }
        self.cell_size = world.image_size / world.grid

    def _template(self, shape: str, size: str | None = None) -> np.ndarray:
        """Binary mask (H, W) of ``shape`` (of ``size``, world v2) drawn by the world."""
        middle = self.world.grid // 2
        extra = {} if size is None else {"size": size}
        obj = self.world.place(shape, self.world.colours[0], middle, middle, **extra)
        image = np.asarray(self.world.render([obj]), dtype=np.float32)
        mask = self._labels(image) > 0
        ys, xs = np.nonzero(mask)
        return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]

    def _labels(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB 0..255 -> (H, W) index into ``colour_names`` (0 = background)."""
        distance = ((image[:, :, None, :] - self.rgb) ** 2).sum(-1)  # (H, W, C + 1)
        return distance.argmin(-1)

    def detect(self, image) -> list[Detection]:
        """Objects of one image: PIL image, or array (H, W, 3) uint8 / float in [0, 1]."""
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            pixels = np.clip(pixels * 255.0, 0, 255)
        pixels = pixels.astype(np.float32)
        size = self.world.image_size
        if pixels.shape != (size, size, 3):
            raise ValueError(f"image must be ({size}, {size}, 3) RGB, got {pixels.shape}")
        labels = self._labels(pixels)
        by_cell: dict[tuple[int, int], list[np.ndarray]] = {}
        components = [  # per colour: touching objects of different colours stay apart
            c
            for label in np.unique(labels[labels > 0])
            for c in connected_components(labels == label)
        ]
        for component in components:
            if len(component) < self.min_area:
                continue
            cy, cx = component.mean(0)
            cell = (self._cell_index(cy), self._cell_index(cx))
            by_cell.setdefault(cell, []).append(component)
        detections = [
            self._describe(np.concatenate(c), cell, labels) for cell, c in by_cell.items()
        ]
        return sorted(detections, key=lambda d: d.cell)

    def _cell_index(self, coordinate: float) -> int:
        return min(self.world.grid - 1, max(0, int(coordinate / self.cell_size)))

    def _describe(self, pixels: np.ndarray, cell: tuple[int, int], labels: np.ndarray) -> Detection:
        votes = np.bincount(labels[pixels[:, 0], pixels[:, 1]], minlength=len(self.colour_names))
        colour = self.colour_names[int(votes[1:].argmax()) + 1]
        mask = np.zeros(labels.shape, dtype=bool)
        mask[pixels[:, 0], pixels[:, 1]] = True
        centre = pixels.mean(0)
        scores = {key: self._best_iou(mask, centre, t) for key, t in self.templates.items()}
        (shape, size), iou = max(scores.items(), key=lambda kv: kv[1])
        named = iou >= self.min_iou
        return Detection(
            colour, shape if named else None, cell, len(pixels), iou, size if named else None
        )

    def _best_iou(self, mask: np.ndarray, centre: np.ndarray, template: np.ndarray) -> float:
        """Highest IoU of ``template`` placed with its centroid near ``centre``."""
        ty, tx = np.nonzero(template)
        base_y = int(round(centre[0] - ty.mean()))
        base_x = int(round(centre[1] - tx.mean()))
        best = 0.0
        for dy in range(-self.max_shift, self.max_shift + 1):
            for dx in range(-self.max_shift, self.max_shift + 1):
                placed = np.zeros_like(mask)
                ys, xs = ty + base_y + dy, tx + base_x + dx
                keep = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
                placed[ys[keep], xs[keep]] = True
                union = (placed | mask).sum()
                best = max(best, float((placed & mask).sum() / union) if union else 0.0)
        return best
