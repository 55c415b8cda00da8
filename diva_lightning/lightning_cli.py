"""The Lightning CLI of ``diva-cli fit|validate|...``: stages as subclasses of ``DualFlowModule``.

Kept apart from ``diva_lightning.cli`` (the entry point that also dispatches ``prepare``,
``analyze`` and ``export``), so that ``export`` can rebuild a run's model from its config without
importing the entry point that imports it.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from diva_lightning.stages.base import DualFlowModule


class DivaCLI(LightningCLI):
    """LightningCLI with the stages as subclasses of ``DualFlowModule``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "diva", "default_hp_metric": False},
                }
            }
        )


def build_cli(args: list[str] | dict | None = None, run: bool = True) -> DivaCLI:
    """Build (and by default run) the Lightning CLI; ``args`` as on the command line, or a
    config dict."""
    if args is not None:  # called from Python (export, analyze, tests): argv belongs to the caller
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return DivaCLI(
        DualFlowModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
