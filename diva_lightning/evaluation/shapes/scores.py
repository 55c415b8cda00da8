"""Object-level scores of the shapes world, shared by understanding and generation.

Both sides reduce to the same comparison: a list of predicted objects (parsed from a generated
caption, or detected in a generated image) against the ground-truth objects. The world puts at
most one object per cell, so objects are matched by cell:

* ``position``: fraction of true objects with a predicted object in their cell;
* ``colour`` / ``shape``: fraction of true objects whose matched prediction has the right
  colour / shape (no match = wrong);
* ``count``: fraction of samples with as many predicted objects as true ones;
* ``object``: fraction of true objects right in all three attributes;
* ``exact``: fraction of samples with every object right and the right count (GenEval's
  per-image "correct");
* ``score``: mean of position, colour, shape and count (the headline number, like GenEval's
  mean over its tasks);
* world v2 objects also carry a ``size``: ``size`` is its accuracy, ``score`` averages it with
  the other four, and ``object`` / ``exact`` need it right too.

``bag_scores`` ignores binding: per sample, the fraction of the true colours, shapes and sizes
found anywhere among the predictions (multisets). Swapping colours between two objects keeps
the bags and breaks ``object``: together they separate knowing the attributes from binding them.

Multiple choice (understanding): the model ranks the true caption among distractors that differ
in one attribute by its likelihood; ``mc_accuracy`` is the fraction of samples whose true caption
ranks first, ``mc_<kind>`` the pairwise accuracy against each kind of distractor.
"""

from __future__ import annotations

from collections.abc import Sequence

ATTRIBUTES = ("position", "colour", "shape", "count")


def match_objects(predicted: Sequence[dict], truth: Sequence[dict]) -> dict[str, float]:
    """Counts for one sample: per true object position/colour/shape/object hits, and count."""
    by_cell: dict[tuple, dict] = {}
    for obj in predicted:  # the first prediction in a cell is the one scored
        if obj.get("cell") is not None:
            by_cell.setdefault(tuple(obj["cell"]), obj)
    hits = {"position": 0, "colour": 0, "shape": 0, "size": 0, "object": 0}
    for obj in truth:
        guess = by_cell.get(tuple(obj["cell"]))
        if guess is None:
            continue
        colour, shape = guess["colour"] == obj["colour"], guess["shape"] == obj["shape"]
        size = guess.get("size") == obj["size"] if "size" in obj else True
        hits["position"] += 1
        hits["colour"] += colour
        hits["shape"] += shape
        hits["size"] += size
        hits["object"] += colour and shape and size
    count_ok = len(predicted) == len(truth)
    return {
        **hits,
        "objects": len(truth),
        "count": float(count_ok),
        "exact": float(count_ok and hits["object"] == len(truth)),
    }


def object_scores(
    predicted: Sequence[Sequence[dict]], truth: Sequence[Sequence[dict]]
) -> dict[str, float]:
    """Aggregate ``match_objects`` over samples -> the scores of the module docstring."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} samples")
    if not truth:
        raise ValueError("object_scores needs at least one sample")
    rows = [match_objects(p, t) for p, t in zip(predicted, truth, strict=True)]
    objects = sum(r["objects"] for r in rows)
    scores = {k: sum(r[k] for r in rows) / objects for k in ("position", "colour", "shape")}
    if any("size" in o for sample in truth for o in sample):
        scores["size"] = sum(r["size"] for r in rows) / objects
    scores["object"] = sum(r["object"] for r in rows) / objects
    scores["count"] = sum(r["count"] for r in rows) / len(rows)
    scores["exact"] = sum(r["exact"] for r in rows) / len(rows)
    attributes = [*ATTRIBUTES, "size"] if "size" in scores else ATTRIBUTES
    scores["score"] = sum(scores[k] for k in attributes) / len(attributes)
    return scores


def bag_scores(
    predicted: Sequence[Sequence[dict]], truth: Sequence[Sequence[dict]]
) -> dict[str, float]:
    """Binding-blind recall of the true colours, shapes (and sizes), as multisets -> ``bag_<a>``
    per attribute and ``bag_score`` their mean."""
    attributes = [a for a in ("colour", "shape", "size") if any(a in o for t in truth for o in t)]
    found = {a: 0 for a in attributes}
    total = sum(len(t) for t in truth)
    for guess, true in zip(predicted, truth, strict=True):
        for a in attributes:
            pool = [o.get(a) for o in guess]
            for obj in true:
                if obj[a] in pool:
                    pool.remove(obj[a])
                    found[a] += 1
    scores = {f"bag_{a}": found[a] / total for a in attributes}
    scores["bag_score"] = sum(scores.values()) / len(attributes)
    return scores


def multiple_choice_scores(
    true_scores: Sequence[float], distractor_scores: Sequence[dict[str, float]]
) -> dict[str, float]:
    """Likelihoods of true captions (N,) and of each sample's distractors {kind: score} ->
    ``mc_accuracy`` (true strictly best) and ``mc_<kind>`` (true beats that distractor)."""
    if len(true_scores) != len(distractor_scores) or not true_scores:
        raise ValueError("need one distractor set per true caption, and at least one")
    kinds = sorted({k for d in distractor_scores for k in d})
    best = [
        all(t > s for s in d.values()) for t, d in zip(true_scores, distractor_scores, strict=True)
    ]
    scores = {"mc_accuracy": sum(best) / len(best)}
    for kind in kinds:
        pairs = [
            (t, d[kind]) for t, d in zip(true_scores, distractor_scores, strict=True) if kind in d
        ]
        scores[f"mc_{kind}"] = sum(t > s for t, s in pairs) / len(pairs)
    return scores
