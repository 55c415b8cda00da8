"""Stage 2: backbone fine-tuning with the mutual-information objectives (paper Eq. 6, 7, 10, 11).

    L_total = lambda_sha (L_{U->G} + L_{G->U}) + lambda_uni L_uni + L_Und + L_Gen

* the stage-1 encoders are loaded and frozen (``train_encoders=True``: the authors' code);
* exactly ``trainable_layers`` of the backbone are unfrozen (Table 8: 8..18);
* ``L_{U->G}``, ``L_{G->U}``: InfoNCE against stop-gradient targets, per layer (Eq. 10). The
  targets come from the EMA teacher (``targets: ema``, App. B.2; see ``teacher.py``) or from the
  online model, detached (``online``); the two directed terms are added (Eq. 11, ``sum``) or
  averaged (the authors' code, ``mean``);
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

import math
import warnings

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.objectives import LinearRamp, SharedAlignment, build_unique_estimator
from diva_lightning.objectives.checkpoint import check_encoder_origin, load_factor_encoders
from diva_lightning.stages.base import DualFlowModule
from diva_lightning.stages.ema import EMA
from diva_lightning.stages.gradients import dot, term_gradients
from diva_lightning.stages.teacher import EMATeacher, eval_mode

UNIQUE_PAIRS = ("cross_flow", "shared_unique")
TARGETS = ("ema", "online")
REDUCTIONS = ("sum", "mean")
BALANCES = ("none", "cap")


class Stage2(DualFlowModule):
    """Stage 2 (see module docstring). Base arguments are documented on ``DualFlowModule``.

    Args:
        stage1_encoders: the stage-1 run's encoders, ``<stage-1 log dir>/factor_encoders`` (the
            shipped configs: ``runs/<name>/stage1/factor_encoders``), or a stage-1 ``.ckpt``.
            Required.
        trainable_layers: inclusive block range to fine-tune (default: ``middle_layers``).
        tau: InfoNCE temperature (authors' code: 0.07).
        stop_gradient: stop-gradient on InfoNCE targets (False: the "w/o sg" ablation; needs
            ``targets: online``).
        gather_negatives: add the other ranks' shared targets as negatives.
        lambda_sha: final weight of the two InfoNCE terms.
        lambda_uni: final weight of L_uni (0 disables the unique term: the "w/o I_uni"
            ablation).
        ramp_steps: optimizer steps over which both lambdas ramp up from 0.
        unique_estimator: ``nce_club`` (paper) or ``gaussian_club`` (authors' code).
        unique_pairs: ``cross_flow`` (paper: z_uni^U vs z_uni^G) or ``shared_unique``
            (authors' code: z_sh^i vs z_uni^i of each flow).
        critic_lr: learning rate of the critic's parameter group.
        critic_hidden: hidden width of the NCE-CLUB critic.
        train_encoders: also fine-tune the stage-1 encoders (authors' code; paper: frozen).
        targets: ``ema`` (paper App. B.2: the EMA teacher gives ``sg[z_sh]``; needs the ``EMA``
            callback) or ``online`` (the online factors, detached).
        alignment_reduction: ``sum`` (Eq. 11: L_{U->G} + L_{G->U}) or ``mean`` (authors' code:
            half of it).
        gen_pooling: ``all`` or ``unmasked``; default: what the stage-1 encoders were trained with.
        balance: ``none`` (paper) or ``cap``: scale the DIVA terms (alignment + L_uni) so that
            their gradient on the trainable blocks is at most ``balance_cap`` x the native one.
        balance_cap: the cap.
        balance_every: optimizer steps between two measurements of the gradient ratio (two
            extra backward passes each); the scale is kept in between.
        allow_encoder_transfer: use stage-1 encoders whose ``factors.json`` records another
            backbone class, layer count or middle range (refused by default).
    """

    term_groups = {
        "native": ("und", "gen"),
        "alignment": ("u2g", "g2u"),
        "diva": ("u2g", "g2u", "uni"),
    }

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
        targets: str = "ema",
        alignment_reduction: str = "sum",
        gen_pooling: str | None = None,
        balance: str = "none",
        balance_cap: float = 1.0,
        balance_every: int = 50,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 800,
        lambda_und: float = 1.0,
        lambda_gen: float = 1.0,
        max_nonfinite_steps: int = 10,
        activation_checkpointing: bool = False,
        decay_all_parameters: bool = False,
        fused_flows: bool | None = None,
        allow_encoder_transfer: bool = False,
    ):
        if stage1_encoders is None:
            raise ValueError("Stage2 needs stage1_encoders: the output of a stage-1 run")
        encoders, config = load_factor_encoders(stage1_encoders, backbone.hidden_size)
        trained_pooling = config.get("gen_pooling", "all")
        if gen_pooling is not None and gen_pooling != trained_pooling:
            raise ValueError(
                f"gen_pooling {gen_pooling!r} differs from the {trained_pooling!r} pooling the "
                f"stage-1 encoders at {stage1_encoders} were trained with"
            )
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
            gen_pooling=trained_pooling,
            decay_all_parameters=decay_all_parameters,
            fused_flows=fused_flows,
        )
        check_encoder_origin(config, stage1_encoders, type(backbone).__name__,
                             backbone.num_layers, self.layers, allow_encoder_transfer)  # fmt: skip
        self.save_hyperparameters(ignore=["backbone"])
        for key, value, allowed in (
            ("unique_pairs", unique_pairs, UNIQUE_PAIRS),
            ("targets", targets, TARGETS),
            ("alignment_reduction", alignment_reduction, REDUCTIONS),
            ("balance", balance, BALANCES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {key} {value!r}; choose one of {allowed}")
        if targets == "ema" and not stop_gradient:
            raise ValueError(
                "stop_gradient: false (the w/o sg ablation) sends gradient into the targets, "
                "which EMA-teacher targets cannot take: set targets: online with it"
            )
        if balance == "cap" and (balance_cap <= 0 or balance_every < 1):
            raise ValueError(f"balance_cap must be > 0 and balance_every >= 1, got "
                             f"{balance_cap}, {balance_every}")  # fmt: skip
        self.encoders = encoders
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
        self.targets = targets
        self.teacher = EMATeacher(self.layers, self.trainable_range)
        self.ema: EMA | None = None  # found among the Trainer's callbacks at fit start
        self._teacher_names: list[str] | None = None
        self.balance_scale = 1.0
        self._balance_step = -1
        self._start_reported = False

    def configure_trainable(self) -> None:
        self.backbone.unfreeze_layers(*self.trainable_range)
        self.encoders.requires_grad_(self.train_encoders)
        self.unique_critic.requires_grad_(True)

    def param_groups(self) -> list[dict]:
        model = [p for p in self.backbone.parameters() if p.requires_grad]
        if self.train_encoders:
            model += list(self.encoders.parameters())
        critic = list(self.unique_critic.parameters())
        critic_group = {"params": critic, "lr": self.critic_lr, "weight_decay": 0.0}
        return [*self.weight_decay_groups(model), critic_group]

    def on_fit_start(self) -> None:
        if self.targets == "ema":
            found = [c for c in self.trainer.callbacks if isinstance(c, EMA)]
            if len(found) != 1:
                raise ValueError(
                    f"targets: ema takes its targets from the EMA callback, and the Trainer has "
                    f"{len(found)}: add exactly one `diva_lightning.stages.ema.EMA` to "
                    "trainer.callbacks, or set model.init_args.targets: online"
                )
            self.ema = found[0]
        if self.hparams.balance == "cap" and any(
            hasattr(p, "ds_tensor") for p in self.balance_parameters()
        ):
            raise ValueError("balance: cap measures per-term gradients of the trainable blocks, "
                             "which ZeRO-3 partitions: use ZeRO-2 (or balance: none) with it")  # fmt: skip

    # ---- the loss ------------------------------------------------------------------------------
    def unique_pairs_of(self, factors) -> list[tuple[Tensor, Tensor]]:
        if self.unique_pairs == "cross_flow":
            return [(factors.unique_u, factors.unique_g)]
        return [(factors.shared_u, factors.unique_u), (factors.shared_g, factors.unique_g)]

    def teacher_targets(self, out_u, out_g) -> tuple[Tensor | None, Tensor | None]:
        """Shared factors (B, L, d) of the EMA teacher for both flows (None: online targets)."""
        if self.targets != "ema":
            return None, None
        if self.ema is None or not self.ema.ready:
            warnings.warn("targets: ema without EMA weights (no fit running): using the online "
                          "weights for the targets", stacklevel=2)  # fmt: skip
            return None, None
        parts = [self.encoders] if self.train_encoders else []
        if self._teacher_names is None:
            self._teacher_names = self.teacher.parameter_names(self, parts)
        names = self._teacher_names
        blocks = self.backbone.decoder_layers
        running = (
            blocks[self.teacher.start - 1 : self.teacher.end] if self.teacher.block_range else []
        )
        pooled = {}
        with torch.no_grad(), self.ema.swapped_in(self, names), eval_mode([*running, *parts]):
            if "UG" in self.recorded:  # fused flows: one replay of the stacked rows
                calls, positions, mask = self.recorded["UG"]
                both = torch.cat([out_u.hidden, out_g.hidden])  # (2B, L, D)
                pooled["U"], pooled["G"] = self.teacher.pooled(both, calls, positions, mask).chunk(
                    2
                )
            for flow, out in (("U", out_u), ("G", out_g)):
                calls, positions, mask = self.recorded.get(flow, (None, None, None))
                if flow not in pooled:
                    pooled[flow] = self.teacher.pooled(out.hidden, calls, positions, mask)
            return (
                self.encoders.encode("U", "shared", pooled["U"].float()),
                self.encoders.encode("G", "shared", pooled["G"].float()),
            )

    def diva_losses(self, batch) -> dict[str, Tensor]:
        record = self.teacher.block_range if self.targets == "ema" else None
        out_u, out_g = self.run_flows(batch, self.layers, pool=True, record=record)
        factors = self.encoders(out_u.hidden.float(), out_g.hidden.float())  # 4 x (B, L, d)
        target_u, target_g = self.teacher_targets(out_u, out_g)
        self.recorded = {}  # the recorded calls hold the graph's inputs: drop them now
        l_u2g, l_g2u = self.alignment(factors.shared_u, factors.shared_g, target_u, target_g)
        pairs = self.unique_pairs_of(factors)
        terms = {
            "loss_u2g": l_u2g,
            "loss_g2u": l_g2u,
            "loss_uni": sum(self.unique_critic.upper_bound(x, y) for x, y in pairs),
            "loss_critic": sum(self.unique_critic.critic_loss(x, y) for x, y in pairs),
            "loss_und": out_u.loss,
            "loss_gen": out_g.loss,
            "mi_shared_nce": math.log(self.num_candidates(len(batch.keys))) - l_u2g.detach(),
            "lambda_sha": self.ramp_sha(self.global_step),
            "lambda_uni": self.ramp_uni(self.global_step),
        }
        return self.total(terms)

    def total(self, terms: dict) -> dict:
        """Add ``loss_model`` (what the model follows) and ``loss`` (+ the critic's own loss)."""
        terms["loss_model"] = sum(self.weighted_terms(terms).values())
        terms["loss"] = terms["loss_model"] + terms["loss_critic"]  # disjoint parameters
        return terms

    def weighted_terms(self, terms: dict, scale: float | None = None) -> dict[str, Tensor]:
        """The weighted terms of Eq. 11; the DIVA ones times the balance scale."""
        scale = self.balance_scale if scale is None else scale
        w_sha = terms["lambda_sha"] * (1.0 if self.hparams.alignment_reduction == "sum" else 0.5)
        return {
            "und": self.lambda_und * terms["loss_und"],
            "gen": self.lambda_gen * terms["loss_gen"],
            "u2g": scale * w_sha * terms["loss_u2g"],
            "g2u": scale * w_sha * terms["loss_g2u"],
            "uni": scale * terms["lambda_uni"] * terms["loss_uni"],
        }

    def loss_terms(self, batch) -> dict[str, Tensor]:
        return self.weighted_terms(self.diva_losses(batch))

    def num_candidates(self, batch_size: int) -> int:
        """Targets each InfoNCE query is ranked against: the batch, times the ranks if gathered."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return batch_size * (world if self.alignment.gather_negatives else 1)

    # ---- optional balance ----------------------------------------------------------------------
    def measure_balance_scale(self, terms: dict) -> float:
        """``min(1, cap |g_native| / |g_diva|)`` on the trainable blocks, from two autograd
        passes over this step's graph (norms averaged over ranks, so all ranks agree)."""
        weighted = self.weighted_terms(terms, scale=1.0)
        grads = term_gradients(
            {
                "native": weighted["und"] + weighted["gen"],
                "diva": weighted["u2g"] + weighted["g2u"] + weighted["uni"],
            },
            self.balance_parameters(),
        )
        sq = torch.tensor([dot(g, g) for g in grads.values()], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            sq = sq.to(self.device)
            dist.all_reduce(sq)
        native, diva = sq.sqrt().tolist()
        if diva == 0:
            return 1.0
        return min(1.0, self.hparams.balance_cap * native / diva)

    # ---- steps ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        terms = self.diva_losses(batch)
        if self.hparams.balance == "cap" and self._balance_step != self.global_step:
            if self.global_step % self.hparams.balance_every == 0:
                self._balance_step = self.global_step
                self.balance_scale = self.measure_balance_scale(terms)
                terms = self.total(terms)
            terms["balance_scale"] = self.balance_scale
        if not self._start_reported:
            self.report_start(terms, len(batch.keys))
        self.log_terms("train", terms, len(batch.keys))
        return self.guard_nonfinite(terms["loss"])

    def report_start(self, terms: dict, batch_size: int) -> None:
        """Once per fit: the first InfoNCE values beside log(number of candidates), the value of
        shared factors that carry no information about each other."""
        self._start_reported = True
        chance = math.log(self.num_candidates(batch_size))
        u2g, g2u = float(terms["loss_u2g"].detach()), float(terms["loss_g2u"].detach())
        self.log_terms("train", {"infonce_start": (u2g + g2u) / 2, "infonce_chance": chance},
                       batch_size)  # fmt: skip
        verdict = "unaligned" if (u2g + g2u) / 2 > 0.9 * chance else "partly aligned"
        rank_zero_info(
            f"stage 2 starts with InfoNCE U->G {u2g:.3f}, G->U {g2u:.3f} against log(candidates)"
            f" = {chance:.3f}: the shared factors start {verdict}"
            + (" (Stage1's lambda_sha aligns them in stage 1)" if verdict == "unaligned" else "")
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.diva_losses(batch)
        keep = ("loss_und", "loss_gen", "loss_u2g", "loss_g2u", "loss_uni")
        self.log_terms("val", {k: terms[k] for k in keep}, len(batch.keys))
