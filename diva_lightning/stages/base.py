"""Shared Lightning glue of the stages: both flows from one batch, optimisation, guards, logging.

A stage receives a backbone adapter by injection (``class_path`` in YAML), builds the
understanding and generation flows of the same image-text pairs (paper Sec. 3.1) and runs them;
the subclass says what is trainable and what the loss is. Subclasses: ``Stage1``, ``Stage2``,
``SFT`` (one level of subclassing).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import FlowOutput
from diva_lightning.backbones.fused import forward_fused
from diva_lightning.backbones.replay import BlockCalls

GEN_POOLINGS = ("all", "unmasked")


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class NonFiniteLossError(RuntimeError):
    """Raised when too many steps produced a non-finite loss."""


class DualFlowModule(L.LightningModule):
    """Base of all stages. Not used directly.

    Args:
        backbone: the UMM adapter (e.g. ``diva_lightning.backbones.emu3.Emu3Adapter``).
        middle_layers: inclusive 1-based block range ``I_mid`` whose image-token states are
            factorised (paper default 8..18).
        lr: AdamW learning rate of the main parameter group.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up of the cosine schedule, in optimizer steps.
        lambda_und: weight of the understanding (captioning) loss.
        lambda_gen: weight of the generation (inpainting) loss.
        max_nonfinite_steps: stop the run with an error after this many non-finite losses.
        activation_checkpointing: recompute backbone activations in backward to save memory.
        gen_pooling: image slots of the generation flow that are mean-pooled into ``h_G``:
            ``all`` (default; Sec. 3.2 pools every image token) or ``unmasked`` (only the
            visible ones; the masked slots hold mask tokens).
        decay_all_parameters: apply weight decay to every parameter. Default ``False``: biases,
            norm weights and embeddings get none (the authors' code; the paper only says 0.01).
        fused_flows: run both flows as one forward of stacked rows (``backbones.fused``;
            results equal to two forwards). ``None`` (default): wherever the backbone allows
            it, measured 0.90-1.00x the step time of two forwards on CPU (``make
            bench-fused``); ``True``: the same, with a warning where it cannot; ``False``: two
            forwards.

    Stages expose ``loss_terms`` (the weighted terms whose sum the trainable model parameters
    follow) and ``term_groups`` for ``GradientBalance``.
    """

    term_groups: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        backbone: BackboneAdapter,
        middle_layers: tuple[int, int] = (8, 18),
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        lambda_und: float = 1.0,
        lambda_gen: float = 1.0,
        max_nonfinite_steps: int = 10,
        activation_checkpointing: bool = False,
        gen_pooling: str = "all",
        decay_all_parameters: bool = False,
        fused_flows: bool | None = None,
    ):
        super().__init__()
        if gen_pooling not in GEN_POOLINGS:
            raise ValueError(f"unknown gen_pooling {gen_pooling!r}; choose one of {GEN_POOLINGS}")
        start, end = middle_layers
        if not 1 <= start <= end <= backbone.num_layers:
            raise ValueError(
                f"middle_layers {start}..{end} is outside the backbone's blocks "
                f"1..{backbone.num_layers} ({type(backbone).__name__})"
            )
        self.backbone = backbone
        self.layers = list(range(start, end + 1))
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.lambda_und, self.lambda_gen = lambda_und, lambda_gen
        self.max_nonfinite_steps = max_nonfinite_steps
        self.activation_checkpointing = activation_checkpointing
        self.gen_pooling, self.decay_all_parameters = gen_pooling, decay_all_parameters
        self.fused_flows = fused_flows is not False and backbone.supports_fused_flows
        if fused_flows and not self.fused_flows:
            rank_zero_warn(f"fused_flows: {type(backbone).__name__} cannot fuse its flows "
                           "(supports_fused_flows); running two forwards")  # fmt: skip
        self.nonfinite_steps = 0
        self._last_batch_end: float | None = None

    # ---- flows ---------------------------------------------------------------------------------
    def image_codes(self, batch) -> Tensor:
        """Pre-tokenised codes when the shards carry them, else the frozen VQ on the pixels."""
        if batch.codes is not None:
            self.backbone.check_codes(batch.codes)
            return batch.codes
        return self.backbone.tokenize_images(batch.pixels)

    def run_flows(
        self,
        batch,
        layers: Sequence[int],
        pool: bool = True,
        record: tuple[int, int] | None = None,
    ) -> tuple[FlowOutput, FlowOutput]:
        """Both flows of the same samples -> (understanding output, generation output).

        ``record=(start, end)``: also keep how blocks ``start..end`` were called in each flow,
        for a replay: ``self.recorded[flow] = (BlockCalls, image positions (B, N), pool mask)``.
        """
        codes = self.image_codes(batch)  # (B, N)
        pixels = batch.pixels if self.backbone.needs_pixels_for_understanding else None
        flow_u = self.backbone.build_understanding(
            batch.prompts, batch.captions, codes=codes, pixels=pixels
        )
        flow_g = self.backbone.build_generation(batch.captions, codes, batch.gen_mask)
        flow_u, flow_g = flow_u.to(self.device), flow_g.to(self.device)
        pool_mask = self.gen_pool_mask(batch)
        self._tokens_in_batch = int(flow_u.attention_mask.sum() + flow_g.attention_mask.sum())
        if self.fused_flows:
            out_u, out_g, recorded = forward_fused(
                self.backbone, flow_u, flow_g, layers, pool, pool_mask, record
            )
            self.recorded = {"UG": recorded} if record else {}
            return out_u, out_g
        blocks = self.backbone.decoder_layers
        calls = {f: BlockCalls(blocks, *record) if record else nullcontext() for f in "UG"}
        with calls["U"]:
            out_u = self.backbone.forward_flow(flow_u, "U", layers, pool=pool)
        with calls["G"]:
            out_g = self.backbone.forward_flow(flow_g, "G", layers, pool=pool, pool_mask=pool_mask)
        self.recorded = {}
        if record:
            self.recorded = {
                "U": (calls["U"], flow_u.image_positions, None),
                "G": (calls["G"], flow_g.image_positions, pool_mask),
            }
        return out_u, out_g

    def gen_pool_mask(self, batch) -> Tensor | None:
        """(B, N) bool of the generation-flow image slots that are pooled (None: all of them)."""
        if self.gen_pooling == "all":
            return None
        return ~batch.gen_mask.to(self.device)

    def native_loss(self, out_u: FlowOutput, out_g: FlowOutput) -> Tensor:
        return self.lambda_und * out_u.loss + self.lambda_gen * out_g.loss

    # ---- lifecycle -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "bind_backbone"):
            datamodule.bind_backbone(self.backbone)
        if self.activation_checkpointing:
            self.backbone.set_activation_checkpointing(True)
        self.configure_trainable()

    def on_train_epoch_start(self) -> None:
        """A frozen backbone runs in eval mode (no dropout); a fine-tuned one in train mode."""
        self.backbone.train(any(p.requires_grad for p in self.backbone.parameters()))

    def configure_trainable(self) -> None:
        """Set ``requires_grad`` for this stage (subclass hook)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (subclass hook). Default: every trainable parameter."""
        return self.weight_decay_groups([p for p in self.parameters() if p.requires_grad])

    def weight_decay_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """Split ``params`` into a decayed group and a group without weight decay (biases, norm
        weights: every parameter with fewer than 2 dims; and ``nn.Embedding`` tables)."""
        if self.decay_all_parameters:
            return [{"params": params}]
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        exempt = [p.ndim < 2 or id(p) in embeddings for p in params]
        return [
            {"params": [p for p, e in zip(params, exempt, strict=True) if not e]},
            {"params": [p for p, e in zip(params, exempt, strict=True) if e], "weight_decay": 0.0},
        ]

    def loss_terms(self, batch) -> dict[str, Tensor]:
        """The weighted loss terms whose sum the trainable model parameters follow (subclass
        hook; read by ``GradientBalance``). Names of the native terms: ``term_groups["native"]``."""
        raise NotImplementedError

    def balance_parameters(self) -> list[nn.Parameter]:
        """Parameters whose per-term gradients ``GradientBalance`` measures: the trainable
        backbone blocks, or (stage 1, backbone frozen) the trainable encoders and readouts."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone or [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(self.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- guards and logging --------------------------------------------------------------------
    def guard_nonfinite(self, loss: Tensor) -> Tensor:
        """Replace a non-finite loss (on any rank) by a zero-gradient loss, count it, and stop
        with a clear error after ``max_nonfinite_steps``. Parameters get a zero gradient that
        step; the optimizer still runs so every rank stays in step."""
        bad = torch.tensor(float(not torch.isfinite(loss).item()), device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)
        if bad.item() == 0:
            return loss
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), sync_dist=False)
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_steps} steps had a non-finite loss (limit max_nonfinite_steps="
                f"{self.max_nonfinite_steps}); last at global step {self.global_step}. "
                "Lower the learning rate or check the data."
            )
        zero = sum(p.sum() for p in self.parameters() if p.requires_grad)
        return zero * 0.0

    def log_terms(self, prefix: str, terms: dict[str, Tensor | float], batch_size: int) -> None:
        for name, value in terms.items():
            value = value.detach() if isinstance(value, Tensor) else value
            self.log(f"{prefix}/{name}", value, batch_size=batch_size, sync_dist=prefix == "val",
                     prog_bar=name == "loss")  # fmt: skip

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            elapsed = max(now - self._last_batch_end, 1e-9)
            self.log("train/samples_per_s", len(batch.keys) / elapsed)
            self.log("train/tokens_per_s", getattr(self, "_tokens_in_batch", 0) / elapsed)
        self._last_batch_end = now
        skips = getattr(batch, "skips", None) or {}
        self.log("data/skipped", float(sum(skips.values())), reduce_fx="sum")
        for reason, count in skips.items():
            self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum")
        truncated = self.backbone.pop_truncated_captions()  # cut to max_caption_tokens
        self.log("data/truncated_captions", float(truncated), reduce_fx="sum")

    def validation_step(self, batch, batch_idx: int) -> None:
        out_u, out_g = self.run_flows(batch, self.layers)
        self.log_terms("val", {"loss_und": out_u.loss, "loss_gen": out_g.loss}, len(batch.keys))
