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
    "w/o stop-grad": {"kind": "diva", "stage2": {"stop_gradient": False}},
    "contiguous mask": {"kind": "diva", "data": {"mask_pattern": "contiguous"}},
    "Linear+LN encoders": {"kind": "diva", "stage1": {"encoder_arch": "linear_ln"}},
    # Table 4's weight sensitivity, both lambdas: 0.05 balances the alignment gradient against
    # the native one on this base (see diagnose.py); 0.2 is not in the default run
    "Base+DIVA (lambda 0.05)": {"kind": "diva", "stage2": {"lambda_sha": 0.05, "lambda_uni": 0.05}},
    "Base+DIVA (lambda 0.2)": {"kind": "diva", "stage2": {"lambda_sha": 0.2, "lambda_uni": 0.2}},
}
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
    # evaluation
    gen_steps: int = 8
    eval_batch: int = 64

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


def config_from_json(stored: dict) -> MiniConfig:
    """A ``MiniConfig`` from ``results.json``'s "config" (lists back to tuples, unknown keys of
    older runs dropped)."""
    known = {f.name for f in fields(MiniConfig)}
    return MiniConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in stored.items() if k in known})  # fmt: skip


MODES = {"quick": quick, "full": full, "smoke": smoke}
