"""The progress bar of ``diva-cli fit``: Lightning's own bar (Rich when installed, else tqdm),
with the running loss and without what misleads on step-based runs.

Training here is step-based (``max_steps``, ``max_epochs: -1``), so Lightning's "Epoch 0/-2"
is replaced by "Epoch 0", and the logger's version (``v_num``, which shows a truncated run
name such as "age1") is dropped. The loss comes from the stage logging ``train/loss`` to the
progress bar. ``DivaCLI`` swaps Lightning's default bar for these; a bar the user configures
is left alone.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def _without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)
    return metrics


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar without ``v_num`` and without ``/-2`` after the epoch."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        return f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs and epochs > 0 else "")


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without ``v_num``."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))


def step_progress_bar(default):
    """The step-based counterpart of Lightning's default bar ``default`` (None otherwise)."""
    if type(default) is RichProgressBar:
        return StepRichProgressBar()
    if type(default) is TQDMProgressBar:
        return StepTQDMProgressBar()
    return None
