"""A synthetic "shapes world": images of 1-3 coloured shapes on a grid, with captions.

Used by the tests, the embedded tiny default and the data benchmark. Every sample is a pure
function of ``(seed, index)``: the same seed gives byte-identical images, captions and object
lists. Objects sit in distinct cells of a ``grid x grid`` layout and are named by the cell
("top left", "center", ...); the caption lists them in cell order, e.g.

    "a red circle at the top left and a blue square at the center."

All caption words are in ``diva_lightning.backbones.tokenizers.WORDS``, so the tiny word-level
tokenizer never produces ``<unk>`` on this world. Shapes are drawn without anti-aliasing, so the
pixel at an object's centre has exactly the object's colour (when stored losslessly, e.g. PNG).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 190, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 10),
    "cyan": (20, 220, 230),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond")
ROW_NAMES_3 = ("top", "middle", "bottom")
COL_NAMES_3 = ("left", "center", "right")
ROW_NAMES_4 = ("top", "upper", "lower", "bottom")
COL_NAMES_4 = ("far left", "left", "right", "far right")
NUMBER_WORDS = ("one", "two", "three", "four", "five")


def cell_name(row: int, col: int, grid: int) -> str:
    """Natural name of a grid cell: 3x3 names ("top left", "center", ...), 4x4 names ("upper far
    left", ...), else "row two column one" (number words up to five, digits beyond: digits are
    outside the tiny vocabulary)."""
    if grid == 4:
        return f"{ROW_NAMES_4[row]} {COL_NAMES_4[col]}"
    if grid != 3:
        word = lambda i: NUMBER_WORDS[i] if i < len(NUMBER_WORDS) else str(i + 1)  # noqa: E731
        return f"row {word(row)} column {word(col)}"
    if (row, col) == (1, 1):
        return "center"
    return f"{ROW_NAMES_3[row]} {COL_NAMES_3[col]}"


def draw_objects(image: Image.Image, objects: list[dict]) -> None:
    """Draw ``objects`` (shape, colour, centre, box) onto ``image``, without anti-aliasing."""
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        (cx, cy), fill = obj["center"], PALETTE[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _sample_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"shapes/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class ShapesWorld:
    """Generator of synthetic image-caption pairs.

    Args:
        image_size: square image side in pixels.
        grid: cells per side; objects are centred in distinct cells.
        shapes: shape vocabulary (a subset of ``SHAPES``).
        colours: colour vocabulary (keys of ``PALETTE``).
        min_objects: fewest objects per image.
        max_objects: most objects per image (at most ``grid * grid``).
        background: RGB background colour.
        seed: global seed; sample ``i`` depends only on ``(seed, i)``.
    """

    image_size: int = 32
    grid: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(PALETTE)
    min_objects: int = 1
    max_objects: int = 3
    background: tuple[int, int, int] = (0, 0, 0)
    seed: int = 0
    _cell: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES]
        unknown += [c for c in self.colours if c not in PALETTE]
        if unknown:
            raise ValueError(f"ShapesWorld: unknown shapes/colours {unknown}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError("ShapesWorld: need 1 <= min_objects <= max_objects <= grid**2")
        self._cell = self.image_size / self.grid

    def objects(self, index: int) -> list[dict]:
        """Ground truth of sample ``index``: shape, colour, cell, name, centre and box, cell order."""
        rng = random.Random(_sample_seed(self.seed, index))
        count = rng.randint(self.min_objects, self.max_objects)
        cells = sorted(rng.sample(range(self.grid**2), count))
        return [self._object(rng, cell) for cell in cells]

    def _object(self, rng: random.Random, cell: int) -> dict:
        row, col = divmod(cell, self.grid)
        shape = rng.choice(self.shapes)  # shape before colour: the world's random stream
        return self.place(shape, rng.choice(self.colours), row, col)

    def place(self, shape: str, colour: str, row: int, col: int) -> dict:
        """The object ``shape`` of ``colour`` in cell ``(row, col)``: centre, box and name."""
        cx = int((col + 0.5) * self._cell)  # pixel column of the centre
        cy = int((row + 0.5) * self._cell)
        r = max(1, int(self._cell * 0.35))  # half extent
        return {
            "shape": shape,
            "colour": colour,
            "cell": [row, col],
            "position": cell_name(row, col, self.grid),
            "center": [cx, cy],
            "bbox": [cx - r, cy - r, cx + r, cy + r],
        }

    def render(self, objects: list[dict]) -> Image.Image:
        """Draw ``objects`` (as returned by ``objects``) into an RGB image."""
        image = Image.new("RGB", (self.image_size, self.image_size), self.background)
        draw_objects(image, objects)
        return image

    @staticmethod
    def describe(objects: list[dict]) -> str:
        """Caption listing the objects: "a red circle at the top left and an orange ..."."""
        article = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
        parts = [
            f"{article(o['colour'])} {o['colour']} {o['shape']} at the {o['position']}"
            for o in objects
        ]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text + "."

    def sample(self, index: int) -> tuple[Image.Image, str, dict]:
        """(image, caption, meta) of sample ``index``; meta is what the shard's json holds."""
        objects = self.objects(index)
        caption = self.describe(objects)
        meta = {"caption": caption, "objects": objects, "seed": self.seed, "index": index}
        return self.render(objects), caption, meta
