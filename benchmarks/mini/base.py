"""Build DIVA-mini's base once, cached by content hash, and show that it has converged.

    python -m benchmarks.mini.base --mode v2          # the v2 protocol's base (issue #17)
    python -m benchmarks.mini.base --mode v2-quick    # the quick mode's small base

Writes ``OUT/base-<hash>/`` with the tokenizer, the shards (``pretrain``, ``val`` and ``post``
splits), and ``base/``: the checkpoint (``model/``), its training logs, ``probes.json`` and
``plateau.json``, and ``analysis/``: ``diva-cli analyze`` on the base, whose suggested middle
range the v2 protocol's stages use. ``<hash>`` covers every setting the base depends on (``MiniConfig.base_key``).
A finished base is reused, never rebuilt. An interrupted build leaves only ``base.partial/``,
which the next build replaces.

Along pre-training, every ``--probe-every`` steps, the base is scored with the benchmark's
metrics on the **validation** split (``probes.json``). This is the calibration record: it shows
whether a base at its plateau lands inside the 0.4-0.8 band. The evaluation split is never read
here. ``plateau.json`` applies the pre-registered rule (``plateau``) to both flows' validation
losses.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L

from benchmarks.mini.backbone import load_base
from benchmarks.mini.config import MODES, MiniConfig
from benchmarks.mini.data import build_tokenizer, eval_set, write_shards
from benchmarks.mini.evaluate import evaluate, tokenizer_ceiling
from benchmarks.mini.train import pretrain_base, read_curves
from diva_lightning.analysis.tool import analyze

PLATEAU_FRACTION, PLATEAU_TOLERANCE = 0.2, 0.01


def plateau(curve: list[tuple[int, float]], fraction=PLATEAU_FRACTION, tol=PLATEAU_TOLERANCE):
    """The pre-registered rule on one validation-loss curve [(step, loss)]: the relative gain
    over the last ``fraction`` of the steps, and whether it is below ``tol``.

    The gain is (loss at the first point at or after (1 - fraction) x last step - last loss) /
    that first loss. A curve that is still falling by ``tol`` or more has not plateaued."""
    if len(curve) < 2:
        raise ValueError("the plateau rule needs at least two validation points")
    last_step = curve[-1][0]
    start = next(v for s, v in curve if s >= (1 - fraction) * last_step)
    gain = (start - curve[-1][1]) / start
    return {"relative_gain": gain, "plateaued": gain < tol, "from_step": last_step}


class Probe(L.Callback):
    """Score the model every ``every`` optimizer steps; append the scores to ``path``."""

    def __init__(self, every: int, tokenizer, data, cfg: MiniConfig, path: Path):
        self.every, self.tokenizer, self.data, self.cfg, self.path = (
            every,
            tokenizer,
            data,
            cfg,
            path,
        )
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        row = {"step": step, "wall_s": time.perf_counter() - self.start}
        try:  # a probe observes: its failure is recorded, it never costs the base's training
            scores = evaluate(pl_module.backbone, self.tokenizer, self.data, self.cfg.eval_batch,
                              self.cfg.gen_steps)  # fmt: skip
            row.update({k: v for k, v in scores.items() if isinstance(v, float)})
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"
            print(f"probe at step {step} failed ({row['error']}); pre-training goes on", flush=True)
        pl_module.backbone.train()
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.rows, indent=1))
        keys = ("step", "und_score", "mcb_accuracy", "pope_accuracy", "gen_overall", "gen_score")
        print(json.dumps({k: round(row[k], 3) for k in keys if k in row}), flush=True)


def build_base(cfg: MiniConfig, out: Path, probe_every: int = 0) -> dict:
    """Tokenizer, shards and base of ``cfg`` under ``out/base-<hash>`` (reused when there)."""
    root = out / f"base-{cfg.base_key()}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    tokenizer, fit_stats = build_tokenizer(cfg, root / "tokenizer.pt")
    shards = write_shards(cfg, root / "shards", tokenizer)
    base = root / "base"
    if base.exists():
        print(f"base: cached at {base}")
    else:
        val = eval_set(cfg, tokenizer, split="val")
        ceiling = tokenizer_ceiling(tokenizer, val)
        print(f"tokenizer {fit_stats or 'cached'}; detector on validation ground truth "
              f"{ceiling['ground_truth']['object']:.3f} of objects, on its reconstructions "
              f"{ceiling['reconstructed']['object']:.3f}", flush=True)  # fmt: skip
        every = probe_every or cfg.pretrain_steps
        probe = Probe(every, tokenizer, val, cfg, base.with_name("base.partial") / "probes.json")
        start = time.perf_counter()
        print(f"pre-training the base ({cfg.pretrain_steps} steps) -> {base}", flush=True)
        pretrain_base(cfg, shards, base, [probe], val_every=max(1, cfg.pretrain_steps // 20),
                      val_batches=8)  # fmt: skip
        facts = {"wall_s": time.perf_counter() - start, "ceiling_val": ceiling}
        (base / "facts.json").write_text(json.dumps(facts, indent=1))
    middle = middle_range(cfg, base, shards)
    verdict = {name: plateau(points) for name, points in base_curves(base).items()}
    (base / "plateau.json").write_text(json.dumps(verdict, indent=1))
    print("plateau rule (gain over the last 20% of steps < 1%): " + ", ".join(
        f"{k} {v['relative_gain']:+.2%} ({'plateaued' if v['plateaued'] else 'still falling'})"
        for k, v in verdict.items()))  # fmt: skip
    print(f"middle layers by the analysis rule: {middle[0]}..{middle[1]} ({base / 'analysis'})")
    return {"root": root, "tokenizer": tokenizer, "shards": shards, "base": base / "model",
            "middle_layers": middle}  # fmt: skip


def middle_range(cfg: MiniConfig, base: Path, shards: dict) -> tuple[int, int]:
    """``diva-cli analyze`` on the base over the validation shards (run once, kept in
    ``base/analysis``) -> the middle range its rule suggests (paper Sec. 2, Fig. 2)."""
    found = base / "analysis" / "divergence.json"
    if not found.exists():
        pattern = sorted(Path(shards["val"]).glob("shard-*.tar"))
        urls = f"{pattern[0].parent}/shard-{{{pattern[0].stem[6:]}..{pattern[-1].stem[6:]}}}.tar"
        samples = min(256, cfg.val_samples)
        analyze(out=base / "analysis.partial", backbone=load_base(cfg, base / "model"),
                shards=urls, samples=samples, batch_size=min(32, samples),
                check_tokenizer=False)  # the patch tokenizer's codes (train.loaders)  # fmt: skip
        (base / "analysis.partial").rename(base / "analysis")
    start, end = json.loads(found.read_text())["suggested_range"]
    return int(start), int(end)


def base_curves(base: Path) -> dict[str, list[tuple[int, float]]]:
    return read_curves(base / "logs" / "metrics.csv")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="v2")
    parser.add_argument("--out", default="runs/mini", help="cache folder")
    parser.add_argument("--probe-every", type=int, default=0,
                        help="score the base on the validation split every N steps (0: at the end)")  # fmt: skip
    args = parser.parse_args(argv)
    build_base(MODES[args.mode](), Path(args.out), args.probe_every)


if __name__ == "__main__":
    main()
