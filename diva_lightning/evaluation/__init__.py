"""Evaluation, in three paths (README, "Evaluate"):

* in training: ``SampleEvaluation`` (``callback``), a Lightning callback that captions and
  generates a fixed sample set and logs captioned grids (``image_grid``) and, on the shapes
  world, metrics to TensorBoard;
* decoding through the adapter contract, for any backbone (``decoding``): greedy captions,
  caption likelihoods, image generation;
* the shapes world's programmatic scorer (``shapes/``): caption parsing, detector, scores, probes
  and their ``torchmetrics`` metrics. Nothing outside ``shapes/`` assumes that world.
"""

from diva_lightning.evaluation.callback import SampleEvaluation

__all__ = ["SampleEvaluation"]
