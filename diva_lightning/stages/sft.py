"""Base+SFT baseline of the paper (Table 2): same data, same trainable layers, native losses only."""

from __future__ import annotations

from torch import Tensor

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.stages.base import DualFlowModule


class SFT(DualFlowModule):
    """Supervised fine-tuning on both flows: ``L = lambda_und L_Und + lambda_gen L_Gen``.

    Args:
        trainable_layers: inclusive block range to fine-tune (default: ``middle_layers``).
        Other arguments: see ``DualFlowModule``.
    """

    term_groups = {"native": ("und", "gen")}

    def __init__(
        self,
        backbone: BackboneAdapter,
        middle_layers: tuple[int, int] = (8, 18),
        trainable_layers: tuple[int, int] | None = None,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 800,
        lambda_und: float = 1.0,
        lambda_gen: float = 1.0,
        max_nonfinite_steps: int = 10,
        activation_checkpointing: bool = False,
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
            activation_checkpointing=activation_checkpointing,
            decay_all_parameters=decay_all_parameters,
            fused_flows=fused_flows,
        )
        self.save_hyperparameters(ignore=["backbone"])
        self.trainable_range = tuple(trainable_layers or middle_layers)
        backbone.unfreeze_layers(*self.trainable_range)

    def configure_trainable(self) -> None:
        self.backbone.unfreeze_layers(*self.trainable_range)

    def sft_losses(self, batch) -> dict[str, Tensor]:
        out_u, out_g = self.run_flows(batch, layers=())
        return {"loss_und": out_u.loss, "loss_gen": out_g.loss}

    def weighted_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "und": self.lambda_und * terms["loss_und"],
            "gen": self.lambda_gen * terms["loss_gen"],
        }

    def loss_terms(self, batch) -> dict[str, Tensor]:
        return self.weighted_terms(self.sft_losses(batch))

    def training_step(self, batch, batch_idx: int):
        terms = self.sft_losses(batch)
        loss = sum(self.weighted_terms(terms).values())
        self.log_terms("train", {"loss": loss, **terms}, len(batch.keys))
        return self.guard_nonfinite(loss)
