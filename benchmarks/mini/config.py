"""DIVA-mini settings: the two modes (quick, full) and the post-training arms (paper Table 2).

Every arm post-trains the same base on the same shards for the same number of backbone steps,
with the same trainable layers and learning rate; an arm differs from Base+DIVA in one key of
the stage configs, exactly as a user would flip it in YAML (``docs/method-choices.md``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

# arm name -> (kind, overrides of the data module, of Stage1, of Stage2)
ARMS: dict[str, dict] = {
    "Base": {"kind": "base"},
    "Base+SFT": {"kind": "sft"},
    "Base+DIVA": {"kind": "diva"},
    "w/o L_uni": {"kind": "diva", "stage2": {"lambda_uni": 0.0}},
    "w/o stop-grad": {"kind": "diva", "stage2": {"stop_gradient": False, "targets": "online"}},
    "contiguous mask": {"kind": "diva", "data": {"mask_pattern": "contiguous"}},
    "Linear+LN encoders": {"kind": "diva", "stage1": {"encoder_arch": "linear_ln"}},
    # Table 4's weight sensitivity, both lambdas: 0.05 balances the alignment gradient against
    # the native one on this base (see diagnose.py); 0.2 is not in the default run
    "Base+DIVA (lambda 0.05)": {"kind": "diva", "stage2": {"lambda_sha": 0.05, "lambda_uni": 0.05}},
    "Base+DIVA (lambda 0.2)": {"kind": "diva", "stage2": {"lambda_sha": 0.2, "lambda_uni": 0.2}},
    # v2 protocol (issue #17): the DIVA family with the other targets, balance cap, Table 4
    "Base+DIVA (online targets)": {"kind": "diva", "stage2": {"targets": "online"}},
    "balance cap": {"kind": "diva", "stage2": {"balance": "cap"}},
    "lambda_uni 0.4": {"kind": "diva", "stage2": {"lambda_uni": 0.4}},
    "lambda_uni 0.6": {"kind": "diva", "stage2": {"lambda_uni": 0.6}},
    "lambda_uni 0.8": {"kind": "diva", "stage2": {"lambda_uni": 0.8}},
}
V2_HEADLINE = ("Base", "Base+SFT", "Base+DIVA", "Base+DIVA (online targets)")
V2_ABLATIONS = ("w/o L_uni", "w/o stop-grad", "contiguous mask", "Linear+LN encoders",
                "balance cap", "lambda_uni 0.4", "lambda_uni 0.6", "lambda_uni 0.8")  # fmt: skip
DEFAULT_ARMS = tuple(list(ARMS)[:8])  # Base, SFT, DIVA, its four ablations, lambda 0.05


def arm_folder(arm: str) -> str:
    """A file-system-safe folder name for an arm ("w/o L_uni" -> "wo_L_uni")."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in arm.replace("/", ""))


@dataclass(frozen=True)
class MiniConfig:
    """One benchmark mode. Sizes are samples; steps are optimizer steps."""

    mode: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = DEFAULT_ARMS
    # world, tokenizer and shards
    world: str = "v1"  # "v2": diva_lightning.data.shapes_v2 (splits disjoint by scene)
    train_samples: int = 8192
    val_samples: int = 256
    eval_samples: int = 128
    codebook_size: int = 512
    tokenizer_fit_images: int = 2000
    # base UMM: a tiny Show-o (or Emu3, see backbone.py), pre-trained from scratch
    backbone: str = "showo"
    max_text_len: int = 40  # Show-o's text slots: prompt + the longest caption fit in 40
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    pretrain_steps: int = 300
    pretrain_lr: float = 1.5e-3
    pretrain_mask: tuple[float, float] = (0.1, 1.0)  # generation pre-training: up to fully masked
    qa_weight: float = 0.0  # world v2: yes/no existence questions in pre-training (qa.py)
    qa_samples: int = 8  # ... about this many samples of each batch
    # post-training, identical for every arm
    batch_size: int = 32
    middle_layers: tuple[int, int] = (3, 6)
    post_steps: int = 100
    post_lr: float = 1e-3
    post_warmup: int = 10
    post_mask: tuple[float, float] = (0.2, 0.6)  # the paper's inpainting ratios
    val_every: int = 20
    val_batches: int = 2
    # DIVA specifics (stage 1 does not touch the backbone)
    stage1_steps: int = 40
    stage1_lr: float = 1e-3
    shared_only_steps: int = 15
    factor_dim: int = 64
    readout_rank: int = 16
    lambda_sha: float = 0.6
    lambda_uni: float = 0.6
    ramp_fraction: float = 0.3  # of post_steps
    tau: float = 0.07
    critic_hidden: int = 64
    critic_lr: float = 1e-3
    # v2 protocol (issue #17): post-training on its own split, EMA and GradientBalance in every arm
    post_samples: int = 0  # > 0: post-train on this many scenes of the world's "post" split
    targets: str = "online"  # Stage2.targets of the DIVA arms (v2: "ema", the paper's)
    ema: bool = False  # every arm keeps an EMA of its weights and is evaluated with it
    balance_every: int = 0  # > 0: GradientBalance every this many steps in every arm
    grid_per_family: int = 4  # configurations per arm family in the tuning grid (grid.py)
    # evaluation
    gen_steps: int = 8
    eval_batch: int = 64
    geneval_per_category: int = 0  # > 0 (world v2): GenEval-style categories, prompts each

    def base_key(self) -> str:
        """Hash of everything the cached shards, tokenizer and base checkpoint depend on."""
        keys = [
            "world",
            "backbone",
            "max_text_len",
            "train_samples",
            "val_samples",
            "codebook_size",
            "tokenizer_fit_images",
            "hidden_size",
            "num_layers",
            "num_heads",
            "pretrain_steps",
            "pretrain_lr",
            "pretrain_mask",
            "batch_size",
        ]
        keys += ["qa_weight", "qa_samples"] if self.qa_weight else []  # (v1 bases keep their keys)
        blob = json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True, default=list)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def quick() -> MiniConfig:
    """The headline comparison only (Base, Base+SFT, Base+DIVA), one seed, half-size batches
    and fewer steps (so a base of its own), the first half of ``full``'s held-out set. Under
    10 minutes from a fresh clone on 2 CPU cores; an indication, not the reported result."""
    return replace(
        MiniConfig(),
        mode="quick",
        seeds=(0,),
        arms=("Base", "Base+SFT", "Base+DIVA"),
        batch_size=16,
        pretrain_steps=250,
        eval_samples=64,
        post_steps=50,
        post_warmup=5,
        stage1_steps=30,
        shared_only_steps=10,
    )


