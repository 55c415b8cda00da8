"""DIVA-mini data: the tokenizer, pre-tokenised shards, and the held-out evaluation set.

* world seed 0: training shards (pre-training and every post-training arm), written by
  ``diva-cli prepare``'s own function with the patch tokenizer's ``codes.npy``;
* world seed 1: validation shards (the loss curves);
* world seed 2: the evaluation set, in memory, keeping only samples whose caption never occurs in
  the training shards (held-out prompts AND images: the caption determines the image).

World v2 (``cfg.world == "v2"``): one world seed, and the sets are its splits, disjoint by scene
(``ShapesWorldV2.split_of``): training shards from ``pretrain``, validation from ``val``, the
evaluation set from ``eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.mini.config import MiniConfig
from benchmarks.mini.tokenizer import PatchTokenizer
from diva_lightning.data.prepare import prepare, synthetic_world_of
from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.evaluation.shapes.probes import geneval_prompts

TRAIN_SEED, VAL_SEED, EVAL_SEED = 0, 1, 2
IMAGE_SIZE, PATCH = 32, 4  # the shapes world's default size; 4 x 4 blocks -> an 8 x 8 grid
PROMPT = "Please describe this image in detail."


def render(world: ShapesWorld, indices) -> Tensor:
    """Images of ``indices`` -> (B, 3, S, S) float in [0, 1]."""
    arrays = [np.asarray(world.sample(i)[0]) for i in indices]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def build_tokenizer(cfg: MiniConfig, path: Path) -> tuple[PatchTokenizer, dict]:
    """Fit (or load) the patch tokenizer on training images only."""
    if path.exists():
        return PatchTokenizer.load(path), {}
    world = synthetic_world_of(cfg.world, IMAGE_SIZE, TRAIN_SEED)
    indices = range(cfg.tokenizer_fit_images)
    if cfg.world == "v2":
        indices = world.split_indices("pretrain", cfg.tokenizer_fit_images)
    tokenizer = PatchTokenizer(IMAGE_SIZE, patch=PATCH, codebook_size=cfg.codebook_size)
    stats = tokenizer.fit(render(world, indices))
    tokenizer.save(path)
    return tokenizer, stats


def write_shards(cfg: MiniConfig, root: Path, tokenizer: PatchTokenizer) -> dict[str, Path]:
    """Training and validation shards with codes, and (``post_samples``) the post-training
    shards (skipped when already complete)."""
    splits = {
        "train": (cfg.train_samples, TRAIN_SEED, 1024, "pretrain"),
        "val": (cfg.val_samples, VAL_SEED, 64, "val"),
    }
    if cfg.post_samples:  # world v2: post-training on scenes pre-training never saw
        splits["post"] = (cfg.post_samples, TRAIN_SEED, 1024, "post")
    paths = {}
    for split, (count, seed, per_shard, v2_split) in splits.items():
        out = root / (f"post{count}" if split == "post" else split)
        v2 = {"synthetic_world": "v2", "synthetic_split": v2_split} if cfg.world == "v2" else {}
        seed = TRAIN_SEED if v2 else seed  # v2: one world, its splits are disjoint by scene
        if not (out / "summary.json").exists():
            prepare(
                str(out), synthetic=count, seed=seed, backbone=tokenizer, max_count=per_shard,
                overwrite=True, quiet=True, **v2,
            )  # fmt: skip
        paths[split] = out
    return paths


@dataclass
class EvalSet:
    """Held-out samples: captions, ground-truth objects, images and their codes."""

    captions: list[str]
    objects: list[list[dict]]
    pixels: Tensor  # (B, 3, S, S) in [0, 1]
    codes: Tensor  # (B, N)
    world: ShapesWorld
    geneval: list[tuple[str, list, str]] | None = None  # world v2: (prompt, objects, category)

    def __len__(self) -> int:
        return len(self.captions)


def eval_set(cfg: MiniConfig, tokenizer: PatchTokenizer, split: str = "eval") -> EvalSet:
    """The first ``eval_samples`` samples of world seed 2 whose caption is not a training one
    (world v2: of ``split``, ``eval`` or ``val``, with ``geneval_per_category`` GenEval-style
    prompts per category from the same split)."""
    if cfg.world == "v2":
        world = synthetic_world_of("v2", IMAGE_SIZE, TRAIN_SEED)
        indices = world.split_indices(split, cfg.eval_samples)
        objects = [world.objects(i) for i in indices]
        pixels = render(world, indices)  # prompts and true captions in the canonical phrasing
        per = cfg.geneval_per_category
        prompts = geneval_prompts(world, per, split) if per else None
        return EvalSet([world.describe(o) for o in objects], objects, pixels,
                       tokenizer.tokenize_images(pixels), world, prompts)  # fmt: skip
    train_world = ShapesWorld(seed=TRAIN_SEED)
    seen = {train_world.describe(train_world.objects(i)) for i in range(cfg.train_samples)}
    world = ShapesWorld(seed=EVAL_SEED)
    indices, index = [], 0
    while len(indices) < cfg.eval_samples:
        if world.describe(world.objects(index)) not in seen:
            indices.append(index)
        index += 1
    objects = [world.objects(i) for i in indices]
    pixels = render(world, indices)
    return EvalSet(
        [world.describe(o) for o in objects],
        objects,
        pixels,
        tokenizer.tokenize_images(pixels),
        world,
    )
