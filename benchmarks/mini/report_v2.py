"""DIVA-mini v2 report: the tables, intervals and plots of the pre-registered protocol.

Reads the ``record.json`` of every run under ``OUT/<mode>/`` (no training) and writes
``OUT/<mode>/report/``: ``table.md``, ``report.json`` and the plots. Intervals:

* **paired over seeds**: for each arm minus SFT, the mean of the per-seed differences with a 95%
  Student-t interval (``n - 1`` degrees of freedom);
* **bootstrap over prompts**: per prompt, the arm's score minus SFT's, averaged over the shared
  seeds, then 1000 resamples of the prompts (percentile 95% interval, fixed seed). This is done
  for caption attributes (per-sample score) and GenEval-style overall (per-prompt correct).
  The categories hold equal numbers of prompts, so the mean of the correct flags is the overall
  score.

The SFT-vs-Base check asks whether the 95% interval of SFT minus Base (over SFT's seeds, with
the deterministic Base fixed) contains 0 for every metric.
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.mini.config import ARMS
from benchmarks.mini.data import IMAGE_SIZE, TRAIN_SEED
from benchmarks.mini.plots import plot_base, plot_curves, plot_metrics, plot_paired, plot_samples
from benchmarks.mini.report import T_CRITICAL_95, aggregate, hardware, markdown_table
from benchmarks.mini.train import read_curves
from diva_lightning.data.prepare import synthetic_world_of
from diva_lightning.evaluation.shapes.probes import CATEGORIES, geneval_prompts

HEADLINE = [
    ("und_score", "caption attr."),
    ("und_bag_score", "caption bag"),
    ("mc_accuracy", "MC one-attr."),
    ("mcb_accuracy", "MC binding"),
    ("pope_accuracy", "POPE acc."),
    ("pope_f1", "POPE F1"),
    ("gen_overall", "GenEval overall"),
    ("gen_obj_score", "Gen attr."),
]
PER_CATEGORY = [(f"gen_{c}", c) for c in CATEGORIES]
CAPTION_ATTRIBUTES = ("position", "colour", "shape", "size", "count")
BOOTSTRAP = {"und_score": "caption_score", "gen_overall": "geneval_correct"}


def load_records(phase_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(phase_dir.glob("*/seed*/record.json"))]


def t_interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval of ``values``."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(values)}
    half = T_CRITICAL_95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def paired_vs(records: list[dict], arm: str, reference: str, keys) -> dict[str, dict]:
    by = {(r["arm"], r["seed"]): r["metrics"] for r in records}
    seeds = sorted(s for a, s in by if a == arm and (reference, s) in by)
    if not seeds:
        return {}
    return {k: t_interval([by[(arm, s)][k] - by[(reference, s)][k] for s in seeds]) for k in keys}


def bootstrap_vs(records, arm, reference, resamples=1000, seed=0) -> dict[str, dict]:
    """Percentile 95% interval of the per-prompt difference ``arm - reference``."""
    by = {(r["arm"], r["seed"]): r["metrics"]["per_prompt"] for r in records}
    seeds = sorted(s for a, s in by if a == arm and (reference, s) in by)
    rng, out = np.random.default_rng(seed), {}
    for key, rows in BOOTSTRAP.items():
        if not seeds:
            continue
        diff = np.mean([np.asarray(by[(arm, s)][rows], float)
                        - np.asarray(by[(reference, s)][rows], float) for s in seeds], axis=0)  # fmt: skip
        means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
        low, high = np.percentile(means, [2.5, 97.5])
        out[key] = {"mean": float(diff.mean()), "low": float(low), "high": float(high),
                    "prompts": len(diff)}  # fmt: skip
    return out


def _interval(c: dict) -> str:
    if c.get("low") is None:
        return f"{c['mean']:+.3f}"
    star = " *" if c["low"] > 0 or c["high"] < 0 else ""
    return f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{star}"


def comparison_table(comparisons: dict, columns, title: str) -> str:
    lines = [f"| {title} | " + " | ".join(t for _, t in columns) + " |",
             "| --- |" + " --- |" * len(columns)]  # fmt: skip
    for arm, comp in comparisons.items():
        cells = [_interval(comp[k]) if k in comp else "" for k, _ in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def balance_table(records: list[dict]) -> str:
    """Per arm, the mean over seeds of the GradientBalance summary: norms, cos with native, and
    cos(und, gen), the two flows' conflict on the trained blocks (the paper's Fig. 2 premise)."""
    rows: dict[str, list[dict]] = {}
    for r in records:
        if r.get("balance"):
            rows.setdefault(r["arm"], []).append(r["balance"]["summary"])
    terms = sorted({k.removeprefix("norm/") for s in rows.values() for x in s for k in x
                    if k.startswith("norm/")} - {"total"})  # fmt: skip
    head = "| arm | " + " | ".join(f"norm {t}" for t in terms)
    head += " | " + " | ".join(f"cos({t}, native)" for t in terms if t != "native")
    head += " | cos(und, gen) |"
    lines = [head, "| --- |" + " --- |" * (2 * len(terms))]
    for arm, summaries in rows.items():
        mean = partial(_mean_of, summaries)

        def cos(t, mean=mean, summaries=summaries):
            key = f"cos/{t}__native"
            return mean(key if any(key in s for s in summaries) else f"cos/native__{t}")

        cells = [mean(f"norm/{t}") for t in terms] + [cos(t) for t in terms if t != "native"]
        cells.append(mean("cos/und__gen"))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_of(summaries: list[dict], key: str) -> str:
    values = [s[key] for s in summaries if key in s and s[key] == s[key]]  # NaN: not measured
    return f"{statistics.fmean(values):.4f}" if values else "-"


def write_v2_report(root: Path, cfg) -> dict:
    """``table.md``, ``report.json`` and plots under ``root/report`` from the phases' records."""
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in HEADLINE + PER_CATEGORY]
    report: dict = {"hardware": hardware(), "mode": cfg.mode}
    lines = [f"DIVA-mini v2 ({cfg.mode}), {report['hardware']}.\n"]
    lines += base_section(root.parent / f"base-{cfg.base_key()}" / "base", out, report)
    check = load_records(root / "sft-check")
    if check:
        base = next(r for r in check if r["arm"] == "Base")
        sft = [r for r in check if r["arm"] == "Base+SFT"]
        diffs = {k: t_interval([r["metrics"][k] - base["metrics"][k] for r in sft]) for k in keys}
        report["sft_check"] = diffs
        lines += ["SFT-vs-Base check (val split, default proportions; 95% t interval of SFT - "
                  "Base over seeds, * = excludes 0):\n",
                  comparison_table({"Base+SFT - Base": diffs}, HEADLINE + PER_CATEGORY, "")]  # fmt: skip
    quick = load_records(root / "quick")
    if quick:
        report["quick"] = aggregate(quick, keys)
        lines += ["\nQuick mode (val split, default proportions, one seed; an indication):\n",
                  markdown_table(report["quick"], HEADLINE),
                  "\n", markdown_table(report["quick"], PER_CATEGORY)]  # fmt: skip
    grid = load_grid(root / "grid")
    if grid:
        report["grid"] = {r["arm"]: r["metrics"] for r in grid}
        lines += ["\nGrid (val split, seed 0):\n", markdown_table(aggregate(grid, keys), HEADLINE)]
    final = load_records(root / "final")
    if final:
        table = aggregate(final, keys)
        arms = [a for a in table if a not in ("Base", "Base+SFT")]
        paired = {a: paired_vs(final, a, "Base+SFT", keys) for a in arms}
        boot = {a: bootstrap_vs(final, a, "Base+SFT") for a in arms}
        report.update(table=table, paired=paired, bootstrap=boot)
        lines += ["\nFinal runs (eval split), mean ± std over seeds:\n",
                  markdown_table(table, HEADLINE),
                  "\nGenEval-style categories:\n", markdown_table(table, PER_CATEGORY),
                  "\nArm - SFT, paired over seeds, 95% t interval (* = excludes 0):\n",
                  comparison_table(paired, HEADLINE, "arm - SFT"),
                  "\nGenEval-style categories, arm - SFT, paired over seeds, 95% t interval:\n",
                  comparison_table(paired, PER_CATEGORY, "arm - SFT"),
                  "\nArm - SFT, bootstrap over prompts, 95% interval:\n",
                  comparison_table(boot, [(k, k) for k in BOOTSTRAP], "arm - SFT"),
                  "\nGradient balance (mean over measured steps and seeds):\n",
                  balance_table(final),
                  "\nWhat each arm trains with (the selected setting, then the arm's own change):\n",
                  settings_table(final, cfg),
                  "\nWall time per run (minutes; ! = over 1.5x its arm's median, i.e. contended):\n",
                  timing_table(final)]  # fmt: skip
        results = {"runs": final, "base_val": _base_val(final)}
        if results["base_val"]:
            plot_curves(results, out / "curves.png")
        plot_metrics(table, HEADLINE, out / "metrics.png")
        plot_paired(paired, HEADLINE, out / "paired.png")
        prompts = geneval_prompts(synthetic_world_of("v2", IMAGE_SIZE, TRAIN_SEED),
                                  cfg.geneval_per_category, "eval")[:16]  # fmt: skip
        world = synthetic_world_of("v2", IMAGE_SIZE, TRAIN_SEED)
        truth = torch.stack([torch.from_numpy(np.asarray(world.render(o))).permute(2, 0, 1)
                             for _, o, _ in prompts]).float() / 255  # fmt: skip
        runs = {"runs": final, "config": {"seeds": list(cfg.seeds)}}
        plot_samples(runs, truth, [p for p, _, _ in prompts], out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'table.md'}")
    return report


