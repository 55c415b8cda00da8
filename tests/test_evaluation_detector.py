"""The shapes-world detector: near-perfect on ground truth, and each corruption lowers exactly
the scores it should."""

import numpy as np
import pytest

from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.evaluation.shapes.detector import ShapesDetector, connected_components
from diva_lightning.evaluation.shapes.scores import object_scores

WORLD = ShapesWorld(seed=7)
N = 120


def score(images, truths, detector=None):
    detector = detector or ShapesDetector(WORLD)
    found = [[d.as_object(WORLD.grid) for d in detector.detect(img)] for img in images]
    return object_scores(found, truths)


@pytest.fixture(scope="module")
def samples():
    objects = [WORLD.objects(i) for i in range(N)]
    images = [np.asarray(WORLD.render(o)) for o in objects]
    return images, objects


def test_ground_truth_is_detected_perfectly(samples):
    images, objects = samples
    s = score(images, objects)
    assert s["object"] == 1.0 and s["exact"] == 1.0 and s["count"] == 1.0


def test_float_images_and_pil_images_agree(samples):
    images, objects = samples
    detector = ShapesDetector(WORLD)
    for image, obj in zip(images[:10], objects[:10], strict=True):
        as_float = detector.detect(image.astype(np.float32) / 255.0)
        as_pil = detector.detect(WORLD.render(obj))
        assert [(d.colour, d.shape, d.cell) for d in as_float] == [
            (d.colour, d.shape, d.cell) for d in as_pil
        ]


def test_noise_lowers_every_score(samples):
    images, objects = samples
    rng = np.random.default_rng(0)
    noisy = [np.clip(i + rng.normal(0, 120, i.shape), 0, 255).astype(np.uint8) for i in images]
    s = score(noisy, objects)
    assert s["exact"] < 0.2 and s["count"] < 0.3


def test_swapped_colours_hit_colour_only(samples):
    images, objects = samples
    swapped = [img[:, :, ::-1].copy() for img in images]  # RGB -> BGR: red turns blue, ...
    s = score(swapped, objects)
    assert s["position"] == 1.0 and s["shape"] == 1.0 and s["count"] == 1.0
    assert s["colour"] < 0.5


def test_changed_shapes_hit_shape_only(samples):
    _, objects = samples
    other = {"circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "circle"}
    changed = [[{**o, "shape": other[o["shape"]]} for o in objs] for objs in objects]
    images = [np.asarray(WORLD.render(o)) for o in changed]
    s = score(images, objects)
    assert s["shape"] == 0.0 and s["colour"] == 1.0 and s["position"] == 1.0


def test_erased_objects_lower_position_and_count(samples):
    images, objects = samples
    erased = [img.copy() for img in images]
    for img in erased:
        img[:, : WORLD.image_size // 3] = 0  # the left column of cells is empty now
    s = score(erased, objects)
    left = sum(o["cell"][1] == 0 for objs in objects for o in objs)
    total = sum(len(objs) for objs in objects)
    assert s["position"] == pytest.approx(1 - left / total)
    assert s["count"] < 1.0


def test_shifted_objects_are_still_recognised(samples):
    images, objects = samples
    shifted = [np.roll(img, 1, axis=1) for img in images]  # one pixel to the right
    assert score(shifted, objects)["object"] == 1.0


def test_connected_components_eight_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 4:6] = True
    sizes = sorted(len(c) for c in connected_components(mask))
    assert sizes == [2, 4]


def test_wrong_image_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        ShapesDetector(WORLD).detect(np.zeros((16, 16, 3), dtype=np.uint8))
