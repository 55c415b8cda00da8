"""Calibrate world v2 for DIVA-mini v2 (issue #17): pre-train the base long, score it on the way.

    python -m benchmarks.mini.calibrate --steps 1000 --every 250 --codebook-size 1024

Builds the v2 tokenizer, shards (``pretrain`` and ``val`` splits) and the ``eval``-split
evaluation set, pre-trains the benchmark's base (the ``full`` mode's sizes) and, every
``--every`` steps, evaluates it with the benchmark's metrics (caption attributes, multiple
choice, GenEval-style generation) on ``--eval-samples`` held-out scenes. Every evaluation is
appended to ``<out>/calibration.json`` as it comes, with the validation losses, so an
interrupted run still tells where the base stands. A calibration run does not cache a base.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L

from benchmarks.mini.backbone import build_base
from benchmarks.mini.config import full
from benchmarks.mini.data import build_tokenizer, eval_set, write_shards
from benchmarks.mini.evaluate import evaluate, tokenizer_ceiling
from benchmarks.mini.train import Pretrain, fit, loaders


class Probe(L.Callback):
    """Evaluate the base every ``every`` optimizer steps; append the scores to ``path``."""

    def __init__(self, every, tokenizer, data, cfg, path: Path, record: dict):
        self.every, self.tokenizer, self.data, self.cfg = every, tokenizer, data, cfg
        self.path, self.record, self.start = path, record, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        scores = evaluate(pl_module.backbone, self.tokenizer, self.data, self.cfg.eval_batch,
                          self.cfg.gen_steps)  # fmt: skip
        pl_module.backbone.train()
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        row = {"step": step, "wall_s": time.perf_counter() - self.start, **losses}
        row.update({k: v for k, v in scores.items() if isinstance(v, float)})
        self.record["evaluations"].append(row)
        self.path.write_text(json.dumps(self.record, indent=1))
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--codebook-size", type=int, default=1024, help="patch tokenizer codes")
    parser.add_argument("--out", default="runs/mini/calibration")
    args = parser.parse_args(argv)
    cfg = replace(full(), mode="calibration", world="v2", max_text_len=64,
                  pretrain_steps=args.steps, eval_samples=args.eval_samples,
                  val_every=args.every, codebook_size=args.codebook_size)  # fmt: skip
    out = Path(args.out)
    root = out / f"base-{cfg.base_key()}"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer, fit_stats = build_tokenizer(cfg, root / "tokenizer.pt")
    shards = write_shards(cfg, root / "shards", tokenizer)
    data = eval_set(cfg, tokenizer)
    ceiling = tokenizer_ceiling(tokenizer, data)
    print(f"tokenizer {fit_stats or 'cached'}; detector ceiling on ground truth "
          f"{ceiling['ground_truth']['object']:.3f}, on reconstructions "
          f"{ceiling['reconstructed']['object']:.3f}", flush=True)  # fmt: skip
    record = {"config": asdict(cfg), "ceiling": ceiling, "evaluations": []}
    L.seed_everything(0, verbose=False)
    module = Pretrain(build_base(cfg), lr=cfg.pretrain_lr, warmup_steps=cfg.pretrain_steps // 10)
    train, val = loaders(cfg, shards, 0, cfg.pretrain_steps, cfg.pretrain_mask)
    probe = Probe(args.every, tokenizer, data, cfg, out / "calibration.json", record)
    fit(module, cfg, root / "logs", cfg.pretrain_steps, train, val, callbacks=[probe])


if __name__ == "__main__":
    main()
