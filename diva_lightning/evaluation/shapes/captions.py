"""Shapes-world captions: parsing generated text into objects, and one-attribute distractors.

Captions follow ``ShapesWorld.describe``: ``"a red circle at the top left, a blue square at the
center and a green diamond at the bottom right."``. ``parse_caption`` reads decoded model text
leniently (any spacing around punctuation, ``a``/``an``): every ``a|an ... at the ...`` part is
one predicted object; a colour, shape or position word outside the world's vocabulary makes
that attribute ``None`` (scored wrong), never an exception.

``distractors`` builds the multiple-choice alternatives of a true caption: each differs from it
in exactly one attribute (colour, shape or position of one object, or the object count).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from diva_lightning.data.shapes import ShapesWorld, cell_name

DISTRACTOR_KINDS = ("colour", "shape", "position", "count")
BINDING_KINDS = ("bind_colour", "bind_shape", "bind_size")  # swap an attribute between objects
SIZE_WORDS = {"small": "small", "large": "large", "big": "large"}
_PART = re.compile(
    r"(?:^|\s)an?\s+(?:(?P<size>small|large|big)\s+)?(?P<colour>\S+)\s+(?P<shape>\S+)"
    r"\s+at\s+the\s+(?P<where>.+)$"
)


def position_cells(world: ShapesWorld) -> dict[str, tuple[int, int]]:
    """Position phrase -> (row, col) of every cell of the world's grid."""
    return {
        cell_name(row, col, world.grid): (row, col)
        for row in range(world.grid)
        for col in range(world.grid)
    }


def parse_caption(text: str, world: ShapesWorld) -> list[dict]:
    """Decoded caption -> objects ``{shape, colour, cell, position}`` (None where unknown)."""
    cells = position_cells(world)
    sentence = text.lower().split(".")[0]  # the first sentence: text after it is ignored
    parts = re.split(r"\s*,\s*|\s+and\s+", sentence.strip())
    objects = []
    for part in parts:
        match = _PART.search(part.strip())  # search: world v2 captions may open with a phrase
        if match is None:
            continue
        where = " ".join(match["where"].split())
        cell = cells.get(where)
        obj = {
            "colour": match["colour"] if match["colour"] in world.colours else None,
            "shape": match["shape"] if match["shape"] in world.shapes else None,
            "cell": list(cell) if cell else None,
            "position": where if cell else None,
        }
        if hasattr(world, "sizes"):  # world v2: "big" is "large"
            obj["size"] = SIZE_WORDS.get(match["size"] or "")
        objects.append(obj)
    return objects


def _empty_cells(objects: list[dict], world: ShapesWorld) -> list[tuple[int, int]]:
    taken = {tuple(o["cell"]) for o in objects}
    every = [(r, c) for r in range(world.grid) for c in range(world.grid)]
    return [cell for cell in every if cell not in taken]


def _other(options, current, rng: random.Random):
    return rng.choice([o for o in options if o != current])


def distractor(objects: list[dict], kind: str, world: ShapesWorld, rng: random.Random) -> str:
    """The caption of ``objects`` with exactly one attribute changed (``kind``)."""
    objs = [dict(o) for o in objects]
    target = rng.randrange(len(objs))
    if kind == "colour":
        objs[target]["colour"] = _other(world.colours, objs[target]["colour"], rng)
    elif kind == "shape":
        objs[target]["shape"] = _other(world.shapes, objs[target]["shape"], rng)
    elif kind == "position":
        row, col = rng.choice(_empty_cells(objs, world))
        objs[target] = world.place(objs[target]["shape"], objs[target]["colour"], row, col)
    elif kind == "count":
        empty = _empty_cells(objs, world)
        can_add = len(objs) < world.max_objects and empty
        can_remove = len(objs) > world.min_objects
        if not (can_add or can_remove):
            raise ValueError(f"no count distractor for {len(objs)} objects in this world")
        if can_remove and (not can_add or rng.random() < 0.5):
            objs.pop(target)
        else:
            row, col = rng.choice(empty)
            objs.append(world.place(rng.choice(world.shapes), rng.choice(world.colours), row, col))
    elif kind in BINDING_KINDS:
        return binding_swap(objs, kind.removeprefix("bind_"), world, rng)
    else:
        raise ValueError(
            f"distractor kind must be one of {DISTRACTOR_KINDS + BINDING_KINDS}, got {kind!r}"
        )
    objs.sort(key=lambda o: tuple(o["cell"]))  # captions list objects in cell order
    return world.describe(objs)


def binding_swap(
    objects: list[dict], attribute: str, world: ShapesWorld, rng: random.Random
) -> str:
    """The caption with ``attribute`` swapped between two objects that differ in it: the same
    bag of colours, shapes and sizes, bound to the wrong objects (a binding distractor)."""
    pairs = [
        (i, j)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
        if objects[i].get(attribute) != objects[j].get(attribute)
    ]
    if not pairs:
        raise ValueError(f"no two objects differ in {attribute}: no binding distractor")
    i, j = rng.choice(pairs)
    objs = [dict(o) for o in objects]
    objs[i][attribute], objs[j][attribute] = objects[j][attribute], objects[i][attribute]
    objs.sort(key=lambda o: tuple(o["cell"]))
    return world.describe(objs)


def binding_kinds(objects: list[dict]) -> tuple[str, ...]:
    """The binding distractor kinds that exist for ``objects`` (two objects must differ)."""
    return tuple(
        kind
        for kind in BINDING_KINDS
        if len({o.get(kind.removeprefix("bind_")) for o in objects}) > 1
    )


def distractors(
    objects: list[dict], world: ShapesWorld, seed: int, kinds=DISTRACTOR_KINDS
) -> dict[str, str]:
    """One distractor caption per kind, seeded (``seed`` should identify the sample)."""
    rng = random.Random(seed)
    return {kind: distractor(objects, kind, world, rng) for kind in kinds}


def world_of_captions(captions: Sequence[str], image_size: int) -> ShapesWorld | None:
    """The shapes world whose grammar parses every caption completely (every object with all
    its attributes), with ``image_size``; None for any other data (no ground truth to score)."""
    from diva_lightning.data.shapes_v2 import ShapesWorldV2

    for world in (ShapesWorldV2(image_size=image_size), ShapesWorld(image_size=image_size)):
        parsed = [parse_caption(c, world) for c in captions]
        if captions and all(p and all(None not in o.values() for o in p) for p in parsed):
            return world
    return None
