"""The Lightning CLI of ``diva-cli fit|validate|...``: stages as subclasses of ``DualFlowModule``.

Kept apart from ``diva_lightning.cli`` (the entry point that also dispatches ``prepare``,
``analyze`` and ``export``), so that ``export`` can rebuild a run's model from its config without
importing the entry point that imports it.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from diva_lightning.stages.base import DualFlowModule

TOOLS_HELP = """DIVA post-training of unified multimodal models.

Trainer subcommands: fit, validate (below). Tools, each with its own --help:
  diva-cli prepare   image folders, JSONL/CSV pairs or the shapes world -> WebDataset shards
  diva-cli analyze   per-layer divergence curves of a backbone (paper Sec. 2, Fig. 2)
  diva-cli export    a trained run's backbone (EMA weights) -> save_pretrained folder"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's line breaks kept (the list of tools)."""


class DivaCLI(LightningCLI):
    """LightningCLI with the stages as subclasses of ``DualFlowModule``; subcommands ``fit`` and
    ``validate`` (the stages define no test or predict step)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

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

    def before_instantiate_classes(self) -> None:
        """Check the accelerator and the device count against this machine before anything is
        built (Lightning would check only after the backbone is built, or after starting one
        process per asked device)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        trainer = config.get("trainer") or {}
        check_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))

    def after_fit(self) -> None:
        """Save the final weights as ``last.ckpt`` beside each checkpoint callback's others
        (unless it sets ``save_last: false``). Lightning's default callback keeps only the
        checkpoint of the last validation, and ``save_last`` skips the end of training once a
        last checkpoint was written earlier, so a run ending between two saves lost its last
        steps."""
        trainer = self.trainer
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is False or callback.dirpath is None:
                continue
            if getattr(callback, "_last_global_step_saved", -1) == trainer.global_step and (
                Path(callback.last_model_path or "").name == "last.ckpt"
            ):
                continue  # this very step is already saved as last.ckpt
            path = (
                Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            )
            trainer.save_checkpoint(path)

    def _parse_ckpt_path(self) -> None:
        """Refuse a checkpoint of another stage before LightningCLI adopts its class.

        LightningCLI replaces the configured model with the class recorded in the checkpoint's
        hyperparameters; a stage-2 config resumed from a stage-1 checkpoint would then train
        stage 1 and log it as stage 2. (Lightning has no hook for this check, hence the
        override of its private step.)
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
            saved = ckpt.get("hyper_parameters", {}).get("_class_path")
            model = self.config[subcommand].get("model")
            wanted = getattr(model, "class_path", None) if model is not None else None
            if saved and wanted and saved.rsplit(".", 1)[-1] != wanted.rsplit(".", 1)[-1]:
                raise ValueError(
                    f"ckpt_path {ckpt_path} is a checkpoint of {saved.rsplit('.', 1)[-1]}, but "
                    f"the config trains {wanted.rsplit('.', 1)[-1]}: resume a run with its own "
                    "stage's checkpoint (stage 2 starts from stage 1 through stage1_encoders)"
                )
        super()._parse_ckpt_path()


def check_devices(accelerator, devices) -> None:
    """Refuse an accelerator this machine lacks, or more devices than it has, naming what
    exists. Only plain names and counts are checked (an Accelerator object, "auto" and device
    lists are left to Lightning)."""
    if not isinstance(accelerator, str):
        return
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    here = f"this machine has {cuda} CUDA device(s) and {cores} CPU core(s)"
    if accelerator in ("gpu", "cuda") and cuda == 0:
        raise ValueError(
            f"trainer.accelerator={accelerator}, but no CUDA device is available ({here}; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): use accelerator: cpu"
        )
    kind = accelerator if accelerator != "auto" else ("gpu" if cuda else "cpu")
    count = int(devices) if isinstance(devices, int) or str(devices).isdigit() else None
    available = cuda if kind in ("gpu", "cuda") else cores if kind == "cpu" else None
    if count is not None and available is not None and count > available:
        unit = "CUDA device(s)" if kind in ("gpu", "cuda") else "CPU core(s) (one process each)"
        raise ValueError(
            f"trainer.devices={count} on accelerator {kind}, but {here}: ask for at most "
            f"{available} {unit}"
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
        parser_kwargs={"description": TOOLS_HELP, "formatter_class": HelpFormatter},
        args=args,
        run=run,
    )
