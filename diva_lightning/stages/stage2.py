"""Stage 2: backbone fine-tuning with the mutual-information objectives (paper Eq. 6, 7, 10, 11).

    L_total = lambda_sha (L_{U->G} + L_{G->U}) + lambda_uni L_uni + L_Und + L_Gen

* the stage-1 encoders are loaded and frozen (``train_encoders=True``: the authors' code);
* exactly ``trainable_layers`` of the backbone are unfrozen (Table 8: 8..18);
* ``L_{U->G}``, ``L_{G->U}``: InfoNCE with stop-gradient targets, per layer (Eq. 10);
* ``L_uni``: NCE-CLUB upper bound (Eq. 7) between the flows' unique factors (paper), or the
  authors' Gaussian CLUB between shared and unique factors of the same flow;
* ``lambda_sha`` and ``lambda_uni`` ramp linearly from 0 (Table 8: to 0.6).

The critic is trained to maximise its own objective on detached inputs while the model
minimises the upper bound through critic-detached scores, so their gradients touch disjoint
parameters. Both updates therefore run in ONE optimizer step over two parameter groups (the
critic's group has its own learning rate and no weight decay). AdamW is per-parameter, so this
equals two optimizers, and it works under DeepSpeed, which accepts a single optimizer. Only the
global gradient-norm clip couples the two groups.
"""

from __future__ import annotations

import torch

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.objectives import LinearRamp, SharedAlignment, build_unique_estimator
from diva_lightning.objectives.checkpoint import load_factor_encoders
from diva_lightning.stages.base import DualFlowModule

UNIQUE_PAIRS = ("cross_flow", "shared_unique")


