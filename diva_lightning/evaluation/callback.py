"""In-training evaluation: every N optimizer steps, caption and generate a fixed set of samples.

``SampleEvaluation`` keeps the first ``num_samples`` validation samples this rank sees (the
sanity check's or the first validation's; a training batch when training reaches the first
evaluation before any validation), and every ``every_n_steps`` optimizer steps:

1. captions their images greedily (``decoding.greedy_captions``) and generates an image from each
   true caption through the generation flow (``decoding.maskgit_generate``, in the backbone's
   ``generation_order``; not for a backbone with continuous targets, whose images need its own
   decoder);
2. logs a captioned grid (real | reconstruction | generated) to TensorBoard (rank 0);
3. when the captions are the shapes world's (``shapes.captions.world_of_captions``), scores them
   with the world's exact ground truth as ``torchmetrics`` metrics that add up across ranks:
   caption attributes (``eval/caption_*``), multiple choice against one-attribute distractors
   (``eval/mc_accuracy``) and GenEval-style detection in the generated images (``eval/gen_*``).
   Other data (no programmatic ground truth) gets the grids only.

The online weights are evaluated (an ``EMA`` callback's average is not swapped in). Every rank
runs the same number of forward passes (decoding never stops early with several ranks), so
sharded models (DeepSpeed ZeRO-3) gather their parameters in step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from diva_lightning.evaluation.decoding import (
    caption_log_likelihood,
    greedy_captions,
    maskgit_generate,
)
from diva_lightning.evaluation.image_grid import captioned_grid
from diva_lightning.evaluation.shapes.captions import distractors, parse_caption, world_of_captions
from diva_lightning.evaluation.shapes.detector import ShapesDetector
from diva_lightning.evaluation.shapes.metrics import (
    MultipleChoiceAccuracy,
    ObjectScores,
    detected_objects,
)

log = logging.getLogger(__name__)


class SampleEvaluation(Callback):
    """Caption and generate a fixed sample set during training; log grids and metrics.

    Args:
        every_n_steps: evaluate every this many optimizer steps (and once at the end of fit).
        num_samples: samples per rank in the fixed set.
        max_caption_tokens: greedy caption length limit.
        generation_steps: MaskGIT steps (``confidence`` order); the raster order takes one step
            per image token.
        score: score shapes-world captions with their ground truth (``auto``: when every caption
            of the set parses completely); ``False`` logs the grids only.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        num_samples: int = 4,
        max_caption_tokens: int = 48,
        generation_steps: int = 8,
        score: bool | str = "auto",
    ):
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError("SampleEvaluation: every_n_steps and num_samples must be >= 1")
        if score not in (True, False, "auto"):
            raise ValueError(f"SampleEvaluation.score must be true, false or 'auto', got {score!r}")
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.max_caption_tokens, self.generation_steps, self.score = (
            max_caption_tokens, generation_steps, score
        )  # fmt: skip
        self.samples: dict | None = None  # the fixed set, on the CPU
        self._last_step = -1

    # ---- the fixed set -------------------------------------------------------------------------
    def _keep(self, batch) -> None:
        if self.samples is not None and len(self.samples["captions"]) >= self.num_samples:
            return
        n = self.num_samples - (0 if self.samples is None else len(self.samples["captions"]))
        part = {
            "captions": list(batch.captions[:n]),
            "prompts": list(batch.prompts[:n]),
            "pixels": None if batch.pixels is None else batch.pixels[:n].cpu(),
            "codes": None if batch.codes is None else batch.codes[:n].cpu(),
        }
        if self.samples is None:
            self.samples = part
            return
        for key in ("captions", "prompts"):
            self.samples[key] += part[key]
        for key in ("pixels", "codes"):
            if self.samples[key] is not None and part[key] is not None:
                self.samples[key] = torch.cat([self.samples[key], part[key]])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        self._keep(batch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:  # fmt: skip
        if self.samples is None:
            self._keep(batch)
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step and self.samples is not None:
            self.evaluate(trainer, pl_module)

    # ---- one evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Caption, generate, log; returns the logged metrics (empty without ground truth)."""
        self._last_step = trainer.global_step
        adapter, device = pl_module.backbone, pl_module.device
        s, was_training = self.samples, adapter.training
        adapter.eval()
        try:
            codes = s["codes"] if s["codes"] is not None else adapter.tokenize_images(
                s["pixels"].to(device)).cpu()  # fmt: skip
            understand = {"codes": codes.to(device)}
            if adapter.needs_pixels_for_understanding:
                understand["pixels"] = s["pixels"].to(device)
            stop_early = trainer.world_size == 1
            captions = greedy_captions(adapter, s["prompts"], max_tokens=self.max_caption_tokens,
                                       stop_early=stop_early, **understand)  # fmt: skip
            generated = None  # continuous targets (Nexus-Gen): embeddings, no codes to sample
            if not adapter.continuous_targets:
                generated = maskgit_generate(adapter, s["captions"], steps=self.generation_steps,
                                             order=adapter.generation_order)  # fmt: skip
            real, recon, made = self._pixels(adapter, s["pixels"], codes, generated)
            metrics = self._scores(adapter, understand, captions, made, real)
        finally:
            adapter.train(was_training)
        if trainer.is_global_zero:  # the metrics are already reduced over ranks
            for logger in trainer.loggers:  # (also from on_train_end, where self.log is refused)
                logger.log_metrics(metrics, step=trainer.global_step)
            self._log_grid(trainer, real, recon, made, captions)
        return metrics

    def _pixels(self, adapter, pixels, codes, generated):
        """(real, reconstruction, generated) pixels; None where the backbone cannot decode."""
        device = next(adapter.parameters()).device
        try:
            recon = adapter.decode_images(codes.to(device)).cpu()
            made = None if generated is None else adapter.decode_images(generated.to(device)).cpu()
        except NotImplementedError as error:
            log.warning("SampleEvaluation: %s; the grid shows the real images only", error)
            recon = made = None
        real = pixels if pixels is not None else recon
        return real, recon, made

    def _scores(self, adapter, understand, captions, made, real) -> dict[str, float]:
        s = self.samples
        size = real.shape[-1] if real is not None else adapter.image_size
        world = world_of_captions(s["captions"], size) if self.score else None
        device = next(adapter.parameters()).device  # metric states reduce there (NCCL: GPU)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank scores, or none: the scoring runs forward passes that ZeRO-3 gathers for
            agree = torch.tensor(float(world is not None), device=device)
            torch.distributed.all_reduce(agree, op=torch.distributed.ReduceOp.MIN)
            world = world if agree.item() > 0 else None
        if world is None:
            if self.score is True:
                raise ValueError("SampleEvaluation(score=true): the captions are not the "
                                 "shapes world's, so there is no ground truth to score")  # fmt: skip
            return {}
        truth = [parse_caption(c, world) for c in s["captions"]]
        caption_scores = ObjectScores().to(device)
        caption_scores.update([parse_caption(c, world) for c in captions], truth)
        out = {f"eval/caption_{k}": v for k, v in caption_scores.compute().items()}
        out["eval/mc_accuracy"] = self._multiple_choice(adapter, understand, truth, world)
        if made is not None:
            images = made if made.shape[-1] == size else F.interpolate(made, size=(size, size),
                                                                       mode="nearest")  # fmt: skip
            generation = ObjectScores().to(device)
            generation.update(detected_objects(ShapesDetector(world), images), truth)
            out |= {f"eval/gen_{k}": v for k, v in generation.compute().items()}
        return {k: float(v) for k, v in out.items()}

    def _multiple_choice(self, adapter, understand, truth, world) -> torch.Tensor:
        s, device = self.samples, next(adapter.parameters()).device
        options = [distractors(objects, world, seed=i) for i, objects in enumerate(truth)]
        kinds = sorted(set.intersection(*(set(o) for o in options)))
        prompts = s["prompts"]
        true = caption_log_likelihood(adapter, prompts, s["captions"], **understand)
        wrong = torch.stack([
            caption_log_likelihood(adapter, prompts, [o[k] for o in options], **understand)
            for k in kinds
        ], dim=1)  # fmt: skip
        metric = MultipleChoiceAccuracy().to(device)  # its states reduce on the ranks' device
        metric.update(true, wrong)
        return metric.compute()

    def _log_grid(self, trainer, real, recon, made, captions) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        lines = [[f"true: {t}", f"generated: {g}"] for t, g in zip(self.samples["captions"],
                                                                   captions, strict=True)]  # fmt: skip
        grid = captioned_grid([real, recon, made], ["real", "reconstruction", "generated"], lines)
        for logger in loggers:
            logger.experiment.add_image("eval/samples", grid, trainer.global_step)
