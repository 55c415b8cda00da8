"""The shapes world's programmatic scorer: caption parsing and distractors (``captions``), the
object detector (``detector``), object and multiple-choice scores (``scores``), POPE and
GenEval-style probes (``probes``), and the same scores as ``torchmetrics`` metrics that add up
across ranks (``metrics``). Only data with the shapes world's exact ground truth is scored here."""