class Stage2(DualFlowModule):
    """Stage 2 (see module docstring). Base arguments are documented on ``DualFlowModule``.

    Args:
        stage1_encoders: stage-1 encoders directory (``<stage-1 log dir>/factor_encoders``) or a
            stage-1 ``.ckpt``. Required.
        trainable_layers: inclusive block range to fine-tune (default: ``middle_layers``).
        tau: InfoNCE temperature (authors' code: 0.07).
        stop_gradient: stop-gradient on InfoNCE targets (False: the "w/o sg" ablation).
        gather_negatives: add the other ranks' shared targets as negatives.
        lambda_sha: final weight of the two InfoNCE terms. lambda_uni: final weight of L_uni
            (0 disables the unique term: the "w/o I_uni" ablation).
        ramp_steps: optimizer steps over which both lambdas ramp up from 0.
        unique_estimator: ``nce_club`` (paper) or ``gaussian_club`` (authors' code).
        unique_pairs: ``cross_flow`` (paper: z_uni^U vs z_uni^G) or ``shared_unique``
            (authors' code: z_sh^i vs z_uni^i of each flow).
        critic_lr: learning rate of the critic's parameter group. critic_hidden: critic width.
        train_encoders: also fine-tune the stage-1 encoders (authors' code; paper: frozen).
    """

    def __init__(
        self,
        backbone: BackboneAdapter,
        stage1_encoders: str | None = None,
        middle_layers: tuple[int, int] = (8, 18),
        trainable_layers: tuple[int, int] | None = None,
        tau: float = 0.07,
        stop_gradient: bool = True,
        gather_negatives: bool = True,
        lambda_sha: float = 0.6,
        lambda_uni: float = 0.6,
        ramp_steps: int = 1000,
        unique_estimator: str = "nce_club",
        unique_pairs: str = "cross_flow",
        critic_lr: float = 1e-4,
        critic_hidden: int = 256,
        train_encoders: bool = False,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 800,
        lambda_und: float = 1.0,
        lambda_gen: float = 1.0,
        max_nonfinite_steps: int = 10,
        activation_checkpointing: bool = False,
    ):
        super().__init__(
            backbone,
            middle_layers,
            lr,
            weight_decay,
            warmup_steps,
            lambda_und,
            lambda_gen,
            max_nonfinite_steps,
            activation_checkpointing,
        )
        self.save_hyperparameters(ignore=["backbone"])
        if stage1_encoders is None:
            raise ValueError("Stage2 needs stage1_encoders: the output of a stage-1 run")
        if unique_pairs not in UNIQUE_PAIRS:
            raise ValueError(f"unknown unique_pairs {unique_pairs!r}; choose one of {UNIQUE_PAIRS}")
        self.encoders, config = load_factor_encoders(stage1_encoders, backbone.hidden_size)
        self.trainable_range = tuple(trainable_layers or middle_layers)
        backbone.unfreeze_layers(*self.trainable_range)  # validates the range early
        self.alignment = SharedAlignment(tau, stop_gradient, gather_negatives)
        x_dim, y_dim = self.encoders.unique_dim, self.encoders.unique_dim
        if unique_pairs == "shared_unique":
            x_dim = self.encoders.shared_dim
        self.unique_critic = build_unique_estimator(unique_estimator, x_dim, y_dim, critic_hidden)
        self.ramp_sha = LinearRamp(0.0, lambda_sha, ramp_steps)
        self.ramp_uni = LinearRamp(0.0, lambda_uni, ramp_steps)
        self.unique_pairs, self.critic_lr, self.train_encoders = (
            unique_pairs,
            critic_lr,
            train_encoders,
        )

    def configure_trainable(self) -> None:
        self.backbone.unfreeze_layers(*self.trainable_range)
        self.encoders.requires_grad_(self.train_encoders)
        self.unique_critic.requires_grad_(True)

    def param_groups(self) -> list[dict]:
        model = [p for p in self.backbone.parameters() if p.requires_grad]
        if self.train_encoders:
            model += list(self.encoders.parameters())
        critic = list(self.unique_critic.parameters())
        return [{"params": model}, {"params": critic, "lr": self.critic_lr, "weight_decay": 0.0}]

    def unique_pairs_of(self, factors) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.unique_pairs == "cross_flow":
            return [(factors.unique_u, factors.unique_g)]
        return [(factors.shared_u, factors.unique_u), (factors.shared_g, factors.unique_g)]

    def diva_losses(self, batch) -> dict[str, torch.Tensor]:
        out_u, out_g = self.run_flows(batch, self.layers, pool=True)
        factors = self.encoders(out_u.hidden.float(), out_g.hidden.float())  # 4 x (B, L, d)
        l_u2g, l_g2u = self.alignment(factors.shared_u, factors.shared_g)
        pairs = self.unique_pairs_of(factors)
        l_uni = sum(self.unique_critic.upper_bound(x, y) for x, y in pairs)
        l_critic = sum(self.unique_critic.critic_loss(x, y) for x, y in pairs)
        lam_sha, lam_uni = self.ramp_sha(self.global_step), self.ramp_uni(self.global_step)
        terms = {
            "loss_u2g": l_u2g,
            "loss_g2u": l_g2u,
            "loss_uni": l_uni,
            "loss_critic": l_critic,
            "loss_und": out_u.loss,
            "loss_gen": out_g.loss,
            "mi_shared_nce": torch.log(torch.tensor(float(len(batch.keys)))) - l_u2g.detach(),
        }
        model_loss = lam_sha * (l_u2g + l_g2u) + lam_uni * l_uni + self.native_loss(out_u, out_g)
        terms["loss_model"] = model_loss
        terms["loss"] = model_loss + l_critic  # disjoint parameters: see module docstring
        terms["lambda_sha"], terms["lambda_uni"] = lam_sha, lam_uni
        return terms

    def training_step(self, batch, batch_idx: int):
        terms = self.diva_losses(batch)
        self.log_terms("train", terms, len(batch.keys))
        return self.guard_nonfinite(terms["loss"])

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.diva_losses(batch)
        keep = ("loss_und", "loss_gen", "loss_u2g", "loss_g2u", "loss_uni")
        self.log_terms("val", {k: terms[k] for k in keep}, len(batch.keys))
