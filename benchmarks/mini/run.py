"""DIVA-mini: the paper's Table 2 protocol end to end on CPU, on the synthetic shapes world.

    make bench-mini                 # full: 8 arms x 3 seeds (83 minutes on 2 CPU cores)
    make bench-mini MODE=quick      # Base, SFT, DIVA; one seed, smaller (under 10 minutes)
    python -m benchmarks.mini.run --mode quick --out runs/mini

Steps (cached under ``OUT/base-<hash>``: tokenizer, shards, base checkpoint):
1. fit the patch tokenizer and report the detector's ceiling on reconstructed held-out images;
2. write training and validation shards with codes; pre-train the base UMM (tiny Show-o);
3. post-train every arm x seed from that base (same data, steps and trainable layers);
4. evaluate every model on the held-out set; write ``results.json``, ``table.md`` and plots.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.mini.backbone import load_base
from benchmarks.mini.config import ARMS, MODES, MiniConfig, arm_folder, config_from_json
from benchmarks.mini.data import build_tokenizer, eval_set, write_shards
from benchmarks.mini.diagnose import diagnose, gradient_table
from benchmarks.mini.evaluate import evaluate, tokenizer_ceiling
from benchmarks.mini.report import write_report
from benchmarks.mini.train import loaders, post_train, pretrain_base, read_curves, validate
from diva_lightning.stages import SFT


class Clock:
    """Wall time per phase."""

    def __init__(self):
        self.start, self.phases = time.perf_counter(), {}

    def lap(self, name: str, since: float) -> float:
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - since
        return time.perf_counter()


def prepare_base(cfg: MiniConfig, out: Path, clock: Clock) -> dict:
    """Tokenizer, shards, held-out set and base checkpoint (cached)."""
    root = out / f"base-{cfg.base_key()}"
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tokenizer, fit_stats = build_tokenizer(cfg, root / "tokenizer.pt")
    shards = write_shards(cfg, root / "shards", tokenizer)
    data = eval_set(cfg, tokenizer)
    ceiling = tokenizer_ceiling(tokenizer, data)
    t = clock.lap("data", t)
    print(f"tokenizer: {fit_stats or 'cached'}; detector on held-out ground truth: "
          f"{ceiling['ground_truth']['object']:.3f} of objects, on reconstructions: "
          f"{ceiling['reconstructed']['object']:.3f}")  # fmt: skip
    base = root / "base"
    if not base.exists():
        print(f"pre-training the base UMM ({cfg.pretrain_steps} steps) -> {base}")
        pretrain_base(cfg, shards, base)
        t = clock.lap("pretrain", t)
    pretrain_curves = read_curves(base / "logs" / "metrics.csv")
    return dict(tokenizer=tokenizer, shards=shards, data=data, ceiling=ceiling, base=base / "model",
                pretrain_curves=pretrain_curves)  # fmt: skip


def base_validation(cfg: MiniConfig, setup: dict) -> dict[str, float]:
    """Validation losses of the base on the reference loader (the curves' step 0)."""
    _, val = loaders(cfg, setup["shards"], 0, 1, cfg.post_mask)
    module = SFT(load_base(cfg, setup["base"]), middle_layers=cfg.middle_layers)
    return validate(module, cfg, val)


def finished_runs(path: Path, cfg: MiniConfig) -> dict[tuple, dict]:
    """Runs already in ``path`` (results.json) made with the same settings, by (arm, seed)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    ignore = ("mode", "arms", "seeds")
    same = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    stored = asdict(config_from_json(old["config"]))
    complete = set(stored) <= set(old["config"])  # a setting added since: not comparable
    if not complete or {k: v for k, v in stored.items() if k not in ignore} != same:
        print(f"{path}: made with other settings; not reused")
        return {}
    return {(r["arm"], r["seed"]): r for r in old["runs"]}


def run(cfg: MiniConfig, out: Path, name: str | None = None) -> dict:
    """Every (arm, seed) of ``cfg``; finished ones in ``out/name/results.json`` are reused."""
    clock = Clock()
    setup = prepare_base(cfg, out, clock)
    run_dir = out / (name or cfg.mode)
    done = finished_runs(run_dir / "results.json", cfg)
    results = {"config": asdict(cfg), "ceiling": setup["ceiling"], "runs": [], "reused": 0}
    results["pretrain_curves"] = setup["pretrain_curves"]
    results["base_val"] = base_validation(cfg, setup)
    jobs = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds if ARMS[arm]["kind"] != "base"]
    if "Base" in cfg.arms:
        jobs.insert(0, ("Base", None))  # deterministic: one checkpoint, greedy decoding
    bar = tqdm(jobs, desc="arms x seeds", unit="run")
    for arm, seed in bar:
        if (arm, seed) in done:
            results["runs"].append(done[(arm, seed)])
            results["reused"] += 1
            continue
        bar.set_postfix_str(f"{arm} seed {seed}")
        results["runs"].append(one_run(cfg, arm, seed, setup, run_dir / arm_folder(arm), clock))
        (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = {**clock.phases, "total": time.perf_counter() - clock.start}
    write_report(results, run_dir, setup["data"])
    if any(r["arm"] == "Base+DIVA" for r in results["runs"]):
        append_gradients(run_dir, diagnose(cfg, run_dir, seed=min(cfg.seeds)))
    return results


def append_gradients(run_dir: Path, gradients: dict) -> None:
    with open(run_dir / "table.md", "a") as table:
        table.write("\n" + gradient_table(gradients) + "\n")


def rerender(run_dir: Path) -> None:
    """Rewrite ``table.md`` and the plots of a finished run from its ``results.json``."""
    results = json.loads((run_dir / "results.json").read_text())
    cfg = config_from_json(results["config"])
    tokenizer, _ = build_tokenizer(cfg, run_dir.parent / f"base-{cfg.base_key()}" / "tokenizer.pt")
    write_report(results, run_dir, eval_set(cfg, tokenizer))
    if (run_dir / "gradients.json").exists():
        append_gradients(run_dir, json.loads((run_dir / "gradients.json").read_text()))


def one_run(cfg: MiniConfig, arm: str, seed, setup: dict, folder: Path, clock: Clock) -> dict:
    """Post-train (unless Base) and evaluate one arm with one seed."""
    folder = folder / f"seed{seed}"
    t, curves = time.perf_counter(), {}
    if arm == "Base":
        adapter = load_base(cfg, setup["base"])
    else:
        adapter, curves = post_train(cfg, arm, seed, setup["base"], setup["shards"], folder)
    t = clock.lap("post-train", t)
    metrics = evaluate(adapter, setup["tokenizer"], setup["data"], cfg.eval_batch, cfg.gen_steps)
    clock.lap("evaluate", t)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(metrics.pop("_pixels"), folder / "samples.pt")
    tqdm.write(f"{arm:20s} seed {seed}: und {metrics['und_score']:.3f}  mc "
               f"{metrics['mc_accuracy']:.3f}  gen {metrics['gen_score']:.3f}")  # fmt: skip
    return {"arm": arm, "seed": seed, "metrics": metrics, "curves": curves, "folder": str(folder)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--out", default="runs/mini", help="cache and results folder")
    parser.add_argument("--arms", nargs="*", help="subset of arms (default: all)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the mode's seeds")
    parser.add_argument("--name", help="results folder under --out (default: the mode)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite table.md and plots from OUT/NAME/results.json; no training")  # fmt: skip
    args = parser.parse_args(argv)
    if args.report_only:
        return rerender(Path(args.out) / (args.name or args.mode))
    cfg = MODES[args.mode]()
    if args.arms:
        unknown = [a for a in args.arms if a not in ARMS]
        if unknown:
            parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
        cfg = replace(cfg, arms=tuple(args.arms))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    results = run(cfg, Path(args.out), args.name)
    print(json.dumps(results["wall_s"], indent=1))


if __name__ == "__main__":
    main()
