"""``diva-cli``: LightningCLI for the stages, plus tools that need no Trainer.

    diva-cli fit --config configs/stage2.yaml          # any Trainer subcommand: fit, validate, ...
    diva-cli prepare --help                            # image folder or synthetic world -> shards
    diva-cli analyze --out runs/analyze                 # Sec. 2 divergence curves, Fig. 2 plots
    diva-cli export --run_config RUN.yaml --checkpoint X.ckpt --out DIR

Stages and backbones are chosen by ``class_path`` in the YAML (``model:`` and
``model.init_args.backbone:``); the data module likewise (``data:``).
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from diva_lightning.stages.base import DualFlowModule

TOOLS = ("prepare", "export", "analyze")


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


def _run_tool(name: str, args: list[str]) -> None:
    from jsonargparse import auto_cli

    if name == "prepare":
        from diva_lightning.data.prepare import prepare

        auto_cli(prepare, args=args)
    elif name == "analyze":
        from diva_lightning.analysis.tool import analyze

        auto_cli(analyze, args=args)
    elif name == "export":
        from diva_lightning.export import export

        auto_cli(export, args=args)


def main(args: list[str] | None = None) -> None:
    """Entry point; ``args`` as on the command line (default: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        _run_tool(argv[0], argv[1:])
        return
    build_cli(None if args is None else argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
