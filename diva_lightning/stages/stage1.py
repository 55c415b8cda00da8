"""Stage 1: task-driven encoder warm-up with the backbone frozen (paper Sec. 3.3, Eq. 8-9, Table 7).

The backbone runs without gradients (eval mode, weights frozen). The four factor encoders and
four low-rank readouts are trained on the native losses computed on the injected logits
(Eq. 8, averaged over the middle layers) plus ``lambda_perp * L_perp`` (Eq. 9). Schedule:
shared-only injection for ``shared_only_steps`` optimizer steps, then shared + unique.
``lambda_sha > 0`` adds the authors' code's stage-1 alignment, ``lambda_sha`` times the mean of
both directed InfoNCE terms without stop-gradient (Eq. 10 on the encoders), so that the shared
factors start stage 2 aligned; the paper (Table 7) trains on the injected losses only (0).
At the end of fit the encoders are written to ``<log_dir>/factor_encoders`` for stage 2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.objectives import (
    FactorEncoders,
    LogitInjection,
    SharedAlignment,
    injected_loss,
    orthogonality_loss,
)
from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders
from diva_lightning.stages.base import DualFlowModule


class Stage1(DualFlowModule):
    """Stage 1 (see module docstring). Base arguments are documented on ``DualFlowModule``.

    Args:
        shared_dim: width of shared factors (authors' code: 256).
        unique_dim: width of unique factors (default: ``shared_dim``).
        encoder_arch: ``gated_mlp`` (paper), ``linear_ln`` or ``transformer`` (Table 2 ablation).
        readout_rank: rank ``r`` of the low-rank readouts (paper: 24).
        injection: ``cross_flow`` (paper Eq. 8) or ``same_flow_sum`` (authors' code).
        lambda_perp: weight of the orthogonality loss (paper: 0.2).
        perp_reduction: ``mean`` (default) or ``sum`` over the cross-correlation entries of
            Eq. 9 (see ``objectives/regularizers.py``).
        shared_only_steps: optimizer steps of shared-only injection before unique injection.
        export_dir: where to write the encoders at the end of fit (default
            ``<log_dir>/factor_encoders``); a relative path is taken inside the run's log dir,
            so that runs never write into each other's folders.
        projector: ``per_flow`` (four encoders) or ``shared`` (Eq. 5 read literally: one ``phi``
            per kind for both flows, per-flow gates).
        lambda_sha: weight of the stage-1 alignment (authors' code; paper and default: 0).
        tau: InfoNCE temperature of the stage-1 alignment.
    """

    term_groups = {"native": ("und", "gen"), "diva": ("perp", "align")}

    def __init__(
        self,
        backbone: BackboneAdapter,
        middle_layers: tuple[int, int] = (8, 18),
        shared_dim: int = 256,
        unique_dim: int | None = None,
        encoder_arch: str = "gated_mlp",
        readout_rank: int = 24,
        injection: str = "cross_flow",
        lambda_perp: float = 0.2,
        perp_reduction: str = "mean",
        shared_only_steps: int = 500,
        export_dir: str | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        lambda_und: float = 1.0,
        lambda_gen: float = 1.0,
        max_nonfinite_steps: int = 10,
        projector: str = "per_flow",
        lambda_sha: float = 0.0,
        tau: float = 0.07,
        gen_pooling: str = "all",
        decay_all_parameters: bool = False,
        fused_flows: bool | None = None,
    ):
        super().__init__(
            backbone,
            middle_layers,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            lambda_und=lambda_und,
            lambda_gen=lambda_gen,
            max_nonfinite_steps=max_nonfinite_steps,
            gen_pooling=gen_pooling,
            decay_all_parameters=decay_all_parameters,
            fused_flows=fused_flows,
        )
        self.save_hyperparameters(ignore=["backbone"])
        self.encoders = FactorEncoders(
            backbone.hidden_size, shared_dim, unique_dim, encoder_arch, projector=projector
        )
        self.alignment = SharedAlignment(tau, stop_gradient=False) if lambda_sha > 0 else None
        self.injection = LogitInjection(
            backbone.text_vocab_size,
            backbone.generation_width,  # the codebook, or the regressed embeddings' width
            self.encoders.shared_dim,
            self.encoders.unique_dim,
            readout_rank,
            injection,
        )
        self.lambda_perp, self.shared_only_steps = lambda_perp, shared_only_steps
        self.export_dir = export_dir

    def configure_trainable(self) -> None:
        self.backbone.freeze_all()

    def diva_losses(self, batch) -> dict[str, Tensor]:
        with torch.no_grad():
            out_u, out_g = self.run_flows(batch, self.layers, pool=True)
        factors = self.encoders(out_u.hidden.float(), out_g.hidden.float())  # 4 x (B, L, d)
        use_unique = self.global_step >= self.shared_only_steps
        bias_u, bias_g = self.injection.biases(factors, use_unique=use_unique)  # (B, L, V)
        terms = {
            "loss_und_injected": injected_loss(out_u.logits, out_u.targets, bias_u),
            "loss_gen_injected": injected_loss(
                out_g.logits, out_g.targets, bias_g, native=out_g.loss_fn()
            ),
            "loss_perp": orthogonality_loss(factors, self.hparams.perp_reduction),
            "loss_und": out_u.loss,
            "loss_gen": out_g.loss,
        }
        if self.alignment is not None:
            l_u2g, l_g2u = self.alignment(factors.shared_u, factors.shared_g)
            terms["loss_align"] = (l_u2g + l_g2u) / 2  # the authors' code averages them
        terms["loss"] = sum(self.weighted_terms(terms).values())
        return terms

    def weighted_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        weighted = {
            "und": self.lambda_und * terms["loss_und_injected"],
            "gen": self.lambda_gen * terms["loss_gen_injected"],
            "perp": self.lambda_perp * terms["loss_perp"],
        }
        if "loss_align" in terms:
            weighted["align"] = self.hparams.lambda_sha * terms["loss_align"]
        return weighted

    def loss_terms(self, batch) -> dict[str, Tensor]:
        return self.weighted_terms(self.diva_losses(batch))

    def training_step(self, batch, batch_idx: int):
        terms = self.diva_losses(batch)
        terms["unique_injection"] = float(self.global_step >= self.shared_only_steps)
        self.log_terms("train", terms, len(batch.keys))
        return self.guard_nonfinite(terms["loss"])

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.diva_losses(batch)
        self.log_terms("val", terms, len(batch.keys))

    def factor_config(self) -> dict:
        return factor_config(
            self.encoders,
            self.layers,
            readout_rank=self.hparams.readout_rank,
            injection=self.hparams.injection,
            backbone=type(self.backbone).__name__,
            num_layers=self.backbone.num_layers,
            gen_pooling=self.gen_pooling,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diva_factor_config"] = self.factor_config()

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        target = str(log_dir / (self.export_dir or "factor_encoders"))  # absolute stays absolute
        save_factor_encoders(target, self.encoders, self.factor_config(), self.injection)
        print(f"stage-1 encoders written to {target}")
