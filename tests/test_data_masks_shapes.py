"""Generation masks (ratio range, rounding, determinism, contiguous blocks) and the shapes world."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from diva_lightning.backbones.tokenizers import WORDS
from diva_lightning.data.masks import block_shape, choose_prompt, generation_mask, mask_count
from diva_lightning.data.shapes import PALETTE, ShapesWorld
from tests.data_helpers import synthetic_shards

GRIDS = [(4, 4), (8, 8), (3, 5), (2, 9), (16, 16)]
KEYS = [f"{i:09d}" for i in range(40)]


def components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a 2D bool mask."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count, stack = count + 1, [start]
        while stack:
            r, c = stack.pop()
            if not (0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]) or seen[r, c]:
                continue
            if mask[r, c]:
                seen[r, c] = True
                stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


@pytest.mark.parametrize("pattern", ["dispersed", "contiguous"])
@pytest.mark.parametrize("grid", GRIDS)
def test_mask_ratio_stays_in_range(grid, pattern):
    n = grid[0] * grid[1]
    ratios = [
        generation_mask(k, 0, seed=1, grid=grid, pattern=pattern).sum().item() / n for k in KEYS
    ]
    assert min(ratios) >= 0.2 and max(ratios) <= 0.6
    if n >= 64:
        assert max(ratios) - min(ratios) > 0.2  # the ratio really varies over U[0.2, 0.6]


def test_mask_count_rounds_half_up_and_clamps():
    assert mask_count(0.5, 5, 0.2, 0.6) == 3  # 2.5 -> 3 (round half up, not to even)
    assert mask_count(0.3, 10, 0.2, 0.6) == 3
    assert mask_count(0.2, 16, 0.2, 0.6) == 4  # 3.2 -> 3, clamped up to ceil(0.2 * 16)
    assert mask_count(0.6, 16, 0.2, 0.6) == 9  # 9.6 -> 10, clamped down to floor(0.6 * 16)
    assert mask_count(0.3, 2, 0.2, 0.6) == 1  # empty integer range: at least one token


def test_masks_are_pure_functions_of_seed_key_epoch():
    grid = (8, 8)
    first = [generation_mask(k, 3, seed=7, grid=grid) for k in KEYS]
    again = [generation_mask(k, 3, seed=7, grid=grid) for k in reversed(KEYS)][::-1]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    other_epoch = [generation_mask(k, 4, seed=7, grid=grid) for k in KEYS]
    other_seed = [generation_mask(k, 3, seed=8, grid=grid) for k in KEYS]
    assert all((a != b).any() for a, b in zip(first, other_epoch, strict=True))
    assert all((a != b).any() for a, b in zip(first, other_seed, strict=True))
    assert len({tuple(m.tolist()) for m in first}) == len(KEYS)  # keys give different masks


@pytest.mark.parametrize("grid", GRIDS)
def test_contiguous_mask_is_one_block(grid):
    rows, cols = grid
    for key in KEYS:
        mask = generation_mask(key, 0, seed=0, grid=grid, pattern="contiguous").numpy()
        block = mask.reshape(rows, cols)
        k = int(mask.sum())
        assert components(block) == 1
        r, c = np.nonzero(block)
        h, w = r.max() - r.min() + 1, c.max() - c.min() + 1
        assert (h, w) == block_shape(grid, k)
        box = block[r.min() : r.max() + 1, c.min() : c.max() + 1]
        assert box[:-1].all()  # every row of the block but the last is full
        assert box[-1, : k - (h - 1) * w].all()  # the last row filled from the left


def test_dispersed_masks_are_not_blocks():
    blocks = [
        components(generation_mask(k, 0, seed=0, grid=(8, 8)).numpy().reshape(8, 8)) for k in KEYS
    ]
    assert np.mean(blocks) > 3


def test_prompt_choice_is_seeded():
    prompts = ["describe this image.", "what is in the picture?", "caption this photo."]
    chosen = [choose_prompt(k, 0, 0, prompts) for k in KEYS]
    assert chosen == [choose_prompt(k, 0, 0, prompts) for k in KEYS]
    assert set(chosen) == set(prompts)
    assert choose_prompt("x", 0, 0, ["only"]) == "only"


# ---- the shapes world ------------------------------------------------------------------------
def test_shapes_world_is_deterministic():
    a, b, c = ShapesWorld(seed=3), ShapesWorld(seed=3), ShapesWorld(seed=4)
    for i in range(20):
        (ia, ca, ma), (ib, cb, mb) = a.sample(i), b.sample(i)
        assert ca == cb and ma == mb and ia.tobytes() == ib.tobytes()
    assert [a.sample(i)[1] for i in range(20)] != [c.sample(i)[1] for i in range(20)]


def test_objects_render_where_the_json_says(tmp_path):
    """Read back the PNG shards: the centre pixel of each object has the object's colour, and
    the caption names exactly these objects in cell order, with in-vocabulary words."""
    shards = synthetic_shards(tmp_path, 30, max_count=30, seed=5, synthetic_image_size=48)
    world, counts, vocabulary = ShapesWorld(image_size=48, seed=5), [], set(WORDS)
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert image.shape == (48, 48, 3)
        for obj in meta["objects"]:
            cx, cy = obj["center"]
            assert tuple(image[cy, cx]) == PALETTE[obj["colour"]]
            assert (image[0, 0] == 0).all()  # background
        caption = sample["txt"].decode()
        assert caption == meta["caption"] == world.describe(world.objects(meta["index"]))
        for obj in meta["objects"]:
            assert f"{obj['colour']} {obj['shape']} at the {obj['position']}" in caption
        assert set(caption.replace(".", " .").replace(",", " ,").split()) <= vocabulary
        counts.append(len(meta["objects"]))
    assert len(counts) == 30 and set(counts) == {1, 2, 3}


def test_cell_names_and_object_placement():
    world = ShapesWorld(image_size=30, seed=0)
    for i in range(30):
        for obj in world.objects(i):
            row, col = obj["cell"]
            cx, cy = obj["center"]
            assert math.floor(cx / 10) == col and math.floor(cy / 10) == row
    names = {o["position"] for i in range(200) for o in world.objects(i)}
    assert {"top left", "center", "bottom right", "middle left"} <= names
