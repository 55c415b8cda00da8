"""DIVA-mini plots: validation curves of both flows per arm (paper Fig. 6 style), the headline
metrics with seed spread, and generated samples next to the ground truth."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# 20 distinct colours, the ten dark ones first, so that up to 20 arms never share one
_TAB20 = plt.get_cmap("tab20").colors
COLOURS = _TAB20[::2] + _TAB20[1::2]
FLOWS = [
    ("val/loss_und", "understanding (caption) loss"),
    ("val/loss_gen", "generation (inpainting) loss"),
]


def _arm_curves(results: dict, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """arm -> (steps, values (seeds, steps)), the base's validation as step 0."""
    grouped: dict[str, list] = {}
    for run in results["runs"]:
        points = run["curves"].get(name) if run["curves"] else None
        if points:
            grouped.setdefault(run["arm"], []).append([(0, results["base_val"][name]), *points])
    out = {}
    for arm, seeds in grouped.items():
        length = min(len(s) for s in seeds)
        steps = np.array([p[0] for p in seeds[0][:length]])
        out[arm] = (steps, np.array([[p[1] for p in s[:length]] for s in seeds]))
    return out


def plot_curves(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {}
    for ax, (name, title) in zip(axes[:2], FLOWS, strict=True):
        for arm, (steps, values) in _arm_curves(results, name).items():
            colour = colours.setdefault(arm, COLOURS[len(colours) % len(COLOURS)])
            (line,) = ax.plot(steps, values.mean(0), label=arm, color=colour)
            if len(values) > 1:
                ax.fill_between(
                    steps, values.min(0), values.max(0), alpha=0.15, color=line.get_color()
                )
        ax.axhline(results["base_val"][name], color="grey", linestyle="--", label="Base")
        ax.set(title=f"validation {title}", xlabel="post-training step", ylabel="loss")
    for run in results["runs"]:
        curves = run["curves"]
        if curves and curves.get("val/loss_und") and curves.get("val/loss_gen"):
            x, y = curves["val/loss_und"][-1][1], curves["val/loss_gen"][-1][1]
            axes[2].scatter(x, y, color=colours.get(run["arm"]), s=25)
    axes[2].scatter(results["base_val"]["val/loss_und"], results["base_val"]["val/loss_gen"],
                    color="grey", marker="x", s=50)  # fmt: skip
    axes[2].set(title="final losses, one point per seed (x: Base)", xlabel="understanding loss",
                ylabel="generation loss")  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metrics(table: dict, columns: list[tuple[str, str]], path: Path) -> None:
    arms = list(table)
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(arms)
    x = np.arange(len(columns))
    for i, arm in enumerate(arms):
        means = [table[arm][k]["mean"] for k, _ in columns]
        stds = [table[arm][k]["std"] or 0.0 for k, _ in columns]
        ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=arm,
               color=COLOURS[i % len(COLOURS)])  # fmt: skip
    ax.set_xticks(x + 0.4 - width / 2, [title for _, title in columns], fontsize=8)
    ax.set(
        ylabel="score (higher is better)",
        ylim=(0, 1.05),
        title="held-out metrics, mean ± std over seeds",
    )
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(paired: dict, columns: list[tuple[str, str]], path: Path) -> None:
    """One panel per metric: each arm minus SFT, the mean of the paired per-seed differences
    with its 95% t interval (``report_v2.paired_vs``); filled where the interval excludes 0."""
    arms = list(paired)
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 0.35 * len(arms) + 1.4),
                             sharey=True)  # fmt: skip
    y = np.arange(len(arms))[::-1]
    for ax, (key, title) in zip(np.atleast_1d(axes), columns, strict=True):
        for yi, arm in zip(y, arms, strict=True):
            c = paired[arm].get(key)
            if c is None or c.get("low") is None:
                continue
            off = c["low"] > 0 or c["high"] < 0
            ax.errorbar(c["mean"], yi, xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]],
                        fmt="o", mfc="C3" if off else "white", color="C3" if off else "C0",
                        capsize=2, ms=4)  # fmt: skip
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_yticks(y, arms, fontsize=8)
    fig.suptitle("arm - SFT, paired over seeds, 95% t interval (filled: excludes 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(results: dict, truth, captions, path: Path, columns: int = 8) -> None:
    """Generated images of the first held-out captions: ground truth, then one row per arm
    (its first seed)."""
    rows = [r for r in results["runs"] if r["seed"] in (None, min(results["config"]["seeds"]))]
    grid = [("ground truth", truth)]
    grid += [(r["arm"], torch.load(Path(r["folder"]) / "samples.pt")) for r in rows]
    columns = min(columns, len(truth), *(len(p) for _, p in grid))
    fig, axes = plt.subplots(
        len(grid), columns, figsize=(1.6 * columns, 1.7 * len(grid)), squeeze=False
    )
    for r, (name, pixels) in enumerate(grid):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(pixels[c].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(
                    captions[c].replace(" and ", "\nand ").replace(", ", ",\n"), fontsize=5
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_base(curves: dict, probes: list[dict], path: Path, fraction: float = 0.2) -> None:
    """The base's pre-training: both flows' validation losses (the plateau rule's window
    shaded) and the probed metrics on the validation split (the 0.4-0.8 calibration band)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, title) in zip(axes[:2], FLOWS, strict=True):
        steps, values = zip(*curves[name], strict=True)
        ax.plot(steps, values)
        ax.axvspan((1 - fraction) * steps[-1], steps[-1], alpha=0.15, color="grey",
                   label="plateau-rule window")  # fmt: skip
        ax.set(title=f"validation {title}", xlabel="pre-training step", ylabel="loss")
        ax.legend(fontsize=8)
    metrics = [("und_score", "caption attributes"), ("mcb_accuracy", "MC binding"),
               ("pope_accuracy", "POPE accuracy"), ("gen_overall", "GenEval-style overall")]  # fmt: skip
    rows = [p for p in probes if "error" not in p]
    for key, label in metrics:
        points = [(p["step"], p[key]) for p in rows if key in p]
        if points:
            axes[2].plot(*zip(*points, strict=True), marker="o", label=label)
    axes[2].axhspan(0.4, 0.8, alpha=0.1, color="green", label="calibration band")
    axes[2].set(title="probes on the validation split", xlabel="pre-training step",
                ylabel="score", ylim=(0, 1))  # fmt: skip
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
