"""DIVA-mini report: the results table (markdown + JSON), the DIVA-vs-SFT comparison and plots.

Mean and sample standard deviation over seeds per arm. The comparison with Base+SFT is paired by
seed (same seed = same data order and masks), with a paired t statistic; with n seeds a
difference is called "outside the seed noise" when |t| exceeds the two-sided 95% critical
value of Student's t with n - 1 degrees of freedom.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from benchmarks.mini.plots import plot_curves, plot_metrics, plot_samples

HEADLINE = [
    ("und_score", "Und: caption attr."),
    ("und_exact", "Und: caption exact"),
    ("mc_accuracy", "Und: multiple choice"),
    ("gen_score", "Gen: GenEval-style"),
    ("gen_exact", "Gen: image exact"),
    ("gen_object", "Gen: objects"),
]
DETAIL = [
    f"{side}_{attr}" for side in ("und", "gen") for attr in ("position", "colour", "shape", "count")
] + ["mc_colour", "mc_shape", "mc_position", "mc_count"]
T_CRITICAL_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(runs: list[dict], keys: list[str]) -> dict[str, dict]:
    """arm -> {metric: {"mean", "std", "n"}} in the order arms first appear."""
    table: dict[str, dict] = {}
    for run in runs:
        table.setdefault(run["arm"], {k: [] for k in keys})
        for key in keys:
            table[run["arm"]][key].append(run["metrics"][key])
    return {
        arm: {
            k: dict(zip(("mean", "std"), mean_std(v), strict=True), n=len(v))
            for k, v in cols.items()
        }
        for arm, cols in table.items()
    }


def paired(runs: list[dict], arm: str, reference: str, keys: list[str]) -> dict[str, dict]:
    """Per metric: paired differences ``arm - reference`` over shared seeds, t and verdict."""
    by_seed = {(r["arm"], r["seed"]): r["metrics"] for r in runs}
    seeds = sorted(s for a, s in by_seed if a == arm and (reference, s) in by_seed)
    out = {}
    for key in keys:
        diffs = [by_seed[(arm, s)][key] - by_seed[(reference, s)][key] for s in seeds]
        if not diffs:
            continue
        mean, std = mean_std(diffs)
        t = mean / (std / len(diffs) ** 0.5) if std else None
        critical = T_CRITICAL_95.get(len(diffs) - 1)
        outside = bool(t is not None and critical is not None and abs(t) > critical)
        out[key] = {"mean": mean, "std": std, "n": len(diffs), "diffs": diffs, "t": t,
                    "t_critical_95": critical, "outside_seed_noise": outside}  # fmt: skip
    return out


def _cell(stat: dict) -> str:
    if stat["std"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(table: dict, columns: list[tuple[str, str]]) -> str:
    head = "| arm | n | " + " | ".join(title for _, title in columns) + " |"
    rule = "| --- | --- |" + " --- |" * len(columns)
    rows = [
        f"| {arm} | {next(iter(stats.values()))['n']} | "
        + " | ".join(_cell(stats[key]) for key, _ in columns) + " |"
        for arm, stats in table.items()
    ]  # fmt: skip
    return "\n".join([head, rule, *rows])


def markdown_comparison(comparison: dict, columns: list[tuple[str, str]]) -> str:
    lines = ["| metric | DIVA - SFT (mean ± std) | per seed | t | outside seed noise |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, title in columns:
        c = comparison.get(key)
        if c is None:
            continue
        std = f" ± {c['std']:.3f}" if c["std"] is not None else ""
        t = f"{c['t']:.2f} (crit {c['t_critical_95']})" if c["t"] is not None else "n/a"
        seeds = ", ".join(f"{d:+.3f}" for d in c["diffs"])
        lines.append(f"| {title} | {c['mean']:+.3f}{std} | {seeds} | {t} | "
                     f"{'yes' if c['outside_seed_noise'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def markdown_arms_vs_reference(comparisons: dict, columns: list[tuple[str, str]]) -> str:
    """One row per arm: ``arm - reference`` per metric, ``*`` when outside the seed noise."""
    head = "| arm - Base+SFT | n | " + " | ".join(title for _, title in columns) + " |"
    lines = [head, "| --- | --- |" + " --- |" * len(columns)]
    for arm, comparison in comparisons.items():
        cells = []
        for key, _ in columns:
            c = comparison[key]
            std = f" ± {c['std']:.3f}" if c["std"] is not None else ""
            cells.append(f"{c['mean']:+.3f}{std}{' *' if c['outside_seed_noise'] else ''}")
        lines.append(f"| {arm} | {next(iter(comparison.values()))['n']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()} {platform.release()}"


def write_report(results: dict, out: Path, data) -> None:
    """Write ``table.md``, ``results.json`` and the plots; ``data`` is the held-out set."""
    out.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    headline_keys = [k for k, _ in HEADLINE]
    results["table"] = aggregate(runs, headline_keys + DETAIL)
    results["hardware"] = hardware()
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    if "Base+SFT" in arms:
        results["vs_sft"] = {
            arm: paired(runs, arm, "Base+SFT", headline_keys + DETAIL)
            for arm in arms
            if arm not in ("Base", "Base+SFT")
        }
        results["vs_sft"] = {arm: c for arm, c in results["vs_sft"].items() if c}
        if "Base+DIVA" in results["vs_sft"]:
            results["diva_vs_sft"] = results["vs_sft"]["Base+DIVA"]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    reused = f" ({results['reused']} of {len(runs)} runs reused)" if results.get("reused") else ""
    lines = [
        f"DIVA-mini ({results['config']['mode']} mode), {results['hardware']}, "
        f"total wall time {results['wall_s']['total'] / 60:.1f} min{reused}.\n",
        markdown_table(results["table"], HEADLINE),
        "\nPer attribute (understanding from parsed captions, generation from detected objects):\n",
        markdown_table(results["table"], [(k, k) for k in DETAIL]),
    ]
    if "diva_vs_sft" in results:
        lines += ["\nBase+DIVA vs Base+SFT, paired by seed:\n",
                  markdown_comparison(results["diva_vs_sft"], HEADLINE)]  # fmt: skip
    if len(results.get("vs_sft", {})) > 1:
        lines += ["\nEvery arm vs Base+SFT, paired by seed (* = outside the seed noise):\n",
                  markdown_arms_vs_reference(results["vs_sft"], HEADLINE)]  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot_curves(results, out / "curves.png")
    plot_metrics(results["table"], HEADLINE, out / "metrics.png")
    plot_samples(results, data.pixels, data.captions, out / "samples.png")
    print(f"results: {out / 'table.md'}, {out / 'results.json'}, plots in {out}")