def base_section(base: Path, out: Path, report: dict) -> list[str]:
    """The base's convergence evidence: the plateau rule, the probes and their plot."""
    if not (base / "plateau.json").exists():
        return []
    verdict = json.loads((base / "plateau.json").read_text())
    probes_path = base / "probes.json"
    probes = json.loads(probes_path.read_text()) if probes_path.exists() else []
    for p in probes:  # the 5-attribute caption score, whichever version of the code probed
        if "und_size" in p:
            p["und_score"] = statistics.fmean(p[f"und_{a}"] for a in CAPTION_ATTRIBUTES)
    facts = json.loads((base / "facts.json").read_text()) if (base / "facts.json").exists() else {}
    report["base"] = {"plateau": verdict, "probes": probes, **facts}
    plot_base(read_curves(base / "logs" / "metrics.csv"), probes, out / "base.png")
    lines = ["Base pre-training: relative gain of the validation loss over the last 20% of steps "
             "(the plateau rule: < 1%): " + ", ".join(
                 f"{k} {v['relative_gain']:+.2%} ({'plateaued' if v['plateaued'] else 'NOT'})"
                 for k, v in verdict.items())]  # fmt: skip
    if facts.get("wall_s"):
        lines[-1] += f"; {facts['wall_s'] / 60:.0f} min with its probes."
    keys = ["und_score", "mc_accuracy", "mcb_accuracy", "pope_accuracy", "gen_overall"]
    lines += ["\n| step | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for p in probes:
        lines.append(f"| {p['step']} | " + " | ".join(f"{p.get(k, float('nan')):.3f}" for k in keys)
                     + " |")  # fmt: skip
    return lines + [""]


GRID_SUMMARY = "grid_val.json"  # one row of metrics per point (docs/mini/v2/grid/)


def load_grid(grid_dir: Path) -> list[dict]:
    """The grid's records keyed by their point (folder) rather than their arm; where only the
    grid's summary was kept (``grid_val.json``, its runs' records being gone), rows built from
    that summary."""
    records = load_records(grid_dir)
    if records or not (grid_dir / GRID_SUMMARY).exists():
        return [{**r, "arm": Path(r["folder"]).parent.name} for r in records]
    rows = json.loads((grid_dir / GRID_SUMMARY).read_text())
    meta = ("point", "arm", "overrides", "train_s")
    return [{"arm": r["point"], "metrics": {k: v for k, v in r.items() if k not in meta}}
            for r in rows]  # fmt: skip


def _base_val(records: list[dict]) -> dict | None:
    return next((r["base_val"] for r in records if r.get("base_val")), None)


SETTING_NAMES = {"lambda_sha": "λ_sha", "lambda_uni": "λ_uni", "tau": "τ", "post_lr": "lr",
                 "post_steps": "steps", "post_warmup": "warm-up"}  # fmt: skip


def effective_setting(record: dict, cfg) -> dict:
    """What a run trained with: its ``overrides`` (the family's selected setting, which the
    ablations' log lines print) with the arm's own ``ARMS`` change applied on top, as
    ``train.stage2_module`` and ``stage1_module`` do."""
    spec = ARMS[record["arm"]]
    if spec["kind"] == "base":
        return {}
    setting = {SETTING_NAMES.get(k, k): v for k, v in record["overrides"].items()}
    if spec["kind"] == "diva":
        setting["targets"] = cfg.targets
    for part in ("stage2", "stage1", "data"):
        setting.update({SETTING_NAMES.get(k, k): v for k, v in spec.get(part, {}).items()})
    return setting


def settings_table(records: list[dict], cfg) -> str:
    rows = {r["arm"]: effective_setting(r, cfg) for r in records}
    lines = ["| arm | trained with |", "| --- | --- |"]
    for arm, setting in rows.items():
        text = ", ".join(f"{k} {v}" for k, v in setting.items()) or "no post-training"
        lines.append(f"| {arm} | {text} |")
    return "\n".join(lines)


def timing_table(records: list[dict]) -> str:
    """Per arm: post-training and total (with evaluation) minutes per seed, contended runs
    marked; the last line sums the recorded times and an uncontended estimate (arm medians)."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["arm"], []).append(r)
    lines = ["| arm | train, per seed | total, per seed |", "| --- | --- | --- |"]
    recorded = estimate = 0.0
    for arm, runs in by.items():
        cells = []
        for key in ("train_s", "total_s"):
            median = statistics.median(r[key] for r in runs)
            cells.append(" ".join(f"{r[key] / 60:.1f}" + ("!" if r[key] > 1.5 * median else "")
                                  for r in runs))  # fmt: skip
        recorded += sum(r["total_s"] for r in runs)
        estimate += len(runs) * statistics.median(r["total_s"] for r in runs)
        lines.append(f"| {arm} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + (f"\n\n{len(records)} runs: {recorded / 60:.0f} min recorded, "
                               f"{estimate / 60:.0f} min at each arm's median.")  # fmt: skip
