"""DIVA-mini v2: the pre-registered protocol (``README.md``), phase by phase, resumable.

    python -m benchmarks.mini.base --mode v2                # the cached, converged base
    python -m benchmarks.mini.protocol sft-check --mode v2  # SFT vs Base, 3 seeds, val split
    python -m benchmarks.mini.protocol grid --mode v2       # 12 configurations, seed 0, val
    python -m benchmarks.mini.protocol select --mode v2     # -> selection.json
    python -m benchmarks.mini.protocol final --mode v2      # selected settings, eval split
    python -m benchmarks.mini.protocol report --mode v2     # table.md and plots, no training
    python -m benchmarks.mini.protocol quick                # own small base, Base/SFT/DIVA, val

Every run writes ``OUT/<mode>/<phase>/<point>/seed<k>/``: ``record.json`` (its metrics, curves
and gradient-balance summary), ``model/`` (the final weights, which are the EMA weights) and
``samples.pt``. A run whose ``record.json`` exists is not run again, so a phase can be spread
over several sessions, arm by arm (``--arms``, ``--seeds``). ``evaluate`` scores any saved model
again: ``python -m benchmarks.mini.protocol evaluate --mode v2 --model PATH --split val``.

**How the evaluation split stays unseen.** ``sft-check``, ``grid`` and ``select`` build only
the ``val`` split's evaluation set. ``final`` is the only phase that builds the ``eval`` split's,
and it refuses to run before ``selection.json`` exists. Its settings come from that file alone.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.mini.backbone import load_base
from benchmarks.mini.base import build_base
from benchmarks.mini.config import ARMS, MODES, V2_ABLATIONS, V2_HEADLINE, MiniConfig, arm_folder
from benchmarks.mini.data import eval_set
from benchmarks.mini.evaluate import evaluate
from benchmarks.mini.grid import grid_points, select
from benchmarks.mini.report_v2 import write_v2_report
from benchmarks.mini.run import base_validation
from benchmarks.mini.train import post_train


def run_point(cfg: MiniConfig, setup: dict, data, arm: str, seed, overrides: dict, folder: Path):
    """Post-train ``arm`` with ``overrides`` (MiniConfig fields) and evaluate it -> record."""
    folder = folder / f"seed{seed}"
    done = folder / "record.json"
    if done.exists():
        return json.loads(done.read_text())
    run_cfg = replace(cfg, **overrides)
    start, curves = time.perf_counter(), {}
    base_val = None
    if arm == "Base":
        adapter, base_val = load_base(cfg, setup["base"]), base_validation(cfg, setup)
    else:
        stage1_root = setup["root"] / f"stage1-{cfg.mode}"
        adapter, curves = post_train(run_cfg, arm, seed, setup["base"], setup["shards"], folder,
                                     stage1_root=stage1_root)  # fmt: skip
    trained = time.perf_counter() - start
    metrics = evaluate(adapter, setup["tokenizer"], data, cfg.eval_batch, cfg.gen_steps)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(metrics.pop("_pixels"), folder / "samples.pt")
    if arm != "Base":
        adapter.save_pretrained(folder / "model")
    balance = folder / "gradient_balance.json"
    record = {
        "arm": arm, "seed": seed, "overrides": overrides, "metrics": metrics, "curves": curves,
        "base_val": base_val,
        "balance": json.loads(balance.read_text()) if balance.exists() else None,
        "folder": str(folder), "train_s": trained, "total_s": time.perf_counter() - start,
    }  # fmt: skip
    partial = folder / "record.json.partial"
    partial.write_text(json.dumps(record, indent=1))
    partial.rename(done)
    tqdm.write(f"{arm:28s} seed {seed} {overrides}: und {metrics['und_score']:.3f}  gen "
               f"{metrics['gen_overall']:.3f}  ({record['total_s'] / 60:.1f} min)")  # fmt: skip
    return record


def run_all(cfg, setup, data, jobs, phase_dir: Path) -> list[dict]:
    """``jobs``: [(point name, arm, seed, overrides)] -> records, in order."""
    records = []
    for point, arm, seed, overrides in tqdm(jobs, desc=phase_dir.name, unit="run"):
        folder = phase_dir / arm_folder(point)
        records.append(run_point(cfg, setup, data, arm, seed, overrides, folder))
    return records


def selection(phase_root: Path) -> dict:
    path = phase_root / "selection.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the grid and `select` first; the final "
                         "phase reads the evaluation split only with a selection fixed before")  # fmt: skip
    return json.loads(path.read_text())


def final_jobs(cfg: MiniConfig, chosen: dict, arms, seeds) -> list[tuple]:
    """The final runs: headline arms with 5 seeds, ablations with 3, at the selected settings."""
    setting = {
        "Base+SFT": chosen["SFT"]["overrides"],
        "Base+DIVA": chosen["DIVA (EMA targets)"]["overrides"],
        "Base+DIVA (online targets)": chosen["DIVA (online targets)"]["overrides"],
    }
    jobs = [("Base", "Base", None, {})] if "Base" in arms else []
    for arm in arms:
        if arm == "Base":
            continue
        n = len(cfg.seeds) if arm in V2_HEADLINE else min(3, len(cfg.seeds))
        overrides = setting.get(arm, setting["Base+DIVA"])  # ablations: DIVA-EMA's setting
        jobs += [(arm, arm, seed, overrides) for seed in (seeds or cfg.seeds[:n])]
    return jobs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("quick", "sft-check", "grid", "select", "final",
                                          "report", "evaluate"))  # fmt: skip
    parser.add_argument("--mode", choices=[m for m in MODES if m.startswith("v2")],
                        help="default: v2-quick for the quick phase, v2 otherwise")  # fmt: skip
    parser.add_argument("--out", default="runs/mini")
    parser.add_argument("--arms", nargs="*", help="final: a subset of the arms")
    parser.add_argument("--seeds", type=int, nargs="*", help="final / sft-check: these seeds")
    parser.add_argument("--model", help="evaluate: a saved model folder")
    parser.add_argument("--split", choices=("val", "eval"), default="val")
    parser.add_argument("--output", help="evaluate: also write the scores to this new JSON file")
    args = parser.parse_args(argv)
    if args.phase == "evaluate":  # before any compute
        if not args.model or not Path(args.model).is_dir():
            parser.error(f"evaluate needs --model, a saved model folder; got {args.model!r}")
        if args.output and Path(args.output).exists():
            parser.error(f"--output {args.output} exists; choose a new file")
    cfg = MODES[args.mode or ("v2-quick" if args.phase == "quick" else "v2")]()
    root = Path(args.out) / cfg.mode
    if args.phase == "select":
        return print(json.dumps(select(root / "grid", cfg), indent=1))
    if args.phase == "report":
        return write_v2_report(root, cfg)
    chosen = selection(root / "grid") if args.phase == "final" else None  # before any compute
    setup = build_base(cfg, Path(args.out))
    cfg = replace(cfg, middle_layers=setup["middle_layers"])  # the analysis rule's range
    if args.phase == "evaluate":
        data = eval_set(cfg, setup["tokenizer"], split=args.split)
        scores = evaluate(load_base(cfg, args.model), setup["tokenizer"], data, cfg.eval_batch,
                          cfg.gen_steps)  # fmt: skip
        text = json.dumps({k: v for k, v in scores.items() if isinstance(v, float)}, indent=1)
        if args.output:
            partial = Path(args.output + ".partial")
            partial.write_text(text + "\n")
            partial.rename(args.output)
        return print(text)
    if args.phase == "final":
        arms = args.arms or (*V2_HEADLINE, *V2_ABLATIONS)
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
        data = eval_set(cfg, setup["tokenizer"], split="eval")  # the only reader of "eval"
        run_all(cfg, setup, data, final_jobs(cfg, chosen, arms, args.seeds), root / "final")
        return
    data = eval_set(cfg, setup["tokenizer"], split="val")
    if args.phase == "grid":
        jobs = [("Base", "Base", None, {})]
        jobs += [(name, arm, 0, overrides) for name, _, arm, overrides in grid_points(cfg)]
        run_all(cfg, setup, data, jobs, root / "grid")
    elif args.phase == "quick":  # an indication on the val split, not the reported result
        jobs = [("Base", "Base", None, {})]
        jobs += [(arm, arm, seed, {}) for arm in cfg.arms if arm != "Base" for seed in cfg.seeds]
        run_all(cfg, setup, data, jobs, root / "quick")
        write_v2_report(root, cfg)
    else:  # sft-check: the default proportions, before any tuning
        seeds = args.seeds or [0, 1, 2]
        jobs = [("Base", "Base", None, {})] + [("Base+SFT", "Base+SFT", s, {}) for s in seeds]
        run_all(cfg, setup, data, jobs, root / "sft-check")


if __name__ == "__main__":
    main()
