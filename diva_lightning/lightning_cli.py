"""The Lightning CLI of ``diva-cli fit|validate|...``: stages as subclasses of ``DualFlowModule``.

Kept apart from ``diva_lightning.cli`` (the entry point that also dispatches ``prepare``,
``analyze`` and ``export``), so that ``export`` can rebuild a run's model from its config without
importing the entry point that imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from diva_lightning.stages.base import DualFlowModule
from diva_lightning.stages.progress import step_progress_bar

TOOLS_HELP = """DIVA post-training of unified multimodal models.

Trainer subcommands: fit, validate (below). Tools, each with its own --help:
  diva-cli prepare   image folders, JSONL/CSV pairs or the shapes world -> WebDataset shards
  diva-cli analyze   per-layer divergence curves of a backbone (paper Sec. 2, Fig. 2)
  diva-cli export    a trained run's backbone (EMA weights) -> save_pretrained folder
  diva-cli generate  prompts -> images in GenEval's or DPG-Bench's layout"""


class NoProductTips(logging.Filter):
    """Drop Lightning's advertisements ("Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoProductTips())


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
        if subcommand == "fit" and not config.get("ckpt_path"):  # a resumed run continues
            fresh_log_version(config)

    def before_fit(self) -> None:
        deepspeed_micro_batch(self.trainer.strategy, self.datamodule)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's trainer, with its default progress bar swapped for the step-based one
        (``stages/progress.py``); a bar the user configured is kept."""
        trainer = super().instantiate_trainer(**kwargs)
        default = trainer.progress_bar_callback
        replacement = step_progress_bar(default)
        if replacement is not None:
            trainer.callbacks[trainer.callbacks.index(default)] = replacement
        return trainer

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


def deepspeed_micro_batch(strategy, datamodule) -> None:
    """Give DeepSpeed the data module's per-GPU batch size before its engine starts.

    DeepSpeed needs ``train_micro_batch_size_per_gpu``. When the config does not state it (a
    strategy given by name, ``deepspeed_stage_2``, or the shipped JSONs), Lightning reads it off
    the train loader's ``batch_sampler``, which is None here: WebDataset batches inside the
    pipeline, and Lightning's ``_auto_select_batch_size`` then fails with an AttributeError.
    A JSON that states a different number than ``data.batch_size`` is refused: DeepSpeed would
    log throughput for batches that never run."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    batch = getattr(datamodule, "batch_size", None)
    if not isinstance(strategy, DeepSpeedStrategy) or strategy.config is None or not batch:
        return
    stated = strategy.config.get("train_micro_batch_size_per_gpu")
    if stated is not None and int(stated) != int(batch):
        raise ValueError(
            f"the DeepSpeed config's train_micro_batch_size_per_gpu is {stated}, but "
            f"data.init_args.batch_size is {batch}: batches come from the data module, so drop "
            "the key from the DeepSpeed config (it is filled in from data.batch_size) or make "
            "the two agree"
        )
    strategy.config["train_micro_batch_size_per_gpu"] = int(batch)


VERSION_ENV = "DIVA_LOG_VERSION"  # rank 0's choice, inherited by the processes it launches


def fresh_log_version(config) -> None:
    """A new run never writes into an earlier run's folder: when the logger's fixed ``version``
    folder holds an earlier run (``holds_a_run``), the run takes ``<version>-1`` (then ``-2``,
    ...) and says so. Ranks that rank 0 launches (``LOCAL_RANK`` > 0) take its choice from
    ``DIVA_LOG_VERSION``, since by then rank 0 has created the folder."""
    try:
        args = config["trainer.logger.init_args"]
    except (KeyError, TypeError):
        return
    version, save_dir = args.get("version"), args.get("save_dir")
    if version is None or save_dir is None:
        return  # Lightning numbers version_0, version_1, ... itself
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(VERSION_ENV):
        args["version"] = os.environ[VERSION_ENV]  # a launched rank: rank 0 chose already
        return
    base = Path(save_dir) / (args.get("name") or "")
    chosen, n = str(version), 0
    while holds_a_run(base / chosen):
        n += 1
        chosen = f"{version}-{n}"
    if n:
        print(f"{base / str(version)} holds an earlier run: this run writes to {base / chosen}",
              file=sys.stderr)  # fmt: skip
    args["version"] = chosen
    os.environ[VERSION_ENV] = chosen


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier run: anything beyond the event file and
    ``hparams.yaml`` that a fit leaves when it stops before training (a run that trains has
    saved its ``config.yaml`` by then). A folder of such leftovers is reused, so the corrected
    rerun keeps the folder name that later configs point at."""
    if not folder.is_dir():
        return False
    leftovers = ("events.out.tfevents.", "hparams.yaml")
    return any(not p.name.startswith(leftovers) for p in folder.iterdir())


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
