"""The shapes-world scores as ``torchmetrics`` metrics, so that they add up across ranks.

The functions in ``scores`` score one process's list of samples. In training, each rank scores
its own share of the samples; these metrics keep the counts behind every score as summed states,
so ``compute()`` gives the value of the whole set on any number of ranks (torchmetrics reduces
the states with ``all_reduce`` when a process group is up).

* ``ObjectScores``: caption attribute accuracy (objects parsed from generated captions) and
  GenEval-style detection (objects found by ``ShapesDetector`` in generated images): the scores
  of ``scores.object_scores``, by the same ``match_objects``.
* ``MultipleChoiceAccuracy``: the true caption's likelihood against its distractors,
  ``scores.multiple_choice_scores``' ``mc_accuracy`` (the true caption strictly best).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric

from diva_lightning.evaluation.shapes.detector import ShapesDetector
from diva_lightning.evaluation.shapes.scores import ATTRIBUTES, match_objects

_OBJECT_COUNTS = ("position", "colour", "shape", "size", "object", "objects", "sized_objects")
_SAMPLE_COUNTS = ("count", "exact", "samples")


class ObjectScores(Metric):
    """Object-level scores of predicted objects against the truth, summed over ranks.

    ``update(predicted, truth)`` takes one list of object dicts per sample (the world's object
    format); ``compute()`` returns the dict of ``scores.object_scores``: ``position``,
    ``colour``, ``shape`` (``size`` in world v2), ``object``, ``count``, ``exact`` and ``score``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in (*_OBJECT_COUNTS, *_SAMPLE_COUNTS):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")  # fmt: skip

    def update(self, predicted: Sequence[Sequence[dict]], truth: Sequence[Sequence[dict]]) -> None:
        if len(predicted) != len(truth):
            raise ValueError(f"{len(predicted)} predictions for {len(truth)} samples")
        for guess, true in zip(predicted, truth, strict=True):
            row = match_objects(guess, true)
            for name in ("position", "colour", "shape", "object", "objects", "count", "exact"):
                getattr(self, name).add_(row[name])
            sized = sum("size" in o for o in true)
            self.size.add_(row["size"] if sized else 0)
            self.sized_objects.add_(sized)
            self.samples.add_(1)

    def compute(self) -> dict[str, Tensor]:
        if self.samples == 0 or self.objects == 0:
            raise ValueError("ObjectScores.compute() before any sample with objects was added")
        scores = {k: getattr(self, k) / self.objects for k in ("position", "colour", "shape")}
        if self.sized_objects > 0:
            scores["size"] = self.size / self.sized_objects
        scores["object"] = self.object / self.objects
        scores["count"] = self.count / self.samples
        scores["exact"] = self.exact / self.samples
        attributes = [*ATTRIBUTES, "size"] if "size" in scores else ATTRIBUTES
        scores["score"] = sum(scores[k] for k in attributes) / len(attributes)
        return {k: v.float() for k, v in scores.items()}


class MultipleChoiceAccuracy(MeanMetric):
    """Fraction of samples whose true caption is strictly likelier than every distractor.

    ``update(true, distractors)``: log-likelihoods ``(B,)`` of the true captions and ``(B, K)``
    of their distractors. A mean of per-sample hits, so torchmetrics' ``MeanMetric`` already
    keeps the sum and the count that add up across ranks.
    """

    def update(self, true: Tensor, distractors: Tensor) -> None:  # type: ignore[override]
        if distractors.dim() != 2 or distractors.shape[0] != true.shape[0]:
            raise ValueError(
                f"distractors must be (B, K) for {tuple(true.shape)} true scores, got "
                f"{tuple(distractors.shape)}"
            )
        super().update((true[:, None] > distractors).all(1).float())


def detected_objects(detector: ShapesDetector, pixels: Tensor) -> list[list[dict]]:
    """Objects the detector finds in images ``(B, 3, H, W)`` in [0, 1], in the world's format."""
    grid = detector.world.grid
    return [
        [d.as_object(grid) for d in detector.detect(image.permute(1, 2, 0).cpu().numpy())]
        for image in pixels.float()
    ]