def full() -> MiniConfig:
    return MiniConfig()


def smoke() -> MiniConfig:
    """Seconds, for tests: a 4-layer model, a few steps of everything, a few arms."""
    return replace(
        MiniConfig(),
        mode="smoke",
        seeds=(0,),
        arms=("Base", "Base+SFT", "Base+DIVA", "contiguous mask"),
        train_samples=256, val_samples=32, eval_samples=8, tokenizer_fit_images=64,
        hidden_size=32, num_layers=4, pretrain_steps=4, batch_size=8, middle_layers=(2, 3),
        post_steps=4, post_warmup=1, val_every=2, val_batches=1, stage1_steps=2,
        shared_only_steps=1, factor_dim=16, readout_rank=4, critic_hidden=16, gen_steps=2,
        eval_batch=8,
    )  # fmt: skip


def v2() -> MiniConfig:
    """The v2 protocol (issue #17, ``README.md``): world v2, a base pre-trained to its plateau
    with yes/no questions, post-training on the ``post`` split at 1/20 of the base's peak LR
    with 7% warm-up for 3 epochs, EMA and GradientBalance in every arm."""
    post_samples, batch, epochs = 2048, 32, 3
    steps = epochs * post_samples // batch
    return replace(
        MiniConfig(), mode="v2", world="v2", seeds=(0, 1, 2, 3, 4), arms=V2_HEADLINE,
        train_samples=32768, val_samples=512, eval_samples=256, codebook_size=1024,
        max_text_len=64, pretrain_steps=4000, pretrain_lr=1.5e-3, qa_weight=1.0,
        batch_size=batch, post_samples=post_samples, post_steps=steps, post_lr=1.5e-3 / 20,
        post_warmup=round(0.07 * steps), val_every=steps // 4, val_batches=4, stage1_steps=150,
        shared_only_steps=50, targets="ema", ema=True, balance_every=steps // 4,
        geneval_per_category=96,
    )  # fmt: skip


def v2_quick() -> MiniConfig:
    """v2 quick: its own small base, then Base, SFT, DIVA with one seed, scored on the val split;
    sized to take under 10 minutes on 2 cores (not yet timed)."""
    return replace(
        v2(), mode="v2-quick", seeds=(0,), arms=("Base", "Base+SFT", "Base+DIVA"),
        train_samples=8192, val_samples=128, eval_samples=64, pretrain_steps=600, batch_size=16,
        post_samples=512, post_steps=64, post_warmup=4, val_every=32, val_batches=2,
        stage1_steps=30, shared_only_steps=10, balance_every=32, geneval_per_category=16,
        eval_batch=96,
    )  # fmt: skip


def v2_smoke() -> MiniConfig:
    """Seconds, for tests: the v2 pipeline end to end on a 4-layer model."""
    small = {f.name: getattr(smoke(), f.name) for f in fields(MiniConfig)}
    v2_only = ("mode", "world", "arms", "max_text_len", "qa_weight", "post_samples", "targets",
               "ema", "balance_every", "geneval_per_category", "grid_per_family")  # fmt: skip
    small = {k: v for k, v in small.items() if k not in v2_only}
    return replace(v2(), **small, mode="v2-smoke", arms=("Base", "Base+SFT", "Base+DIVA"),
                   post_samples=64, balance_every=2, geneval_per_category=2,
                   grid_per_family=1)  # fmt: skip


def config_from_json(stored: dict) -> MiniConfig:
    """A ``MiniConfig`` from ``results.json``'s "config" (lists back to tuples, unknown keys of
    older runs dropped)."""
    known = {f.name for f in fields(MiniConfig)}
    return MiniConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in stored.items() if k in known})  # fmt: skip


MODES = {"quick": quick, "full": full, "smoke": smoke, "v2": v2, "v2-quick": v2_quick,
         "v2-smoke": v2_smoke}  # fmt: skip
