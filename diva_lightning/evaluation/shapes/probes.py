"""Probes with room to move, for world v2: a POPE-style existence probe and GenEval-style
generation categories.

**POPE-style** (Li et al. 2023, "Evaluating Object Hallucination"): balanced yes/no questions
"is there a small red circle?". Each sample gets one question about an object it holds (answer
"yes") and one about an object it does not hold (answer "no"), the latter adversarial: it shares
two of the three attributes (size, colour, shape) with an object that is there. Scores are
POPE's: accuracy, precision, recall, F1 of "yes", and the share of "yes" answers.

**GenEval-style** categories (Ghosh et al. 2023), each a set of prompts whose images are checked
by the programmatic detector: ``single_object`` (one object; the right shape, nothing else),
``two_objects`` (both shapes present, two objects), ``counting`` (three or four objects: the
right number), ``colors`` (one object of the right colour), ``position`` (two objects, each of
the right shape in its cell) and ``color_attr`` (two objects of different colours, each shape
with its own colour). ``overall`` is the mean over categories, like GenEval's.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from diva_lightning.data.shapes import ShapesWorld

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def _phrase(obj: dict) -> str:
    size = f"{obj['size']} " if obj.get("size") else ""
    return f"{size}{obj['colour']} {obj['shape']}"


def pope_questions(objects: list[dict], world: ShapesWorld, seed: int) -> list[tuple[str, str]]:
    """One "yes" and one adversarial "no" question about a scene -> [(question, answer)]."""
    rng = random.Random(seed)
    present = {_phrase(o) for o in objects}
    positive = rng.choice(objects)
    options = []
    for obj in objects:
        for attribute, values in (
            ("colour", world.colours),
            ("shape", world.shapes),
            ("size", getattr(world, "sizes", ())),
        ):
            for value in values:
                changed = {**obj, attribute: value}
                if _phrase(changed) not in present:
                    options.append(changed)
    negative = rng.choice(options)
    ask = lambda o: f"is there {'an' if _phrase(o)[0] in 'aeiou' else 'a'} {_phrase(o)}?"  # noqa: E731
    return [(ask(positive), "yes"), (ask(negative), "no")]


def pope_scores(answers: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """POPE's scores of predicted "yes"/"no" answers against the true ones."""
    if len(answers) != len(predicted) or not answers:
        raise ValueError("need one prediction per answer, and at least one")
    tp = sum(a == "yes" and p == "yes" for a, p in zip(answers, predicted, strict=True))
    fp = sum(a == "no" and p == "yes" for a, p in zip(answers, predicted, strict=True))
    fn = sum(a == "yes" and p != "yes" for a, p in zip(answers, predicted, strict=True))
    correct = sum(a == p for a, p in zip(answers, predicted, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "pope_accuracy": correct / len(answers),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1": f1,
        "pope_yes_ratio": sum(p == "yes" for p in predicted) / len(predicted),
    }


def category_of_scene(objects: list[dict]) -> list[str]:
    """The GenEval-style categories a scene can serve as a prompt for."""
    n = len(objects)
    if n == 1:
        return ["single_object", "colors"]
    if n == 2:
        found = ["two_objects", "position"]
        if objects[0]["colour"] != objects[1]["colour"]:
            found.append("color_attr")
        return found
    return ["counting"]


def geneval_correct(category: str, detected: list[dict], truth: list[dict]) -> bool:
    """Whether the detected objects satisfy the prompt of ``category`` (see module docstring)."""
    shapes = Counter(o["shape"] for o in truth)  # multisets: an unnamed blob (None) compares
    if category == "single_object":
        return len(detected) == 1 and detected[0]["shape"] == truth[0]["shape"]
    if category == "colors":
        return len(detected) == 1 and detected[0]["colour"] == truth[0]["colour"]
    if category == "two_objects":
        return len(detected) == 2 and Counter(o["shape"] for o in detected) == shapes
    if category == "counting":
        return len(detected) == len(truth)
    by_cell = {tuple(o["cell"]): o for o in detected}
    if category == "position":
        return len(detected) == 2 and all(
            by_cell.get(tuple(t["cell"]), {}).get("shape") == t["shape"] for t in truth
        )
    if category == "color_attr":
        pairs = Counter((o["shape"], o["colour"]) for o in detected)
        return len(detected) == 2 and pairs == Counter((t["shape"], t["colour"]) for t in truth)
    raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")


def geneval_scores(
    categories: Sequence[str], detected: Sequence[list[dict]], truth: Sequence[list[dict]]
) -> dict[str, float]:
    """Per-category accuracy (``gen_<category>``) and ``gen_overall``, their mean."""
    rows: dict[str, list[bool]] = {}
    for category, found, true in zip(categories, detected, truth, strict=True):
        rows.setdefault(category, []).append(geneval_correct(category, found, true))
    scores = {f"gen_{c}": sum(r) / len(r) for c, r in rows.items()}
    scores["gen_overall"] = sum(scores.values()) / len(scores)
    return scores


def geneval_prompts(world, per_category: int, split: str = "eval") -> list[tuple[str, list, str]]:
    """``per_category`` prompts per category from ``split`` of a world v2, in canonical phrasing
    -> [(prompt, objects, category)]; a scene serves one category at most."""
    need = {c: per_category for c in CATEGORIES}
    prompts, index = [], 0
    while any(need.values()):
        objects = world.objects(index)
        index += 1
        if world.split_of(objects) != split:
            continue
        open_ = [c for c in category_of_scene(objects) if need[c]]
        if open_:
            category = min(open_, key=lambda c: per_category - need[c])  # fill evenly
            need[category] -= 1
            prompts.append((world.describe(objects), objects, category))
    return prompts
