"""DIVA-mini training: base pre-training and the post-training arms, on the library's own
stages (``Stage1``, ``Stage2``, ``SFT``), data module and Lightning ``Trainer``.

Every run validates on the same reference loader (the validation shards with the paper's
dispersed 0.2..0.6 masks, fixed per sample), whatever masks the arm trains with, so the loss
curves of all arms are comparable. A base checkpoint is written to a temporary directory and
renamed into place: an interrupted run never leaves a half-written base behind.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import lightning as L
import transformers
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from benchmarks.mini.backbone import build_base, load_base
from benchmarks.mini.config import ARMS, MiniConfig
from benchmarks.mini.data import IMAGE_SIZE, PATCH, TRAIN_SEED
from benchmarks.mini.qa import qa_pairs
from diva_lightning.data import DualFlowDataModule
from diva_lightning.data.prepare import synthetic_world_of
from diva_lightning.stages import SFT, Stage1, Stage2
from diva_lightning.stages.balance import GradientBalance
from diva_lightning.stages.base import DualFlowModule
from diva_lightning.stages.ema import EMA

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*number of training batches.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen VQ
warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")  # stage 1 runs without
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
transformers.utils.logging.disable_progress_bar()


def loaders(
    cfg: MiniConfig, shards: dict, seed: int, steps: int, mask, mask_pattern="dispersed",
    split: str = "train",
):  # fmt: skip
    """(train loader of this arm on ``shards[split]``, reference validation loader). The codes
    come from the benchmark's patch tokenizer, not the adapter's VQ, by design (``backbone.py``):
    hence ``check_tokenizer=False``."""
    side = IMAGE_SIZE // PATCH
    facts = dict(image_size=IMAGE_SIZE, image_grid=(side, side), codebook_size=cfg.codebook_size)

    def module(low_high, pattern, seed):
        data = DualFlowDataModule(
            train_shards=str(shards[split]), val_shards=str(shards["val"]),
            batch_size=cfg.batch_size, num_workers=0, samples_per_epoch=steps * cfg.batch_size,
            shuffle_buffer=512, seed=seed, mask_ratio_min=low_high[0], mask_ratio_max=low_high[1],
            mask_pattern=pattern, use_codes=True, check_tokenizer=False, **facts,
        )  # fmt: skip
        data.setup("fit")
        return data

    train = module(mask, mask_pattern, seed).make_loader("train")
    val = module(cfg.post_mask, "dispersed", 0).make_loader("val")
    return train, val


def fit(
    module: DualFlowModule, cfg: MiniConfig, out: Path, steps: int, train, val=None, callbacks=(),
    val_every: int | None = None, val_batches: int | None = None,
) -> Path:  # fmt: skip
    """Fit ``module`` for ``steps`` optimizer steps; returns the CSV metrics file. Validation
    every ``val_every`` (default ``cfg.val_every``) steps on ``val_batches`` batches."""
    loggers = [CSVLogger(out, name="", version=""), TensorBoardLogger(out, name="", version="tb")]
    every, batches = val_every or cfg.val_every, val_batches or cfg.val_batches
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=loggers,
        val_check_interval=every if val is not None else None,
        check_val_every_n_epoch=None, limit_val_batches=batches if val is not None else 0,
        num_sanity_val_steps=0, gradient_clip_val=1.0, log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return out / "metrics.csv"


def validate(module: DualFlowModule, cfg: MiniConfig, val) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, limit_val_batches=cfg.val_batches,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    (metrics,) = trainer.validate(module, dataloaders=val, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """CSV metrics -> {"val/loss_und": [(step, value), ...], "val/loss_gen": [...]}."""
    curves: dict[str, list[tuple[int, float]]] = {"val/loss_und": [], "val/loss_gen": []}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            for name, points in curves.items():
                if row.get(name):
                    points.append((int(row["step"]), float(row[name])))
    return curves


class Pretrain(DualFlowModule):
    """Base UMM pre-training from scratch: every weight but the VQ, both native losses, and
    (``qa_world`` given) the yes/no existence questions of ``qa.py`` weighted by ``qa_weight``."""

    def __init__(
        self, backbone, lr: float = 1e-3, warmup_steps: int = 50, qa_world=None, qa_weight=1.0,
        qa_samples: int = 8,
    ):  # fmt: skip
        super().__init__(backbone, middle_layers=(1, 1), lr=lr, warmup_steps=warmup_steps)
        self.qa_world, self.qa_weight, self.qa_samples = qa_world, qa_weight, qa_samples

    def qa_loss(self, batch):
        """Cross-entropy of the answers to one question about each of the batch's first
        ``qa_samples`` samples (batches are shuffled); None when none parses."""
        n = self.qa_samples
        pairs = qa_pairs(batch.captions[:n], batch.keys[:n], self.qa_world, self.global_step)
        keep = [i for i, p in enumerate(pairs) if p is not None]
        if not keep:
            return None
        codes = self.image_codes(batch)[keep]  # (B', N)
        questions, answers = zip(*(pairs[i] for i in keep), strict=True)
        flow = self.backbone.build_understanding(list(questions), list(answers), codes=codes)
        return self.backbone.forward_flow(flow.to(self.device), "U").loss

    def configure_trainable(self) -> None:
        self.backbone.requires_grad_(True)
        self.backbone.vq.requires_grad_(False)

    def training_step(self, batch, batch_idx: int):
        out_u, out_g = self.run_flows(batch, layers=())
        loss = self.native_loss(out_u, out_g)
        terms = {"loss_und": out_u.loss, "loss_gen": out_g.loss}
        qa = self.qa_loss(batch) if self.qa_world is not None else None
        if qa is not None:
            loss = loss + self.qa_weight * qa
            terms["loss_qa"] = qa
        self.log_terms("train", {"loss": loss, **terms}, len(batch.keys))
        return self.guard_nonfinite(loss)


def pretrain_module(cfg: MiniConfig) -> Pretrain:
    """A freshly initialised base with its pre-training objective (QA when ``cfg.qa_weight``)."""
    world = synthetic_world_of(cfg.world, IMAGE_SIZE, TRAIN_SEED) if cfg.qa_weight else None
    return Pretrain(build_base(cfg), lr=cfg.pretrain_lr, warmup_steps=cfg.pretrain_steps // 10,
                    qa_world=world, qa_weight=cfg.qa_weight, qa_samples=cfg.qa_samples)  # fmt: skip


def pretrain_base(cfg: MiniConfig, shards: dict, target: Path, callbacks=(), **val) -> dict:
    """Pre-train the base and write it to ``target`` (atomically); returns its curves.
    ``val``: ``fit``'s ``val_every`` / ``val_batches`` for the base's own curves."""
    L.seed_everything(0, verbose=False)
    module = pretrain_module(cfg)
    train, val_loader = loaders(cfg, shards, 0, cfg.pretrain_steps, cfg.pretrain_mask)
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    metrics = fit(module, cfg, work / "logs", cfg.pretrain_steps, train, val_loader, callbacks,
                  **val)  # fmt: skip
    module.backbone.save_pretrained(work / "model")
    work.rename(target)
    return read_curves(target / "logs" / metrics.name)


def stage1_module(cfg: MiniConfig, spec: dict, base: Path, encoders: Path) -> Stage1:
    return Stage1(
        load_base(cfg, base), middle_layers=cfg.middle_layers,
        shared_dim=cfg.factor_dim, readout_rank=cfg.readout_rank,
        shared_only_steps=cfg.shared_only_steps, export_dir=str(Path(encoders).resolve()), lr=cfg.stage1_lr,
        warmup_steps=cfg.stage1_steps // 10, **spec.get("stage1", {}),
    )  # fmt: skip


def stage2_module(cfg: MiniConfig, spec: dict, base: Path, encoders: Path) -> Stage2:
    options = dict(
        tau=cfg.tau, lambda_sha=cfg.lambda_sha, lambda_uni=cfg.lambda_uni,
        ramp_steps=max(1, int(cfg.ramp_fraction * cfg.post_steps)),
        critic_hidden=cfg.critic_hidden, critic_lr=cfg.critic_lr,
        targets=cfg.targets,  # v1 protocol: online (its runs have no EMA); v2: ema
    )  # fmt: skip
    options.update(spec.get("stage2", {}))
    return Stage2(
        load_base(cfg, base), stage1_encoders=str(encoders),
        middle_layers=cfg.middle_layers, trainable_layers=cfg.middle_layers, lr=cfg.post_lr,
        warmup_steps=cfg.post_warmup, **options,
    )  # fmt: skip


def stage1_key(spec: dict) -> str:
    """Folder name of a stage-1 run: arms whose stage 1 sees the same settings share it."""
    overrides = {"data": spec.get("data", {}), "stage1": spec.get("stage1", {})}
    blob = json.dumps(overrides, sort_keys=True)
    return "stage1-" + hashlib.blake2b(blob.encode(), digest_size=4).hexdigest()


def stage1_encoders(cfg: MiniConfig, spec: dict, seed: int, base: Path, shards: dict, root: Path):
    """Train (or reuse) the stage-1 encoders of ``spec`` for ``seed`` -> their folder.

    Stage 1 never touches the backbone and depends only on the data and Stage1 keys, so
    "Base+DIVA", "w/o L_uni" and "w/o stop-grad" share one stage-1 run per seed. Written to a
    temporary folder and renamed: an interrupted stage 1 is never reused.
    """
    folder = root / stage1_key(spec) / f"seed{seed}"
    encoders = folder / "stage1_encoders"
    if encoders.exists():
        return encoders
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    data = spec.get("data", {})
    train, val = loaders(cfg, shards, seed + 1000, cfg.stage1_steps, cfg.post_mask, **data,
                         split=post_split(shards))  # fmt: skip
    module = stage1_module(cfg, spec, base, work / "stage1_encoders")
    validated = val if cfg.post_samples else None  # v2: the injected losses' plateau is checked
    fit(module, cfg, work, cfg.stage1_steps, train, validated,
        val_every=max(1, cfg.stage1_steps // 10))  # fmt: skip
    (work / "overrides.json").write_text(json.dumps(spec, indent=1))
    work.rename(folder)
    return encoders


def post_train(
    cfg: MiniConfig, arm: str, seed: int, base: Path, shards: dict, out: Path, stage1_root=None
):
    """Post-train the base with ``arm`` -> (trained adapter, validation curves).

    ``out`` is ``<results>/<arm>/seed<k>``; stage-1 runs live in ``<results>/stage1-<key>``
    (or under ``stage1_root``).
    """
    spec = ARMS[arm]
    L.seed_everything(seed, verbose=False)
    callbacks = post_callbacks(cfg)
    if spec["kind"] == "sft":
        module = SFT(
            load_base(cfg, base), middle_layers=cfg.middle_layers,
            trainable_layers=cfg.middle_layers, lr=cfg.post_lr, warmup_steps=cfg.post_warmup,
        )  # fmt: skip
    else:
        encoders = stage1_encoders(cfg, spec, seed, base, shards, stage1_root or out.parent.parent)
        L.seed_everything(seed, verbose=False)
        module = stage2_module(cfg, spec, base, encoders)
    train, val = loaders(cfg, shards, seed, cfg.post_steps, cfg.post_mask, **spec.get("data", {}),
                         split=post_split(shards))  # fmt: skip
    metrics = fit(module, cfg, out, cfg.post_steps, train, val, callbacks)
    return module.backbone, read_curves(metrics)


def post_split(shards: dict) -> str:
    """v2 post-trains on its own ``post`` split; v1 on the pre-training shards."""
    return "post" if "post" in shards else "train"


def post_callbacks(cfg: MiniConfig) -> list[L.Callback]:
    """v2: an EMA of the trained weights (copied into the model at the end, so every arm is
    evaluated with its EMA weights) and GradientBalance.

    The EMA keeps the paper's proportion to the run rather than its raw decays: 0.99 -> 0.999
    over 12K steps is a time constant of 1/12 of the run at the end; here the decay ramps from
    0.9 to 1 - 12 / post_steps over the first 30% of the steps."""
    callbacks: list[L.Callback] = []
    if cfg.ema:
        end = max(0.9, 1 - 12 / cfg.post_steps)
        callbacks.append(EMA(0.9, end, ramp_steps=max(1, int(0.3 * cfg.post_steps))))
    if cfg.balance_every:
        callbacks.append(GradientBalance(every_n_steps=cfg.balance_every))
    return callbacks
